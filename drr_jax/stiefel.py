"""Maximizing the third central moment of projections over the Stiefel manifold St(C, k).

DRR looks, in a layer's features X (N samples x C channels), for k orthonormal directions
along which the projections are most skewed: a small poisoned sub-population shifted by d
makes X v skewed when v is close to d. The search is Riemannian gradient ascent with the
Cayley retraction of Wen & Yin (2013) in its low-rank form, so each step solves a 2k x 2k
system instead of a C x C one. The start is the k neuron axes with the largest criterion
(Algorithm 1 of the paper, H0 = I).

With several devices `maximize` splits the N rows over them (`sharding.shard_batch`):
every moment is a mean over rows, so under jit each device sums its rows and XLA
all-reduces the partial sums; the rows padded to a whole share per device are masked out
of every sum (`mask`, None with one device: the unmasked program, unchanged).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from drr_jax import sharding

# Keeps the skewness finite (zero) on constant projections, e.g. dead ReLU channels.
_EPS = 1e-12


class FrameResult(NamedTuple):
  """frame (C, k) orthonormal, values (k,) per-column criterion at the end, history
  (steps + 1,) summed criterion before each step and at the end; a leading L when stacked."""
  frame: jax.Array
  values: jax.Array
  history: jax.Array


def _row_mean(x: jax.Array, mask: jax.Array | None, keepdims: bool = False) -> jax.Array:
  """The mean over rows (axis 0), of the rows where mask is 1 when a mask is given."""
  if mask is None:
    return jnp.mean(x, axis=0, keepdims=keepdims)
  w = mask.reshape(-1, *([1] * (x.ndim - 1))).astype(x.dtype)
  return jnp.sum(x * w, axis=0, keepdims=keepdims) / jnp.sum(w)


def center(features: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Features (N, C) minus their column mean, as float32; with a (N,) 0/1 mask, the mean
  of the rows it keeps (padding rows: zero after centering, so they add to no moment)."""
  x = jnp.asarray(features, jnp.float32)
  if mask is None:
    return x - jnp.mean(x, axis=0, keepdims=True)
  return (x - _row_mean(x, mask, keepdims=True)) * mask[:, None].astype(x.dtype)


def _moments_to_criterion(m2: jax.Array, m3: jax.Array, standardize: bool) -> jax.Array:
  if standardize:
    return m3 / (jnp.power(m2, 1.5) + _EPS)
  return m3


def criterion(centered: jax.Array, frame: jax.Array, standardize: bool,
              mask: jax.Array | None = None) -> jax.Array:
  """(k,) mean((X v)^3) of each column v of frame; the sample skewness if standardize.
  With a (N,) 0/1 mask, the means over the rows it keeps."""
  p = centered @ frame
  return _moments_to_criterion(_row_mean(p * p, mask), _row_mean(p * p * p, mask),
                               standardize)


def axis_criterion(centered: jax.Array, standardize: bool,
                   mask: jax.Array | None = None) -> jax.Array:
  """(C,) criterion of every neuron axis, straight from the columns (no identity matmul)."""
  x = jnp.asarray(centered, jnp.float32)
  return _moments_to_criterion(_row_mean(x * x, mask), _row_mean(x * x * x, mask),
                               standardize)


def init_frame(centered: jax.Array, k: int, standardize: bool,
               mask: jax.Array | None = None) -> jax.Array:
  """(C, k) identity columns of the k axes with the largest criterion, in decreasing order."""
  scores = axis_criterion(centered, standardize, mask)
  _, idx = jax.lax.top_k(scores, k)
  return jax.nn.one_hot(idx, scores.shape[0], dtype=jnp.float32).T


