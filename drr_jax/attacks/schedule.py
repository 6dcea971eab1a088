"""The batches a victim trains on, and the poisoned set that training actually used.

Most attacks poison the training set once, before training (`attacks.poison`). Per-batch
attacks (WaNet) poison each batch as it is drawn: which images are warped, and the noise
of the "noise mode" ones, change from epoch to epoch. Everything here is a deterministic
function of (the attack's training base, the attack config, the training seed, the
epoch, the batch size), so the poisoned set of the final epoch -- the one a defender is
handed, each training image as the last pass of training saw it -- is rebuilt exactly,
without storing 47,500 images in a checkpoint.

IAB's batches are poisoned by a generator trained along with the model, so they are no
function of these settings alone: its training (`train.train`, `attacks.iab.batches`)
records the final epoch's poisoned samples in the checkpoint instead (`attacks.iab`).
"""
from __future__ import annotations

from typing import Any, Iterator, NamedTuple

import numpy as np

from drr_jax.attacks import wanet
from drr_jax.attacks.core import PoisonedSet, target_labels

PER_BATCH = ("wanet",)
# Per-batch attacks whose poisoned images come from networks trained with the model: the
# set a training used is read from its checkpoint (`attacks.iab.trained_set`).
GENERATED = ("iab",)


class Batch(NamedTuple):
  index: np.ndarray   # (B,) rows of the training set
  images: np.ndarray  # (B, H, W, C) uint8, as trained on
  labels: np.ndarray  # (B,) int32, as trained on
  kind: np.ndarray    # (B,) int8: 0 clean, 1 backdoor, 2 noise mode (cross)


def epoch_order(n: int, train_seed: int, epoch: int) -> np.ndarray:
  """The shuffle of one epoch (the order `train.train` has always used)."""
  return np.random.default_rng(train_seed * 100003 + epoch).permutation(n)


def per_batch_count(batch_size: int, ratio: float, rng: np.random.Generator) -> int:
  """How many images of a batch a per-batch attack poisons: int(B * ratio); where
  ratio * B < 1, one image with probability ratio * B (BackdoorBench's generalization to
  low ratios, `generalize_to_lower_pratio` in its WaNet and input-aware attacks)."""
  if batch_size * ratio >= 1:
    return int(batch_size * ratio)
  return int(rng.uniform() < batch_size * ratio)


def _wanet_batch(images, labels, trigger, config, rng) -> tuple[np.ndarray, ...]:
  """WaNet's per-batch poisoning: the first int(B * ratio) images warped and relabelled,
  the next cross_ratio times as many warped with noise and kept (`per_batch_count`)."""
  _, _, _, cross = wanet.settings(config)
  b = len(labels)
  n_bd = per_batch_count(b, float(config.get("poison_ratio", 0.1)), rng)
  n_cross = min(int(n_bd * cross), b - n_bd)
  images, labels = images.copy(), labels.copy()
  kind = np.zeros(b, np.int8)
  if n_bd:
    images[:n_bd] = wanet.to_uint8(wanet.warp(images[:n_bd], trigger.grid))
    labels[:n_bd] = target_labels(labels[:n_bd], config)
    kind[:n_bd] = 1
  if n_cross:
    part = slice(n_bd, n_bd + n_cross)
    images[part] = wanet.to_uint8(wanet.warp(images[part],
                                             wanet.noise_grids(trigger.grid, n_cross, rng)))
    kind[part] = 2
  return images, labels.astype(np.int32), kind


def _refuse_generated(attack_config: dict[str, Any]) -> None:
  if attack_config.get("name") in GENERATED:
    raise ValueError(f"{attack_config['name']!r} poisons its batches with networks trained "
                     "along with the model: its batches are drawn by its training "
                     "(attacks.iab.batches), and the set it used is read from the "
                     "checkpoint (attacks.iab.trained_set)")


def train_batches(base: PoisonedSet, attack_config: dict[str, Any], train_seed: int,
                  epoch: int, batch_size: int) -> Iterator[Batch]:
  """The epoch's full batches (the last partial one is dropped), poisoned per batch for
  a per-batch attack, as they are (already poisoned) otherwise."""
  _refuse_generated(attack_config)
  n = len(base.labels)
  order = epoch_order(n, train_seed, epoch)
  per_batch = attack_config.get("name") in PER_BATCH
  poisoned = np.zeros(n, bool)
  poisoned[np.asarray(base.poison_idx, np.int64)] = True
  for i, start in enumerate(range(0, n - n % batch_size, batch_size)):
    idx = order[start:start + batch_size]
    if per_batch:
      rng = np.random.default_rng([train_seed, epoch, i])
      images, labels, kind = _wanet_batch(base.images[idx], base.labels[idx],
                                          base.trigger, attack_config, rng)
    else:
      images, labels, kind = base.images[idx], base.labels[idx], poisoned[idx].astype(np.int8)
    yield Batch(idx, images, labels, kind)


def trained_set(base: PoisonedSet, attack_config: dict[str, Any], train_seed: int,
                epochs: int, batch_size: int) -> PoisonedSet:
  """The poisoned training set as the final epoch used it (a per-batch attack), with
  `poison_idx` its backdoor samples; `base` itself for every other attack."""
  _refuse_generated(attack_config)
  if attack_config.get("name") not in PER_BATCH:
    return base
  images, labels = base.images.copy(), base.labels.copy()
  backdoor = []
  for batch in train_batches(base, attack_config, train_seed, max(epochs, 1) - 1,
                             batch_size):
    images[batch.index] = batch.images
    labels[batch.index] = batch.labels
    backdoor.append(batch.index[batch.kind == 1])
  idx = np.sort(np.concatenate(backdoor)) if backdoor else np.zeros(0, np.int64)
  return PoisonedSet(images, labels, idx.astype(np.int64), base.trigger)
