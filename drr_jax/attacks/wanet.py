"""WaNet (Nguyen & Tran, ICLR 2021): a fixed, smooth, almost invisible warp of the image.

The field: a k x k grid of random offsets, uniform in [-1, 1] and scaled so that their
mean magnitude is 1, upsampled bicubically (align_corners) to the image size; the warp
samples the image bilinearly at  identity + s * field / H  (times grid_rescale, clipped
to the image), in the normalized [-1, 1] coordinates of `grid_sample(align_corners=True)`.
Backdoor samples are warped with that field and take the target label; "noise mode"
(cross) samples are warped with the field plus a fresh uniform offset in [-1/H, 1/H] per
pixel and keep their labels, so that the network learns the one field rather than any
warp. Settings of the original and BackdoorBench: k 4, s 0.5, grid_rescale 1, cross ratio
2 (../shared/notes/backdoor-facts.md). Both kinds are drawn per batch during training
(`attacks.schedule`), and the defender is handed the set that the final epoch used
(`schedule.trained_set`). BackdoorBench instead regenerates its `bd_train` after training
in a fresh, unshuffled pass with new noise; the set here is the one the model saw.

Choices where this differs from the original code: warped images are stored as uint8
pixels like every poisoned image here (a rounding of at most half a grey level); the
warp is applied before the project's augmentation (random crop with 4-pixel padding and
flip), where the original adds a 10-degree random rotation.

config keys: wanet_k (4), wanet_s (0.5), wanet_grid_rescale (1.0), wanet_cross_ratio (2).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from drr_jax.attacks.core import Trigger, warp_images

CUBIC_A = -0.75  # the cubic convolution kernel of PyTorch's bicubic upsampling


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """(n, 4) weights of the samples at offsets -1, 0, 1, 2 for fractional positions t."""
  a = CUBIC_A

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def upsample_bicubic(grid: np.ndarray, size: int) -> np.ndarray:
  """(k, k, ...) -> (size, size, ...) bicubic interpolation with aligned corners (the
  corner samples land on the corner pixels), indices clamped at the border."""
  k = grid.shape[0]
  x = np.arange(size) * (k - 1) / max(size - 1, 1)
  x0 = np.floor(x).astype(int)
  w = _cubic_weights(x - x0)                                   # (size, 4)
  idx = np.clip(x0[:, None] + np.arange(-1, 3)[None, :], 0, k - 1)  # (size, 4)
  m = np.zeros((size, k))
  np.add.at(m, (np.repeat(np.arange(size), 4), idx.ravel()), w.ravel())
  return np.einsum("ik,jl,kl...->ij...", m, m, grid)


def make_field(seed: int, k: int = 4, size: int = 32) -> np.ndarray:
  """The (size, size, 2) smooth offset field (x, y), mean magnitude 1 on its k x k grid."""
  if k < 2 or k > size:
    raise ValueError(f"wanet_k must be in [2, {size}], got {k}")
  ins = np.random.default_rng(seed).uniform(-1, 1, (k, k, 2))
  ins = ins / np.mean(np.abs(ins))
  return upsample_bicubic(ins, size).astype(np.float32)


def identity_grid(h: int, w: int) -> np.ndarray:
  """(h, w, 2) normalized (x, y) coordinates of every pixel, in [-1, 1]."""
  ys, xs = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
  return np.stack([xs, ys], -1).astype(np.float32)


def warp_grid(field: np.ndarray, s: float = 0.5, grid_rescale: float = 1.0) -> np.ndarray:
  """Where the warped image samples the original: (identity + s field / H) * rescale,
  clipped to [-1, 1]."""
  h, w = field.shape[:2]
  return np.clip((identity_grid(h, w) + s * field / h) * grid_rescale, -1, 1)


def noise_grids(grid: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
  """(n, H, W, 2) "noise mode" grids: the warp plus a uniform [-1/H, 1/H] offset per pixel."""
  h = grid.shape[0]
  return np.clip(grid[None] + rng.uniform(-1, 1, (n, *grid.shape)) / h, -1, 1)


warp = warp_images  # bilinear sampling as grid_sample(align_corners=True)


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Warped images are stored like every poisoned image: uint8 pixels."""
  return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def settings(config: dict[str, Any]) -> tuple[int, float, float, float]:
  """(k, s, grid_rescale, cross_ratio) from a config, checked."""
  k = int(config.get("wanet_k", 4))
  s = float(config.get("wanet_s", 0.5))
  rescale = float(config.get("wanet_grid_rescale", 1.0))
  cross = float(config.get("wanet_cross_ratio", 2.0))
  if not s > 0:
    raise ValueError(f"wanet_s must be positive, got {s}")
  if not rescale > 0:
    raise ValueError(f"wanet_grid_rescale must be positive, got {rescale}")
  if cross < 0:
    raise ValueError(f"wanet_cross_ratio must be >= 0, got {cross}")
  return k, s, rescale, cross


def make_trigger(seed: int, config: dict[str, Any], image_shape=(32, 32, 3)) -> Trigger:
  """The test-time trigger: the fixed warp (no noise), nothing blended or added."""
  h, w, _ = image_shape
  if h != w:
    raise ValueError(f"WaNet's field is square; images are {h}x{w}")
  k, s, rescale, _ = settings(config)
  zeros = np.zeros(image_shape, np.float32)
  return Trigger(zeros.astype(np.uint8), zeros, None,
                 warp_grid(make_field(seed, k, h), s, rescale))
