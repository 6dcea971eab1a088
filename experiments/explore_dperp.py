"""Variants of removing the tail mean difference d at one layer (validation only):
d orthogonal to the mean feature (zeroing then keeps the mean), and zeroing d followed by
BatchNorm re-estimation on the defense images."""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import explore_common
from drr_jax import evaluate, projection, stiefel
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
  mu = drr.extract(model, variables, imgs[:2000], (args.layer,), outputs=False,
                   pooling="mean", batch_size=500, progress=False)[args.layer].mean(0)
  res = jax.device_get(stiefel.maximize(x, 16, steps=200, lr=0.1, standardize=True,
                                        search="multistart"))
  v1 = np.asarray(res.frame)[:, int(np.argmax(res.values))].astype(np.float64)
  pr = (x - x.mean(0)) @ v1
  pr *= np.sign(np.mean(pr ** 3))
  tail = pr / pr.std() > 2
  d = x[tail].mean(0) - x[~tail].mean(0)
  d /= np.linalg.norm(d)
  mh = mu / np.linalg.norm(mu)
  print(f"cos(d, mu) {d @ mh:.3f}; cos(v1, d) {abs(v1 @ d):.3f}", flush=True)
  dp = d - (d @ mh) * mh
  dp /= np.linalg.norm(dp)

  def report(name, vv):
    m = evaluate.evaluate(model, vv, ds.val, trigger, cfg["attack"], progress=False)
    ch = evaluate.predict(model, vv, imgs, progress=False) != base
    print(f"{name:28s} val ACC {m['acc']:.4f} ASR {m['asr']:.4f} tail flip {ch[tail].mean():.3f}"
          f" non-tail changed {ch[~tail].mean():.4f} [{time.time() - T0:.0f}s]", flush=True)

  def fold(v):
    return {**variables, "params": projection.fold(variables["params"],
                                                   {args.layer: v[:, None].astype(np.float32)})}

  report("d_perp_mu zero", fold(dp))

  def recal(vv, n_batches=20):
    stats = vv["batch_stats"]
    step = jax.jit(lambda s, xb: model.apply({"params": vv["params"], "batch_stats": s}, xb,
                                             train=True, mutable=["batch_stats"])[1]["batch_stats"])
    order = np.random.default_rng(1).permutation(len(imgs))
    for i in range(n_batches):
      stats = step(stats, imgs[order[i * 500:(i + 1) * 500]])
    return {**vv, "batch_stats": stats}

  report("d zero + BN recal", recal(fold(d)))
  report("v1 zero + BN recal", recal(fold(v1)))
  report("none + BN recal", recal(dict(variables)))


if __name__ == "__main__":
  main()
