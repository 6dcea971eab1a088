"""How much does DRR cost against one plain inference pass? (issue 18, point 1)

For each model, in one process and in this order, on the same N training images:
  (a) floor    one plain jitted inference pass (`inference.predict`), after a warm-up
               batch that compiles the program (its compile seconds are listed apart);
  (b) default  `drr_jax.defend` with the defaults;
  (c) paper    `defend` with `drr_jax.defenses.paper_config()` (Algorithm 1 as written).
(b) and (c) include their own XLA compiles, as a user's call does.

Each `defend` is split into phases by wrapping, from here, the functions the layer loop
calls (nothing in drr_jax is edited; the wrappers are removed afterwards):
  features      `Run.extract`: feature passes over the images
  search        `stiefel.maximize` / `maximize_stacked`: the Stiefel ascent
  confirmation  `Confirmer.check` / `check_residual` / `base` / `rows`: the predictions
                of trial networks on the confirmation images
  folding       `Removal.project`: folding a direction into the weights (and the mean
                shift traced through the network on a few probe images)
  other         the rest: layer plan, site search, candidate tails on the host, report
A call nested inside another wrapped call counts in the outer one only. The wrappers wait
for a phase's device work (`jax.block_until_ready`), so a phase's seconds are its own;
that also removes a little overlap of host and device work, so a wrapped total can be
slightly longer than an unwrapped one.

Peak memory: the resident set size sampled every 10 ms during each run (psutil, if
installed), and the process's peak `ru_maxrss` at the end. `features MB` is the size of
one pass's pooled features, N x (sum of the visited units' widths) x 4 bytes: the bound
that issue 18 sets for the peak.

  DRR_DATA_DIR=../shared/data .venv/bin/python benchmarks/defend_bench.py
  .venv/bin/python benchmarks/defend_bench.py --n 5000 --models random:resnet18@1.0 \
      --json /tmp/defend_bench.json

Models (--models): a checkpoint folder (its poisoned training set is rebuilt from its
config, from $DRR_DATA_DIR), or random:NAME@WIDTH, a drr_jax model with random weights
on the clean CIFAR-10 training split (95 %, as the presets hold out 5 %); NAME may also
be a Flax module's import path, as `launch.defend --model` takes it
(random:tests/tiny_net.py:TinyNet). --synthetic
uses random uint8 images instead of CIFAR-10 (for tests; the figures then mean little).
Timings taken while other jobs run are not the machine's figures: take the full table
on a quiet machine.

Scaling (--devices 1 2 4 8): the runs again in one subprocess per device count, each
started with XLA_FLAGS=--xla_force_host_platform_device_count=D (D virtual CPU devices;
it must be set before JAX starts) and DRR_NUM_DEVICES=D (the first D devices, for a
machine with several real ones); prints the seconds of each run per device count, the
speed-up over the first count, and the directions kept (the same for every count).
  .venv/bin/python benchmarks/defend_bench.py --n 2000 --models random:resnet18@0.25 \
      --devices 1 2 4 8
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
  sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from drr_jax import checkpoint, data, inference, sharding, stiefel, utils  # noqa: E402
from drr_jax.defenses import default_config, defend, paper_config  # noqa: E402
from drr_jax.defenses.drr.confirmation import Confirmer  # noqa: E402
from drr_jax.defenses.drr.removal import Removal  # noqa: E402
from drr_jax.defenses.drr.state import Run  # noqa: E402

DEFAULT_MODELS = ("artifacts/wrn28_1-badnets-cpu",
                  "artifacts/checkpoints/dev-r18-badnets3-br-t0-p10",
                  "random:resnet18@1.0")
MODES = ("floor", "default", "paper")
PHASES = ("features", "search", "confirmation", "folding")

try:
  import psutil
except ImportError:  # optional: ru_maxrss alone then
  psutil = None


# ------------------------------------------------------------------ phase timers


class Phases:
  """Seconds and calls per phase; a call inside another timed call counts in the outer."""

  def __init__(self):
    self.seconds = {p: 0.0 for p in PHASES}
    self.calls = {p: 0 for p in PHASES}
    self.predicted = 0  # images predicted by inference.predict inside defend
    self._active: str | None = None

  def wrap(self, phase: str, fn: Callable, block: bool = False) -> Callable:
    @functools.wraps(fn)
    def timed(*args, **kwargs):
      if self._active is not None:
        return fn(*args, **kwargs)
      self._active = phase
      t0 = time.perf_counter()
      try:
        out = fn(*args, **kwargs)
        return jax.block_until_ready(out) if block else out
      finally:
        self.seconds[phase] += time.perf_counter() - t0
        self.calls[phase] += 1
        self._active = None
    return timed

  def count_predict(self, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def counted(model, variables, images, *args, **kwargs):
      self.predicted += len(images)
      return fn(model, variables, images, *args, **kwargs)
    return counted


@contextlib.contextmanager
def instrumented(phases: Phases):
  """Wraps the functions the DRR loop calls (at the attributes it looks them up by);
  puts the originals back on exit."""
  targets = [
      (Run, "extract", "features", False),
      (stiefel, "maximize", "search", True),
      (stiefel, "maximize_stacked", "search", True),
      (Confirmer, "check", "confirmation", False),
      (Confirmer, "check_residual", "confirmation", False),
      (Confirmer, "base", "confirmation", False),
      (Confirmer, "rows", "confirmation", False),
      (Removal, "project", "folding", True),
  ]
  saved = [(owner, name, owner.__dict__[name]) for owner, name, _, _ in targets]
  saved.append((inference, "predict", inference.predict))
  try:
    for owner, name, phase, block in targets:
      setattr(owner, name, phases.wrap(phase, owner.__dict__[name], block))
    inference.predict = phases.count_predict(inference.predict)
    yield phases
  finally:
    for owner, name, original in saved:
      setattr(owner, name, original)


# ------------------------------------------------------------------ memory


def rss_mb() -> float | None:
  return psutil.Process().memory_info().rss / 2**20 if psutil is not None else None


def maxrss_mb() -> float:
  # Linux reports kilobytes, macOS bytes
  scale = 1 if platform.system() == "Darwin" else 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


class PeakRss:
  """The largest resident set size seen (every `interval` s) while the block runs."""

  def __init__(self, interval: float = 0.01):
    self.interval, self.peak, self.start = interval, None, None
    self._stop = threading.Event()

  def _sample(self):
    proc = psutil.Process()
    while not self._stop.is_set():
      self.peak = max(self.peak, proc.memory_info().rss / 2**20)
      self._stop.wait(self.interval)

  def __enter__(self):
    if psutil is not None:
      self.start = self.peak = rss_mb()
      self._thread = threading.Thread(target=self._sample, daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc):
    if psutil is not None:
      self._stop.set()
      self._thread.join()
      self.peak = max(self.peak, rss_mb())


# ------------------------------------------------------------------ models and images


def _subset(images: np.ndarray, n: int) -> np.ndarray:
  if n >= len(images):
    return images
  idx = np.sort(np.random.default_rng(0).choice(len(images), n, replace=False))
  return images[idx]


def load(spec: str, n: int, synthetic: bool) -> dict[str, Any]:
  """{'label', 'model', 'variables', 'images', 'source'} for a --models entry."""
  if spec.startswith("random:"):
    name, _, width = spec[len("random:"):].partition("@")
    if ":" in name:  # a user's Flax module by import path, as launch.defend --model
      from drr_jax import assets
      model, label = assets.load_model_spec(name), f"{name.rpartition(':')[2]} (random)"
    else:
      from drr_jax.models import get_model
      model = get_model(name, width=float(width or 1.0))
      label = f"{name} x{float(width or 1.0):g} (random)"
    variables = dict(model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.uint8)))
    images, source = None, "CIFAR-10 train (clean, 95 %)"
    if not synthetic:
      full = data.load_split("train")
      images = data.holdout_split(full, 0.05, 0)[0].images
  else:
    model, variables, meta, record = checkpoint.load_model(spec)
    mcfg = meta["config"]["model"]
    label = f"{Path(spec).name} ({mcfg['name']} x{mcfg.get('width', 1.0):g})"
    images, source = None, "its poisoned training set"
    if not synthetic:
      from drr_jax import adversary, datasets
      # IAB's poisoned set exists only as training made it: from the attack record
      images = datasets.load(meta["config"], None, test=False, record=record,
                             attacker_model=adversary.beside(spec)).train.images
  if synthetic:
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    source = "synthetic uint8 noise"
  images = _subset(np.asarray(images), n)
  return {"label": label, "spec": spec, "model": model, "variables": variables,
          "images": images, "source": source}


# ------------------------------------------------------------------ the three runs


def floor(model, variables, images, batch_size: int, progress: bool) -> dict[str, Any]:
  """One plain jitted inference pass, after a warm-up batch that compiles it."""
  warm = images[:min(batch_size, len(images))]
  t0 = time.perf_counter()
  inference.predict(model, variables, warm, batch_size, progress=False)
  compile_s = time.perf_counter() - t0
  with PeakRss() as mem:
    t0 = time.perf_counter()
    inference.predict(model, variables, images, batch_size, progress=progress,
                      desc="floor: predict")
    seconds = time.perf_counter() - t0
  return {"seconds": seconds, "compile_s": compile_s, "images_per_s": len(images) / seconds,
          "peak_rss_mb": mem.peak, "rss_before_mb": mem.start}


def run_defend(model, variables, images, config: dict[str, Any], progress: bool
               ) -> dict[str, Any]:
  phases = Phases()
  with instrumented(phases), PeakRss() as mem:
    t0 = time.perf_counter()
    defended, report = defend(model, variables, images, config=config, progress=progress)
    seconds = time.perf_counter() - t0
  split = dict(phases.seconds)
  split["other"] = max(seconds - sum(split.values()), 0.0)
  widths = [e["channels"] for e in report["layers"]]
  first = {e["layer"]: e["channels"] for e in report["layers"]}  # each unit once
  return {"seconds": seconds, "images_per_s": len(images) / seconds, "phases": split,
          "calls": dict(phases.calls), "predicted_images": phases.predicted,
          "feature_passes": report["feature_passes"],
          "directions_kept": report["directions_kept"],
          "layers_projected": report["layers_projected"], "units": len(first),
          "layer_visits": len(widths),
          "features_mb": len(images) * sum(first.values()) * 4 / 2**20,
          "peak_rss_mb": mem.peak, "rss_before_mb": mem.start,
          "_variables": defended, "_report": report}


def save_decisions(folder: str, spec: str, mode: str, run: dict[str, Any]) -> None:
  """<folder>/<model>.<mode>.npz: the defended variables (flattened, float32) and each
  layer visit's kept directions, for `benchmarks/same_decisions.py` to compare two code
  versions."""
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(run["_variables"])[0]}
  kept = [{"layer": e["layer"], "directions": e["directions"]}
          for e in run["_report"]["layers"] if e["kept"]]
  kept += [{"layer": f"carried {c['from']} -> {c['to']}", "directions": []}
           for c in run["_report"].get("carried", []) if c["kept"]]
  os.makedirs(folder, exist_ok=True)
  name = Path(spec.rstrip("/")).name.replace(":", "_").replace("@", "_")
  np.savez(Path(folder) / f"{name}.{mode}.npz", __kept__=json.dumps(kept), **flat)


def bench_model(spec: str, args) -> dict[str, Any]:
  m = load(spec, args.n, args.synthetic)
  images, model, variables = m["images"], m["model"], m["variables"]
  out = {"model": m["label"], "spec": spec, "images": m["source"], "n": len(images),
         "runs": {}}
  note = "" if len(images) == args.n else f" (asked {args.n}; the set holds {len(images)})"
  print(f"{m['label']}: N = {len(images)}{note}", file=sys.stderr, flush=True)
  configs = {"default": {**default_config(), **args.set},
             "paper": {**default_config(), **paper_config(), **args.set}}
  for mode in args.modes:
    print(f"  {mode} ...", file=sys.stderr, flush=True)
    if mode == "floor":
      out["runs"]["floor"] = floor(model, variables, images, args.batch_size, args.progress)
    else:
      run = run_defend(model, variables, images, configs[mode], args.progress)
      if args.save:
        save_decisions(args.save, spec, mode, run)
      out["runs"][mode] = {k: v for k, v in run.items() if not k.startswith("_")}
  base = out["runs"].get("floor", {}).get("seconds")
  for r in out["runs"].values():
    r["x_floor"] = r["seconds"] / base if base else None
    if "phases" in r:
      r["phases_x_floor"] = {p: (s / base if base else None)
                             for p, s in r["phases"].items()}
  return out


# ------------------------------------------------------------------ report


def environment() -> dict[str, Any]:
  try:
    load_avg = list(os.getloadavg())
  except OSError:
    load_avg = None
  return {"machine": utils.machine_description(), "platform": platform.platform(),
          "python": platform.python_version(), "jax": jax.__version__,
          "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
          "mesh_devices": sharding.batch_mesh().size,
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_avg": load_avg,
          "psutil": psutil is not None, "git": utils.git_commit(ROOT)}


def _f(v, fmt="{:.1f}") -> str:
  return "-" if v is None else fmt.format(v)


def _mem(r: dict[str, Any]) -> str:
  peak, start = r.get("peak_rss_mb"), r.get("rss_before_mb")
  grow = None if peak is None or start is None else peak - start
  return f"{_f(peak, '{:.0f}'):>8s} {_f(grow, '{:.0f}'):>6s}"


def table(results: list[dict[str, Any]]) -> str:
  head = (f"{'model':44s} {'N':>6s} {'run':8s} {'s':>8s} {'x floor':>7s} {'img/s':>7s} "
          + " ".join(f"{p[:7]:>13s}" for p in (*PHASES, "other"))
          + f" {'passes':>6s} {'kept':>4s} {'predicted':>9s} {'peak MB':>8s} {'+MB':>6s}"
          f" {'feat MB':>8s}")
  lines = [head, "-" * len(head)]
  for res in results:
    for i, (mode, r) in enumerate(res["runs"].items()):
      name = res["model"] if i == 0 else ""
      n = str(res["n"]) if i == 0 else ""
      if "phases" in r:
        cells = " ".join(
            f"{r['phases'][p]:7.1f}/{_f(r['phases_x_floor'][p], '{:.2f}'):>5s}"
            for p in (*PHASES, "other"))
        extra = (f" {r['feature_passes']:6d} {r['directions_kept']:4d} "
                 f"{r['predicted_images']:9d} {_mem(r)} {r['features_mb']:8.1f}")
      else:
        cells = " ".join(f"{'-':>13s}" for _ in (*PHASES, "other"))
        extra = f" {'1':>6s} {'-':>4s} {res['n']:9d} {_mem(r)} {'-':>8s}"
      lines.append(f"{name[:44]:44s} {n:>6s} {mode:8s} {r['seconds']:8.1f} "
                   f"{_f(r['x_floor'], '{:.2f}'):>7s} {r['images_per_s']:7.0f} {cells}"
                   + extra)
  lines.append("phases: seconds/ratio to the floor; floor: warm (its compile apart, "
               "below); defend runs include their compiles")
  lines.append("predicted: images run through the network by inference.predict (defend: "
               "the confirmation's trial networks)")
  lines.append("peak MB: the process's resident set during the run, +MB: above its size "
               "at the run's start; feat MB: one pass's pooled features, N x sum of the "
               "units' widths x 4 bytes")
  for res in results:
    fl = res["runs"].get("floor")
    if fl:
      lines.append(f"  {res['model']}: floor compile {fl['compile_s']:.1f} s")
  return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                 help="checkpoint folders or random:NAME@WIDTH (default: %(default)s)")
  p.add_argument("--n", type=int, default=47500, help="training images (default 47500)")
  p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
  p.add_argument("--batch-size", type=int, default=500, help="floor's batch (defend: "
                 "its batch_size setting, 500 by default)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a DRR setting for both defend runs, e.g. --set confirm_samples=2000")
  p.add_argument("--synthetic", action="store_true",
                 help="random uint8 images instead of CIFAR-10 (tests)")
  p.add_argument("--progress", action="store_true", help="tqdm bars on stderr")
  p.add_argument("--json", help="also write the figures here")
  p.add_argument("--save", metavar="DIR", help="also save each defend run's variables "
                 "and kept directions to DIR/<model>.<mode>.npz (compare two code "
                 "versions with benchmarks/same_decisions.py)")
  p.add_argument("--devices", type=int, nargs="+", metavar="D",
                 help="scaling: every run once per device count, each in a subprocess "
                 "with D devices (virtual CPU devices on a CPU), e.g. --devices 1 2 4 8")
  args = p.parse_args(argv)
  if args.devices and min(args.devices) < 1:
    p.error("--devices takes counts >= 1")
  if args.n < 2:
    p.error("--n must be at least 2")
  import ast
  settings = {}
  for item in args.set:
    key, sep, raw = item.partition("=")
    if not sep or key not in default_config():
      p.error(f"--set {item!r}: expected KEY=VALUE with KEY a DRR setting")
    try:
      settings[key] = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      settings[key] = raw
  args.set = settings
  return args


# ------------------------------------------------------------------ scaling


def _child_argv(args, json_path: str) -> list[str]:
  """The flags of one device count's run: these arguments, less --devices."""
  out = ["--models", *args.models, "--n", str(args.n), "--modes", *args.modes,
         "--batch-size", str(args.batch_size), "--json", json_path]
  for key, value in args.set.items():
    out += ["--set", f"{key}={value!r}"]
  return out + (["--synthetic"] if args.synthetic else []) + (
      ["--progress"] if args.progress else [])


