"""How much of an all-to-all cell's ASR after DRR is the backdoor, and how much is the
ordinary confusion of class y with class y + 1? Validation split only: the rate of
(y + 1) predictions on clean images (the floor any model has), on triggered images, and
on triggered images that the model classified correctly when clean."""
from __future__ import annotations

import argparse
import ast
import time

import numpy as np

import explore_common
from drr_jax import attacks, evaluate
from drr_jax.defenses import drr


def rates(model, variables, ds, trigger, acfg, tag):
  y = ds.val.labels
  tgt = attacks.core.target_labels(y, acfg)
  clean = evaluate.predict(model, variables, ds.val.images, progress=False)
  trig = evaluate.predict(model, variables, attacks.core.apply_trigger(ds.val.images, trigger),
                          progress=False)
  ok = clean == y
  print(f"{tag}: clean ACC {np.mean(ok):.4f}; (y+1) on clean {np.mean(clean == tgt):.4f}; "
        f"ASR {np.mean(trig == tgt):.4f}; ASR among clean-correct {np.mean(trig[ok] == tgt[ok]):.4f}; "
        f"triggered predicted as clean {np.mean(trig == clean):.4f}", flush=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--subset", type=int, default=47500)
  p.add_argument("--layers", default=None,
                 help="','-separated layers DRR visits (default: all); the grid's record "
                      "says which layer the defaults keep, and visiting only it is faster")
  p.add_argument("--set", action="append", default=[],
                 help="DRR setting key=value (a Python literal), e.g. rounds=2; repeatable")
  args = p.parse_args()
  t0 = time.time()
  model, variables, cfg, ds, trigger, imgs, _ = explore_common.load(args.checkpoint, args.subset)
  acfg = attacks.resolve(dict(cfg["attack"]))
  rates(model, variables, ds, trigger, acfg, "backdoored")
  dcfg = {"layers": args.layers.split(",")} if args.layers else {}
  for item in args.set:
    key, _, raw = item.partition("=")
    dcfg[key] = ast.literal_eval(raw)
  defended, rep = drr.defend(model, variables, imgs, config=dcfg, progress=False)
  print(drr.format_report(rep).splitlines()[-1], flush=True)
  rates(model, defended, ds, trigger, acfg, f"DRR (layers {args.layers or 'all'}, settings {args.set or 'default'})")
  print(f"[{time.time() - t0:.0f}s]")


if __name__ == "__main__":
  main()
