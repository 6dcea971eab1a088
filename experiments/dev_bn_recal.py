"""Does re-estimating BatchNorm statistics after DRR's removals give back accuracy?
(issue 13; zoo-dev validation images only.)

For each named zoo-dev model: DRR with the defaults on a random subset of its poisoned
training set (as `dev_eval.py`), then the defended network with every BatchNorm's
statistics re-estimated on that same subset (`batchnorm_stats` below: the mean of
each BatchNorm's training-mode batch statistics); also the
backdoored network re-estimated alone, as a control. Prints validation ACC / ASR of
each and appends a JSON line per model to --log. The test split is never read.

  DRR_DATA_DIR=../shared/data PYTHONPATH=. python experiments/dev_bn_recal.py \
      --models dev-dn-blend-noise-a10-t9-p10 --log experiments/results/zoo-dev/bn.jsonl
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from drr_jax import (attacks, checkpoint, configs, data, datasets, evaluate, features, grid,
                     utils)
from drr_jax.defenses import default_config, defend
from drr_jax.defenses.drr import make_config


def _train_stats(model: nn.Module, params: Any, stats: Any, x: jax.Array) -> Any:
  _, new = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                       mutable=["batch_stats"])
  return new["batch_stats"]


_train_stats_jit = features.model_jit(_train_stats)


def batchnorm_stats(model: nn.Module, variables: Mapping[str, Any], images: np.ndarray,
                    *, batch_size: int = 500, progress: bool = True) -> dict[str, Any]:
  """variables with every BatchNorm's running mean and variance replaced by their
  average over `images` in batches of `batch_size` (the last, smaller batch dropped
  unless it is the only one); variables unchanged where the model has no BatchNorm."""
  variables = dict(variables)
  stats = variables.get("batch_stats")
  if not stats:
    return variables
  if not isinstance(model, nn.Module):
    raise TypeError("re-estimating BatchNorm statistics runs the model in training mode: "
                    "it needs a Linen module, not an apply function")
  n = len(images)
  if n == 0:
    raise ValueError("no images to re-estimate the BatchNorm statistics on")
  batch = min(int(batch_size), n)
  steps = max(1, n // batch)
  params = variables["params"]
  zeros = jax.tree.map(jnp.zeros_like, stats)
  ones = jax.tree.map(jnp.ones_like, stats)
  first = jnp.asarray(images[:batch])
  # with running statistics 1 and 0: m + (1 - m) s and (1 - m) s, so 1 - m = 1 - (a - b)
  weight = jax.tree.map(lambda a, b: 1.0 - (a - b),
                        _train_stats_jit(model, params, ones, first),
                        _train_stats_jit(model, params, zeros, first))
  total = jax.tree.map(jnp.zeros_like, stats)
  for s in tqdm(range(steps), desc="BatchNorm statistics", disable=not progress,
                leave=False):
    x = jnp.asarray(images[s * batch:(s + 1) * batch])
    total = jax.tree.map(jnp.add, total, _train_stats_jit(model, params, zeros, x))
  variables["batch_stats"] = jax.tree.map(
      lambda t, w, old: (t / (steps * w)).astype(old.dtype), total, weight, stats)
  return variables


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--models", nargs="+", required=True, help="zoo-dev cell ids")
  p.add_argument("--root", default="artifacts/checkpoints")
  p.add_argument("--subset", type=int, default=10000, help="defense images")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--augment", action="store_true",
                 help="re-estimate on the images randomly cropped and flipped, as in training")
  p.add_argument("--log", help="append a JSON line per model here")
  args = p.parse_args()
  cfg = configs.override(default_config(), args.set)
  make_config(cfg)
  dev = {grid.cell_id(c) for c in grid.ZOO_DEV}
  for name in args.models:
    if name not in dev:
      raise SystemExit(f"error: {name} is not a zoo-dev model; choices are only on dev")
    model, variables, meta, record = checkpoint.load_model(Path(args.root) / name)
    tcfg = meta["config"]
    ds = datasets.load(tcfg, None, test=False)
    acfg = tcfg["attack"]
    trigger = attacks.trigger_from_record(record) if acfg["name"] != "none" else None
    idx = np.sort(np.random.default_rng(0).choice(
        len(ds.train.labels), min(args.subset, len(ds.train.labels)), replace=False))
    images = ds.train.images[idx]
    stat_images = (np.asarray(data.augment(jax.random.key(0), jnp.asarray(images)))
                   if args.augment else images)
    ev = lambda v: evaluate.evaluate(model, v, ds.val, trigger, acfg, progress=False)
    out = {"before": ev(variables)}
    out["recal_only"] = ev(batchnorm_stats(model, variables, stat_images,
                                                       progress=False))
    t0 = time.time()
    defended, report = defend(model, variables, images, config=cfg, progress=False)
    seconds = time.time() - t0
    out["drr"] = ev(defended)
    t0 = time.time()
    out["drr_recal"] = ev(batchnorm_stats(model, defended, stat_images,
                                                      progress=False))
    recal_s = time.time() - t0
    pct = lambda v: "  -  " if v != v else f"{100 * v:6.2f}"
    print(f"{name}: kept {report['directions_kept']} {report['layers_projected']} "
          f"({seconds:.0f} s; recal {recal_s:.0f} s)")
    for k, v in out.items():
      print(f"  {k:12s} val ACC {pct(v['acc'])}  ASR {pct(v['asr'])}", flush=True)
    if args.log:
      Path(args.log).parent.mkdir(parents=True, exist_ok=True)
      with open(args.log, "a") as f:
        f.write(json.dumps(utils.jsonable({
            "model": name, "settings": args.set, "augment": args.augment, "subset": args.subset, **out,
            "kept": report["directions_kept"], "where": report["layers_projected"],
            "seconds": seconds, "recal_seconds": recal_s, "git": utils.git_commit(),
            "machine": utils.machine_description()})) + "\n")


if __name__ == "__main__":
  main()
