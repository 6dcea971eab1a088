"""CIFAR classifiers (Flax Linen). Each takes pixel images (N, 32, 32, 3), 0..255, and
`train`; `drr_jax.features` finds the feature each conv/dense weight consumes."""
from __future__ import annotations

import flax.linen as nn

from drr_jax.models.densenet import DenseNet, densenet121
from drr_jax.models.resnet import ResNet, resnet18
from drr_jax.models.wide_resnet import WideResNet, wrn28_1


def get_model(name: str, num_classes: int = 10, width: float = 1.0) -> nn.Module:
  """Model by name: 'resnet18' (with `width`), 'wrn28_1', 'densenet121'."""
  if name == "resnet18":
    return resnet18(width, num_classes)
  if name == "wrn28_1":
    return wrn28_1(num_classes)
  if name == "densenet121":
    return densenet121(num_classes)
  raise ValueError(f"unknown model {name!r}; choose resnet18, wrn28_1 or densenet121")


__all__ = ["get_model", "ResNet", "WideResNet", "DenseNet", "resnet18", "wrn28_1",
           "densenet121"]
