"""Defend a checkpoint with DRR on its poisoned training set; report ACC/ASR before/after.

  python -m launch.defend --checkpoint artifacts/wrn28_1-badnets-cpu \
      --data_dir ../shared/data --out runs/wrn28_1-badnets-drr
The defended model is written (atomically) as a new checkpoint under --out.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from drr_jax import attacks, checkpoint, configs, datasets, evaluate, utils
from drr_jax.defenses import (DefenseError, default_config, defend, format_report,
                              paper_config)
from drr_jax.defenses.drr import make_config

PRESETS = ("drr", "paper")


def _metrics(model, variables, split, trigger, acfg, progress=True):
  m = evaluate.evaluate(model, variables, split, trigger, acfg, progress=progress)
  return {k: float(v) for k, v in m.items()}


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True, help="a run folder written by launch.train")
  p.add_argument("--data_dir", help="CIFAR-10 zips folder (default: $DRR_DATA_DIR)")
  p.add_argument("--out", help="folder for the defended checkpoint (must not exist)")
  p.add_argument("--preset", default="drr", choices=PRESETS,
                 help="drr: the project's defaults; paper: Algorithm 1 of the paper as "
                 "written (drr_jax/defenses/paper.py)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="DRR setting, e.g. --set k=2 --set tau=1.5 (see defenses/drr/config.py)")
  p.add_argument("--no_test", action="store_true", help="skip the test-set evaluation")
  args = p.parse_args(argv)
  out = args.out or os.path.join("runs", os.path.basename(os.path.normpath(args.checkpoint))
                                 + "-drr")
  if os.path.exists(out):
    sys.exit(f"error: {out} already exists; choose another --out")
  base = {**default_config(), **(paper_config() if args.preset == "paper" else {})}
  try:
    drr_cfg = configs.override(base, args.set)
    make_config(drr_cfg)  # every setting checked before anything is loaded
  except (KeyError, ValueError) as e:
    sys.exit(f"error: {e}")
  try:
    model, variables, meta, record = checkpoint.load_model(args.checkpoint)
  except checkpoint.CheckpointError as e:
    sys.exit(f"error: {e}")
  cfg = meta["config"]
  ds = datasets.load(cfg, args.data_dir, test=not args.no_test)
  acfg = cfg["attack"]
  trigger = attacks.trigger_from_record(record)
  if acfg["name"] == "none":
    trigger = None

  t0 = time.time()
  evaluate.predict(model, variables, ds.train.images, progress=True, desc="plain pass")
  plain_seconds = time.time() - t0
  before = {"val": _metrics(model, variables, ds.val, trigger, acfg)}
  if not args.no_test:
    before["test"] = _metrics(model, variables, ds.test, trigger, acfg)
  try:
    defended, report = defend(model, variables, ds.train.images, config=drr_cfg)
  except DefenseError as e:
    sys.exit(f"error: {e}")
  after = {"val": _metrics(model, defended, ds.val, trigger, acfg)}
  if not args.no_test:
    after["test"] = _metrics(model, defended, ds.test, trigger, acfg)
  print(format_report(report))
  for split in after:
    b, a = before[split], after[split]
    print(f"{split:5s} ACC {100 * b['acc']:.2f} -> {100 * a['acc']:.2f} %   "
          f"ASR {100 * b['asr']:.2f} -> {100 * a['asr']:.2f} %")
  print(f"DRR {report['seconds']:.1f} s; one plain inference pass over the "
        f"{len(ds.train.labels)} training images {plain_seconds:.1f} s")
  result = {"checkpoint": args.checkpoint, "drr": report, "before": before,
            "after": after, "plain_pass_seconds": plain_seconds,
            "machine": utils.machine_description()}
  mngr = checkpoint.manager(os.path.join(out, "checkpoints"), keep=1)
  checkpoint.save(mngr, 0, {"model": defended, "attack": record,
                            "meta": {**meta, "defense": result}})
  utils.write_json_atomic(os.path.join(out, "result.json"), result)
  print(f"defended checkpoint written to {out}")
  return result


if __name__ == "__main__":
  main()
