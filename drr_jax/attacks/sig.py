"""SIG (Barni, Kallas & Tondi, 2019): a horizontal sinusoid added to target-class images.

v(i, j) = delta * sin(2 pi j f / m) over column j of an m-column image, the same for every
row and channel; x' = clip(x + v). The poisoned images are training images of the target
class, labels unchanged (a clean-label attack); at test time the same signal is added to
images of the other classes. delta 40, f 6 as BackdoorBench's SIG (the original paper
trains with delta 20 and tests with larger ones; ../shared/notes/backdoor-facts.md).
config keys: sig_delta (40), sig_f (6); the poison ratio is a share of the whole training
set (the grids use 8 %, as for CLA).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from drr_jax.attacks.core import Trigger


def signal(image_shape, delta: float, f: float) -> np.ndarray:
  """The (H, W, C) float32 signal delta * sin(2 pi j f / W) of column j."""
  h, w, c = image_shape
  row = delta * np.sin(2 * np.pi * np.arange(w) * f / w)
  return np.broadcast_to(row[None, :, None], (h, w, c)).astype(np.float32)


DEFAULTS = {"sig_delta": 40.0, "sig_f": 6.0}


def defaults() -> dict[str, Any]:
  """The SIG settings a config starts from (BackdoorBench's)."""
  return dict(DEFAULTS)


def make_trigger(seed: int, config: dict[str, Any], image_shape=(32, 32, 3)) -> Trigger:
  del seed  # the signal is deterministic
  delta = float(config.get("sig_delta", DEFAULTS["sig_delta"]))
  f = float(config.get("sig_f", DEFAULTS["sig_f"]))
  if not 0.0 < delta <= 255.0:
    raise ValueError(f"sig_delta must be in (0, 255], got {delta}")
  if not f > 0.0:
    raise ValueError(f"sig_f must be positive, got {f}")
  zeros = np.zeros(image_shape, np.float32)
  return Trigger(zeros.astype(np.uint8), zeros, signal(image_shape, delta, f))
