"""Pieces shared by the CIFAR models: input normalization and initializers."""
from __future__ import annotations


import flax.linen as nn
import jax.numpy as jnp

# Per-channel statistics of the CIFAR-10 training set, in pixel units (0..255).
CIFAR10_MEAN = (125.31, 122.95, 113.87)
CIFAR10_STD = (62.99, 62.09, 66.70)


def normalize(images: jnp.ndarray) -> jnp.ndarray:
  """Pixel values (uint8 or float, 0..255) -> standardized float32.

  The one place where inputs are normalized: data and attacks stay in pixel space.
  """
  x = images.astype(jnp.float32)
  return (x - jnp.asarray(CIFAR10_MEAN)) / jnp.asarray(CIFAR10_STD)


# He (fan-out) initialization, the usual one for ResNets and WRNs.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
  # momentum 0.9 == PyTorch's momentum 0.1; epsilon as in PyTorch.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      name=name)


class PointwiseConv(nn.Conv):
  """A 1x1 `nn.Conv` (same params, same function) computed as a matrix product of the
  (strided) input: XLA's convolution gradient is about 5x slower than a matmul's for 1x1
  kernels on CPU (measured here), which dominated DenseNet's and MobileNetV2's training.
  It is an `nn.Conv`, so DRR treats it as any other conv layer."""

  @nn.compact
  def __call__(self, inputs):
    if tuple(self.kernel_size) != (1, 1) or int(self.feature_group_count) != 1:
      raise ValueError("PointwiseConv is for ungrouped 1x1 kernels")
    kernel = self.param("kernel", self.kernel_init,
                        (1, 1, inputs.shape[-1], self.features), self.param_dtype)
    strides = self.strides or (1, 1)
    strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
    x = inputs[:, ::strides[0], ::strides[1], :]
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    y = jnp.matmul(x, kernel[0, 0], precision=self.precision)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      y = y + bias.astype(y.dtype)
    return y


def conv(features: int, kernel: int, stride: int = 1, name: str | None = None) -> nn.Conv:
  if kernel == 1:
    return PointwiseConv(features, (1, 1), (stride, stride), padding="VALID",
                         use_bias=False, kernel_init=conv_init, name=name)
  return nn.Conv(features, (kernel, kernel), (stride, stride),
                 padding=[(kernel // 2, kernel // 2)] * 2, use_bias=False,
                 kernel_init=conv_init, name=name)
