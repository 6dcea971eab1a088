"""Sites: a folded removal equals an explicit projection of the feature in every path."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drr_jax import features, sites
from drr_jax.models import (DenseNet, MobileNetV2, PreActResNet, ResNet, VGG,
                            WideResNet)


def _images(n=4, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3)), jnp.uint8)


def _init(model, x, seed=0):
  v = model.init(jax.random.key(seed), x, train=False)
  # Random BatchNorm statistics and affine params, so that no BN is the identity.
  rng = np.random.default_rng(seed + 1)

  def bn(path, a):
    key = getattr(path[-1], "key", "")
    if key == "mean" or (key == "bias" and a.ndim == 1):
      return jnp.asarray(rng.normal(0, 0.1, a.shape), a.dtype)
    if key in ("var", "scale"):
      return jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype)
    return a

  params = jax.tree_util.tree_map_with_path(bn, v["params"])
  stats = jax.tree_util.tree_map_with_path(bn, v["batch_stats"])
  return {"params": params, "batch_stats": stats}


def _unit(c, k=1, seed=0):
  q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((c, k)))
  return jnp.asarray(q, jnp.float32)


_apply = jax.jit(lambda model, variables, x: model.apply(variables, x, train=False),
                 static_argnums=0)


def _logits(model, variables, x):
  return _apply(model, variables, x)


# Reduced layouts of every zoo architecture (the same modules, fewer blocks and channels),
# so that each site is checked in seconds.
ARCHS = {
    "resnet18 (post-activation)": ResNet((1, 1, 1, 1), 0.125),
    "preact_resnet18": PreActResNet((1, 1, 1, 1), 0.125),
    "wrn28_1 (pre-activation)": WideResNet(10, 0.5),
    "vgg": VGG((8, "M", 16, "M", 16, "M"), 1.0),
    "mobilenet_v2": MobileNetV2(((1, 8, 1, 1), (2, 8, 1, 1), (2, 16, 1, 2)),
                                             0.5),
    "densenet": DenseNet((2, 2), 4, 0.5),
}


@pytest.mark.parametrize("name", list(ARCHS))
def test_every_site_folds_exactly_in_every_path(name):
  model = ARCHS[name]
  x = _images()
  variables = _init(model, x)
  found = sites.find_sites(model, variables, x)
  assert found, "no site found"
  base = _logits(model, variables, x)
  scale = float(jnp.max(jnp.abs(base)))
  rng = np.random.default_rng(1)
  explicit = sites.explicit_applier(model, variables, found, k=2)  # one program for all
  for s in found:
    kernel = variables["params"]
    for part in s.layer.split("/"):
      kernel = kernel[part]
    c = kernel["kernel"].shape[-2 if s.side == "input" else -1]
    v = _unit(c, min(2, c), seed=len(s.layer))
    folded = _logits(model, sites.fold(variables, s, v), x)
    want = explicit(variables, x, s, v)
    assert float(jnp.max(jnp.abs(folded - want))) <= 1e-4 * scale, s.name
    assert not np.allclose(folded, base, atol=1e-3 * scale) or c <= 2, s.name
    # Mean replacement: the constant is folded where the network allows it. It is exact
    # on the output side and for 1x1 / dense readers; a 3x3 reader of a zero-padded input
    # gets the constant averaged over positions (exact away from the border only).
    kernels = features.layer_kernels(variables["params"])
    if s.side == "input" and any(kernels[f].ndim == 4 and kernels[f].shape[0] > 1
                                 for f in s.folds):
      continue
    mean = jnp.asarray(rng.uniform(0, 1, c), jnp.float32)
    moved, ok = sites.fold_with_mean(model, variables, s, v, mean, x)
    if ok:
      want = explicit(variables, x, s, v, mean)
      got = _logits(model, moved, x)
      assert float(jnp.max(jnp.abs(got - want))) <= 1e-3 * scale, s.name


def test_the_compiled_applier_equals_explicit_apply_at_every_kind_of_site():
  model = ARCHS["resnet18 (post-activation)"]
  x = _images()
  variables = _init(model, x)
  found = sites.find_sites(model, variables, x)
  explicit = sites.explicit_applier(model, variables, found, k=2)
  picks = {(s.side, s.origin is None): s for s in found}  # output; input at a module/fn
  assert len(picks) == 3, picks
  rng = np.random.default_rng(3)
  for s in picks.values():
    c = sites._site_width(s, features.layer_kernels(variables["params"]))
    for k in (1, 2):
      v = _unit(c, k, seed=k)
      mean = jnp.asarray(rng.uniform(0, 1, c), jnp.float32)
      for m in (None, mean):
        want = sites.explicit_apply(model, s, v, m)(variables, x)
        got = explicit(variables, x, s, v, m)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=s.name)
        if m is None:
          assert not np.allclose(got, _logits(model, variables, x), atol=1e-4), s.name


def _names(found):
  return {s.name for s in found}


def test_post_activation_block_input_is_not_an_input_site_but_its_producer_is():
  model = ARCHS["resnet18 (post-activation)"]
  x = _images()
  found = sites.find_sites(model, _init(model, x), x)
  names = _names(found)
  # stage1_block1 reads relu(stem) through conv1 AND the identity shortcut: no input site
  assert "stage1_block1/conv1:in" not in names
  # the stem's output is read (through BN, ReLU) by every later path: an output site
  assert "stem_conv:out" in names
  # a widening block reads its input only through conv1 and the 1x1 shortcut conv
  widening = [s for s in found if s.name == "stage2_block1/conv1:in"]
  assert widening and set(widening[0].folds) == {"stage2_block1/conv1",
                                                 "stage2_block1/shortcut_conv"}
  # conv2 reads relu(bn1(conv1)) and nothing else does
  assert "stage1_block1/conv2:in" in names
  assert "head:in" in names  # the pooled stream feeds nothing but the classifier
  assert "head:out" not in names  # the logits are never a site


def test_pre_activation_block_input_is_an_input_site_of_both_readers():
  model = ARCHS["preact_resnet18"]
  x = _images()
  found = sites.find_sites(model, _init(model, x), x)
  by_name = {s.name: s for s in found}
  s = by_name["stage2_block1/shortcut_conv:in"] if "stage2_block1/shortcut_conv:in" in by_name \
      else by_name["stage2_block1/conv1:in"]
  assert set(s.folds) == {"stage2_block1/conv1", "stage2_block1/shortcut_conv"}
  # a block without a shortcut conv: relu(bn1(x)) is read by conv1 alone
  assert by_name["stage1_block1/conv1:in"].folds == ("stage1_block1/conv1",)


def test_depthwise_convs_are_not_sites():
  model = ARCHS["mobilenet_v2"]
  x = _images()
  found = sites.find_sites(model, _init(model, x), x)
  assert not any("depthwise" in s.layer for s in found)
  assert any(s.name.endswith("project_conv:in") for s in found)
  assert any(s.name.endswith("expand_conv:out") for s in found)


def test_a_dense_feature_read_by_concatenation_is_removed_at_its_producer():
  model = ARCHS["densenet"]
  x = _images()
  names = _names(sites.find_sites(model, _init(model, x), x))
  # conv2's output is concatenated into every later layer's input: an output site
  assert "dense1_layer1/conv2:out" in names
  # the next bottleneck reads relu(bn1(concat)) through its conv1 alone
  assert "dense1_layer2/conv1:in" in names


class _TwoReaders(nn.Module):
  """A tensor read by a dense layer and by a weightless path added to the logits."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dense(4, name="a")(x.reshape(len(x), -1).astype(jnp.float32) / 255)
    return nn.Dense(4, name="b")(h) + h


def test_a_tensor_with_a_weightless_reader_is_not_an_input_site():
  model = _TwoReaders()
  x = _images()
  v = model.init(jax.random.key(0), x)
  names = _names(sites.find_sites(model, v, x))
  assert "b:in" not in names and "a:out" in names
