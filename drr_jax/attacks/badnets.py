"""BadNets (Gu et al., 2019): a random 3x3 patch at the bottom-right corner.

As in the DRR paper and its authors' EP/CLP code, the patch is a random pattern rather
than BackdoorBench's white square; here every pixel and channel is 0 or 255.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from drr_jax.attacks.core import Trigger


def make_trigger(seed: int, config: dict[str, Any], image_shape=(32, 32, 3)) -> Trigger:
  size = int(config.get("patch_size", 3))
  rng = np.random.default_rng(seed)
  h, w, c = image_shape
  pattern = np.zeros(image_shape, np.uint8)
  mask = np.zeros(image_shape, np.float32)
  pattern[h - size:, w - size:, :] = 255 * rng.integers(0, 2, (size, size, c))
  mask[h - size:, w - size:, :] = 1.0
  return Trigger(pattern, mask)
