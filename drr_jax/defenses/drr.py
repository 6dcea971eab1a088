"""Directional Rank Reduction (Algorithm 1 of the paper) over any Flax Linen model.

For each conv/dense layer, first to last: take the feature matrix X of the (poisoned)
data at that layer, find k orthonormal directions maximizing the third central moment of
X v (`stiefel`), keep those whose criterion exceeds tau, and fold P = I - V V^T into the
layer's kernel (`projection`). By default (see the README for the evidence) a kept
candidate v is replaced by the mean difference d of its skewed tail and the rest (the
direction Theorem 1 says v approximates), confirmed by whether removing it flips its
tail's predictions, and removed by replacing the component with its benign mean rather
than zero, the constant folded into biases or BatchNorm running means; a kept direction
is also removed from the later layers that read the same channels through identity
shortcuts, and from every layer that reads the very same input tensor whatever the order
the model calls them in (`carry`, sequential mode). In the faithful 'sequential' mode the
features of later layers come from the network as modified so far; they are re-extracted
only after a layer was actually projected (before that, the original network's features
are exact).
The 'one_pass' mode takes every layer's features from the original network and
optimizes all frames of equal width together in one vmapped program.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from drr_jax import evaluate, features, projection, stiefel

SIDES = ("input", "output")
MODES = ("sequential", "one_pass")
DIRECTIONS = ("skew", "tail_mean")
MEAN_FITS = ("average", "interior")
_PROBE = 4  # images on which mean shifts are traced to the BatchNorms that absorb them
_COLLATERAL = 1000  # confirmation images on which a removal's collateral is measured


def default_config() -> dict[str, Any]:
  """DRR settings; see the README for the evidence behind each default."""
  return {
      "side": "input",         # project the feature a weight consumes (paper: W^ = P W)
      "pooling": "max",        # conv feature -> per-channel spatial max per image
      "k": 4,                  # directions optimized per layer (multistart: starts, <= C)
      "search": "multistart",  # 'joint' (St(C, k), Algorithm 1), 'greedy' (deflation) or
                               # 'multistart' (k independent ascents from the top axes)
      "tau": 2.0,              # keep a direction if its criterion exceeds tau
      "direction": "tail_mean",  # what a kept candidate removes: 'skew' (the optimized
                               # direction v) or 'tail_mean' (mean of v's skewed tail
                               # minus the rest's: Theorem 1's d, which v approximates)
      "locate": True,          # conv, 'tail_mean': for a confirmed candidate, also try the
                               # tail mean of the feature at the position where it fires
                               # most (a local trigger's place); keep whichever removal
                               # flips more of the tail
      "mean_fit": "average",   # a 3x3 conv's mean-replacement constant: its exact value
                               # averaged over output positions ('average') or its value
                               # away from the zero-padded border ('interior')
      "keep_mean": True,       # replace the component by its benign mean (outside the
                               # skewed tail) instead of zeroing it: x - (x - mu) V V^T,
                               # the constant folded into biases / BatchNorm means
      "standardize": True,     # criterion = skewness m3 / m2^1.5 (scale-free), not raw m3
      "steps": 200,            # Cayley ascent steps
      "lr": 0.1,               # Cayley step size
      "mode": "sequential",    # 'sequential' (Algorithm 1) or 'one_pass'
      "rounds": 1,             # sequential: revisit a layer, with re-extracted features,
                               # up to this many times while directions are still kept
      "batch_size": 500,       # images per forward pass while extracting features
      "layers": None,          # optional list of layer names to consider (default: all)
      "skip_classifier": True,  # never project the last layer's input (class directions)
      # Confirmation (ours, not the paper's): a candidate direction (criterion > tau) is
      # projected only if removing it changes the prediction of most images in its skewed
      # tail (z > tail_z) -- the signature of a sub-population whose label the direction
      # decides. Measured on `confirm_samples` images of the defense set.
      "confirm": True,
      "confirm_samples": 5000,
      "tail_z": 2.0,
      "min_tail_flip": 0.75,
      # ... and only if it changes at most this share of the predictions outside its
      # tail (measured on up to 1,000 of the confirmation images): a removal that moves
      # many images it is not aimed at is a class direction, not a backdoor's.
      "max_collateral": 0.15,
      # Once a direction was kept, a later candidate is tried only if at least this share
      # of its tail lies in the tails already removed: the same sub-population, not a
      # class surfacing once the poison direction is gone. None: off.
      "tail_overlap": 0.5,
      # Sequential, input side: a kept direction is also removed from the later layers
      # (the classifier included) that read the same channels through identity shortcuts
      # -- per-channel correlation of the two inputs over images, less that of unmatched
      # channels, at least `carry_link` -- where that flips at least half of the tail
      # images whose prediction the removals so far left unchanged. Layers that read the
      # very same tensor (e.g. a 1x1 shortcut conv beside a block's first conv) are tried
      # first, even if the model calls them earlier.
      "carry": True,
      "carry_link": 0.3,
      "seed": 0,
  }


class DefenseError(ValueError):
  """Input that DRR cannot work with; the message names the problem."""


def _check_config(cfg: Mapping[str, Any]) -> None:
  unknown = set(cfg) - set(default_config())
  if unknown:
    raise DefenseError(f"unknown DRR setting(s) {sorted(unknown)}")
  if cfg["side"] not in SIDES:
    raise DefenseError(f"side must be one of {SIDES}, got {cfg['side']!r}")
  if cfg["search"] not in stiefel.SEARCHES:
    raise DefenseError(f"search must be one of {tuple(stiefel.SEARCHES)}, got "
                       f"{cfg['search']!r}")
  if cfg["direction"] not in DIRECTIONS:
    raise DefenseError(f"direction must be one of {DIRECTIONS}, got {cfg['direction']!r}")
  for key in ("keep_mean", "locate", "carry"):
    if not isinstance(cfg[key], (bool, np.bool_)):
      raise DefenseError(f"{key} must be True or False, got {cfg[key]!r}")
  if cfg["mean_fit"] not in MEAN_FITS:
    raise DefenseError(f"mean_fit must be one of {MEAN_FITS}, got {cfg['mean_fit']!r}")
  if cfg["mode"] not in MODES:
    raise DefenseError(f"mode must be one of {MODES}, got {cfg['mode']!r}")
  if cfg["pooling"] not in features.POOLINGS:
    raise DefenseError(f"pooling must be one of {features.POOLINGS}, got {cfg['pooling']!r}")
  if not isinstance(cfg["k"], (int, np.integer)) or cfg["k"] < 1:
    raise DefenseError(f"k must be an integer >= 1, got {cfg['k']!r}")
  if not np.isfinite(cfg["tau"]) or cfg["tau"] < 0:
    raise DefenseError(f"tau must be finite and >= 0, got {cfg['tau']!r}")
  if cfg["steps"] < 0 or not cfg["lr"] > 0 or cfg["batch_size"] < 1:
    raise DefenseError("steps must be >= 0, lr > 0 and batch_size >= 1")
  if int(cfg["rounds"]) < 1:
    raise DefenseError(f"rounds must be >= 1, got {cfg['rounds']!r}")
  if not 0.0 <= cfg["min_tail_flip"] <= 1.0 or cfg["confirm_samples"] < 2:
    raise DefenseError("min_tail_flip must be in [0, 1] and confirm_samples >= 2")
  if cfg["tail_overlap"] is not None and not 0.0 <= cfg["tail_overlap"] <= 1.0:
    raise DefenseError(f"tail_overlap must be None or in [0, 1], got {cfg['tail_overlap']!r}")
  if not -1.0 <= cfg["carry_link"] <= 1.0:
    raise DefenseError(f"carry_link must be in [-1, 1], got {cfg['carry_link']!r}")
  if not 0.0 <= cfg["max_collateral"] <= 1.0:
    raise DefenseError(f"max_collateral must be in [0, 1], got {cfg['max_collateral']!r}")


def as_images(batch: Any) -> np.ndarray:
  """An array (N, H, W, C), or an iterable of such arrays or of (images, labels) pairs,
  as one array; checks rank, emptiness and finiteness."""
  if isinstance(batch, (np.ndarray, jax.Array)):
    parts = [batch]
  elif isinstance(batch, Iterable):
    parts = [b[0] if isinstance(b, (tuple, list)) else b for b in batch]
  else:
    raise DefenseError(f"batch must be an array or an iterable of arrays, got {type(batch)}")
  if not parts:
    raise DefenseError("the batch is empty: DRR needs the (poisoned) training images")
  parts = [np.asarray(p) for p in parts]
  for p in parts:
    if p.ndim != 4:
      raise DefenseError(f"images must have shape (N, H, W, C), got {p.shape}")
    if p.shape[1:] != parts[0].shape[1:]:
      raise DefenseError(f"batches disagree on image shape: {p.shape[1:]} vs "
                         f"{parts[0].shape[1:]}")
  images = np.concatenate(parts) if len(parts) > 1 else parts[0]
  if len(images) < 2:
    raise DefenseError(f"the batch holds {len(images)} image(s); DRR needs at least 2")
  if np.issubdtype(images.dtype, np.floating) and not np.all(np.isfinite(images)):
    raise DefenseError("the images contain NaN or Inf")
  return images


def _check_fit(model, variables, image_shape) -> None:
  apply = features.as_apply_fn(model)
  try:
    jax.eval_shape(apply, variables, jnp.zeros((1, *image_shape), jnp.uint8))
  except Exception as e:  # noqa: BLE001 - Flax raises many types for mismatched params
    raise DefenseError(f"the params do not fit the model: {type(e).__name__}: "
                       f"{str(e)[:400]}") from e


def extract(model, variables, images: np.ndarray, layers: tuple[str, ...], *,
            outputs: bool, pooling: str, batch_size: int, progress: bool = True,
            desc: str = "features", with_means: bool = False):
  """Streams the images through the model; returns {layer: (rows, C)} on the host, and
  with `with_means` also {layer: (N, C)} each image's mean of the feature over positions."""
  fn = features.pooled_fn(model, outputs=outputs, pooling=pooling, layers=layers,
                          with_means=True)
  chunks: dict[str, list[np.ndarray]] = {k: [] for k in layers}
  mean_chunks: dict[str, list[np.ndarray]] = {k: [] for k in layers}
  n = len(images)
  for i in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
    x = images[i:i + batch_size]
    m = len(x)
    if m < batch_size and n > batch_size:  # pad: one compiled program for every batch
      x = np.concatenate([x, np.repeat(x[-1:], batch_size - m, 0)])
    out, means = jax.device_get(fn(variables, x))
    for k, v in out.items():
      rows = v.shape[0] // len(x) * m
      chunks[k].append(v[:rows])
      mean_chunks[k].append(means[k][:m])
  feats = {k: np.concatenate(v) for k, v in chunks.items()}
  for k, v in feats.items():
    if not np.all(np.isfinite(v)):
      raise DefenseError(f"the features of layer {k!r} contain NaN or Inf")
  if with_means:
    return feats, {k: np.concatenate(v) for k, v in mean_chunks.items()}
  return feats


