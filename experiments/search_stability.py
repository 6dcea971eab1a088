"""How far float rounding moves DRR's search: every site's multistart ascent run on the
max-pooled features of the defense images, and again on the same features with a relative
perturbation of `--noise` (the size of the rounding difference between two CPUs' kernels),
for several step counts. Prints, per step count, how many sites find the same top
direction (cosine >= 0.99) and criterion (within 1e-3) both times. Reads no label; the
features are those `drr_jax.defend` searches (pooling 'max', standardized skewness).

  python experiments/search_stability.py --checkpoint artifacts/checkpoints/dev-pre18-blend-smooth-a12-t2-p10
"""
from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from drr_jax import checkpoint, datasets, features, sites, stiefel


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--subset", type=int, default=10000, help="defense images")
  p.add_argument("--noise", type=float, default=1e-6, help="relative perturbation")
  p.add_argument("--steps", type=int, nargs="+", default=[200, 1000, 3000])
  p.add_argument("--lr", type=float, default=0.1,
                 help="0.1: up to version 7; 0.005: version 8")
  p.add_argument("--k", type=int, default=4)
  p.add_argument("--log", help="append one JSON line per step count here")
  args = p.parse_args()
  model, variables, meta, _ = checkpoint.load_model(args.checkpoint)
  ds = datasets.load(meta["config"], None, test=False)
  rng = np.random.default_rng(0)
  idx = np.sort(rng.choice(len(ds.train.labels), args.subset, replace=False))
  images = ds.train.images[idx]
  found = sites.find_sites(model, variables, jax.numpy.asarray(images[:4]))
  ins = tuple(s.layer for s in found if s.side == "input")
  outs = tuple(s.layer for s in found if s.side == "output")
  (rows_in, _), (rows_out, _) = features.extract_sides(
      model, variables, images, inputs=ins, outputs=outs, pooling="max", batch_size=500)
  units = {**{f"{n}:in": x for n, x in rows_in.items()},
           **{f"{n}:out": x for n, x in rows_out.items()}}
  noise = np.random.default_rng(1)
  for steps in args.steps:
    same_dir = same_crit = 0
    worst = []
    for name, x in units.items():
      k = min(args.k, x.shape[1])
      y = x * (1 + args.noise * noise.standard_normal(x.shape)).astype(np.float32)
      a, b = (jax.device_get(stiefel.maximize(f, k, steps=steps, lr=args.lr,
                                              search="multistart")) for f in (x, y))
      ia, ib = int(np.argmax(a.values)), int(np.argmax(b.values))
      cos = abs(float(a.frame[:, ia] @ b.frame[:, ib]))
      gap = float(np.max(np.abs(np.sort(a.values) - np.sort(b.values))))
      same_dir += cos >= 0.99
      same_crit += gap <= 1e-3
      worst.append((gap, name, cos))
    worst.sort(reverse=True)
    line = {"checkpoint": args.checkpoint, "steps": steps, "lr": args.lr,
            "noise": args.noise, "units": len(units), "same_top_direction": same_dir,
            "same_criteria": same_crit,
            "worst": [{"unit": n, "criterion_gap": round(g, 4), "top_cosine": round(c, 4)}
                      for g, n, c in worst[:3]]}
    print(json.dumps(line), flush=True)
    if args.log:
      with open(args.log, "a") as f:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
  main()