def cayley_step(frame: jax.Array, euclid_grad: jax.Array, lr: float | jax.Array
                ) -> jax.Array:
  """One ascent step Y = (I - lr/2 A)^{-1} (I + lr/2 A) X with A = G X^T - X G^T.

  Low-rank form (Wen & Yin 2013, Lemma 4): with U = [G, X], V = [X, -G],
  Y = X + lr U (I_2k - lr/2 V^T U)^{-1} V^T X, a 2k x 2k solve; the sign is that of
  maximization (Wen & Yin minimize). A is skew, so Y is orthonormal in exact arithmetic.
  In float32 the error would build up over thousands of steps, so G first loses its
  X sym(X^T G) part (A is unchanged, the numbers get smaller) and Y gets one
  Newton-Schulz polar correction Y (3I - Y^T Y) / 2, which is k x k and moves an
  orthonormal Y only at rounding level.
  """
  x = frame
  k = x.shape[-1]
  xtg = x.T @ euclid_grad
  g = euclid_grad - x @ (0.5 * (xtg + xtg.T))
  u = jnp.concatenate([g, x], axis=-1)
  v = jnp.concatenate([x, -g], axis=-1)
  eye = jnp.eye(2 * k, dtype=x.dtype)
  y = x + lr * (u @ jnp.linalg.solve(eye - 0.5 * lr * (v.T @ u), v.T @ x))
  return y @ (1.5 * eye[:k, :k] - 0.5 * (y.T @ y))


def _ascend(features: jax.Array, lr: jax.Array, k: int, steps: int,
            standardize: bool, mask: jax.Array | None = None) -> FrameResult:
  x = center(features, mask)
  objective = lambda f: jnp.sum(criterion(x, f, standardize, mask))
  value_and_grad = jax.value_and_grad(objective)

  def step(frame, _):
    value, grad = value_and_grad(frame)
    return cayley_step(frame, grad, lr), value

  frame, history = jax.lax.scan(step, init_frame(x, k, standardize, mask), None,
                                length=steps)
  values = criterion(x, frame, standardize, mask)
  order = jnp.argsort(-values)
  history = jnp.concatenate([history, jnp.sum(values)[None]])
  return FrameResult(frame[:, order], values[order], history)


def _ascend_greedy(features: jax.Array, lr: jax.Array, k: int, steps: int,
                   standardize: bool, mask: jax.Array | None = None) -> FrameResult:
  """k directions found one at a time, each in the orthogonal complement of the previous
  ones (deflation). Unlike the joint search, a saturating criterion such as the skewness
  cannot split one skewed direction over several columns."""
  x = center(features, mask)
  c = x.shape[-1]
  proj = jnp.eye(c, dtype=jnp.float32)
  cols, history = [], 0.0
  for _ in range(k):
    res = _ascend(x @ proj, lr, 1, steps, standardize, mask)
    v = proj @ res.frame[:, 0]
    v = v / jnp.linalg.norm(v)
    cols.append(v)
    history = history + res.history
    proj = proj - jnp.outer(v, v)
  frame = jnp.stack(cols, axis=1)
  return FrameResult(frame, criterion(x, frame, standardize, mask), history)


def _ascend_multistart(features: jax.Array, lr: jax.Array, k: int, steps: int,
                       standardize: bool, mask: jax.Array | None = None) -> FrameResult:
  """k single directions, each ascended on the sphere St(C, 1) from one of the k axes
  with the largest criterion. The columns are local maxima, unit length but not mutually
  orthogonal (two starts may reach the same maximum): a pool of candidates for a caller
  that judges each direction on its own."""
  x = center(features, mask)
  starts = init_frame(x, k, standardize, mask)  # (C, k)
  objective = lambda f: jnp.sum(criterion(x, f, standardize, mask))
  value_and_grad = jax.value_and_grad(objective)

  def one(start):
    def step(frame, _):
      value, grad = value_and_grad(frame)
      return cayley_step(frame, grad, lr), value
    frame, history = jax.lax.scan(step, start[:, None], None, length=steps)
    return frame[:, 0], history

  cols, history = jax.vmap(one, in_axes=1, out_axes=(1, 0))(starts)
  values = criterion(x, cols, standardize, mask)
  history = jnp.concatenate([jnp.sum(history, 0), jnp.sum(values)[None]])
  return FrameResult(cols, values, history)


SEARCHES = {"joint": _ascend, "greedy": _ascend_greedy, "multistart": _ascend_multistart}


