from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drr_jax import features
from drr_jax.models import get_model


def _count(model):
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  return sum(x.size for x in jax.tree.leaves(v["params"]))


@pytest.mark.parametrize("name,width,expected", [
    # kuangliu/pytorch-cifar ResNet18 and DenseNet121 (growth 32), and the WRN-28-1 of
    # Zagoruyko & Komodakis with 10 classes, counted from their definitions.
    ("resnet18", 1.0, 11_173_962),
    ("wrn28_1", 1.0, 369_498),
    ("densenet121", 1.0, 6_956_298),
])
def test_parameter_counts(name, width, expected):
  assert _count(get_model(name, width=width)) == expected


def test_width_multiplier_shrinks_resnet():
  assert _count(get_model("resnet18", width=0.25)) < _count(get_model("resnet18")) / 10


@pytest.mark.parametrize("name", ["wrn28_1", "resnet18"])
def test_every_kernel_has_its_feature(name):
  model = get_model(name, width=0.25)
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)), jnp.uint8)
  v = model.init(jax.random.key(0), x)
  kernels = features.layer_kernels(v["params"])
  logits, inputs = features.capture(model, v, x, train=False)
  _, outputs = features.capture(model, v, x, outputs=True, train=False)
  assert logits.shape == (2, 10)
  assert set(kernels) == set(inputs) == set(outputs)
  for layer, k in kernels.items():
    assert features.layer_name(features.kernel_path(layer)) == layer
    assert inputs[layer].shape[-1] == k.shape[-2]  # C_in consumed by the kernel
    assert outputs[layer].shape[-1] == k.shape[-1]
  # the stem consumes the normalized image, the head the pooled features
  assert inputs["stem_conv"].shape == (2, 32, 32, 3)
  assert inputs["head"].ndim == 2


def test_batchnorm_train_and_eval_modes():
  model = get_model("resnet18", width=0.125)
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)), jnp.uint8)
  v = model.init(jax.random.key(0), x)
  y_train, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), v["batch_stats"], upd["batch_stats"])
  assert any(jax.tree.leaves(changed))  # running stats move in training mode
  y_eval = model.apply(v, x, train=False)
  assert not np.allclose(y_train, y_eval)  # batch vs running statistics


@pytest.mark.parametrize("stride", [1, 2])
def test_mobilenet_depthwise_conv_equals_a_grouped_conv(stride):
  import flax.linen as nn
  from drr_jax.models.mobilenet_v2 import DepthwiseConv3x3
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 8)), jnp.float32)
  m = DepthwiseConv3x3(stride)
  v = m.init(jax.random.key(0), x)
  ref = nn.Conv(8, (3, 3), (stride, stride), padding=[(1, 1), (1, 1)],
                feature_group_count=8, use_bias=False)
  np.testing.assert_allclose(m.apply(v, x), ref.apply(v, x), atol=1e-5)


@pytest.mark.parametrize("name", ["preact_resnet18", "vgg11", "mobilenet_v2", "densenet121",
                                  "wrn28_1"])
def test_zoo_models_run_at_reduced_width(name):
  model = get_model(name, width=0.25)
  x = jnp.zeros((2, 32, 32, 3), jnp.uint8)
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  out = jax.eval_shape(lambda v: model.apply(v, x), v)
  assert out.shape == (2, 10)


def test_unknown_model_and_bad_width_are_named():
  with pytest.raises(ValueError, match="unknown model 'resnet19'"):
    get_model("resnet19")
  with pytest.raises(ValueError, match="width"):
    get_model("resnet18", width=0)


@pytest.mark.parametrize("name,expected", [
    # kuangliu/pytorch-cifar's PreActResNet18 and MobileNetV2, counted from their
    # definitions (10 classes)
    ("preact_resnet18", 11_171_146),
    ("mobilenet_v2", 2_296_922),
])
def test_zoo_parameter_counts(name, expected):
  assert _count(get_model(name)) == expected


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_conv_equals_a_1x1_nn_conv(stride):
  import flax.linen as nn
  from drr_jax.models.common import PointwiseConv
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 6)), jnp.float32)
  m = PointwiseConv(5, (1, 1), (stride, stride), padding="VALID", use_bias=False)
  v = m.init(jax.random.key(0), x)
  ref = nn.Conv(5, (1, 1), (stride, stride), padding="VALID", use_bias=False)
  assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, ref.init(jax.random.key(0), x))
  np.testing.assert_allclose(m.apply(v, x), ref.apply(v, x), atol=1e-5)
