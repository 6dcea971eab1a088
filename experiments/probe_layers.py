"""One layer at a time: top skew direction (multistart), folded alone; val ACC/ASR and the
label-free tail statistics. For comparing poolings on a CPU checkpoint (validation only)."""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import explore_common
from drr_jax import evaluate, features, projection, stiefel
from drr_jax.defenses import drr

T0 = time.time()


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--layers", nargs="*")
  p.add_argument("--pooling", default="max")
  p.add_argument("--subset", type=int, default=4000)
  p.add_argument("--starts", type=int, default=4)
  p.add_argument("--side", default="input")
  args = p.parse_args()
  model, variables, cfg, ds, trigger, imgs, is_poison = explore_common.load(
      args.checkpoint, args.subset)
  base = evaluate.predict(model, variables, imgs, progress=False)
  layers = args.layers or features.layer_order(model, variables, imgs.shape[1:])[:-1]
  print(f"{'layer':30s} skew   ACC    ASR   tail  tailpois flip  nontail_ch", flush=True)
  for name in layers:
    x = drr.extract(model, variables, imgs, (name,), outputs=args.side == "output",
                    pooling=args.pooling, batch_size=500, progress=False)[name]
    c = x.shape[1]
    res = jax.device_get(stiefel.maximize(x, min(args.starts, c), steps=200, lr=0.1,
                                          standardize=True, search="multistart"))
    j = int(np.argmax(res.values))
    v = np.asarray(res.frame)[:, j:j + 1]
    proj = (x - x.mean(0)) @ v[:, 0]
    z = (proj / proj.std()).reshape(len(imgs), -1).max(1)
    tail = z > 2.0
    prm = projection.fold(variables["params"], {name: v}, args.side)
    vv = {**variables, "params": prm}
    m = evaluate.evaluate(model, vv, ds.val, trigger, cfg["attack"], progress=False)
    ch = evaluate.predict(model, vv, imgs, progress=False) != base
    print(f"{name:30s} {res.values[j]:5.2f} {m['acc']:.4f} {m['asr']:.4f} "
          f"{tail.mean():.3f} {is_poison[tail].mean() if tail.any() else 0:.3f} "
          f"{ch[tail].mean() if tail.any() else 0:.3f} {ch[~tail].mean():.4f}"
          f"  [{time.time() - T0:.0f}s]", flush=True)


if __name__ == "__main__":
  main()
