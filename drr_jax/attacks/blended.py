"""Blended (Chen et al., 2017): x' = (1 - alpha) x + alpha t with a fixed image t.

alpha = 0.2 by default: BackdoorBench's Blended uses alpha 0.2, and the DRR authors'
EP/CLP code blends 0.8 x + 0.2 t (see ../shared/notes/backdoor-facts.md). config key
`blend_pattern`: 'noise' (uniform random pixels, the paper's "random noise patterns") or
'smooth' (random 4x4 noise upsampled bilinearly to the image: a low-frequency pattern).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from drr_jax.attacks.core import Trigger

PATTERNS = ("noise", "smooth")


def _smooth(rng: np.random.Generator, image_shape, cells: int = 4) -> np.ndarray:
  h, w, c = image_shape
  coarse = rng.uniform(0, 255, (cells, cells, c))
  # bilinear interpolation of the coarse grid at pixel centres
  ys = np.clip((np.arange(h) + 0.5) * cells / h - 0.5, 0, cells - 1)
  xs = np.clip((np.arange(w) + 0.5) * cells / w - 0.5, 0, cells - 1)
  y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
  y1, x1 = np.minimum(y0 + 1, cells - 1), np.minimum(x0 + 1, cells - 1)
  fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
  top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x1] * fx
  bottom = coarse[y1][:, x0] * (1 - fx) + coarse[y1][:, x1] * fx
  return np.rint(top * (1 - fy) + bottom * fy)


def make_trigger(seed: int, config: dict[str, Any], image_shape=(32, 32, 3)) -> Trigger:
  alpha = float(config.get("alpha", 0.2))
  if not 0.0 < alpha <= 1.0:
    raise ValueError(f"blend alpha must be in (0, 1], got {alpha}")
  kind = config.get("blend_pattern", "noise")
  if kind not in PATTERNS:
    raise ValueError(f"unknown blend pattern {kind!r}; choose one of {PATTERNS}")
  rng = np.random.default_rng(seed)
  if kind == "noise":
    pattern = rng.integers(0, 256, image_shape)
  else:
    pattern = _smooth(rng, image_shape)
  return Trigger(pattern.astype(np.uint8), np.full(image_shape, alpha, np.float32))
