"""Tests for folding the DRR projection into layer weights (drr_jax.projection).

The reference for every fold is the same network with P applied explicitly at run time
by a Flax method interceptor, to the layer's input or to its output.
"""
from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import FrozenDict

from drr_jax import features
from drr_jax import projection as pj
from drr_jax.models import get_model


def _orthonormal(rng: np.random.Generator, c: int, k: int) -> jnp.ndarray:
  q, _ = np.linalg.qr(rng.standard_normal((c, k)))
  return jnp.asarray(q, jnp.float32)


def _images(seed: int, n: int = 4) -> jnp.ndarray:
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), np.uint8))


def _explicit(projectors: dict[str, jnp.ndarray], side: str):
  """Interceptor that applies P to the input (or output) of each named layer's __call__."""
  def interceptor(next_fun, args, kwargs, context):
    p = None
    if context.method_name == "__call__":
      p = projectors.get("/".join(context.module.scope.path))
    if p is None:
      return next_fun(*args, **kwargs)
    if side == "input":
      return next_fun(args[0] @ p, *args[1:], **kwargs)
    return next_fun(*args, **kwargs) @ p
  return interceptor


def _random_variables(model: nn.Module, seed: int):
  """Random He-scaled kernels, non-zero biases and non-trivial BatchNorm statistics.

  Drawn with numpy into the shapes `eval_shape` gives: `model.init` would compile a
  truncated-normal draw per kernel shape (seconds on CPU), and it leaves biases at 0 and
  BN at the identity, which would not exercise bias folding.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), _images(0, 1), train=False))
  def draw(path, x):
    key = path[-1].key
    if key == "kernel":
      fan_in = int(np.prod(x.shape[:-1]))
      value = rng.standard_normal(x.shape) * np.sqrt(2.0 / fan_in)
    elif key in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, x.shape)
    else:  # bias, mean
      value = 0.1 * rng.standard_normal(x.shape)
    return jnp.asarray(value, x.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _check_equivalent(model, variables, frames, side, x, atol=1e-4):
  folded = {**variables, "params": pj.fold(variables["params"], frames, side)}
  got = model.apply(folded, x, train=False)
  projectors = {name: pj.projector(v) for name, v in frames.items()}
  with nn.intercept_methods(_explicit(projectors, side)):
    want = model.apply(variables, x, train=False)
  plain = model.apply(variables, x, train=False)
  scale = float(jnp.max(jnp.abs(want)))
  np.testing.assert_allclose(got, want, atol=atol * max(1.0, scale), rtol=0)
  # The projection must actually change the network, or the comparison proves nothing.
  assert float(jnp.max(jnp.abs(plain - want))) > 100 * atol * max(1.0, scale)
  return folded


class Small(nn.Module):
  """Conv (with bias) -> BatchNorm -> relu -> Conv -> mean -> Dense (with bias)."""

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = images.astype(jnp.float32) / 255.0 - 0.5
    x = nn.Conv(8, (3, 3), name="conv1")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(x))
    x = nn.Conv(6, (3, 3), strides=(2, 2), use_bias=False, name="conv2")(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(5, name="head")(x)


@pytest.fixture(scope="module")
def small():
  model = Small()
  return model, _random_variables(model, 1)


@pytest.fixture(scope="module")
def resnet():
  model = get_model("resnet18", width=0.125)
  return model, _random_variables(model, 2)


@pytest.fixture(scope="module")
def wrn():
  model = get_model("wrn28_1")
  return model, _random_variables(model, 3)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _frames_for(params, names, side, k, seed):
  kernels = features.layer_kernels(params)
  rng = np.random.default_rng(seed)
  axis = -2 if side == "input" else -1
  return {n: _orthonormal(rng, kernels[n].shape[axis], k) for n in names}


def test_projector_is_symmetric_idempotent_with_frame_in_null_space():
  v = _orthonormal(np.random.default_rng(0), 12, 3)
  p = pj.projector(v)
  np.testing.assert_allclose(p, p.T, atol=1e-6)
  np.testing.assert_allclose(p @ p, p, atol=1e-6)
  np.testing.assert_allclose(p @ v, 0.0, atol=1e-6)
  np.testing.assert_allclose(jnp.trace(p), 12 - 3, atol=1e-5)
  np.testing.assert_array_equal(pj.projector(jnp.zeros((5, 0))), jnp.eye(5))


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("layer", ["conv1", "conv2", "head"])
def test_small_model_fold_equals_explicit_projection(small, layer, side):
  model, variables = small
  k = 1 if (layer, side) == ("conv1", "input") else 2  # the RGB input has 3 channels
  seed = ["conv1", "conv2", "head"].index(layer) + 10 * (side == "output")
  frames = _frames_for(variables["params"], [layer], side, k, seed=seed)
  folded = _check_equivalent(model, variables, frames, side, _images(1))
  before, after = variables["params"][layer], folded["params"][layer]
  if "bias" in before:
    same_bias = np.array_equal(before["bias"], after["bias"])
    assert same_bias == (side == "input")


@pytest.mark.parametrize("side", ["input", "output"])
def test_resnet_block_fold_equals_explicit_projection(resnet, side):
  model, variables = resnet
  names = [f"stage2_block1/{c}" for c in ("conv1", "conv2", "shortcut_conv")]
  frames = _frames_for(variables["params"], names, side, 2, seed=7)
  folded = _check_equivalent(model, variables, frames, side, _images(2))
  untouched = ("stage2_block2", "conv1", "kernel")
  assert _get(folded["params"], untouched) is _get(variables["params"], untouched)


@pytest.mark.parametrize("side", ["input", "output"])
def test_wrn_block_fold_equals_explicit_projection(wrn, side):
  model, variables = wrn
  names = [f"stage2_block1/{c}" for c in ("conv1", "conv2", "shortcut_conv")]
  frames = _frames_for(variables["params"], names, side, 2, seed=8)
  _check_equivalent(model, variables, frames, side, _images(3))


def test_output_fold_removes_direction_from_captured_output(resnet):
  model, variables = resnet
  name = "stage2_block1/conv1"
  frames = _frames_for(variables["params"], [name], "output", 2, seed=9)
  x = _images(4)
  _, before = features.capture(model, variables, x, outputs=True, train=False)
  folded = {**variables, "params": pj.fold(variables["params"], frames, "output")}
  _, after = features.capture(model, folded, x, outputs=True, train=False)
  v = frames[name]
  size = float(jnp.max(jnp.abs(before[name] @ v)))
  assert size > 1e-2
  assert float(jnp.max(jnp.abs(after[name] @ v))) < 1e-5 * max(1.0, size)


def test_input_fold_makes_layer_blind_to_direction():
  rng = np.random.default_rng(10)
  conv = nn.Conv(4, (3, 3))
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 6)), jnp.float32)
  params = {"kernel": jnp.asarray(rng.standard_normal((3, 3, 6, 4)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(4), jnp.float32)}
  v = _orthonormal(rng, 6, 2)
  folded = {**params, "kernel": pj.fold_input(params["kernel"], v)}
  shift = 10 * jnp.asarray(rng.standard_normal((2, 8, 8, 2)), jnp.float32) @ v.T
  y, y_shifted = (conv.apply({"params": folded}, z) for z in (x, x + shift))
  np.testing.assert_allclose(y, y_shifted, atol=1e-4)
  assert not np.allclose(conv.apply({"params": params}, x),
                         conv.apply({"params": params}, x + shift), atol=1e-2)


def test_empty_frames_and_zero_columns_leave_params_identical(small):
  _, variables = small
  params = variables["params"]
  for frames, side in [({}, "input"), ({}, "output"),
                       ({"conv2": jnp.zeros((8, 0))}, "input"),
                       ({"conv1": jnp.zeros((8, 0))}, "output")]:
    out = pj.fold(params, frames, side)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(params)):
      assert a is b
  kernel = params["conv2"]["kernel"]
  assert pj.fold_input(kernel, jnp.zeros((8, 0))) is kernel
  assert pj.fold_output(kernel, None, jnp.zeros((6, 0))) == (kernel, None)


def test_fold_keeps_kind_dtypes_and_does_not_mutate(small):
  _, variables = small
  params = variables["params"]
  snapshot = jax.tree_util.tree_map(np.array, params)
  frames = {"conv2": _orthonormal(np.random.default_rng(11), 6, 2),
            "head": _orthonormal(np.random.default_rng(12), 5, 1)}
  out = pj.fold(params, frames, "output")
  assert type(out) is dict
  for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(params)):
    assert a.dtype == b.dtype and a.shape == b.shape
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, snapshot)
  assert not np.array_equal(out["head"]["bias"], params["head"]["bias"])
  frozen = pj.fold(FrozenDict(params), frames, "output")
  assert isinstance(frozen, FrozenDict)
  jax.tree_util.tree_map(np.testing.assert_array_equal, dict(frozen.unfreeze()), out)


def test_fold_output_and_input_formulas():
  rng = np.random.default_rng(13)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 5, 7)), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(7), jnp.float32)
  v_in, v_out = _orthonormal(rng, 5, 2), _orthonormal(rng, 7, 3)
  p_in, p_out = pj.projector(v_in), pj.projector(v_out)
  np.testing.assert_allclose(pj.fold_input(kernel, v_in),
                             jnp.einsum("ij,hwjo->hwio", p_in, kernel), atol=1e-5)
  k2, b2 = pj.fold_output(kernel, bias, v_out)
  np.testing.assert_allclose(k2, kernel @ p_out, atol=1e-5)
  np.testing.assert_allclose(b2, bias @ p_out, atol=1e-5)


@pytest.mark.parametrize("frames,side,match", [
    ({"nope/conv": jnp.zeros((3, 1))}, "input", "unknown layer 'nope/conv'"),
    ({"conv1/kernel": jnp.zeros((3, 1))}, "input", "unknown layer 'conv1/kernel'"),
    ({"conv2": jnp.eye(6)[:, :1]}, "input", "'conv2'.*rows"),
    ({"conv2": jnp.eye(8)[:, :1]}, "output", "'conv2'.*rows"),
    ({"head": jnp.ones(6)}, "input", "'head'.*2-D"),
    ({"head": jnp.full((6, 1), jnp.nan)}, "input", "'head'.*non-finite"),
    ({"conv1": jnp.eye(3, 4)}, "input", "'conv1'.*columns"),
    ({"head": jnp.eye(6)[:, :1]}, "sideways", "side"),
])
def test_bad_inputs_raise_naming_the_layer(small, frames, side, match):
  _, variables = small
  with pytest.raises(ValueError, match=match):
    pj.fold(variables["params"], frames, side)


# --- mean-preserving removal: the constant folded into biases and BatchNorm means -------

def _shifted(model, variables, x, shifts):
  """Reference: the network with shifts[layer] added to each layer's output at run time."""
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    name = "/".join(context.module.scope.path)
    if context.method_name == "__call__" and name in shifts and features.is_layer(
        context.module):
      out = out + shifts[name]
    return out
  with nn.intercept_methods(interceptor):
    return model.apply(variables, x, train=False)