@functools.partial(jax.jit, static_argnames=("k", "steps", "standardize", "search"))
def _maximize(features, lr, k, steps, standardize, search="joint", mask=None):
  return SEARCHES[search](features, lr, k, steps, standardize, mask)


@functools.partial(jax.jit, static_argnames=("k", "steps", "standardize", "search"))
def _maximize_stacked(features, lr, k, steps, standardize, search="joint", mask=None):
  one = lambda f: SEARCHES[search](f, lr, k, steps, standardize, mask)
  return jax.vmap(one)(features)


def _shard_rows(features: jax.Array, axis: int) -> tuple[jax.Array, jax.Array | None]:
  """(features with their rows split over the devices, the (N',) 0/1 mask of the real
  rows, or None when no row was padded); with one device, (features, None)."""
  mesh = sharding.batch_mesh()
  features, n = sharding.shard_batch(features, mesh, axis=axis)
  total = features.shape[axis]
  if total == n:
    return features, None
  mask, _ = sharding.shard_batch(np.arange(total) < n, mesh)
  return features, mask


def _validate(features, k, steps, lr, ndim: int) -> jax.Array:
  shape = np.shape(features)
  if len(shape) != ndim:
    want = "(N, C)" if ndim == 2 else "(L, N, C)"
    raise ValueError(f"features must be {ndim}-D {want}, got shape {shape}")
  n, c = shape[-2], shape[-1]
  if n < 2:
    raise ValueError(f"need N >= 2 samples to center features, got N = {n}")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise ValueError(f"k must be an int, got {k!r}")
  if not 1 <= k <= c:
    raise ValueError(f"k must satisfy 1 <= k <= C = {c}, got k = {k}")
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
    raise ValueError(f"steps must be an int >= 0, got {steps!r}")
  if not isinstance(lr, jax.core.Tracer) and not (np.isfinite(lr) and lr > 0):
    raise ValueError(f"lr must be finite and > 0, got {lr!r}")
  features = jnp.asarray(features, jnp.float32)
  concrete = not isinstance(features, jax.core.Tracer)
  if concrete and not bool(jnp.all(jnp.isfinite(features))):
    raise ValueError("features contain NaN or Inf")
  return features


def _check_search(search: str) -> str:
  if search not in SEARCHES:
    raise ValueError(f"search must be one of {tuple(SEARCHES)}, got {search!r}")
  return search


def maximize(features: jax.Array, k: int, *, steps: int = 200, lr: float = 0.05,
             standardize: bool = True, search: str = "joint") -> FrameResult:
  """k orthonormal directions maximizing the skewness (or raw third central moment) of
  the projections of features (N, C).

  search='joint' ascends the summed criterion of all k columns on St(C, k) (Algorithm 1);
  columns come back by decreasing criterion. search='greedy' finds them one at a time by
  deflation, in the order found. search='multistart' ascends one direction from each of
  the k best axes independently: unit columns, not mutually orthogonal. One compiled program serves every call with the same
  shape and static settings. The raw moment scales with the cube of the features, so its
  lr must be scaled to them.
  """
  features = _validate(features, k, steps, lr, ndim=2)
  features, mask = _shard_rows(features, axis=0)
  return _maximize(features, lr, int(k), int(steps), bool(standardize),
                   _check_search(search), mask)


def maximize_stacked(features: jax.Array, k: int, *, steps: int = 200, lr: float = 0.05,
                     standardize: bool = True, search: str = "joint") -> FrameResult:
  """maximize on L independent layers of equal shape, features (L, N, C), in one vmapped
  program; every field of the result gets a leading L."""
  features = _validate(features, k, steps, lr, ndim=3)
  features, mask = _shard_rows(features, axis=1)
  return _maximize_stacked(features, lr, int(k), int(steps), bool(standardize),
                           _check_search(search), mask)


def is_orthonormal(frame: jax.Array, atol: float = 1e-5) -> bool:
  """Whether the columns of frame (..., C, k) are orthonormal: max |F^T F - I| <= atol."""
  f = np.asarray(frame, np.float64)
  gram = np.swapaxes(f, -1, -2) @ f
  return bool(np.max(np.abs(gram - np.eye(f.shape[-1]))) <= atol)
