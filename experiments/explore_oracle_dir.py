"""Diagnosis only: at a low poison ratio, is the backdoor removable along the *true* mean
difference d = mean(poisoned) - mean(benign) of a layer's max-pooled input features, and
how skewed is the mixture along d? Uses the poison mask (never available to DRR, never
used for a choice); validation split for ACC/ASR."""
from __future__ import annotations

import argparse
import time

import numpy as np

import explore_common
from drr_jax import evaluate, projection
from drr_jax.defenses import drr

T0 = time.time()


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--layers", nargs="+", required=True)
  p.add_argument("--subset", type=int, default=20000)
  args = p.parse_args()
  model, variables, cfg, ds, trigger, imgs, is_poison = explore_common.load(
      args.checkpoint, args.subset)
  is_poison = np.asarray(is_poison, bool)
  print(f"subset {len(imgs)}, poisoned {is_poison.sum()}", flush=True)
  feats = drr.extract(model, variables, imgs, tuple(args.layers), outputs=False,
                      pooling="max", batch_size=500, progress=False)
  for layer in args.layers:
    x = np.asarray(feats[layer], np.float64)
    d = x[is_poison].mean(0) - x[~is_poison].mean(0)
    d /= np.linalg.norm(d)
    pr = (x - x.mean(0)) @ d
    z = pr / pr.std()
    tail = z > 2
    print(f"{layer}: skewness along d {np.mean(z ** 3):.2f}; z>2 tail {tail.mean():.4f} of "
          f"images, {is_poison[tail].mean():.2f} of it poisoned; poisoned with z>2 "
          f"{tail[is_poison].mean():.2f}", flush=True)
    vv = {**variables, "params": projection.fold(variables["params"],
                                                 {layer: d[:, None].astype(np.float32)})}
    m = evaluate.evaluate(model, vv, ds.val, trigger, cfg["attack"], progress=False)
    print(f"  d zeroed at {layer}: val ACC {m['acc']:.4f} ASR {m['asr']:.4f} "
          f"[{time.time() - T0:.0f}s]", flush=True)


if __name__ == "__main__":
  main()