@pytest.mark.parametrize("fixture,layer", [
    ("wrn", "stage2_block2/conv2"),   # output joins the residual stream: later BNs absorb
    ("wrn", "stage3_block1/conv1"),   # output goes straight into bn2
    ("resnet", "stage2_block1/shortcut_conv"),  # conv -> BN in a post-activation net
    ("small", "conv2"),               # no BN after it: spatial mean -> Dense bias absorbs
    ("small", "conv1"),               # has its own bias
])
def test_absorb_shifts_equals_the_shifted_network(request, fixture, layer):
  model, variables = request.getfixturevalue(fixture)
  cout = features.layer_kernels(variables["params"])[layer].shape[-1]
  shift = jnp.asarray(np.random.default_rng(5).normal(size=cout), jnp.float32)
  new, ok = pj.absorb_shifts(model, variables, {layer: shift}, _images(7, 2))
  assert ok
  x = _images(8)  # other images than the probe
  want = _shifted(model, variables, x, {layer: shift})
  got = model.apply(new, x, train=False)
  plain = model.apply(variables, x, train=False)
  scale = float(jnp.max(jnp.abs(want)))
  np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, scale), rtol=0)
  assert float(jnp.max(jnp.abs(plain - want))) > 1e-2 * max(1.0, scale)
  assert jax.tree.structure(new) == jax.tree.structure(dict(variables))