def _layer_entry(name, x, result, keep, checks, seconds, v_kept) -> dict[str, Any]:
  """One layer's report; `directions` holds the removed unit vectors, one list each."""
  return {"layer": name, "channels": int(x.shape[1]), "rows": int(x.shape[0]),
          "criterion": [float(v) for v in np.asarray(result.values)],
          "kept": int(np.sum(keep)), "checks": checks, "seconds": seconds,
          "directions": np.asarray(v_kept, np.float64).T.tolist()}


def channel_link(a: np.ndarray, b: np.ndarray) -> float:
  """How much two (N, C) features share their channels: the mean correlation over
  images of channel c in a with channel c in b, less the mean over unmatched pairs
  (c, c'). About 0 for layers whose channels are unrelated; large where an identity
  shortcut carries a's channels into b (the residual stream)."""
  a = (a - a.mean(0)) / (a.std(0) + 1e-12)
  b = (b - b.mean(0)) / (b.std(0) + 1e-12)
  corr = a.T @ b / len(a)
  c = len(corr)
  diag = np.trace(corr)
  off = (corr.sum() - diag) / max(c * c - c, 1)
  return float(diag / c - off)


def same_input(means: Mapping[str, np.ndarray]) -> dict[str, list[str]]:
  """{layer: the other layers whose input is the very same tensor}, from each layer's
  (N, C) per-image input means: equal arrays (to float32 rounding) mean one tensor read
  twice, such as a block's first conv and its 1x1 shortcut conv."""
  names = list(means)
  out: dict[str, list[str]] = {n: [] for n in names}
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      x, y = means[a], means[b]
      if x.shape == y.shape and np.allclose(x, y, rtol=1e-5, atol=1e-6):
        out[a].append(b)
        out[b].append(a)
  return out


