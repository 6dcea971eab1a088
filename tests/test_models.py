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


@pytest.mark.parametrize("as_fn", [False, True])
def test_one_pass_reads_both_sides_as_two_passes_do(as_fn):
  """`extract_sides` (what DRR's site features use: the inputs of some layers and the
  outputs of others, in one pass) gives the features of one `extract` per side."""
  model = get_model("resnet18", width=0.125)
  images = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
  v = model.init(jax.random.key(0), images[:1])
  net = (lambda var, x: model.apply(var, x, train=False)) if as_fn else model
  ins, outs = ("stem_conv", "stage2_block1/conv1", "head"), ("stage1_block1/conv2",
                                                               "stage3_block2/conv1")
  kw = dict(pooling="max", batch_size=3, progress=False)
  (fi, mi), (fo, mo) = features.extract_sides(net, v, images, inputs=ins, outputs=outs, **kw)
  assert set(fi) == set(mi) == set(ins) and set(fo) == set(mo) == set(outs)
  for layers, outputs, got, means in ((ins, False, fi, mi), (outs, True, fo, mo)):
    want, want_means = features.extract(net, v, images, layers, outputs=outputs,
                                        with_means=True, **kw)
    for k in layers:
      assert got[k].shape[0] == 7 and means[k].shape[0] == 7
      np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(means[k], want_means[k], rtol=1e-6, atol=1e-6)
  # one layer on both sides: its input and its output, not one of them twice
  (both_in, _), (both_out, _) = features.extract_sides(
      net, v, images, inputs=("stage1_block1/conv2",), outputs=("stage1_block1/conv2",), **kw)
  np.testing.assert_allclose(both_in["stage1_block1/conv2"], features.extract(
      net, v, images, ("stage1_block1/conv2",), outputs=False, **kw)["stage1_block1/conv2"])
  assert not np.allclose(both_in["stage1_block1/conv2"], both_out["stage1_block1/conv2"])
  np.testing.assert_allclose(both_out["stage1_block1/conv2"], fo["stage1_block1/conv2"])
