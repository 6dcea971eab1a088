"""WideResNet-28-k for CIFAR (Zagoruyko & Komodakis, 2016), pre-activation blocks.

WRN-28-1 (the paper's) has 369,498 parameters: widths 16/16/32/64, four blocks per stage,
1x1 shortcut convs only where the width or stride changes, no dropout.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from drr_jax.models.common import batch_norm, conv, normalize


class PreActBlock(nn.Module):
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    o = nn.relu(batch_norm(train, "bn1")(x))
    needs_proj = self.stride != 1 or x.shape[-1] != self.features
    shortcut = conv(self.features, 1, self.stride, name="shortcut_conv")(o) if needs_proj else x
    y = conv(self.features, 3, self.stride, name="conv1")(o)
    y = nn.relu(batch_norm(train, "bn2")(y))
    y = conv(self.features, 3, 1, name="conv2")(y)
    return y + shortcut


class WideResNet(nn.Module):
  depth: int = 28
  widen: float = 1.0
  num_classes: int = 10

  @nn.compact
  def __call__(self, images, train: bool = False):
    if (self.depth - 4) % 6:
      raise ValueError(f"WRN depth must be 6n + 4, got {self.depth}")
    n = (self.depth - 4) // 6
    x = conv(16, 3, name="stem_conv")(normalize(images))
    for s, w in enumerate(max(1, int(round(c * self.widen))) for c in (16, 32, 64)):
      for b in range(n):
        x = PreActBlock(w, 2 if (s > 0 and b == 0) else 1,
                        name=f"stage{s + 1}_block{b + 1}")(x, train)
    x = nn.relu(batch_norm(train, "final_bn")(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


def wrn28_1(num_classes: int = 10, width: float = 1.0) -> WideResNet:
  """WRN-28-1; `width` scales its channels (1.0: the paper's)."""
  return WideResNet(28, width, num_classes)
