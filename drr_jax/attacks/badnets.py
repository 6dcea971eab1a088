"""BadNets (Gu et al., 2019): a small patch stamped at a fixed place.

As in the DRR paper and its authors' EP/CLP code, the default patch is a random binary
pattern (every pixel and channel 0 or 255) of 3x3 at the bottom-right corner, rather than
BackdoorBench's white square. config keys: patch_size (3), position ('br', 'bl', 'tr',
'tl' or 'center'), pattern ('random', 'white' or 'checker').
"""
from __future__ import annotations

from typing import Any

import numpy as np

from drr_jax.attacks.core import Trigger

POSITIONS = ("br", "bl", "tr", "tl", "center")
PATTERNS = ("random", "white", "checker")


def _corner(position: str, size: int, h: int, w: int) -> tuple[int, int]:
  if position == "center":
    return (h - size) // 2, (w - size) // 2
  return (h - size if position[0] == "b" else 0), (w - size if position[1] == "r" else 0)


def make_trigger(seed: int, config: dict[str, Any], image_shape=(32, 32, 3)) -> Trigger:
  size = int(config.get("patch_size", 3))
  position = config.get("position", "br")
  kind = config.get("pattern", "random")
  h, w, c = image_shape
  if not 1 <= size <= min(h, w):
    raise ValueError(f"patch_size must be in [1, {min(h, w)}], got {size}")
  if position not in POSITIONS:
    raise ValueError(f"unknown BadNets position {position!r}; choose one of {POSITIONS}")
  if kind not in PATTERNS:
    raise ValueError(f"unknown BadNets pattern {kind!r}; choose one of {PATTERNS}")
  if kind == "random":
    patch = np.random.default_rng(seed).integers(0, 2, (size, size, c))
  elif kind == "white":
    patch = np.ones((size, size, c), np.int64)
  else:
    ii, jj = np.indices((size, size))
    patch = np.repeat(((ii + jj) % 2 == 0)[..., None], c, axis=-1)
  top, left = _corner(position, size, h, w)
  pattern = np.zeros(image_shape, np.uint8)
  mask = np.zeros(image_shape, np.float32)
  pattern[top:top + size, left:left + size, :] = 255 * patch
  mask[top:top + size, left:left + size, :] = 1.0
  return Trigger(pattern, mask)