def _skewed_tail(x: np.ndarray, v: np.ndarray, n: int, tail_z: float
                 ) -> tuple[np.ndarray, np.ndarray]:
  """v oriented so that its projections skew to the right, and the per-image mask of the
  skewed tail (some row of the image with z-score > tail_z along v)."""
  proj = (x - x.mean(0)) @ v
  sign = np.sign(np.mean(proj ** 3)) or 1.0
  z = sign * proj / (proj.std() + 1e-12)
  return sign * v, z.reshape(n, -1).max(1) > tail_z


class _Confirmer:
  """Tests candidate directions on a fixed subset S of the defense set: does removing a
  direction change the predictions of (most of) the images in its skewed tail?"""

  def __init__(self, model, images, cfg):
    n = len(images)
    m = min(int(cfg["confirm_samples"]), n)
    self.n = n
    self.idx = np.sort(np.random.default_rng(cfg["seed"]).choice(n, m, replace=False))
    self.images, self.model, self.cfg = images[self.idx], model, cfg
    self.batch = min(int(cfg["batch_size"]), m)
    # the images on which collateral changes are counted (positions in self.images)
    self.side = np.sort(np.random.default_rng(cfg["seed"] + 1).permutation(m)[:_COLLATERAL])
    self._base_key, self._base = None, None

  def _predict(self, variables):
    return evaluate.predict(self.model, variables, self.images, self.batch, progress=False)

  def base(self, variables):
    """Predictions of the network as it stands, recomputed only when its variables change."""
    key = tuple(variables.values())  # held, so their ids cannot be reused meanwhile
    if self._base_key is None or len(key) != len(self._base_key) or any(
        a is not b for a, b in zip(key, self._base_key)):
      self._base, self._base_key = self._predict(variables), key
    return self._base

  def rows(self, variables, layer: str, v: np.ndarray, outputs: bool) -> np.ndarray:
    """(m, C) float64: each confirmation image's feature of `layer` at its position where
    the projection on v is largest (`features.located_fn`)."""
    fn = features.located_fn(self.model, layer, outputs=outputs)
    vj = jnp.asarray(v, jnp.float32)
    out = []
    for i in range(0, len(self.images), self.batch):
      x = self.images[i:i + self.batch]
      m = len(x)
      if m < self.batch:  # pad: one compiled program for every batch
        x = np.concatenate([x, np.repeat(x[-1:], self.batch - m, 0)])
      out.append(np.asarray(fn(variables, x, vj))[:m])
    return np.concatenate(out).astype(np.float64)

  def _changed(self, variables, trial, rows: np.ndarray) -> np.ndarray:
    """Whether the trial's prediction differs from the current one, on images[rows]
    (padded to whole batches, so one compiled program serves every count)."""
    before = self.base(variables)[rows]
    images = self.images[rows]
    pad = -len(rows) % self.batch
    if pad:
      images = np.concatenate([images, np.repeat(images[-1:], pad, 0)])
    after = evaluate.predict(self.model, trial, images, self.batch, progress=False)
    return before != after[:len(rows)]

  def _flips(self, variables, trial, tail: np.ndarray, rows: np.ndarray
             ) -> tuple[float, float]:
    """(share of images[rows] whose prediction the trial changes, the same share among
    the `side` images outside the tail: the collateral); tail: mask over self.images."""
    if not len(rows):
      return 0.0, 0.0
    flip = float(np.mean(self._changed(variables, trial, rows)))
    others = self.side[~tail[self.side]]
    if not len(others):
      return flip, 0.0
    return flip, float(np.mean(self._changed(variables, trial, others)))

  def check_residual(self, original, variables, trial, tail: np.ndarray
                     ) -> dict[str, float]:
    """Carry statistics: among the tail images whose prediction is still the original
    network's (`original`: its predictions), the share the trial changes; and the
    collateral, as in `check`."""
    tail = tail[self.idx]
    rows = np.flatnonzero(tail & (self.base(variables) == original))
    flip, collateral = self._flips(variables, trial, tail, rows)
    return {"residual": int(len(rows)), "tail_flip": flip, "collateral": collateral}

  def check(self, variables, trial, tail: np.ndarray) -> dict[str, float]:
    """Tail-flip and collateral statistics of a trial network; tail: per-image mask over
    the defense set. The trial predicts only the tail images and the non-tail ones among
    `side`, not the whole confirmation set."""
    tail = tail[self.idx]
    rows = np.flatnonzero(tail)
    flip, collateral = self._flips(variables, trial, tail, rows)
    return {"tail_frac": float(len(rows) / len(self.idx)), "tail_flip": flip,
            "collateral": collateral}