def test_absorb_shifts_compiles_one_program_for_every_layer_it_shifts(resnet):
  """Variables placed on a device (as a restored checkpoint's are) and shifts of different
  layers: each call reuses the program of the first; none compiles its own."""
  model, variables = resnet
  variables = jax.device_put(variables, jax.devices()[0])
  kernels = features.layer_kernels(variables["params"])
  layers = ["stage2_block1/shortcut_conv", "stage3_block1/conv1", "stage2_block2/conv2"]
  compiled = []

  class Count(logging.Handler):
    def emit(self, record):
      if "jit(_shifted_run)" in record.getMessage() and "compil" in record.getMessage():
        compiled.append(record.getMessage())

  handler, logger = Count(), logging.getLogger("jax")
  logger.addHandler(handler)
  try:
    with jax.log_compiles(True):
      for i, layer in enumerate(layers):
        shift = jax.device_put(  # on the device, as `mean_shift` makes it from a kernel
            np.random.default_rng(i).normal(size=kernels[layer].shape[-1]).astype(
                np.float32), jax.devices()[0])
        _, ok = pj.absorb_shifts(model, variables, {layer: shift}, _images(7, 2))
        assert ok
        if i == 0:
          compiled.clear()  # the first call compiles the program (if no test did before)
  finally:
    logger.removeHandler(handler)
  assert compiled == []


