"""Exactness of removal at every site of the committed zoo checkpoints (issue 13, point 2).

For each site of each model (`drr_jax.sites.find_sites`), a random 2-column orthonormal
frame is folded into the weights (zeroing, and with mean replacement where the constant
can be folded) and the logits on 16 real training images are compared with those of the
explicit run-time projection of the site's feature in every path. Prints the largest
deviation relative to the logits' scale, per model and side.

  DRR_DATA_DIR=../shared/data PYTHONPATH=. python experiments/zoo_exactness.py
"""
from __future__ import annotations

import argparse
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from drr_jax import checkpoint, data, features, sites


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--root", default="artifacts/checkpoints")
  p.add_argument("--images", type=int, default=16)
  p.add_argument("--only", nargs="*", default=[], metavar="SUBSTRING",
                 help="only the checkpoints whose name contains one of these")
  args = p.parse_args()
  images = jnp.asarray(data.load_split("test")[0][:args.images])
  for folder in sorted(Path(args.root).iterdir()):
    if args.only and not any(o in folder.name for o in args.only):
      continue
    model, variables, _, _ = checkpoint.load_model(folder)
    found = sites.find_sites(model, variables, images[:4])
    logits = model.apply(variables, images, train=False)
    scale = float(jnp.max(jnp.abs(logits)))
    kernels = features.layer_kernels(variables["params"])
    rng = np.random.default_rng(0)
    worst = {"input": 0.0, "output": 0.0}
    worst_mean = 0.0
    for s in found:
      c = kernels[s.layer].shape[-2 if s.side == "input" else -1]
      q, _ = np.linalg.qr(rng.standard_normal((c, 2)))
      v = jnp.asarray(q, jnp.float32)
      got = model.apply(sites.fold(variables, s, v), images, train=False)
      want = sites.explicit_apply(model, s, v)(variables, images)
      worst[s.side] = max(worst[s.side], float(jnp.max(jnp.abs(got - want))) / scale)
      spatial = any(kernels[f].ndim == 4 and kernels[f].shape[0] > 1 for f in s.folds)
      if s.side == "output" or not spatial:
        mean = jnp.asarray(rng.uniform(0, 1, c), jnp.float32)
        moved, ok = sites.fold_with_mean(model, variables, s, v, mean, images[:4])
        if ok:
          got = model.apply(moved, images, train=False)
          want = sites.explicit_apply(model, s, v, mean)(variables, images)
          worst_mean = max(worst_mean, float(jnp.max(jnp.abs(got - want))) / scale)
    n_in = sum(s.side == "input" for s in found)
    print(f"{folder.name:40s} sites {len(found)} ({n_in} input): max |fold - explicit| / "
          f"max|logit|: input {worst['input']:.1e}, output {worst['output']:.1e}, "
          f"mean-replaced {worst_mean:.1e}", flush=True)


if __name__ == "__main__":
  main()
