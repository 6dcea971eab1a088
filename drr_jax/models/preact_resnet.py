"""PreAct-ResNet-18 for CIFAR (He et al. 2016, "Identity mappings"), the layout
BackdoorBench trains: 3x3 stem conv, pre-activation basic blocks (BN-ReLU-conv twice),
a 1x1 shortcut conv on the block's pre-activated input where width or stride change,
global average pooling of the raw residual stream, and a linear head. 11.17 M parameters
at width 1.0."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from drr_jax.models.common import batch_norm, conv, normalize


class PreActBasicBlock(nn.Module):
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    o = nn.relu(batch_norm(train, "bn1")(x))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = conv(self.features, 1, self.stride, name="shortcut_conv")(o)
    y = conv(self.features, 3, self.stride, name="conv1")(o)
    y = conv(self.features, 3, 1, name="conv2")(nn.relu(batch_norm(train, "bn2")(y)))
    return y + shortcut


class PreActResNet(nn.Module):
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: float = 1.0
  num_classes: int = 10

  @nn.compact
  def __call__(self, images, train: bool = False):
    widths = [max(1, int(round(w * self.width))) for w in (64, 128, 256, 512)]
    x = conv(widths[0], 3, name="stem_conv")(normalize(images))
    for s, (n, w) in enumerate(zip(self.stage_sizes, widths)):
      for b in range(n):
        x = PreActBasicBlock(w, 2 if (s > 0 and b == 0) else 1,
                             name=f"stage{s + 1}_block{b + 1}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


def preact_resnet18(width: float = 1.0, num_classes: int = 10) -> PreActResNet:
  return PreActResNet((2, 2, 2, 2), width, num_classes)
