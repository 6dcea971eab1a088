"""DRR settings on the zoo-dev models, validation images only (issue 13).

Runs `drr_jax.defend` with the given settings on every zoo-dev model that has a committed
checkpoint (or the ones named), on a random subset of its poisoned training set, and
prints validation ACC / ASR before and after, the sites or layers kept and the seconds.
The test split is never read. Appends one JSON line per model to --log.

  DRR_DATA_DIR=../shared/data PYTHONPATH=. python experiments/dev_eval.py \
      --set side="'sites'" --log experiments/results/zoo-dev/sites.jsonl
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from drr_jax import attacks, checkpoint, configs, datasets, evaluate, grid, utils
from drr_jax.defenses import default_config, defend, paper_config
from drr_jax.defenses.drr import make_config


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--models", nargs="*", help="zoo-dev cell ids (default: all exported)")
  p.add_argument("--root", default="artifacts/checkpoints")
  p.add_argument("--subset", type=int, default=10000, help="defense images")
  p.add_argument("--preset", default="drr", choices=("drr", "paper"))
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--log", help="append a JSON line per model here")
  args = p.parse_args()
  base = {**default_config(), **(paper_config() if args.preset == "paper" else {})}
  cfg = configs.override(base, args.set)
  make_config(cfg)
  names = args.models or [grid.cell_id(c) for c in grid.ZOO_DEV]
  for name in names:
    if name not in {grid.cell_id(c) for c in grid.ZOO_DEV}:
      raise SystemExit(f"error: {name} is not a zoo-dev model; choices are only on dev")
    folder = Path(args.root) / name
    if not folder.is_dir():
      print(f"{name}: no checkpoint yet, skipped", flush=True)
      continue
    model, variables, meta, record = checkpoint.load_model(folder)
    tcfg = meta["config"]
    ds = datasets.load(tcfg, None, test=False)
    acfg = tcfg["attack"]
    trigger = (attacks.trigger_from_record(record)
               if acfg["name"] != "none" else None)
    idx = np.sort(np.random.default_rng(0).choice(len(ds.train.labels),
                                                  min(args.subset, len(ds.train.labels)),
                                                  replace=False))
    before = evaluate.evaluate(model, variables, ds.val, trigger, acfg, progress=False)
    t0 = time.time()
    defended, report = defend(model, variables, ds.train.images[idx], config=cfg,
                              progress=False)
    seconds = time.time() - t0
    after = evaluate.evaluate(model, defended, ds.val, trigger, acfg, progress=False)
    pct = lambda v: "  -  " if v != v else f"{100 * v:6.2f}"
    print(f"{name:40s} val ACC {pct(before['acc'])} -> {pct(after['acc'])}  ASR "
          f"{pct(before['asr'])} -> {pct(after['asr'])}  kept {report['directions_kept']} "
          f"{report['layers_projected']}  {seconds:.0f} s", flush=True)
    if args.log:
      Path(args.log).parent.mkdir(parents=True, exist_ok=True)
      with open(args.log, "a") as f:
        f.write(json.dumps(utils.jsonable({
            "model": name, "settings": args.set, "preset": args.preset,
            "subset": args.subset, "before": before, "after": after, "seconds": seconds,
            "kept": report["directions_kept"], "where": report["layers_projected"],
            "layers": [{k: e[k] for k in ("layer", "criterion", "kept", "checks")}
                       for e in report["layers"]],
            "git": utils.git_commit(), "machine": utils.machine_description()})) + "\n")


if __name__ == "__main__":
  main()
