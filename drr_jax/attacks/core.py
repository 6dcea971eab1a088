"""What every poisoning attack shares: a trigger, a label map, and poisoning a set.

A trigger is stamped as  x' = clip(round((1 - mask) * x + mask * pattern + offset))  in
pixel space (uint8 in, uint8 out), which covers patch triggers (mask 0/1), blends (mask =
alpha) and additive signals (mask 0, an offset: SIG).

Dirty-label attacks relabel the poisoned samples (all-to-one or all-to-all); clean-label
attacks (config `clean_label`, set by the attack's name) poison samples of the target
class only and keep every label.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

NUM_CLASSES = 10


class Trigger(NamedTuple):
  pattern: np.ndarray  # (H, W, C) uint8
  mask: np.ndarray     # (H, W, C) float32 in [0, 1]
  offset: np.ndarray | None = None  # (H, W, C) float32 added after the blend, or None


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
  if trigger.offset is not None:
    out = out + trigger.offset
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def trigger_from_record(record: dict[str, Any]) -> Trigger:
  """The trigger a checkpoint's attack record holds (`train.attack_record`)."""
  offset = record.get("offset")
  return Trigger(np.asarray(record["pattern"]), np.asarray(record["mask"]),
                 None if offset is None else np.asarray(offset, np.float32))


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
  """round(ratio * N) indices, drawn among samples whose label the attack changes (a
  clean-label attack: among the target class's samples)."""
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"poison_ratio must be in [0, 1], got {ratio}")
  targets = target_labels(labels, config)
  clean = bool(config.get("clean_label", False))
  candidates = np.flatnonzero(targets == labels if clean else targets != labels)
  count = int(round(ratio * len(labels)))
  if count > len(candidates):
    what = "are of the target class" if clean else "have a label the attack changes"
    raise ValueError(f"cannot poison {count} of {len(labels)} samples: only "
                     f"{len(candidates)} {what}")
  return np.sort(rng.choice(candidates, count, replace=False))


def poison_with(images: np.ndarray, labels: np.ndarray, trigger: Trigger, seed: int,
                config: dict[str, Any]) -> PoisonedSet:
  rng = np.random.default_rng(seed)
  idx = choose_poison(labels, float(config.get("poison_ratio", 0.1)), rng, config)
  images = np.array(images, copy=True)
  labels = np.array(labels, copy=True)
  if len(idx):
    images[idx] = apply_trigger(images[idx], trigger)
    if not config.get("clean_label", False):
      labels[idx] = target_labels(labels[idx], config)
  return PoisonedSet(images, labels.astype(np.int32), idx, trigger)
