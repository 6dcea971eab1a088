"""ResNet-18 for CIFAR (3x3 stem, no max-pool, 1x1 conv + BN shortcuts), with a width
multiplier: 1.0 is the paper's (11.17 M parameters), 0.25 the CPU presets' one."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from drr_jax.models.common import batch_norm, conv, normalize


class BasicBlock(nn.Module):
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = conv(self.features, 3, self.stride, name="conv1")(x)
    y = nn.relu(batch_norm(train, "bn1")(y))
    y = conv(self.features, 3, 1, name="conv2")(y)
    y = batch_norm(train, "bn2")(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, self.stride, name="shortcut_conv")(x)
      x = batch_norm(train, "shortcut_bn")(x)
    return nn.relu(y + x)


class ResNet(nn.Module):
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: float = 1.0
  num_classes: int = 10

  @nn.compact
  def __call__(self, images, train: bool = False):
    widths = [max(1, int(round(w * self.width))) for w in (64, 128, 256, 512)]
    x = conv(widths[0], 3, name="stem_conv")(normalize(images))
    x = nn.relu(batch_norm(train, "stem_bn")(x))
    for s, (n, w) in enumerate(zip(self.stage_sizes, widths)):
      for b in range(n):
        x = BasicBlock(w, 2 if (s > 0 and b == 0) else 1,
                       name=f"stage{s + 1}_block{b + 1}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


def resnet18(width: float = 1.0, num_classes: int = 10) -> ResNet:
  return ResNet((2, 2, 2, 2), width, num_classes)
