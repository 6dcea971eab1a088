"""CIFAR classifiers (Flax Linen). Each takes pixel images (N, 32, 32, 3), 0..255, and
`train`; `drr_jax.features` finds the feature each conv/dense weight consumes."""
from __future__ import annotations

from typing import Callable

import flax.linen as nn

from drr_jax.models.densenet import DenseNet, densenet121
from drr_jax.models.mobilenet_v2 import MobileNetV2, mobilenet_v2
from drr_jax.models.preact_resnet import PreActResNet, preact_resnet18
from drr_jax.models.resnet import ResNet, resnet18
from drr_jax.models.vgg import VGG, vgg11
from drr_jax.models.wide_resnet import WideResNet, wrn28_1

# name -> factory(width, num_classes); `width` scales every layer's channels (DenseNet:
# its growth rate), 1.0 being the published model.
MODELS: dict[str, Callable[[float, int], nn.Module]] = {
    "resnet18": lambda w, n: resnet18(w, n),
    "preact_resnet18": lambda w, n: preact_resnet18(w, n),
    "wrn28_1": lambda w, n: wrn28_1(n, w),
    "densenet121": lambda w, n: densenet121(n, w),
    "vgg11": lambda w, n: vgg11(w, n),
    "mobilenet_v2": lambda w, n: mobilenet_v2(w, n),
}


# The models that read pixel values 0..255 and normalize them themselves (their
# subclasses too): inputs on another scale are a mistake that `defend` can name.
PIXEL_MODELS = (DenseNet, MobileNetV2, PreActResNet, ResNet, VGG, WideResNet)


def takes_pixels(model) -> bool:
  """Whether `model` is one of drr_jax's models, which take pixels 0..255."""
  return isinstance(model, PIXEL_MODELS)


def get_model(name: str, num_classes: int = 10, width: float = 1.0) -> nn.Module:
  """Model by name (one of `MODELS`) at a channel width multiplier."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {tuple(MODELS)}")
  if not (isinstance(width, (int, float)) and 0 < width <= 8):
    raise ValueError(f"model width must be a number in (0, 8], got {width!r}")
  return MODELS[name](float(width), num_classes)


__all__ = ["MODELS", "PIXEL_MODELS", "get_model", "takes_pixels", "ResNet", "PreActResNet", "WideResNet", "DenseNet",
           "VGG", "MobileNetV2", "resnet18", "preact_resnet18", "wrn28_1", "densenet121",
           "vgg11", "mobilenet_v2"]
