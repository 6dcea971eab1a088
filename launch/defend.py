"""Defend a checkpoint (DRR, or a baseline); report ACC/ASR before/after.

  python -m launch.defend --checkpoint artifacts/wrn28_1-badnets-cpu \
      --data_dir ../shared/data --out runs/wrn28_1-badnets-drr [--method clp]
The defended model is written (atomically) as a new checkpoint under --out. DRR, CLP, EP
and RR-EP use the poisoned training set (CLP only its shape); FP, ANP and RR-FP also get
the clean validation split (5 % of the training set, never the test set).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from drr_jax import attacks, checkpoint, configs, datasets, evaluate, utils
from drr_jax.defenses import METHODS, DefenseError, get_defense

PRESETS = ("drr", "paper")  # --preset, kept as an alias of --method for these two


def _metrics(model, variables, split, trigger, acfg, progress=True):
  m = evaluate.evaluate(model, variables, split, trigger, acfg, progress=progress)
  return {k: float(v) for k, v in m.items()}


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True, help="a run folder written by launch.train")
  p.add_argument("--data_dir", help="CIFAR-10 zips folder (default: $DRR_DATA_DIR)")
  p.add_argument("--out", help="folder for the defended checkpoint (must not exist)")
  p.add_argument("--method", choices=METHODS,
                 help="drr (default): the project's DRR; paper: Algorithm 1 as written; "
                 "fp, anp, clp, ep: the baselines; rr-fp, rr-ep: this project's "
                 "rank-reduction versions of FP and EP (drr_jax/defenses/__init__.py)")
  p.add_argument("--preset", choices=PRESETS, help="the same as --method drr|paper")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a setting of the method, e.g. --set k=2 --set tau=1.5 for DRR "
                 "(defenses/drr/config.py), --set u=2.5 for CLP")
  p.add_argument("--no_test", action="store_true", help="skip the test-set evaluation")
  args = p.parse_args(argv)
  if args.method and args.preset and args.method != args.preset:
    sys.exit(f"error: --method {args.method} and --preset {args.preset} disagree")
  method = args.method or args.preset or "drr"
  defense = get_defense(method)
  out = args.out or os.path.join("runs", os.path.basename(os.path.normpath(args.checkpoint))
                                 + f"-{method}")
  if os.path.exists(out):
    sys.exit(f"error: {out} already exists; choose another --out")
  try:
    drr_cfg = configs.override(defense.default_config(), args.set)
    defense.check(drr_cfg)  # every setting checked before anything is loaded
  except (KeyError, ValueError) as e:
    sys.exit(f"error: {e}")
  try:
    model, variables, meta, record = checkpoint.load_model(args.checkpoint)
  except checkpoint.CheckpointError as e:
    sys.exit(f"error: {e}")
  cfg = meta["config"]
  ds = datasets.load(cfg, args.data_dir, test=not args.no_test, record=record)
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
  clean = None
  if defense.needs_clean:
    clean = (ds.val.images, ds.val.labels)
    print(f"{method} uses clean data: the clean validation split ({len(ds.val.labels)} "
          "images held out from training), never the test set; its val figures below "
          "are on data it saw")
  try:
    defended, report = defense.defend(model, variables, ds.train.images, config=drr_cfg,
                                      clean=clean)
  except DefenseError as e:
    sys.exit(f"error: {e}")
  after = {"val": _metrics(model, defended, ds.val, trigger, acfg)}
  if not args.no_test:
    after["test"] = _metrics(model, defended, ds.test, trigger, acfg)
  print(defense.format_report(report))
  for split in after:
    b, a = before[split], after[split]
    print(f"{split:5s} ACC {100 * b['acc']:.2f} -> {100 * a['acc']:.2f} %   "
          f"ASR {100 * b['asr']:.2f} -> {100 * a['asr']:.2f} %")
  print(f"{method} {report['seconds']:.1f} s; one plain inference pass over the "
        f"{len(ds.train.labels)} training images {plain_seconds:.1f} s")
  result = {"checkpoint": args.checkpoint, "method": method,
            "drr" if method in PRESETS else method: report,
            "clean_data": "val" if defense.needs_clean else None, "before": before,
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
