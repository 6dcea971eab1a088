"""DenseNet-121 for CIFAR (growth 32, blocks 6/12/24/16, compression 0.5, 3x3 stem),
the layout of the common CIFAR port (kuangliu/pytorch-cifar): 6,956,298 parameters."""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from drr_jax.models.common import batch_norm, conv, normalize


class Bottleneck(nn.Module):
  growth: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = conv(4 * self.growth, 1, name="conv1")(nn.relu(batch_norm(train, "bn1")(x)))
    y = conv(self.growth, 3, name="conv2")(nn.relu(batch_norm(train, "bn2")(y)))
    return jnp.concatenate([y, x], axis=-1)


class Transition(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = conv(self.features, 1, name="conv")(nn.relu(batch_norm(train, "bn")(x)))
    return nn.avg_pool(x, (2, 2), (2, 2))


class DenseNet(nn.Module):
  blocks: Sequence[int] = (6, 12, 24, 16)
  growth: int = 32
  reduction: float = 0.5
  num_classes: int = 10

  @nn.compact
  def __call__(self, images, train: bool = False):
    c = 2 * self.growth
    x = conv(c, 3, name="stem_conv")(normalize(images))
    for i, n in enumerate(self.blocks):
      for j in range(n):
        x = Bottleneck(self.growth, name=f"dense{i + 1}_layer{j + 1}")(x, train)
      c += n * self.growth
      if i < len(self.blocks) - 1:
        c = int(math.floor(c * self.reduction))
        x = Transition(c, name=f"transition{i + 1}")(x, train)
    x = nn.relu(batch_norm(train, "final_bn")(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


def densenet121(num_classes: int = 10, width: float = 1.0) -> DenseNet:
  """DenseNet-121; `width` scales the growth rate 32 (0.25: growth 8)."""
  return DenseNet((6, 12, 24, 16), max(1, int(round(32 * width))), 0.5, num_classes)
