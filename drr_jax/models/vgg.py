"""A plain VGG-style CNN for CIFAR: conv-BN-ReLU blocks and max pooling, no shortcuts, a
linear head on the globally pooled features. Each conv reads exactly the previous one's
activation, so it is the paper's X W chain. VGG-11's layout (8 convs), as in
kuangliu/pytorch-cifar's VGG('VGG11'), whose 512 x 1 x 1 map the head reads as it is."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from drr_jax.models.common import batch_norm, conv, normalize

VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
  layout: Sequence[int | str] = VGG11
  width: float = 1.0
  num_classes: int = 10

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = normalize(images)
    i = 0
    for item in self.layout:
      if item == "M":
        x = nn.max_pool(x, (2, 2), (2, 2))
        continue
      i += 1
      x = conv(max(1, int(round(item * self.width))), 3, name=f"conv{i}")(x)
      x = nn.relu(batch_norm(train, f"bn{i}")(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


def vgg11(width: float = 1.0, num_classes: int = 10) -> VGG:
  return VGG(VGG11, width, num_classes)
