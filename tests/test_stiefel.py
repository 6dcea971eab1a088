"""Tests for the Stiefel-manifold ascent of the third central moment (drr_jax.stiefel)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from drr_jax import stiefel as st


def _mixture(csep: float, seed: int, n: int = 20000, c: int = 32, pi2: float = 0.1,
             axis_cos: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
  """Two unit-covariance Gaussians, the minority (share pi2) shifted by d, ||d||^2 = csep.

  d makes angle arccos(axis_cos) with axis 0 and is otherwise random, so the most skewed
  axis (the start) is axis 0 and the optimizer has to rotate away from it.
  """
  rng = np.random.default_rng(seed)
  w = rng.standard_normal(c)
  w[0] = 0.0
  w /= np.linalg.norm(w)
  d = axis_cos * np.eye(c)[0] + np.sqrt(1 - axis_cos ** 2) * w
  d *= np.sqrt(csep)
  poisoned = rng.random(n) < pi2
  x = rng.standard_normal((n, c)) + poisoned[:, None] * d
  return x.astype(np.float32), d / np.linalg.norm(d)


def _orthonormal(rng: np.random.Generator, c: int, k: int) -> np.ndarray:
  q, _ = np.linalg.qr(rng.standard_normal((c, k)))
  return q.astype(np.float32)


@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("csep", [5.0, 10.0, 20.0])
def test_top_direction_meets_theorem1_bound(csep, standardize):
  x, d = _mixture(csep, seed=int(csep))
  bound = np.sqrt(csep ** 2 - 9) / csep
  start = st.init_frame(st.center(x), 1, standardize)
  assert abs(float(start[:, 0] @ d)) < bound
  result = st.maximize(x, 1, standardize=standardize)
  assert abs(float(result.frame[:, 0] @ d)) >= bound
  assert float(result.history[-1]) > float(result.history[0])


@pytest.mark.parametrize("standardize", [True, False])
def test_span_of_several_directions_holds_d(standardize):
  # With k > 1 the summed skewness may spread d over columns, so the span is what must hold it.
  csep = 10.0
  x, d = _mixture(csep, seed=3)
  result = st.maximize(x, 3, standardize=standardize)
  assert np.linalg.norm(np.asarray(result.frame).T @ d) >= np.sqrt(csep ** 2 - 9) / csep
  assert np.all(np.diff(np.asarray(result.values)) <= 0)


@pytest.mark.parametrize("standardize,lr", [(True, 1.0), (False, 0.2)])
def test_frame_stays_orthonormal_over_many_large_steps(standardize, lr):
  x, _ = _mixture(20.0, seed=4, n=2000, c=16)
  result = st.maximize(x, 4, steps=2000, lr=lr, standardize=standardize)
  assert st.is_orthonormal(result.frame, atol=1e-5)


def test_cayley_step_stays_orthonormal_with_arbitrary_gradient():
  rng = np.random.default_rng(5)
  frame = jnp.asarray(_orthonormal(rng, 64, 5))
  step = jax.jit(st.cayley_step)
  for _ in range(300):
    frame = step(frame, jnp.asarray(rng.standard_normal((64, 5)), jnp.float32), 2.0)
  assert st.is_orthonormal(frame, atol=1e-5)


@pytest.mark.parametrize("standardize", [True, False])
def test_history_non_decreasing_under_small_steps(standardize):
  x, _ = _mixture(10.0, seed=6, n=4000, c=16)
  result = st.maximize(x, 3, steps=300, lr=0.01, standardize=standardize)
  h = np.asarray(result.history)
  assert h.shape == (301,)
  assert np.all(np.diff(h) >= -1e-5 * np.max(np.abs(h)))
  assert h[-1] > h[0]
  np.testing.assert_allclose(h[-1], np.sum(np.asarray(result.values)), rtol=1e-6)


def test_cayley_step_is_an_ascent_step():
  rng = np.random.default_rng(7)
  x = st.center(jnp.asarray(rng.gamma(2.0, size=(3000, 10)), jnp.float32))
  frame = jnp.asarray(_orthonormal(rng, 10, 3))
  objective = lambda f: jnp.sum(st.criterion(x, f, True))
  grad = jax.grad(objective)(frame)
  assert float(objective(st.cayley_step(frame, grad, 1e-2))) > float(objective(frame))


def test_cayley_step_with_zero_gradient_keeps_frame():
  frame = jnp.asarray(_orthonormal(np.random.default_rng(8), 40, 6))
  out = st.cayley_step(frame, jnp.zeros_like(frame), 0.5)
  np.testing.assert_allclose(np.asarray(out), np.asarray(frame), atol=1e-6)


@pytest.mark.parametrize("standardize", [True, False])
def test_criterion_matches_reference_moments(standardize):
  rng = np.random.default_rng(9)
  x = rng.gamma(2.0, size=(2000, 8)).astype(np.float32)
  frame = _orthonormal(rng, 8, 3)
  got = np.asarray(st.criterion(st.center(x), frame, standardize))
  p = x.astype(np.float64) @ frame
  want = scipy.stats.skew(p, axis=0) if standardize else np.mean((p - p.mean(0)) ** 3, 0)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("standardize", [True, False])
def test_axis_criterion_and_init_frame_pick_top_axes(standardize):
  rng = np.random.default_rng(10)
  raw = rng.gamma(rng.uniform(0.5, 20.0, size=12), size=(3000, 12)) * rng.uniform(0.5, 2.0, 12)
  x = st.center(raw)
  every = np.asarray(st.criterion(x, jnp.eye(12), standardize))
  np.testing.assert_allclose(np.asarray(st.axis_criterion(x, standardize)), every, rtol=1e-5)
  frame = np.asarray(st.init_frame(x, 4, standardize))
  assert frame.shape == (12, 4) and st.is_orthonormal(frame)
  assert set(np.unique(frame)) <= {0.0, 1.0}
  picked = every[np.argmax(frame, axis=0)]
  assert np.all(np.diff(picked) <= 0)
  assert picked[-1] >= np.max(np.delete(every, np.argmax(frame, axis=0)))


def test_constant_channel_gives_finite_results():
  x = np.random.default_rng(11).standard_normal((500, 6)).astype(np.float32) ** 2
  x[:, 2] = 0.0
  result = st.maximize(x, 6, steps=20)
  assert np.all(np.isfinite(np.asarray(result.frame)))
  assert np.all(np.isfinite(np.asarray(result.history)))


def test_stacked_equals_layer_by_layer():
  rng = np.random.default_rng(12)
  shapes = rng.uniform(1.0, 5.0, size=(3, 1, 10))
  layers = rng.gamma(shapes, size=(3, 600, 10)).astype(np.float32)
  stacked = st.maximize_stacked(layers, 3, steps=60, lr=0.1)
  assert stacked.frame.shape == (3, 10, 3)
  assert stacked.values.shape == (3, 3) and stacked.history.shape == (3, 61)
  for i in range(3):
    single = st.maximize(layers[i], 3, steps=60, lr=0.1)
    for a, b in zip(stacked, single):
      np.testing.assert_allclose(np.asarray(a[i]), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_one_program_serves_layers_of_the_same_shape():
  rng = np.random.default_rng(13)
  st.maximize(rng.standard_normal((300, 7)).astype(np.float32), 2, steps=5)
  size = st._maximize._cache_size()
  st.maximize(rng.standard_normal((300, 7)).astype(np.float32), 2, steps=5, lr=0.3)
  assert st._maximize._cache_size() == size


def test_maximize_under_outer_jit():
  x = np.random.default_rng(14).standard_normal((200, 5)).astype(np.float32) ** 2
  outer = jax.jit(lambda f: st.maximize(f, 2, steps=10).frame)
  eager = st.maximize(x, 2, steps=10).frame
  np.testing.assert_allclose(np.asarray(outer(x)), np.asarray(eager), atol=1e-6)


@pytest.mark.parametrize("bad,match", [
    (np.float32(np.nan), "NaN or Inf"),
    (np.float32(np.inf), "NaN or Inf"),
])
def test_non_finite_features_rejected(bad, match):
  x = np.ones((10, 4), np.float32)
  x[3, 1] = bad
  with pytest.raises(ValueError, match=match):
    st.maximize(x, 2)
  with pytest.raises(ValueError, match=match):
    st.maximize_stacked(x[None], 2)


@pytest.mark.parametrize("kwargs,shape,match", [
    (dict(k=5), (10, 4), r"k must satisfy 1 <= k <= C"),
    (dict(k=0), (10, 4), r"k must satisfy 1 <= k <= C"),
    (dict(k=2.0), (10, 4), "k must be an int"),
    (dict(k=2), (10,), "must be 2-D"),
    (dict(k=2), (3, 10, 4), "must be 2-D"),
    (dict(k=2), (1, 4), "N >= 2"),
    (dict(k=2, steps=-1), (10, 4), "steps must be"),
    (dict(k=2, lr=0.0), (10, 4), "lr must be"),
    (dict(k=2, lr=float("nan")), (10, 4), "lr must be"),
])
def test_bad_arguments_rejected(kwargs, shape, match):
  with pytest.raises(ValueError, match=match):
    st.maximize(np.ones(shape, np.float32), **kwargs)


def test_stacked_wants_three_dimensions():
  with pytest.raises(ValueError, match="must be 3-D"):
    st.maximize_stacked(np.ones((10, 4), np.float32), 2)
  with pytest.raises(ValueError, match="N >= 2"):
    st.maximize_stacked(np.ones((2, 1, 4), np.float32), 2)


# --- the other two searches: greedy (deflation) and multistart ------------------------

@pytest.mark.parametrize("csep", [10.0, 20.0])
def test_greedy_puts_the_skewed_direction_in_one_column(csep):
  """The joint search splits a saturating skewness over two columns; deflation does not."""
  x, d = _mixture(csep, seed=7)
  bound = np.sqrt(csep ** 2 - 9) / csep
  greedy = st.maximize(x, 2, search="greedy", lr=0.1)
  assert st.is_orthonormal(greedy.frame)
  assert abs(float(greedy.frame[:, 0] @ d)) >= bound
  assert abs(float(greedy.frame[:, 1] @ d)) < 0.2
  np.testing.assert_allclose(greedy.values, st.criterion(st.center(x), greedy.frame, True),
                             rtol=1e-4)


def test_multistart_columns_are_local_maxima_from_the_top_axes():
  x, d = _mixture(10.0, seed=3)
  centered = st.center(x)
  res = st.maximize(x, 4, search="multistart", lr=0.1)
  cols = np.asarray(res.frame)
  np.testing.assert_allclose(np.linalg.norm(cols, axis=0), 1.0, atol=1e-5)
  start_values = np.asarray(st.axis_criterion(centered, True))
  top = np.sort(start_values)[::-1][:4]
  assert np.all(np.asarray(res.values) >= top - 1e-4)  # ascent never ends below its start
  assert np.max(np.abs(cols.T @ d)) >= np.sqrt(100 - 9) / 10
  stacked = st.maximize_stacked(np.stack([x, x]), 4, search="multistart", lr=0.1)
  np.testing.assert_allclose(stacked.values[0], res.values, rtol=1e-3)


def test_unknown_search_rejected():
  with pytest.raises(ValueError, match="search must be one of"):
    st.maximize(np.ones((4, 3), np.float32) + np.arange(12).reshape(4, 3), 1, search="random")