class ReluAfter(nn.Module):
  """A bias-free conv whose output meets a ReLU before anything could absorb a shift."""

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = nn.Conv(4, (3, 3), use_bias=False, name="conv")(images.astype(jnp.float32) / 255.0)
    return nn.Dense(3, name="head")(jnp.mean(nn.relu(x), axis=(1, 2)))


def test_absorb_shifts_reports_a_shift_it_cannot_fold():
  model = ReluAfter()
  variables = _random_variables(model, 4)
  shift = jnp.ones(4, jnp.float32)
  new, ok = pj.absorb_shifts(model, variables, {"conv": shift}, _images(1, 2))
  assert not ok
  chex_equal = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), new, variables)
  assert all(jax.tree.leaves(chex_equal))


def test_mean_shift_makes_mean_replacement_exact_for_a_dense_layer(small):
  model, variables = small
  rng = np.random.default_rng(6)
  frame = _orthonormal(rng, 6, 2)
  mu = jnp.asarray(rng.normal(size=6), jnp.float32)
  kernel = variables["params"]["head"]["kernel"]
  folded = {**variables, "params": pj.fold(variables["params"], {"head": frame})}
  shift = pj.mean_shift(kernel, frame, mu, "input")
  new, ok = pj.absorb_shifts(model, folded, {"head": shift}, _images(2, 2))
  assert ok

  def replace(next_fun, args, kwargs, context):  # x - (x - mu) V V^T at the head's input
    if context.method_name == "__call__" and context.module.scope.path == ("head",):
      h = args[0]
      return next_fun(h - ((h - mu) @ frame) @ frame.T, *args[1:], **kwargs)
    return next_fun(*args, **kwargs)

  x = _images(9)
  with nn.intercept_methods(replace):
    want = model.apply(variables, x, train=False)
  np.testing.assert_allclose(model.apply(new, x, train=False), want, atol=1e-4)
  zeroed = model.apply(folded, x, train=False)
  assert float(jnp.max(jnp.abs(zeroed - want))) > 1e-3  # the constant mattered


