"""Analysis only (issue 13, zoo-dev validation): how much can one rank-1 removal at one
site do on a model, if it knew the poisoned images? For each named site, the poisoned-minus-
benign mean difference d of the site's max-pooled features (from the record's poison
indices) is removed in two ways, at run time (`sites.explicit_apply`'s hook):

- orthogonal: x -> x - ((x - m) . d) d, m the benign mean (what DRR folds today);
- oblique: x -> x - ((x - m) . b) d with b = S^-1 d / (d' S^-1 d), S the benign covariance
  (+ ridge): the same rank-1 idempotent map along d, but read by the benign discriminant,
  so that a benign image moves as little as its own spread along b allows.

Printed: the share of the poisoned defense images whose prediction changes, of the benign
ones, and the clean validation ACC / triggered validation ASR after each.

  DRR_DATA_DIR=../shared/data PYTHONPATH=. python experiments/dev_oblique.py \
      --checkpoint artifacts/checkpoints/dev-r18-blend-noise-a20-t6-p1 --sites head:in
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from drr_jax import attacks, checkpoint, datasets, evaluate, features, sites


def _oblique(x, frame, mean):
  a, b = frame[:, 0], frame[:, 1]
  centered = x if mean is None else x - mean
  return x - (centered @ b)[..., None] * a


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--subset", type=int, default=10000, help="defense images")
  p.add_argument("--sites", nargs="+", required=True)
  p.add_argument("--ridge", type=float, default=1e-3, help="of the mean eigenvalue")
  p.add_argument("--jointly", action="store_true",
                 help="also every named site's d removed at once (orthogonal, folded)")
  args = p.parse_args()
  model, variables, meta, record = checkpoint.load_model(args.checkpoint)
  cfg = meta["config"]
  ds = datasets.load(cfg, None, test=False)
  acfg = cfg["attack"]
  trigger = attacks.trigger_from_record(record)
  rng = np.random.default_rng(0)
  idx = np.sort(rng.choice(len(ds.train.labels), args.subset, replace=False))
  images = ds.train.images[idx]
  is_poison = np.isin(idx, checkpoint.poison_indices(record))
  probe = jnp.asarray(images[:4])
  found = {s.name: s for s in sites.find_sites(model, variables, probe)}
  base = evaluate.predict(model, variables, images, progress=False)
  print(f"{args.checkpoint}: {is_poison.sum()} poisoned of {len(images)}", flush=True)
  print(f"{'site':36s} {'way':9s} {'pflip':>5s} {'coll':>5s} {'ACC':>6s} {'ASR':>6s}")
  orthogonal = sites._project
  joint = variables
  for name in args.sites:
    s = found[name]
    fn = features.pooled_fn(model, outputs=s.side == "output", pooling="max",
                            layers=(s.layer,), with_means=True)
    xs, ms = [], []
    for i in range(0, len(images), 500):
      pooled, means = jax.device_get(fn(variables, images[i:i + 500]))
      xs.append(pooled[s.layer]), ms.append(means[s.layer])
    x, means = np.concatenate(xs).astype(np.float64), np.concatenate(ms)
    d = x[is_poison].mean(0) - x[~is_poison].mean(0)
    d /= np.linalg.norm(d)
    cov = np.cov(x[~is_poison].T)
    cov += args.ridge * np.trace(cov) / len(cov) * np.eye(len(cov))
    w = np.linalg.solve(cov, d)
    b = w / (w @ d)
    m = means[~is_poison].mean(0)
    if args.jointly:  # d and m from the original network's features (an oracle anyway)
      joint, _ = sites.fold_with_mean(model, joint, s, d[:, None].astype(np.float32), m,
                                      probe)
    for way, frame, project in (("orthogonal", d[:, None], orthogonal),
                                ("oblique", np.stack([d, b], 1), _oblique)):
      sites._project = project
      try:
        apply = sites.explicit_apply(model, s, frame.astype(np.float32), m)
        after = evaluate.predict(apply, variables, images, progress=False)
        r = evaluate.evaluate(apply, variables, ds.val, trigger, acfg, progress=False)
      finally:
        sites._project = orthogonal
      changed = after != base
      print(f"{name:36s} {way:9s} {changed[is_poison].mean():5.2f} "
            f"{changed[~is_poison].mean():5.3f} {100 * r['acc']:6.2f} "
            f"{100 * r['asr']:6.2f}", flush=True)
  if args.jointly:
    after = evaluate.predict(model, joint, images, progress=False)
    r = evaluate.evaluate(model, joint, ds.val, trigger, acfg, progress=False)
    changed = after != base
    print(f"{'all named sites at once':36s} {'orthogonal':9s} {changed[is_poison].mean():5.2f} "
          f"{changed[~is_poison].mean():5.3f} {100 * r['acc']:6.2f} {100 * r['asr']:6.2f}",
          flush=True)


if __name__ == "__main__":
  main()
