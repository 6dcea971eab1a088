"""Candidate directions, before any confirmation: pure NumPy on a layer's features.

An optimized column v (criterion > tau) is oriented so that its projections skew right
and defines a skewed tail of images (`skewed_tail`). With direction 'tail_mean' it is
replaced by the mean difference of that tail and the rest (Theorem 1's d, which v
approximates; `tail_mean`). It is then made orthogonal to what the layer already lost
(`orthonormal`): one mostly inside that span is a duplicate. Once directions were kept,
`tail_overlap` tells a candidate aimed at the same images from a class surfacing once
the poison direction is gone. `located` is the alternative estimate at a conv layer: the
tail mean of the feature at the position where v fires most (a local trigger's place).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def centered(x: np.ndarray) -> np.ndarray:
  """x less its column mean, in float64: what `skewed_tail` projects, computed once for
  all of a unit's candidates (the same numbers as computing it for each)."""
  return (x - x.mean(0)).astype(np.float64)


def skewed_tail(x: np.ndarray, v: np.ndarray, n: int, tail_z: float,
                xc: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """v oriented so that its projections skew to the right, and the per-image mask of the
  skewed tail (some row of the image with z-score > tail_z along v); xc: `centered(x)`
  where the caller has it."""
  proj = (centered(x) if xc is None else xc) @ v
  sign = np.sign(np.mean(proj ** 3)) or 1.0
  z = sign * proj / (proj.std() + 1e-12)
  return sign * v, z.reshape(n, -1).max(1) > tail_z


def tail_mean(x: np.ndarray, tail: np.ndarray, n: int) -> np.ndarray | None:
  """The unit mean difference of the feature rows of the tail images and the others'
  (x: (rows, C) for n images), or None when the tail is empty or everything."""
  rows = np.repeat(tail, len(x) // n)
  if rows.all() or not rows.any():
    return None
  v = x[rows].mean(0) - x[~rows].mean(0)
  return v / (np.linalg.norm(v) + 1e-30)


def contrast(x: np.ndarray, a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray | None:
  """The unit mean difference of the feature rows of images `a` and of images `b`
  (per-image masks over the n images of x (rows, C)); None when either is empty. With
  `b` the other images of the tail's class, the mean difference of a clean-label tail
  less its class: the trigger's feature."""
  per = len(x) // n
  ra, rb = np.repeat(a, per), np.repeat(b, per)
  if not ra.any() or not rb.any():
    return None
  v = x[ra].mean(0) - x[rb].mean(0)
  norm = np.linalg.norm(v)
  return v / norm if norm > 1e-12 else None


def _without(v: np.ndarray, against: Sequence[np.ndarray]) -> np.ndarray:
  """v less its components along each of the (orthonormal) vectors `against`, in turn."""
  for u in against:
    v = v - (u @ v) * u
  return v


def orthonormal(v: np.ndarray, against: Sequence[np.ndarray]) -> np.ndarray | None:
  """Unit v orthogonal to `against`, or None when less than half of it is left outside
  their span (mostly a direction already kept)."""
  v = _without(v, against)
  if np.linalg.norm(v) < 0.5:
    return None
  return v / np.linalg.norm(v)


def candidate(x: np.ndarray, column: np.ndarray, n: int, *, direction: str,
              tail_z: float, against: Sequence[np.ndarray], xc: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray] | None:
  """(unit direction, per-image tail mask) of one optimized column of a layer's features
  x (rows, C) over n images, or None when it yields no usable direction; xc:
  `centered(x)` where the caller has it."""
  v, tail = skewed_tail(x, column.astype(np.float64), n, float(tail_z), xc)
  if direction == "tail_mean":
    v = tail_mean(x, tail, n)
    if v is None:
      return None
  v = orthonormal(v, against)
  return None if v is None else (v, tail)


def tail_overlap(removed_tails: np.ndarray, tail: np.ndarray) -> float | None:
  """The share of the tail's images inside the tails already removed, or None while
  nothing was removed."""
  if not removed_tails.any():
    return None
  return float(np.mean(removed_tails[tail]))


def located(rows: np.ndarray, tail: np.ndarray, against: Sequence[np.ndarray]
            ) -> np.ndarray | None:
  """The unit tail-mean direction of `rows` (m, C), each image's feature where the
  candidate fires most, and `tail` (m,) over the same images, orthogonal to `against`;
  None when it is degenerate."""
  if tail.all() or not tail.any():
    return None
  u = _without(rows[tail].mean(0) - rows[~tail].mean(0), against)
  norm = np.linalg.norm(u)
  return u / norm if norm > 1e-12 else None
