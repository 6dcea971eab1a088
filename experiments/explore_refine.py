"""At one layer's input: the skew direction v1 (multistart, k=4), the mean difference d of
its skewed tail vs the rest, and refinements of d: re-select the tail along d itself
(z > 2) and recompute, up to --iters times; d from mean-pooled instead of max-pooled
features. Each removed by benign-mean replacement, exact at the input (x - (x - mu) v v^T)
and interior-exact (the constant folded at the output), as DRR folds it, or that
constant averaged over output positions (mean_avg). Validation only;
the poison mask is printed for diagnosis, never used for a choice."""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import explore_common
from drr_jax import evaluate, features, stiefel
from drr_jax.defenses import drr

T0 = time.time()


def skew(p):
  p = p - p.mean()
  return np.mean(p ** 3) / np.mean(p ** 2) ** 1.5


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--layer", required=True)
  p.add_argument("--subset", type=int, default=5000)
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--modes", default="mean_in,mean_out")
  p.add_argument("--only", default="", help="comma-separated candidate names")
  args = p.parse_args()
  model, variables, cfg, ds, trigger, imgs, is_poison = explore_common.load(
      args.checkpoint, args.subset)
  base = evaluate.predict(model, variables, imgs, progress=False)
  layer = args.layer
  kern = np.asarray(features.layer_kernels(variables["params"])[layer], np.float64)
  x = drr.extract(model, variables, imgs, (layer,), outputs=False, pooling="max",
                  batch_size=500, progress=False)[layer].astype(np.float64)
  xm = drr.extract(model, variables, imgs, (layer,), outputs=False, pooling="mean",
                   batch_size=500, progress=False)[layer].astype(np.float64)
  res = jax.device_get(stiefel.maximize(x, min(4, x.shape[1]), steps=200, lr=0.1,
                                        standardize=True, search="multistart"))
  v1 = np.asarray(res.frame)[:, int(np.argmax(res.values))].astype(np.float64)
  v1 *= np.sign(np.mean(((x - x.mean(0)) @ v1) ** 3))

  def tail_of(feat, v):
    pr = (feat - feat.mean(0)) @ v
    return pr / pr.std() > 2

  def diff(feat, tail):
    d = feat[tail].mean(0) - feat[~tail].mean(0)
    return d / np.linalg.norm(d)

  tail = tail_of(x, v1)
  cands = [("d0", diff(x, tail), tail)]
  # per position: each image's feature at its position most aligned with d0
  xp = drr.extract(model, variables, imgs, (layer,), outputs=False, pooling="positions",
                   batch_size=500, progress=False)[layer].astype(np.float32)
  xp = xp.reshape(len(imgs), -1, xp.shape[-1])
  at = xp[np.arange(len(imgs)), np.argmax(xp @ cands[0][1].astype(np.float32), 1)]
  at = at.astype(np.float64)
  dpos = diff(at, tail)
  cands.append(("d-pos", dpos, tail))
  both = np.linalg.qr(np.stack([cands[0][1], dpos], 1))[0]
  cands.append(("d0+d-pos", both, tail))
  del xp
  cands.append(("d0-meanpool", diff(xm, tail), tail))
  d, t = cands[0][1], tail
  for i in range(args.iters):
    t = tail_of(x, d)
    d = diff(x, t)
    cands.append((f"d-refine{i + 1}", d, t))
  print(f"{args.checkpoint} {layer}: subset {args.subset}; v1 skew {np.max(res.values):.2f}",
        flush=True)
  for name, v, t in cands:
    if v.ndim == 2:
      continue
    print(f"  {name:12s} skew {skew(x @ v):.2f} cos(d0) {v @ cands[0][1]:.3f} tail "
          f"{t.mean():.3f} poisoned-in-tail {is_poison[t].mean():.3f} poison-caught "
          f"{t[is_poison].mean():.3f}", flush=True)
  for name, v, t in cands:
    if args.only and name not in args.only.split(","):
      continue
    mu = xm[~t].mean(0)
    for mode in args.modes.split(","):
      V = v.reshape(len(v), -1)
      c = jnp.asarray(V @ (V.T @ mu), jnp.float32)
      b = jnp.asarray(np.tensordot(V @ (V.T @ mu), kern, axes=([0], [kern.ndim - 2])
                                   ).reshape(-1, kern.shape[-1]).sum(0), jnp.float32)

      def averaged(h, c=c):  # the exact constant's response, averaged over positions
        cmap = jax.lax.conv_general_dilated(
            jnp.zeros_like(h[:1]) + c, jnp.asarray(kern, jnp.float32), (1, 1), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return cmap.mean(axis=tuple(range(1, cmap.ndim - 1)), keepdims=True)

      apply = explore_common.removing(
          model, layer, V, shift_in=c if mode == "mean_in" else None,
          shift_out={"mean_out": b, "mean_avg": averaged}.get(mode))

      m = evaluate.evaluate(apply, variables, ds.val, trigger, cfg["attack"], progress=False)
      ch = evaluate.predict(apply, variables, imgs, progress=False) != base
      print(f"  {name:12s} {mode:8s} val ACC {m['acc']:.4f} ASR {m['asr']:.4f} tail flip "
            f"{ch[t].mean():.3f} non-tail changed {ch[~t].mean():.4f} "
            f"[{time.time() - T0:.0f}s]", flush=True)


if __name__ == "__main__":
  main()