def defend(model: nn.Module | Callable, variables: Mapping[str, Any], batch: Any, *,
           config: Mapping[str, Any] | None = None, progress: bool = True
           ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Runs DRR; returns (new variables, report).

  model: a Linen module (applied with train=False) or an apply(variables, images)
  function that calls Linen modules inside. batch: the (poisoned) training images, as an
  array or an iterable of arrays or (images, labels) pairs. config: overrides of
  `default_config()`. The report holds, per layer, the criterion of each optimized
  direction, the confirmation statistics of the candidates, how many directions were
  kept, and the seconds spent.
  """
  cfg = {**default_config(), **dict(config or {})}
  _check_config(cfg)
  images = as_images(batch)
  _check_fit(model, variables, images.shape[1:])
  order = features.layer_order(model, variables, images.shape[1:])
  if not order:
    raise DefenseError("the model has no conv or dense layer to defend")
  classifier = order[-1]
  if cfg["skip_classifier"] and len(order) > 1:
    order = order[:-1]
  if cfg["layers"] is not None:
    unknown = set(cfg["layers"]) - set(order)
    if unknown:
      raise DefenseError(f"unknown layer(s) {sorted(unknown)}; DRR can visit {order}")
    order = [l for l in order if l in set(cfg["layers"])]
  outputs = cfg["side"] == "output"
  kernels = features.layer_kernels(variables["params"])
  width = {name: kernels[name].shape[-1 if outputs else -2]
           for name in [*order, classifier]}
  if cfg["search"] != "multistart":  # multistart's k counts starts, capped at C below
    for name in order:
      c = width[name]
      if cfg["k"] > c:
        raise DefenseError(f"k = {cfg['k']} exceeds the {c} channels of layer {name!r}")
  k_of = lambda name: min(int(cfg["k"]), width[name])
  opt = {"steps": int(cfg["steps"]), "lr": float(cfg["lr"]),
         "standardize": bool(cfg["standardize"]), "search": cfg["search"]}
  ext = dict(outputs=outputs, pooling=cfg["pooling"], batch_size=int(cfg["batch_size"]),
             progress=progress, with_means=True)
  t_start = time.time()
  variables = dict(variables)
  confirmer = _Confirmer(model, images, cfg) if cfg["confirm"] else None
  probe = jnp.asarray(images[:_PROBE])
  n = len(images)
  removed_tails = np.zeros(n, bool)  # images in the tails of the directions kept so far

  coverage: dict[str, Any] = {}

  def project(current, name, v, mean):
    """`current` with v (C, m) removed from layer `name`: zeroed, or replaced by its mean
    (the constant folded exactly where the network allows; else zeroed). -> (vars, kept)"""
    kernel = features.layer_kernels(current["params"])[name]
    folded = {**current, "params": projection.fold(current["params"], {name: v},
                                                   cfg["side"])}
    if not cfg["keep_mean"]:
      return folded, False
    if cfg["mean_fit"] == "average" and not outputs and name not in coverage:
      coverage[name] = projection.tap_coverage(model, current, name, probe)
    shift = projection.mean_shift(kernel, v, mean, cfg["side"], coverage.get(name))
    absorbed, ok = projection.absorb_shifts(model, folded, {name: shift}, probe)
    return (absorbed, True) if ok else (folded, False)

  def located(base, name, v, tail, against):
    """The tail-mean direction of the features at the position where v fires most, on
    the confirmation images (orthonormal to `against`), or None when it is degenerate."""
    rows = confirmer.rows(base, name, v, outputs)
    t = tail[confirmer.idx]
    if t.all() or not t.any():
      return None
    u = rows[t].mean(0) - rows[~t].mean(0)
    for w in against:
      u = u - (w @ u) * w
    norm = np.linalg.norm(u)
    return u / norm if norm > 1e-12 else None

  def decide(name, x, res, base, image_means, prior=()):
    """The directions of one layer to project, as an orthonormal (C, m) frame, and the
    network with them removed.

    Candidates are the columns with criterion > tau, by decreasing criterion; with
    direction 'tail_mean' each is replaced by the mean difference of its skewed tail.
    Each is made orthogonal to those already kept (one mostly inside their span is a
    duplicate and skipped). With confirmation, a candidate is kept only if removing it,
    on top of the directions kept before it, flips most of its tail and few other
    images; at a conv layer its located estimate (`located`) replaces it when that
    flips more of the tail.
    """
    values, frame = np.asarray(res.values), np.asarray(res.frame)
    conv_layer = features.layer_kernels(base["params"])[name].ndim > 2
    keep = np.zeros(len(values), bool)
    kept: list[np.ndarray] = []
    tails: list[np.ndarray] = []
    checks = []
    current = base
    anchor = np.zeros(len(frame))  # sum of (benign mean . v) v over kept v: their values
    for j in np.argsort(-values):
      if not values[j] > cfg["tau"]:
        break
      v, tail = _skewed_tail(x, frame[:, j].astype(np.float64), n, float(cfg["tail_z"]))
      if cfg["direction"] == "tail_mean":
        rows = np.repeat(tail, len(x) // n)
        if rows.all() or not rows.any():
          continue
        v = x[rows].mean(0) - x[~rows].mean(0)
        v = v / (np.linalg.norm(v) + 1e-30)
      for u in list(prior) + kept:  # orthogonal to what this layer already lost
        v = v - (u @ v) * u
      if np.linalg.norm(v) < 0.5:  # mostly a direction already kept
        continue
      v = v / np.linalg.norm(v)
      if cfg["tail_overlap"] is not None and removed_tails.any():
        overlap = float(np.mean(removed_tails[tail]))
        if overlap < cfg["tail_overlap"]:
          checks.append({"column": int(j), "tail_frac": float(np.mean(tail)),
                         "tail_flip": 0.0, "collateral": 0.0, "overlap": overlap})
          continue
      # the benign value: the mean over images outside the tail (the suspected poison)
      benign = image_means[~tail].mean(0).astype(np.float64)
      trial, mean_kept = project(current, name, v[:, None].astype(np.float32), benign)
      if confirmer is not None:
        stats = confirmer.check(current, trial, tail)
        stats["column"] = int(j)
        stats["mean_kept"] = mean_kept
        checks.append(stats)
        # at least 10 tail images, so that a flip rate is more than a coin toss
        if not (stats["tail_flip"] >= cfg["min_tail_flip"]
                and stats["tail_frac"] * len(confirmer.idx) >= 10):
          continue
        if cfg["locate"] and cfg["direction"] == "tail_mean" and conv_layer:
          alt = located(base, name, v, tail, list(prior) + kept)
          if alt is not None:
            alt_trial, alt_kept = project(current, name, alt[:, None].astype(np.float32),
                                          benign)
            alt_stats = confirmer.check(current, alt_trial, tail)
            alt_flip = alt_stats["tail_flip"]
            stats["pooled_flip"], stats["located_flip"] = stats["tail_flip"], alt_flip
            if (alt_flip > stats["tail_flip"]
                and alt_stats["collateral"] <= cfg["max_collateral"]):
              v, trial, mean_kept = alt, alt_trial, alt_kept
              stats.update(tail_flip=alt_flip, collateral=alt_stats["collateral"],
                           located=True, mean_kept=alt_kept)
        if stats["collateral"] > cfg["max_collateral"]:
          continue
      current = trial
      keep[j] = True
      kept.append(v)
      tails.append(tail)
      removed_tails[tail] = True
      anchor = anchor + (benign @ v) * v
    v_kept = np.stack(kept, 1).astype(np.float32) if kept else np.zeros((len(frame), 0),
                                                                        np.float32)
    return v_kept, keep, checks, current, anchor, tails

  # carrying kept directions to the later readers of the same channels (sequential only)
  carry = (cfg["carry"] and cfg["mode"] == "sequential" and confirmer is not None
           and not outputs)
  original = confirmer.base(variables) if carry else None  # the original predictions
  readers = [*order, classifier] if classifier not in order else list(order)
  lost: dict[str, list[np.ndarray]] = {}  # directions carried into each reader
  siblings: dict[str, list[str]] = {}  # readers of the same tensor, from the first pass
  carried: list[dict[str, Any]] = []
  carried_kept = lambda: [c for c in carried if c["kept"]]

  def carry_on(name, v_kept, tails, current, means):
    """`current` with each direction kept at `name` also removed from the other readers
    of the same tensor and the later readers of the same channels (`channel_link`),
    where that flips at least half of the tail images whose prediction has not changed
    yet; records each try in `carried`."""
    same = siblings.get(name, [])
    later = [r for r in readers[readers.index(name) + 1:] if r not in same]
    for v, tail in zip(np.asarray(v_kept, np.float64).T, tails):
      for r in [*same, *later]:
        if width[r] != width[name]:
          continue
        # A sibling called before `name` was not re-extracted, but its input is this one.
        mean_r = means[name] if r in same else means[r]
        link = channel_link(means[name], mean_r)
        if link < cfg["carry_link"]:
          continue
        u = v.copy()
        for w in lost.get(r, []):
          u = u - (w @ u) * w
        if np.linalg.norm(u) < 0.5:
          continue
        u = u / np.linalg.norm(u)
        benign = mean_r[~tail].mean(0).astype(np.float64)
        trial, mean_kept = project(current, r, u[:, None].astype(np.float32), benign)
        stats = confirmer.check_residual(original, current, trial, tail)
        ok = (stats["residual"] >= 10 and stats["tail_flip"] >= 0.5
              and stats["collateral"] <= cfg["max_collateral"])
        carried.append({"from": name, "to": r, "link": link, "mean_kept": mean_kept,
                        **stats, "kept": bool(ok),
                        "direction": u.tolist() if ok else []})
        if stats["residual"] < 10:
          break  # nothing left for later readers to flip
        if ok:
          current = trial
          lost.setdefault(r, []).append(u)
    return current

  entries, passes = [], 0
  if cfg["mode"] == "one_pass":
    feats, means = extract(model, variables, images, tuple(order), **ext)
    passes = 1
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name in order:
      by_shape.setdefault(feats[name].shape, []).append(name)
    results = {}
    for shape, names in tqdm(by_shape.items(), desc="directions", disable=not progress,
                             leave=False):
      t0 = time.time()
      res = jax.device_get(stiefel.maximize_stacked(
          np.stack([feats[n] for n in names]), k_of(names[0]), **opt))
      for i, name in enumerate(names):
        results[name] = (stiefel.FrameResult(res.frame[i], res.values[i], res.history[i]),
                         (time.time() - t0) / len(names))
    frames = {}
    for name in tqdm(order, desc="confirm", disable=not progress, leave=False):
      res, dt = results[name]
      t0 = time.time()
      v_kept, keep, checks, _, anchor, _ = decide(name, feats[name], res, variables,
                                                  means[name])
      if keep.any():
        frames[name] = (v_kept, anchor)
      entries.append(_layer_entry(name, feats[name], res, keep, checks,
                                  dt + time.time() - t0, v_kept))
    for name, (v, anchor) in frames.items():  # all from the original network's features
      variables, _ = project(variables, name, v, anchor)
  else:
    feats, stale = None, True
    bar = tqdm(order, desc="DRR layers", disable=not progress)
    for li, name in enumerate(bar):
      # directions already projected out of this layer's input
      removed = [np.stack(lost[name], 1)] if name in lost else []
      for _ in range(int(cfg["rounds"])):
        t0 = time.time()
        if stale:  # features of this and later layers, from the network as modified so far
          later = readers[readers.index(name):] if carry else order[li:]
          feats, means = extract(model, variables, images, tuple(later),
                                 desc=f"features from {name}", **ext)
          if carry and passes == 0:  # every reader is in the first pass
            siblings = same_input(means)
          passes += 1
          stale = False
        x = feats[name]
        if removed and not outputs:
          # Input-side folding changes the kernel, not its input: look at the input as
          # the kernel now sees it, with the removed directions projected out.
          v = np.concatenate(removed, axis=1)
          x = x - (x @ v) @ v.T
        res = jax.device_get(stiefel.maximize(x, k_of(name), **opt))
        prior = [u for v in removed for u in np.asarray(v, np.float64).T]
        v_kept, keep, checks, variables, _, tails = decide(name, x, res, variables,
                                                           means[name], prior)
        if keep.any():
          removed.append(v_kept)
          stale = True
          if carry:
            variables = carry_on(name, v_kept, tails, variables, means)
        entries.append(_layer_entry(name, x, res, keep, checks, time.time() - t0, v_kept))
        bar.set_postfix(kept=sum(e["kept"] for e in entries) + len(carried_kept()))
        if not keep.any():  # nothing more to remove here: next layer
          break
  projected = [e["layer"] for e in entries if e["kept"]]
  projected += [c["to"] for c in carried_kept() if c["to"] not in projected]
  report = {"config": cfg, "layers": entries, "carried": carried, "feature_passes": passes,
            "directions_kept": sum(e["kept"] for e in entries) + len(carried_kept()),
            "layers_projected": projected,
            "num_images": int(len(images)), "seconds": time.time() - t_start}
  return variables, report


def format_report(report: Mapping[str, Any]) -> str:
  """The per-layer report as a plain-text table."""
  lines = [f"{'layer':32s} {'C':>4s} {'criterion':>10s} {'tail flip':>9s} kept {'s':>6s}"]
  for e in report["layers"]:
    crit = " ".join(f"{v:.2f}" for v in e["criterion"][:3])
    flips = " ".join(f"{c['tail_flip']:.2f}" for c in e.get("checks", [])[:3]) or "-"
    lines.append(f"{e['layer']:32s} {e['channels']:4d} {crit:>10s} {flips:>9s} "
                 f"{e['kept']:4d} {e['seconds']:6.2f}")
  for c in report.get("carried", []):
    lines.append(f"  carried {c['from']} -> {c['to']}: link {c['link']:.2f}, flips "
                 f"{c['tail_flip']:.2f} of {c['residual']} unflipped tail images, "
                 f"collateral {c['collateral']:.3f}: {'kept' if c['kept'] else 'not kept'}")
  cfg = report["config"]
  lines.append(f"tau {cfg['tau']}, confirm {cfg['confirm']} (tail z > {cfg['tail_z']}, "
               f"flip >= {cfg['min_tail_flip']}, collateral <= "
               f"{cfg.get('max_collateral', 1.0)}): {report['directions_kept']} direction(s) "
               f"kept in {len(report['layers_projected'])} layer(s) "
               f"{report['layers_projected']}, {report['feature_passes']} feature pass(es), "
               f"{report['seconds']:.1f} s")
  return "\n".join(lines)