def run_devices(args, devices: int) -> dict[str, Any]:
  """This benchmark in a subprocess that sees `devices` devices; its JSON record."""
  flags = os.environ.get("XLA_FLAGS", "")
  flags = " ".join(f for f in flags.split()
                   if not f.startswith("--xla_force_host_platform_device_count"))
  env = {**os.environ, "DRR_NUM_DEVICES": str(devices),
         "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip()}
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "bench.json")
    proc = subprocess.run([sys.executable, __file__, *_child_argv(args, path)], env=env,
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
      raise RuntimeError(f"the run with {devices} device(s) failed "
                         f"(exit {proc.returncode}):\n{proc.stdout[-2000:]}")
    with open(path) as f:
      out = json.load(f)
  out["mesh_devices"] = devices
  return out


def scaling_table(records: list[dict[str, Any]]) -> str:
  """Seconds per run and device count, the speed-up over the first count, and what each
  count kept."""
  counts = [r["mesh_devices"] for r in records]
  head = (f"{'model':36s} {'run':8s} "
          + " ".join(f"{f'{d} dev s':>9s}" for d in counts)
          + " " + " ".join(f"{f'x{d}':>6s}" for d in counts[1:])
          + f"  {'kept (each count)':s}")
  lines = [head, "-" * len(head)]
  for i, res in enumerate(records[0]["results"]):
    for mode in res["runs"]:
      runs = [r["results"][i]["runs"][mode] for r in records]
      secs = [r["seconds"] for r in runs]
      kept = "/".join(str(r.get("directions_kept", "-")) for r in runs)
      lines.append(f"{res['model'][:36]:36s} {mode:8s} "
                   + " ".join(f"{s:9.1f}" for s in secs) + " "
                   + " ".join(f"{secs[0] / s:6.2f}" for s in secs[1:]) + f"  {kept}")
  lines.append("x D: seconds with the first count / seconds with D devices "
               "(above 1: faster)")
  return "\n".join(lines)


def main_scaling(args) -> dict[str, Any]:
  records = []
  for d in args.devices:
    print(f"{d} device(s) ...", file=sys.stderr, flush=True)
    rec = run_devices(args, d)
    seen = rec["environment"]["mesh_devices"]
    if seen != d:
      raise RuntimeError(f"asked {d} devices, the subprocess's mesh has {seen}")
    records.append(rec)
  env = records[0]["environment"]
  print(f"machine: {env['machine']}; device kind: {env['devices'][0]}; N = {args.n}")
  print(f"load average at start {_f(env['load_avg'] and env['load_avg'][0], '{:.2f}')}")
  print(scaling_table(records))
  out = {"benchmark": "defend scaling", "n": args.n, "settings": args.set,
         "devices": args.devices, "records": records}
  if args.json:
    utils.write_json_atomic(args.json, utils.jsonable(out))
  return out


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.devices:
    return main_scaling(args)
  env = environment()
  results = [bench_model(spec, args) for spec in args.models]
  env["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
  out = {"benchmark": "defend", "n": args.n, "settings": args.set, "environment": env,
         "peak_rss_mb_process": maxrss_mb(), "results": results}
  print(f"machine: {env['machine']}; devices: {', '.join(env['devices'])}")
  print(f"XLA_FLAGS: {env['xla_flags'] or '(none)'}; load average at start "
        f"{_f(env['load_avg'] and env['load_avg'][0], '{:.2f}')}, at end "
        f"{_f(env['load_avg_end'] and env['load_avg_end'][0], '{:.2f}')}")
  print(table(results))
  print(f"process peak RSS (ru_maxrss): {out['peak_rss_mb_process']:.0f} MB")
  if args.json:
    utils.write_json_atomic(args.json, utils.jsonable(out))
  return out


if __name__ == "__main__":
  main()
