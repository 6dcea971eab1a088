"""The landscape of a zoo-dev model, site by site (issue 13; validation images only).

For every site of the network (`drr_jax.sites`: output sites, and the input sites that are
exact), each of the top skewness directions of its pooled features (multistart ascent on
the *original* network) is turned into its tail-mean direction and removed alone, with
mean replacement, folded exactly. Printed per candidate:
- label-free statistics a selection rule may use: skewness, the site's median axis
  skewness, tail share, tail flip (share of the tail whose prediction the removal
  changes), collateral (share of the other images that change), same-class collateral
  (among the non-tail images predicted as the tail's majority class), and the tail's
  majority-class share before removal;
- for analysis only, never for a decision: the tail's poisoned share, and the clean
  validation ACC and triggered validation ASR after the removal.

  DRR_DATA_DIR=../shared/data PYTHONPATH=. python experiments/dev_sites.py \
      --checkpoint artifacts/checkpoints/dev-r18-badnets3-br-t0-p10 > log
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from drr_jax import attacks, checkpoint, datasets, evaluate, features, sites, stiefel


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--subset", type=int, default=5000, help="defense images")
  p.add_argument("--starts", type=int, default=4)
  p.add_argument("--per_site", type=int, default=2, help="candidates tried per site")
  p.add_argument("--tail_z", type=float, default=2.0)
  p.add_argument("--oracle", action="store_true",
                 help="analysis only: per site, the poisoned-minus-benign mean direction "
                      "(from the record's poison indices): its skewness, the poison's place "
                      "along it, its cosine with the best found direction, and its removal")
  args = p.parse_args()
  t0 = time.time()
  model, variables, meta, record = checkpoint.load_model(args.checkpoint)
  cfg = meta["config"]
  ds = datasets.load(cfg, None, test=False)
  acfg = cfg["attack"]
  trigger = (attacks.trigger_from_record(record)
             if acfg["name"] != "none" else None)
  rng = np.random.default_rng(0)
  idx = np.sort(rng.choice(len(ds.train.labels), args.subset, replace=False))
  images = ds.train.images[idx]
  is_poison = np.isin(idx, checkpoint.poison_indices(record))
  probe = jnp.asarray(images[:4])
  found = sites.find_sites(model, variables, probe)
  base = evaluate.predict(model, variables, images, progress=False)
  before = evaluate.evaluate(model, variables, ds.val, trigger, acfg, progress=False)
  print(f"{args.checkpoint}: {len(found)} sites, {is_poison.sum()} poisoned of "
        f"{len(images)}; val ACC {100 * before['acc']:.2f} ASR {100 * before['asr']:.2f}",
        flush=True)
  layers_in = tuple(dict.fromkeys(s.layer for s in found if s.side == "input"))
  layers_out = tuple(dict.fromkeys(s.layer for s in found if s.side == "output"))
  feats = {}
  for side, layers in (("input", layers_in), ("output", layers_out)):
    fn = features.pooled_fn(model, outputs=side == "output", pooling="max", layers=layers,
                            with_means=True)
    chunks = {}
    for i in range(0, len(images), 500):
      pooled, means = jax.device_get(fn(variables, images[i:i + 500]))
      for k in layers:
        chunks.setdefault(k, []).append((pooled[k], means[k]))
    for k in layers:
      feats[k, side] = (np.concatenate([a for a, _ in chunks[k]]),
                        np.concatenate([b for _, b in chunks[k]]))
  print(f"features {time.time() - t0:.0f} s", flush=True)
  if args.oracle:
    _oracle(args, model, variables, found, feats, images, is_poison, base, probe, ds, trigger,
            acfg)
    print(f"total {time.time() - t0:.0f} s")
    return
  print(f"{'site':36s} {'skew':>5s} {'axmed':>5s} {'tail':>5s} {'pois':>5s} {'maj':>5s} "
        f"{'flip':>5s} {'coll':>5s} {'scoll':>5s} {'ACC':>6s} {'ASR':>6s}", flush=True)
  for s in found:
    x, means = feats[s.layer, s.side]
    c = x.shape[1]
    xc = x - x.mean(0)
    axis = np.mean(xc ** 3, 0) / (np.mean(xc ** 2, 0) ** 1.5 + 1e-12)
    res = jax.device_get(stiefel.maximize(x, min(args.starts, c), steps=200, lr=0.1,
                                          standardize=True, search="multistart"))
    order = np.argsort(-np.asarray(res.values))
    tried = []
    for j in order:
      if len(tried) >= args.per_site:
        break
      v = np.asarray(res.frame)[:, j].astype(np.float64)
      proj = xc @ v
      sign = np.sign(np.mean(proj ** 3)) or 1.0
      z = sign * proj / (proj.std() + 1e-12)
      tail = z > args.tail_z
      if tail.sum() < 10 or tail.all():
        continue
      d = x[tail].mean(0) - x[~tail].mean(0)
      d = d / np.linalg.norm(d)
      if any(abs(d @ u) > 0.9 for u in tried):
        continue
      tried.append(d)
      benign = means[~tail].mean(0)
      trial, _ = sites.fold_with_mean(model, variables, s, d[:, None], benign, probe)
      after = evaluate.predict(model, trial, images, progress=False)
      changed = after != base
      maj = np.bincount(base[tail], minlength=10).argmax()
      same = (~tail) & (base == maj)
      m = evaluate.evaluate(model, trial, ds.val, trigger, acfg, progress=False)
      print(f"{s.name:36s} {res.values[j]:5.2f} {np.median(axis):5.2f} "
            f"{tail.mean():5.3f} {is_poison[tail].mean():5.2f} "
            f"{np.mean(base[tail] == maj):5.2f} {changed[tail].mean():5.2f} "
            f"{changed[~tail].mean():5.3f} {changed[same].mean():5.3f} "
            f"{100 * m['acc']:6.2f} {100 * (m['asr'] if m['asr'] == m['asr'] else 0):6.2f}",
            flush=True)
  print(f"total {time.time() - t0:.0f} s")


def _oracle(args, model, variables, found, feats, images, is_poison, base, probe, ds,
            trigger, acfg) -> None:
  """What the search would need to find at each site, and what removing it would do."""
  print(f"{'site':36s} {'skew_d':>6s} {'found':>6s} {'cos':>5s} {'zpois':>6s} "
        f"{'p>2':>5s} {'tail':>5s} {'pois':>5s} {'pflip':>5s} {'coll':>5s} "
        f"{'ACC':>6s} {'ASR':>6s}", flush=True)
  for s in found:
    x, means = feats[s.layer, s.side]
    xc = x - x.mean(0)
    d = x[is_poison].mean(0) - x[~is_poison].mean(0)
    d = d / (np.linalg.norm(d) + 1e-12)
    proj = xc @ d
    skew_d = np.mean(proj ** 3) / (np.mean(proj ** 2) ** 1.5 + 1e-12)
    z = proj / (proj.std() + 1e-12)
    res = jax.device_get(stiefel.maximize(x, min(args.starts, x.shape[1]), steps=200,
                                          lr=0.1, standardize=True, search="multistart"))
    j = int(np.argmax(res.values))
    cos = abs(float(np.asarray(res.frame)[:, j] @ d))
    tail = z > args.tail_z
    benign = means[~is_poison].mean(0)
    trial, _ = sites.fold_with_mean(model, variables, s, d[:, None], benign, probe)
    after = evaluate.predict(model, trial, images, progress=False)
    changed = after != base
    m = evaluate.evaluate(model, trial, ds.val, trigger, acfg, progress=False)
    print(f"{s.name:36s} {skew_d:6.2f} {float(res.values[j]):6.2f} {cos:5.2f} "
          f"{np.median(z[is_poison]):6.2f} {np.mean(z[is_poison] > args.tail_z):5.2f} "
          f"{tail.mean():5.3f} {is_poison[tail].mean() if tail.any() else 0:5.2f} "
          f"{changed[is_poison].mean():5.2f} {changed[~is_poison].mean():5.3f} "
          f"{100 * m['acc']:6.2f} {100 * (m['asr'] if m['asr'] == m['asr'] else 0):6.2f}",
          flush=True)


if __name__ == "__main__":
  main()
