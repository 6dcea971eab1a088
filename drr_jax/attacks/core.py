"""What every poisoning attack shares: a trigger, a label map, and poisoning a set.

A trigger is stamped as  x' = round((1 - mask) * x + mask * pattern)  in pixel space
(uint8 in, uint8 out), which covers patch triggers (mask 0/1) and blends (mask = alpha).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

NUM_CLASSES = 10


class Trigger(NamedTuple):
  pattern: np.ndarray  # (H, W, C) uint8
  mask: np.ndarray     # (H, W, C) float32 in [0, 1]


class PoisonedSet(NamedTuple):
  images: np.ndarray        # (N, H, W, C) uint8, poisoned where `poison_idx` says
  labels: np.ndarray        # (N,) int32, the labels a victim trains on
  poison_idx: np.ndarray    # (P,) int64 sorted; for analysis only, never for defense
  trigger: Trigger


def apply_trigger(images: np.ndarray, trigger: Trigger) -> np.ndarray:
  """Stamps the trigger into a batch of uint8 images (N, H, W, C)."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[1:] != trigger.pattern.shape:
    raise ValueError(f"images of shape {images.shape} do not fit a trigger of shape "
                     f"{trigger.pattern.shape}")
  out = (1.0 - trigger.mask) * images + trigger.mask * trigger.pattern
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def target_labels(labels: np.ndarray, config: dict[str, Any]) -> np.ndarray:
  """The labels the attacker wants for triggered inputs: all-to-one or (y + 1) % M."""
  labels = np.asarray(labels)
  mode = config.get("label_mode", "all2one")
  if mode == "all2one":
    return np.full_like(labels, int(config.get("target", 0)))
  if mode == "all2all":
    return (labels + 1) % int(config.get("num_classes", NUM_CLASSES))
  raise ValueError(f"unknown label_mode {mode!r}; use 'all2one' or 'all2all'")


def choose_poison(labels: np.ndarray, ratio: float, rng: np.random.Generator,
                  config: dict[str, Any]) -> np.ndarray:
  """round(ratio * N) indices, drawn among samples whose label the attack changes."""
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"poison_ratio must be in [0, 1], got {ratio}")
  candidates = np.flatnonzero(target_labels(labels, config) != labels)
  count = int(round(ratio * len(labels)))
  if count > len(candidates):
    raise ValueError(f"cannot poison {count} of {len(labels)} samples: only "
                     f"{len(candidates)} have a label the attack changes")
  return np.sort(rng.choice(candidates, count, replace=False))


def poison_with(images: np.ndarray, labels: np.ndarray, trigger: Trigger, seed: int,
                config: dict[str, Any]) -> PoisonedSet:
  rng = np.random.default_rng(seed)
  idx = choose_poison(labels, float(config.get("poison_ratio", 0.1)), rng, config)
  images = np.array(images, copy=True)
  labels = np.array(labels, copy=True)
  if len(idx):
    images[idx] = apply_trigger(images[idx], trigger)
    labels[idx] = target_labels(labels[idx], config)
  return PoisonedSet(images, labels.astype(np.int32), idx, trigger)
