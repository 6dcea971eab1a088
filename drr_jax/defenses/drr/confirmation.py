"""Confirmation: does removing a candidate direction change the predictions of (most of)
the images in its skewed tail, and few others?

A `Confirmer` holds a fixed random subset S of the defense set (the confirmation images)
and predicts on it with the network before and after a trial removal: the tail flip
(share of tail images whose prediction changes), the collateral (the same share among up
to `COLLATERAL` images outside the tail), the residual statistics used when a direction
is carried to other readers, and each image's feature at the place where a direction
fires most (`rows`, for the located estimate). With several devices every prediction
batch is split over them (`inference.predict`, `sharding`).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from drr_jax import features, inference, sharding

COLLATERAL = 1000  # confirmation images on which a removal's collateral is measured
MIN_BUCKET = 64    # the smallest batch a trial prediction is padded to


def bucket(n: int, batch: int) -> int:
  """The batch size for predicting n images: the least power of two >= n (at least
  MIN_BUCKET) where that is below `batch`, else `batch`. A tail of 150 images is then
  predicted as 256, not padded to a whole batch of 500, and a few compiled programs
  serve every count."""
  size = max(MIN_BUCKET, 1 << max(0, int(n) - 1).bit_length())
  return min(size, int(batch))


def tail_stats(changed: np.ndarray, known: np.ndarray, share: float, major: np.ndarray,
               still: np.ndarray | None) -> dict[str, Any]:
  """A tail's statistics from whether the trial changed each tail image's prediction
  (`changed`, read where `known`): its share of the confirmation images, the flip, the
  share in the tail's majority class (`major`) and the flip there, and with `still`
  (the tail images still predicted as the original network did) their count and flip."""
  mean = lambda m: float(np.mean(changed[m & known])) if (m & known).any() else 0.0
  out: dict[str, Any] = {"tail_frac": float(share), "tail_flip": mean(np.ones_like(known))}
  if len(changed):
    out["majority_share"] = float(np.mean(major))
    out["majority_flip"] = mean(major)
  if still is not None:
    out["residual"] = int(still.sum())
    out["residual_flip"] = mean(still)
  return out


class Confirmer:
  """Tests candidate directions on a fixed subset S of the defense set: does removing a
  direction change the predictions of (most of) the images in its skewed tail?

  The predictions of the network as it stands are cached (`base`), keyed by the identity
  of its variables' top-level values.
  """

  def __init__(self, model: nn.Module | Callable, images: np.ndarray, *, samples: int,
               batch_size: int, seed: int):
    n = len(images)
    m = min(int(samples), n)
    self.n = n
    self.idx = np.sort(np.random.default_rng(seed).choice(n, m, replace=False))
    self.images, self.model = images[self.idx], model
    self.batch = min(int(batch_size), m)
    # the images on which collateral changes are counted (positions in self.images)
    self.side = np.sort(np.random.default_rng(seed + 1).permutation(m)[:COLLATERAL])
    self._base_key, self._base = None, None
    self._sum = None  # the confirmation images' pixel sum, for implants
    self._implant_cache = None  # ((tail, network key), `_implant_hits` answer)

  def _predict(self, variables: Any) -> np.ndarray:
    return inference.predict(self.model, variables, self.images, self.batch, progress=False)

  def base(self, variables: Any) -> np.ndarray:
    """Predictions of the network as it stands, recomputed only when its variables change."""
    key = tuple(variables.values())  # held, so their ids cannot be reused meanwhile
    if self._base_key is None or len(key) != len(self._base_key) or any(
        a is not b for a, b in zip(key, self._base_key)):
      self._base, self._base_key = self._predict(variables), key
    return self._base

  def rows(self, variables: Any, layer: str, v: np.ndarray, outputs: bool) -> np.ndarray:
    """(m, C) float64: each confirmation image's feature of `layer` at its position where
    the projection on v is largest (`features.located_fn`)."""
    fn = features.located_fn(self.model, layer, outputs=outputs)
    mesh = sharding.batch_mesh()
    vj, variables = sharding.replicate((jnp.asarray(v, jnp.float32), variables), mesh)
    out = [np.asarray(sharding.to_host(fn(variables, x, vj)))[:m]
           for x, m in sharding.batches(self.images, self.batch, mesh)]
    return np.concatenate(out).astype(np.float64)

  def _changed(self, variables: Any, trial: Any, rows: np.ndarray) -> np.ndarray:
    """Whether the trial's prediction differs from the current one, on images[rows]
    (padded to whole batches of a `bucket` size, so that a few compiled programs serve
    every count)."""
    return self.base(variables)[rows] != self._predict_padded(trial, self.images[rows])

  def _flips(self, variables: Any, trial: Any, tail: np.ndarray, rows: np.ndarray,
             changed_rows: np.ndarray | None = None) -> tuple[float, float, float]:
    """(share of images[rows] whose prediction the trial changes, the same share among
    the `side` images outside the tail: the collateral, and among those of them that the
    network puts in the tail's majority class: the class collateral); tail: mask over
    self.images. A class direction's removal moves its whole class, tail or not; a
    trigger's leaves the clean images of the target class where they were."""
    if not len(rows):
      return 0.0, 0.0, 0.0
    if changed_rows is None:
      changed_rows = self._changed(variables, trial, rows)
    return (float(np.mean(changed_rows)),) + self._collateral(variables, trial, tail, rows)

  def _collateral(self, variables: Any, trial: Any, tail: np.ndarray, rows: np.ndarray
                  ) -> tuple[float, float]:
    """(collateral, class collateral) of a trial: the share of the `side` images outside
    the tail whose prediction it changes, and the same among those that the network puts
    in the majority class of images[rows]; tail: mask over self.images."""
    others = self.side[~tail[self.side]]
    if not len(others):
      return 0.0, 0.0
    changed = self._changed(variables, trial, others)
    base = self.base(variables)
    majority = np.bincount(base[rows]).argmax()
    same = base[others] == majority
    return float(np.mean(changed)), float(np.mean(changed[same])) if same.any() else 0.0

  def implanted(self, variables: Any, tail: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, int]:
    """(positions, implanted images, majority class) of `implant`; tail: mask over
    self.images. Empty where the tail is empty or everything."""
    base = self.base(variables)
    rows = np.flatnonzero(tail)
    empty = np.zeros(0, np.int64), self.images[:0]
    if not len(rows) or tail.all():
      return (*empty, -1)
    majority = int(np.bincount(base[rows]).argmax())
    others = self.side[~tail[self.side]]
    others = others[base[others] != majority]
    if not len(others):
      return (*empty, majority)
    if self._sum is None:
      self._sum = self.images.sum(0, dtype=np.float64)
    inside = self.images[tail].sum(0, dtype=np.float64)
    delta = inside / len(rows) - (self._sum - inside) / (len(tail) - len(rows))
    moved = self.images[others].astype(np.float64) + delta
    if self.images.dtype == np.uint8:
      moved = np.clip(np.rint(moved), 0, 255)
    return others, moved.astype(self.images.dtype), majority

  def _predict_padded(self, variables: Any, images: np.ndarray) -> np.ndarray:
    """Predictions on `images`, padded to whole batches of a `bucket` size."""
    size = bucket(len(images), self.batch)
    pad = -len(images) % size
    if pad:
      images = np.concatenate([images, np.repeat(images[-1:], pad, 0)])
    return inference.predict(self.model, variables, images, size,
                             progress=False)[:len(images) - pad]

  def _implant_hits(self, variables: Any, tail: np.ndarray
                    ) -> tuple[int, np.ndarray, int]:
    """(images implanted, those of them the network puts in the majority class, that
    class) for a tail (mask over self.images) on the network `variables`; the last
    answer is kept, since a candidate's implant is asked for before and after its
    trial removal."""
    self.base(variables)  # makes self._base_key the key of `variables`
    key = (tail.tobytes(), self._base_key)
    cached = self._implant_cache
    if cached is not None and cached[0][0] == key[0] and all(
        a is b for a, b in zip(cached[0][1], key[1])):
      return cached[1]
    others, moved, majority = self.implanted(variables, tail)
    hits = (moved[self._predict_padded(variables, moved) == majority] if len(others)
            else moved)
    self._implant_cache = (key, (int(len(others)), hits, majority))
    return self._implant_cache[1]

  def implant(self, variables: Any, tail: np.ndarray, trial: Any = None
              ) -> dict[str, Any]:
    """The tail's input-space implant: the mean difference of the tail's confirmation
    images and the others' (an estimate of an additive trigger, which every poisoned
    image carries and a benign cluster does not share) added to the `side` images
    outside the tail that the network puts in another class than the tail's majority.
    'implant': the share of them it then moves into that class. A trigger moves them
    there whether or not the tail's own labels depend on it (a clean-label trigger's
    tail is its target class, which no removal can flip). With `trial` (a removal),
    'implant_cut': the share of the images so moved that the trial no longer puts
    there, what the tail flip is to a dirty-label trigger. tail: per-image mask over
    the defense set."""
    n, hits, majority = self._implant_hits(variables, tail[self.idx])
    out: dict[str, Any] = {"implant": 0.0, "implant_images": n}
    if not n:
      return out
    out["implant"] = float(len(hits) / n)
    if trial is not None:
      out["implant_cut"] = (float(np.mean(self._predict_padded(trial, hits) != majority))
                            if len(hits) else 0.0)
    return out

  def same_class(self, variables: Any, tail: np.ndarray) -> np.ndarray:
    """(N,) bool over the defense set: the confirmation images outside the tail that the
    network puts in the tail's majority class (the tail's class, less the tail)."""
    inside = tail[self.idx]
    base = self.base(variables)
    mask = np.zeros(len(tail), bool)
    if inside.any():
      majority = np.bincount(base[inside]).argmax()
      mask[self.idx[~inside & (base == majority)]] = True
    return mask

  def collateral(self, variables: Any, trial: Any, tail: np.ndarray) -> tuple[float, float]:
    """(collateral, class collateral) of a trial removal, as `check` measures them;
    tail: per-image mask over the defense set."""
    tail = tail[self.idx]
    rows = np.flatnonzero(tail)
    if not len(rows):
      return 0.0, 0.0
    return self._collateral(variables, trial, tail, rows)

  def check_residual(self, original: np.ndarray, variables: Any, trial: Any,
                     tail: np.ndarray) -> dict[str, float]:
    """Carry statistics: among the tail images whose prediction is still the original
    network's (`original`: its predictions), the share the trial changes; and the
    collateral, as in `check`."""
    tail = tail[self.idx]
    rows = np.flatnonzero(tail & (self.base(variables) == original))
    flip, collateral, _ = self._flips(variables, trial, tail, rows)
    return {"residual": int(len(rows)), "tail_flip": flip, "collateral": collateral}

  def _tail_changes(self, variables: Any, trial: Any, rows: np.ndarray,
                    fails: Callable[[np.ndarray], bool] | None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(changed, known) over images[rows]: whether the trial changes each prediction,
    and which of them were predicted. Without `fails`, all of them. With it, half of
    them first (rounded up to a `bucket`), then the rest only if `fails(changed, with
    every unpredicted image counted as changed)` is False: a gate that fails even if
    every image left would flip fails whatever they do."""
    changed, known = np.ones(len(rows), bool), np.zeros(len(rows), bool)
    first = (len(rows) if fails is None
             else min(len(rows), bucket(-(-len(rows) // 2), self.batch)))
    for part in (slice(0, first), slice(first, len(rows))):
      if part.start >= len(rows):
        break
      changed[part] = self._changed(variables, trial, rows[part])
      known[part] = True
      if fails is not None and not known.all() and fails(changed):
        break
    return changed, known

  def check(self, variables: Any, trial: Any, tail: np.ndarray,
            original: np.ndarray | None = None,
            gate: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """Tail-flip and collateral statistics of a trial network; tail: per-image mask over
    the defense set. The trial predicts only the tail images and the non-tail ones among
    `side`, not the whole confirmation set. Also recorded, for analysis (no decision reads
    them): the share of the tail that the network puts in the tail's majority class, and
    the flip among those images (a backdoor that acts on part of its poison can flip at
    most that part). With `original` (the original network's predictions), also the
    residual statistics of `check_residual` from the same predictions: how many tail
    images the network still predicts as the original did, and the share of them the
    trial changes.

    With `gate`, a test of the tail statistics alone (it must not pass with fewer
    flips where it fails with more): where it fails, the candidate fails whatever its
    collateral, so the collateral images are not predicted ('collateral' and
    'class_collateral' None), and the tail is predicted only until the failure is
    certain (`_tail_changes`): the flips are then over the 'tail_predicted' images
    predicted so far, which is at most what the whole tail would give. The decisions
    are those of predicting everything (tests/test_ranking.py)."""
    tail = tail[self.idx]
    rows = np.flatnonzero(tail)
    base = self.base(variables)[rows]
    major = base == np.bincount(base).argmax() if len(rows) else base.astype(bool)
    still = None if original is None else base == original[rows]

    share = len(rows) / len(self.idx)
    every = np.ones(len(rows), bool)
    fails = None if gate is None else (
        lambda changed: not gate(tail_stats(changed, every, share, major, still)))
    changed, known = self._tail_changes(variables, trial, rows, fails)
    out = tail_stats(changed, known, share, major, still)
    if not known.all():
      out["tail_predicted"] = int(known.sum())
    if gate is not None and not gate(out):
      out.update(collateral=None, class_collateral=None)
      return out
    _, out["collateral"], out["class_collateral"] = self._flips(variables, trial, tail,
                                                                rows, changed)
    return out
