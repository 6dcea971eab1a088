"""Per layer: the skew direction v1 (multistart, k=4) and the mean difference d of its
skewed tail vs the rest; each removed from the layer's input by zeroing (the paper's P) or
by mean replacement, the latter exact (x - (x - mu) v v^T at the input) or interior-exact
(x P at the input plus the constant mu v v^T W at the output). Validation split only."""
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


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--layers", nargs="+", required=True)
  p.add_argument("--subset", type=int, default=5000)
  p.add_argument("--k", type=int, default=4)
  p.add_argument("--modes", default="zero,mean_in,mean_out")
  args = p.parse_args()
  model, variables, cfg, ds, trigger, imgs, is_poison = explore_common.load(
      args.checkpoint, args.subset)
  base = evaluate.predict(model, variables, imgs, progress=False)
  kernels = features.layer_kernels(variables["params"])
  print(f"{args.checkpoint}: subset {args.subset}", flush=True)
  for layer in args.layers:
    x = drr.extract(model, variables, imgs, (layer,), outputs=False, pooling="max",
                    batch_size=500, progress=False)[layer].astype(np.float64)
    mu = drr.extract(model, variables, imgs[:2000], (layer,), outputs=False,
                     pooling="mean", batch_size=500, progress=False)[layer].mean(0)
    res = jax.device_get(stiefel.maximize(x, min(args.k, x.shape[1]), steps=200, lr=0.1,
                                          standardize=True, search="multistart"))
    v1 = np.asarray(res.frame)[:, int(np.argmax(res.values))].astype(np.float64)
    pr = (x - x.mean(0)) @ v1
    v1 *= np.sign(np.mean(pr ** 3))
    pr *= np.sign(np.mean(pr ** 3))
    tail = pr / pr.std() > 2
    d = x[tail].mean(0) - x[~tail].mean(0)
    d /= np.linalg.norm(d)
    pd = (x - x.mean(0)) @ d
    sk = np.mean(pd ** 3) / np.mean(pd ** 2) ** 1.5
    print(f"{layer}: v1 skew {np.max(res.values):.2f}, d skew {sk:.2f}, cos {v1 @ d:.2f}; "
          f"tail {tail.mean():.3f} poisoned {is_poison[tail].mean():.3f}", flush=True)
    kern = np.asarray(kernels[layer], np.float64)
    for name, v in (("v1", v1), ("d", d)):
      for mode in args.modes.split(","):
        c = jnp.asarray((mu @ v) * v, jnp.float32)
        b = jnp.asarray(np.tensordot((mu @ v) * v, kern, axes=([0], [kern.ndim - 2])).reshape(-1, kern.shape[-1]).sum(0), jnp.float32)
        apply = explore_common.removing(model, layer, v[:, None],
                                        shift_in=c if mode == "mean_in" else None,
                                        shift_out=b if mode == "mean_out" else None)

        m = evaluate.evaluate(apply, variables, ds.val, trigger, cfg["attack"], progress=False)
        ch = evaluate.predict(apply, variables, imgs, progress=False) != base
        print(f"  {name:2s} {mode:8s} val ACC {m['acc']:.4f} ASR {m['asr']:.4f} tail flip "
              f"{ch[tail].mean():.3f} non-tail changed {ch[~tail].mean():.4f} "
              f"[{time.time() - T0:.0f}s]", flush=True)


if __name__ == "__main__":
  main()
