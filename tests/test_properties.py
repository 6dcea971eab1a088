"""Property-based tests (hypothesis) of the algebra DRR relies on.

- Folding P = I - V V^T into a Dense or conv kernel (drr_jax.projection.fold, as
  drr_jax.sites.fold calls it) equals projecting the layer's input (x -> x P) or output
  (y -> y P) explicitly; folding is idempotent; it removes exactly span(V) and leaves the
  orthogonal complement as it was.
- The Cayley step (drr_jax.stiefel.cayley_step) keeps H^T H = I and is the Cayley
  transform (I - lr/2 A)^{-1} (I + lr/2 A) X of the skew A = G X^T - X G^T.
- The criterion (drr_jax.stiefel.criterion) is odd in the data, invariant to a constant
  shift, and (standardized) invariant to a positive scale; raw, it scales with its cube.

Shapes are drawn from a few buckets so that each eager op and jitted function compiles a
handful of times, not once per example. The references are computed in float64 numpy,
independently of the library; the tolerances are float32's.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drr_jax import projection
from drr_jax import stiefel

# derandomize: the same examples on every run (CI), and no .hypothesis database
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
SEEDS = st.integers(0, 2 ** 32 - 1)
# kernel spatial shape: None for a Dense layer
KINDS = {"dense": None, "conv1x1": (1, 1), "conv3x3": (3, 3)}


def _orthonormal(rng: np.random.Generator, c: int, m: int) -> np.ndarray:
  """A (c, m) float64 frame with orthonormal columns (m = 0 gives an empty frame)."""
  if m == 0:
    return np.zeros((c, 0))
  q, _ = np.linalg.qr(rng.standard_normal((c, m)))
  return q


class Case:
  """One layer (kernel, bias, input x) and a frame V on one of its sides."""

  def __init__(self, kind, c_in, c_out, side, m, seed):
    rng = np.random.default_rng(seed)
    self.kind, self.side = kind, side
    spatial = KINDS[kind]
    kshape = (c_in, c_out) if spatial is None else (*spatial, c_in, c_out)
    fan_in = c_in * (1 if spatial is None else int(np.prod(spatial)))
    self.kernel = rng.standard_normal(kshape) / np.sqrt(fan_in)
    self.bias = 0.5 * rng.standard_normal(c_out)
    self.v = _orthonormal(rng, c_in if side == "input" else c_out, m)
    self.p = np.eye(self.v.shape[0]) - self.v @ self.v.T  # float64 reference
    xshape = (4, c_in) if spatial is None else (2, 5, 5, c_in)
    self.x = rng.standard_normal(xshape)
    self.module = (nn.Dense(c_out) if spatial is None
                   else nn.Conv(c_out, spatial, padding="SAME"))

  def params(self, kernel=None, bias=None):
    k = self.kernel if kernel is None else kernel
    b = self.bias if bias is None else bias
    return {"block": {"layer": {"kernel": jnp.asarray(k, jnp.float32),
                                "bias": jnp.asarray(b, jnp.float32)}}}

  def fold(self, params, v=None):
    """The library's fold of V on this case's side, as drr_jax.sites.fold calls it."""
    v = self.v if v is None else v
    return projection.fold(params, {"block/layer": jnp.asarray(v, jnp.float32)},
                           self.side)

  def apply(self, params, x):
    return np.asarray(self.module.apply({"params": params["block"]["layer"]},
                                        jnp.asarray(x, jnp.float32)), np.float64)


@st.composite
def cases(draw):
  kind = draw(st.sampled_from(sorted(KINDS)))
  c_in = draw(st.sampled_from((3, 6)))
  c_out = draw(st.sampled_from((4, 7)))
  side = draw(st.sampled_from(projection.SIDES))
  m = draw(st.integers(0, c_in if side == "input" else c_out))
  return Case(kind, c_in, c_out, side, m, draw(SEEDS))


def _close(got, want, rtol=2e-5):
  """Equal up to float32 rounding, relative to the largest value involved."""
  scale = max(1.0, float(np.max(np.abs(want))) if np.size(want) else 1.0)
  np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale * 10)


@SETTINGS
@given(cases())
def test_fold_equals_the_explicit_projection(case):
  """Input side: folded(x) = layer(x P). Output side: folded(x) = layer(x) P."""
  params = case.params()
  got = case.apply(case.fold(params), case.x)
  if case.side == "input":
    want = case.apply(params, case.x @ case.p)
  else:
    want = case.apply(params, case.x) @ case.p
  _close(got, want)


@SETTINGS
@given(cases())
def test_fold_is_idempotent(case):
  """Folding the same V twice gives the params of folding it once (P P = P)."""
  once = case.fold(case.params())
  twice = case.fold(once)
  for a, b in zip(jax.tree_util.tree_leaves(once), jax.tree_util.tree_leaves(twice)):
    _close(np.asarray(b, np.float64), np.asarray(a, np.float64))
  p = np.asarray(projection.projector(jnp.asarray(case.v, jnp.float32)), np.float64)
  _close(p @ p, p)
  _close(p, p.T)


@SETTINGS
@given(cases(), SEEDS)
def test_fold_removes_span_v_and_keeps_its_complement(case, seed):
  rng = np.random.default_rng(seed)
  folded = case.fold(case.params())
  if case.side == "input":
    # an input inside span(V) contributes nothing: the output is the bias alone
    inside = (rng.standard_normal(case.x.shape[:-1] + (case.v.shape[1],)) @ case.v.T)
    got = case.apply(folded, inside)
    _close(got, np.broadcast_to(case.bias, got.shape))
    # an input orthogonal to V gives the unfolded layer's output
    outside = case.x @ case.p
    _close(case.apply(folded, outside), case.apply(case.params(), outside))
  else:
    got, plain = case.apply(folded, case.x), case.apply(case.params(), case.x)
    _close(got @ case.v, np.zeros(got.shape[:-1] + (case.v.shape[1],)))  # span(V) gone
    _close(got @ case.p, plain @ case.p)  # the complement unchanged
    # a layer whose outputs are already orthogonal to V is not changed by the fold
    orth = case.params(kernel=case.kernel @ case.p, bias=case.bias @ case.p)
    _close(case.apply(case.fold(orth), case.x), case.apply(orth, case.x))


# ------------------------------------------------------------------- Cayley retraction

_cayley = jax.jit(stiefel.cayley_step)


@SETTINGS
@given(st.sampled_from(((4, 1), (8, 2), (8, 8), (16, 3))), SEEDS,
       st.floats(1e-3, 2.0), st.floats(1e-2, 10.0))
def test_cayley_step_stays_on_the_stiefel_manifold(shape, seed, lr, grad_scale):
  c, k = shape
  rng = np.random.default_rng(seed)
  x = _orthonormal(rng, c, k)
  g = grad_scale * rng.standard_normal((c, k))
  y = np.asarray(_cayley(jnp.asarray(x, jnp.float32), jnp.asarray(g, jnp.float32),
                         jnp.float32(lr)), np.float64)
  np.testing.assert_allclose(y.T @ y, np.eye(k), rtol=0, atol=2e-5)
  # and it is the Cayley transform of the skew generator A = G X^T - X G^T
  a = g @ x.T - x @ g.T
  np.testing.assert_allclose(a, -a.T, atol=1e-12)
  eye = np.eye(c)
  want = np.linalg.solve(eye - 0.5 * lr * a, (eye + 0.5 * lr * a) @ x)
  np.testing.assert_allclose(y, want, rtol=0, atol=2e-4 * max(1.0, lr * grad_scale))


# ------------------------------------------------------------------------- criterion

def _criterion(x, v, standardize):
  return np.asarray(stiefel.criterion(stiefel.center(jnp.asarray(x, jnp.float32)),
                                      jnp.asarray(v, jnp.float32), standardize),
                    np.float64)


@st.composite
def skewed_data(draw):
  """(x (N, C), frame (C, k)): a skewed sample (an exponential part) and a frame."""
  n, c, k = draw(st.sampled_from(((64, 3, 1), (128, 5, 2), (128, 8, 3))))
  rng = np.random.default_rng(draw(SEEDS))
  x = rng.standard_normal((n, c)) + rng.exponential(1.0, (n, 1)) * rng.standard_normal(c)
  return x, _orthonormal(rng, c, k)


@SETTINGS
@given(skewed_data(), st.booleans())
def test_criterion_is_odd_in_the_data(data, standardize):
  x, v = data
  plus, minus = _criterion(x, v, standardize), _criterion(-x, v, standardize)
  np.testing.assert_allclose(minus, -plus, rtol=1e-5, atol=1e-6)
  # and in the direction: X (-v) = -(X v)
  np.testing.assert_allclose(_criterion(x, -v, standardize), -plus, rtol=1e-5, atol=1e-6)


@SETTINGS
@given(skewed_data(), st.booleans(), st.floats(-20.0, 20.0))
def test_criterion_ignores_a_constant_shift(data, standardize, shift):
  x, v = data
  offset = shift * np.linspace(-1.0, 1.0, x.shape[1])  # a different constant per channel
  want = _criterion(x, v, standardize)
  got = _criterion(x + offset, v, standardize)
  # float32 centering of values up to ~|shift| leaves an error of ~|shift| * 1e-6
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * max(1.0, abs(shift)))


@SETTINGS
@given(skewed_data(), st.floats(1e-2, 1e2))
def test_criterion_scales_as_the_third_moment(data, scale):
  x, v = data
  np.testing.assert_allclose(_criterion(scale * x, v, True), _criterion(x, v, True),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(_criterion(scale * x, v, False),
                             scale ** 3 * _criterion(x, v, False), rtol=1e-4,
                             atol=1e-5 * scale ** 3)
  # the per-axis criterion is the criterion of the identity frame
  centered = stiefel.center(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(np.asarray(stiefel.axis_criterion(centered, True)),
                             _criterion(x, np.eye(x.shape[1]), True), rtol=1e-5, atol=1e-6)
