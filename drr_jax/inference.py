"""Batched, jitted class predictions of a model: what the defense needs from a network.

Kept apart from `evaluate` (ACC/ASR, which needs the attacks to build triggered images) so
that the defense can predict without importing `drr_jax.attacks`. With several devices
each batch is split over them (`sharding`); with one, nothing changes.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from drr_jax import features, sharding

ApplyFn = Callable[[Any, jax.Array], jax.Array]


@functools.lru_cache(maxsize=32)
def _jitted(model: nn.Module | ApplyFn) -> Callable:
  """One compiled predictor per model (Linen modules hash by their fields)."""
  apply_fn = features.as_apply_fn(model)
  return jax.jit(lambda v, x: jnp.argmax(apply_fn(v, x), axis=-1))


def predict(model: nn.Module | ApplyFn, variables: Any, images: np.ndarray,
            batch_size: int = 500, progress: bool = True, desc: str = "predict"
            ) -> np.ndarray:
  """Predicted classes for uint8 images (N, H, W, C), batch by batch (each batch split
  over the devices: its size rounded up to a multiple of their count)."""
  images = np.asarray(images)
  if images.ndim != 4 or len(images) == 0:
    raise ValueError(f"expected a non-empty batch (N, H, W, C), got shape {images.shape}")
  fn = _jitted(model)
  mesh = sharding.batch_mesh()
  variables = sharding.replicate(variables, mesh)
  out = [np.asarray(sharding.to_host(fn(variables, x)))[:m]
         for x, m in sharding.batches(images, batch_size, mesh, progress=progress,
                                      desc=desc)]
  return np.concatenate(out)
