"""MobileNetV2 for CIFAR (Sandler et al. 2018; the CIFAR layout of kuangliu/pytorch-cifar:
3x3 stem of stride 1, the first two stages at stride 1). Inverted residual blocks: a 1x1
expansion conv, a 3x3 depthwise conv (its kernel (3, 3, 1, C) mixes no channels), a 1x1
linear projection with BN and no ReLU, and an identity shortcut where shape allows; the
residual stream between blocks is therefore linear. 2.30 M parameters at width 1.0.

The depthwise conv is computed as nine shifted per-channel products (`DepthwiseConv3x3`),
the same function as `nn.Conv(feature_group_count=C)` with the same (3, 3, 1, C) kernel,
because XLA's grouped convolution is about 7x slower on CPU (measured here, forward and
backward). Not being an `nn.Conv`, it is not a DRR layer: a depthwise kernel mixes no
channels, so no projection can be folded into it anyway (`drr_jax.sites`)."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from drr_jax.models.common import batch_norm, conv, conv_init, normalize

# (expansion, output channels, blocks, stride of the first block)
CIFAR_LAYOUT = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class DepthwiseConv3x3(nn.Module):
  """A 3x3 depthwise conv, zero padding 1, no bias; kernel (3, 3, 1, C) as nn.Conv's."""
  stride: int = 1

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    kernel = self.param("kernel", conv_init, (3, 3, 1, c), jnp.float32)
    h, w = x.shape[1], x.shape[2]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    s = self.stride
    out = 0.0
    for i in range(3):
      for j in range(3):
        out = out + padded[:, i:i + h:s, j:j + w:s, :] * kernel[i, j, 0].astype(x.dtype)
    return out


class InvertedResidual(nn.Module):
  expansion: int
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    hidden = x.shape[-1] * self.expansion
    y = conv(hidden, 1, name="expand_conv")(x)
    y = nn.relu(batch_norm(train, "expand_bn")(y))
    y = DepthwiseConv3x3(self.stride, name="depthwise_conv")(y)
    y = nn.relu(batch_norm(train, "depthwise_bn")(y))
    y = conv(self.features, 1, name="project_conv")(y)
    y = batch_norm(train, "project_bn")(y)
    if self.stride == 1 and x.shape[-1] == self.features:
      return y + x
    if self.stride == 1:  # kuangliu's CIFAR port: a 1x1 conv shortcut where widths differ
      x = batch_norm(train, "shortcut_bn")(conv(self.features, 1, name="shortcut_conv")(x))
      return y + x
    return y


class MobileNetV2(nn.Module):
  layout: Sequence[tuple[int, int, int, int]] = CIFAR_LAYOUT
  width: float = 1.0
  num_classes: int = 10

  @nn.compact
  def __call__(self, images, train: bool = False):
    scale = lambda c: max(1, int(round(c * self.width)))
    x = conv(scale(32), 3, name="stem_conv")(normalize(images))
    x = nn.relu(batch_norm(train, "stem_bn")(x))
    for s, (t, c, n, stride) in enumerate(self.layout):
      for b in range(n):
        x = InvertedResidual(t, scale(c), stride if b == 0 else 1,
                             name=f"stage{s + 1}_block{b + 1}")(x, train)
    x = conv(scale(1280), 1, name="last_conv")(x)
    x = nn.relu(batch_norm(train, "last_bn")(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


def mobilenet_v2(width: float = 1.0, num_classes: int = 10) -> MobileNetV2:
  return MobileNetV2(CIFAR_LAYOUT, width, num_classes)
