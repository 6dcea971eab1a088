"""How many directions does the toxic layer need, and which? (validation split only)

Takes one layer of a checkpoint, its max-pooled input features on a random subset of the
poisoned training set, the best skew direction v1 (multistart), and then tries label-free
ways of choosing further directions from the images in v1's skewed tail. Prints val
ACC/ASR and the label-free statistics for each cumulative projection.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import explore_common
from drr_jax import evaluate, projection, stiefel
from drr_jax.defenses import drr

T0 = time.time()


def log(m):
  print(f"[{time.time() - T0:6.1f}s] {m}", flush=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--layer", required=True)
  p.add_argument("--subset", type=int, default=10000)
  p.add_argument("--starts", type=int, default=16)
  p.add_argument("--max_dirs", type=int, default=8)
  args = p.parse_args()
  model, variables, cfg, ds, trigger, imgs, is_poison = explore_common.load(
      args.checkpoint, args.subset)
  log(f"subset {len(imgs)}, poisoned {is_poison.mean():.3f}")
  x = drr.extract(model, variables, imgs, (args.layer,), outputs=False, pooling="max",
                  batch_size=500, progress=False)[args.layer].astype(np.float64)
  log(f"features {x.shape}")
  base_pred = evaluate.predict(model, variables, imgs, progress=False)
  params0 = variables["params"]

  def val(frame):
    prm = projection.fold(params0, {args.layer: frame.astype(np.float32)}, "input")
    v = {**variables, "params": prm}
    m = evaluate.evaluate(model, v, ds.val, trigger, cfg["attack"], progress=False)
    pred = evaluate.predict(model, v, imgs, progress=False)
    return m, pred

  res = jax.device_get(stiefel.maximize(x, args.starts, steps=200, lr=0.1,
                                        standardize=True, search="multistart"))
  order = np.argsort(-np.asarray(res.values))
  v1 = np.asarray(res.frame)[:, order[0]].astype(np.float64)
  xc = x - x.mean(0)
  proj = xc @ v1
  proj *= np.sign(np.mean(proj ** 3))
  v1 *= np.sign(np.mean((xc @ v1) ** 3))
  z = proj / proj.std()
  tail = z > 2.0
  log(f"v1 skew {res.values[order[0]]:.2f}; tail {tail.sum()} images, poisoned share "
      f"{is_poison[tail].mean():.3f}, poison recall {tail[is_poison].mean():.3f}")
  m, pred = val(v1[:, None])
  flipped = tail & (pred != base_pred)
  log(f"v1 only: val ACC {m['acc']:.4f} ASR {m['asr']:.4f}; tail flip "
      f"{flipped.sum() / tail.sum():.3f}; non-tail changed {(pred != base_pred)[~tail].mean():.4f}")

  def run(name, dirs_fn):
    frame = v1[:, None]
    for j in range(1, args.max_dirs):
      u = dirs_fn(frame)
      if u is None:
        break
      u = u - frame @ (frame.T @ u)
      u /= np.linalg.norm(u)
      frame = np.concatenate([frame, u[:, None]], 1)
      m, pred = val(frame)
      ch = pred != base_pred
      log(f"{name} r={frame.shape[1]}: val ACC {m['acc']:.4f} ASR {m['asr']:.4f}; tail flip "
          f"{ch[tail].mean():.3f}; non-tail changed {ch[~tail].mean():.4f}; "
          f"poison flip {ch[is_poison].mean():.3f}")

  rest_mu = x[~tail].mean(0)

  # a. principal directions of the tail around the non-tail mean, after removing frame
  def tail_pca(frame):
    d = x[tail] - rest_mu
    d = d - (d @ frame) @ frame.T
    _, s, vt = np.linalg.svd(d, full_matrices=False)
    return vt[0]
  run("tail-pca", tail_pca)

  # b. mean difference of tail images whose prediction did not change yet vs non-tail
  def unflipped_md(frame):
    prm = projection.fold(params0, {args.layer: frame.astype(np.float32)}, "input")
    pred = evaluate.predict(model, {**variables, "params": prm}, imgs, progress=False)
    still = tail & (pred == base_pred)
    if still.sum() < 10:
      return None
    return x[still].mean(0) - rest_mu
  run("unflipped-md", unflipped_md)

  # c. whitened discriminant (LDA) of tail vs non-tail, in the complement of frame
  def lda(frame):
    q = np.eye(len(v1)) - frame @ frame.T
    cov = np.cov((x[~tail] @ q).T) + 1e-3 * np.eye(len(v1))
    return q @ np.linalg.solve(cov, q @ (x[tail].mean(0) - rest_mu))
  run("lda", lda)

  # d. next skew directions (deflated multistart), for comparison
  def skew_next(frame):
    q = np.eye(len(v1)) - frame @ frame.T
    r = jax.device_get(stiefel.maximize(x @ q, args.starts, steps=200, lr=0.1,
                                        standardize=True, search="multistart"))
    return np.asarray(r.frame)[:, int(np.argmax(r.values))].astype(np.float64)
  run("skew-next", skew_next)


if __name__ == "__main__":
  main()
