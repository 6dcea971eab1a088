"""Blended (Chen et al., 2017): x' = (1 - alpha) x + alpha t with a random-noise image t.

alpha = 0.2 by default: BackdoorBench's Blended uses alpha 0.2, and the DRR authors'
EP/CLP code blends 0.8 x + 0.2 t (see ../shared/notes/backdoor-facts.md).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from drr_jax.attacks.core import Trigger


def make_trigger(seed: int, config: dict[str, Any], image_shape=(32, 32, 3)) -> Trigger:
  alpha = float(config.get("alpha", 0.2))
  if not 0.0 < alpha <= 1.0:
    raise ValueError(f"blend alpha must be in (0, 1], got {alpha}")
  rng = np.random.default_rng(seed)
  pattern = rng.integers(0, 256, image_shape).astype(np.uint8)
  return Trigger(pattern, np.full(image_shape, alpha, np.float32))
