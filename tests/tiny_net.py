"""A tiny Flax classifier that tests/test_defend_assets.py loads by import path, as a
user's own model would be (`--model tests/tiny_net.py:TinyNet`)."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class TinyNet(nn.Module):
  num_classes: int = 10
  width: int = 8

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(jnp.float32) / 255.0
    x = nn.relu(nn.Conv(self.width, (3, 3), name="conv1")(x))
    x = nn.relu(nn.Conv(self.width, (3, 3), name="conv2")(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


def tiny_net(num_classes: int = 10) -> TinyNet:
  """A factory, as --model also takes."""
  return TinyNet(num_classes=num_classes)
