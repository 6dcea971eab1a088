"""What every poisoning attack shares: a trigger, a label map, and poisoning a set.

A trigger is stamped as  x' = clip(round((1 - mask) * w(x) + mask * pattern + offset))  in
pixel space (uint8 in, uint8 out), where w warps the image along a sampling grid (or is
the identity): patch triggers (mask 0/1), blends (mask = alpha), additive signals (mask 0,
an offset: SIG) and warps (mask 0, a grid: WaNet). A trigger computed from the input by
trained networks (IAB) is a function of the images instead (`Trigger.fn`).

Dirty-label attacks relabel the poisoned samples (all-to-one or all-to-all); clean-label
attacks (config `clean_label`, set by the attack's name) poison samples of the target
class only and keep every label.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np

NUM_CLASSES = 10


class Trigger(NamedTuple):
  pattern: np.ndarray  # (H, W, C) uint8
  mask: np.ndarray     # (H, W, C) float32 in [0, 1]
  offset: np.ndarray | None = None  # (H, W, C) float32 added after the blend, or None
  grid: np.ndarray | None = None    # (H, W, 2) float32 sampling grid in [-1, 1], or None
  # uint8 images (N, H, W, C) -> their triggered uint8 copies, for a trigger that depends on
  # the input (IAB's generated pattern and mask); pattern and mask are then unused zeros
  fn: Callable[[np.ndarray], np.ndarray] | None = None


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
  if trigger.fn is not None:
    return np.asarray(trigger.fn(images), np.uint8)
  base = images if trigger.grid is None else warp_images(images, trigger.grid)
  out = (1.0 - trigger.mask) * base + trigger.mask * trigger.pattern
  if trigger.offset is not None:
    out = out + trigger.offset
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def warp_images(images: np.ndarray, grid: np.ndarray) -> np.ndarray:
  """Bilinear sampling of (N, H, W, C) images at a (H, W, 2) or (N, H, W, 2) grid of
  normalized (x, y) coordinates in [-1, 1] (PyTorch's grid_sample with
  align_corners=True: -1 and 1 are the centres of the border pixels); float32 out."""
  images = np.asarray(images, np.float32)
  n, h, w, _ = images.shape
  grid = np.broadcast_to(grid, (n, h, w, 2))
  px = (grid[..., 0] + 1) * (w - 1) / 2
  py = (grid[..., 1] + 1) * (h - 1) / 2
  x0 = np.clip(np.floor(px).astype(int), 0, w - 1)
  y0 = np.clip(np.floor(py).astype(int), 0, h - 1)
  x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
  fx, fy = (px - x0)[..., None], (py - y0)[..., None]
  b = np.arange(n)[:, None, None]
  top = images[b, y0, x0] * (1 - fx) + images[b, y0, x1] * fx
  bottom = images[b, y1, x0] * (1 - fx) + images[b, y1, x1] * fx
  return top * (1 - fy) + bottom * fy


def trigger_from_record(record: dict[str, Any]) -> Trigger:
  """The trigger a checkpoint's attack record holds (`train.attack_record`; IAB's record
  holds its generator and mask networks, `attacks.iab.record`)."""
  if "iab_generator" in record:
    from drr_jax.attacks import iab  # its networks need flax; iab itself imports this module
    return iab.trigger_from_record(record)
  opt = {k: None if record.get(k) is None else np.asarray(record[k], np.float32)
         for k in ("offset", "grid")}
  return Trigger(np.asarray(record["pattern"]), np.asarray(record["mask"]), **opt)


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