def test_mean_shift_of_a_conv_sums_the_kernel_taps():
  rng = np.random.default_rng(7)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 5, 4)), jnp.float32)
  frame = _orthonormal(rng, 5, 1)
  mu = jnp.asarray(rng.normal(size=5), jnp.float32)
  c = np.asarray(mu @ frame @ frame.T)
  want = np.einsum("c,hwco->o", c, np.asarray(kernel))
  np.testing.assert_allclose(pj.mean_shift(kernel, frame, mu, "input"), want, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(pj.mean_shift(kernel, _orthonormal(rng, 4, 2), jnp.zeros(4),
                                           "output"), np.zeros(4), atol=0)


class Strided(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), use_bias=False, name="same")(x.astype(jnp.float32))
    x = nn.Conv(5, (3, 3), strides=2, name="down")(x)
    x = nn.Conv(3, (2, 3), padding="VALID", name="valid")(x)
    return nn.Dense(2, name="head")(x.reshape(len(x), -1))


def _coverage_by_counting(size: int, k: int, stride: int, pad_lo: int, n_out: int):
  """Per tap offset: the share of output positions whose input index is inside [0, size)."""
  return np.array([np.mean([0 <= o * stride - pad_lo + t < size for o in range(n_out)])
                   for t in range(k)])


def test_tap_coverage_counts_the_taps_that_read_inside_the_input():
  model = Strided()
  x = jnp.zeros((1, 8, 8, 3))
  variables = model.init(jax.random.key(0), x)
  rows = _coverage_by_counting(8, 3, 1, 1, 8)  # SAME, stride 1: one pad each side
  np.testing.assert_allclose(pj.tap_coverage(model, variables, "same", x),
                             np.outer(rows, rows), rtol=1e-6)
  rows = _coverage_by_counting(8, 3, 2, 0, 4)  # SAME, stride 2 on 8: padded after only
  np.testing.assert_allclose(pj.tap_coverage(model, variables, "down", x),
                             np.outer(rows, rows), rtol=1e-6)
  np.testing.assert_allclose(pj.tap_coverage(model, variables, "valid", x), np.ones((2, 3)))
  assert pj.tap_coverage(model, variables, "head", x) is None
  with pytest.raises(ValueError, match="not called"):
    pj.tap_coverage(model, variables, "nope", x)


def test_mean_shift_with_coverage_is_the_exact_constant_averaged_over_positions():
  rng = np.random.default_rng(8)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 5, 4)), jnp.float32)
  frame = _orthonormal(rng, 5, 2)
  mu = jnp.asarray(rng.normal(size=5), jnp.float32)
  c = mu @ frame @ frame.T  # what mean replacement adds at every input position
  exact = jax.lax.conv_general_dilated(  # its response through zero padding
      jnp.broadcast_to(c, (1, 8, 8, 5)), kernel, (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  model = Strided()
  x = jnp.zeros((1, 8, 8, 3))
  cov = pj.tap_coverage(model, model.init(jax.random.key(0), x), "same", x)
  np.testing.assert_allclose(pj.mean_shift(kernel, frame, mu, "input", cov),
                             exact.mean((0, 1, 2)), rtol=1e-5, atol=1e-5)
  interior = pj.mean_shift(kernel, frame, mu, "input")
  np.testing.assert_allclose(interior, exact[0, 4, 4], rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(interior - exact.mean((0, 1, 2))))) > 1e-3
  with pytest.raises(ValueError, match="coverage"):
    pj.mean_shift(kernel, frame, mu, "input", np.ones((2, 2)))
