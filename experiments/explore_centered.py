"""Zeroing a direction (x - x v v^T, the paper's P) vs replacing it by its mean
(x - (x - mu) v v^T) at one layer, applied explicitly by a Flax interceptor; several
candidate directions. Validation split only."""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import explore_common
from drr_jax import evaluate, stiefel
from drr_jax.defenses import drr

T0 = time.time()


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--layer", required=True)
  p.add_argument("--subset", type=int, default=10000)
  args = p.parse_args()
  model, variables, cfg, ds, trigger, imgs, is_poison = explore_common.load(
      args.checkpoint, args.subset)
  base = evaluate.predict(model, variables, imgs, progress=False)
  x = drr.extract(model, variables, imgs, (args.layer,), outputs=False, pooling="max",
                  batch_size=500, progress=False)[args.layer].astype(np.float64)
  xm = drr.extract(model, variables, imgs[:2000], (args.layer,), outputs=False,
                   pooling="mean", batch_size=500, progress=False)[args.layer]
  mu_pos = xm.mean(0)
  res = jax.device_get(stiefel.maximize(x, 16, steps=200, lr=0.1, standardize=True,
                                        search="multistart"))
  vals = np.asarray(res.values)
  order = np.argsort(-vals)
  xc = x - x.mean(0)
  cands = {}
  for r, j in enumerate(order[:4]):
    v = np.asarray(res.frame)[:, j].astype(np.float64)
    cands[f"skew#{r} ({vals[j]:.2f})"] = v[:, None]
  v1 = cands[next(iter(cands))][:, 0]
  pr = xc @ v1
  pr *= np.sign(np.mean(pr ** 3))
  tail = pr / pr.std() > 2
  d = x[tail].mean(0) - x[~tail].mean(0)
  cands["d (tail mean diff)"] = (d / np.linalg.norm(d))[:, None]
  q, _ = np.linalg.qr(np.stack([v1, d], 1))
  cands["[v1, d]"] = q
  print(f"tail {tail.sum()} poisoned share {is_poison[tail].mean():.3f}", flush=True)

  for name, frame in cands.items():
    for mode in ("zero", "mean"):
      mu = mu_pos if mode == "mean" else np.zeros_like(mu_pos)
      # h - ((h - mu) V) V^T: the removal plus the constant mu V V^T at the input
      apply = explore_common.removing(model, args.layer, frame,
                                      shift_in=jnp.asarray(frame @ (frame.T @ mu), jnp.float32))

      m = evaluate.evaluate(apply, variables, ds.val, trigger, cfg["attack"], progress=False)
      ch = evaluate.predict(apply, variables, imgs, progress=False) != base
      print(f"{name:22s} {mode:4s} val ACC {m['acc']:.4f} ASR {m['asr']:.4f}  tail flip "
            f"{ch[tail].mean():.3f} poison flip {ch[is_poison].mean():.3f} non-tail changed "
            f"{ch[~tail].mean():.4f} [{time.time() - T0:.0f}s]", flush=True)


if __name__ == "__main__":
  main()
