"""Shared set-up of the exploration scripts: a checkpoint, its splits, and a random subset
of its poisoned training set (seed 0) as the defense images."""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from drr_jax import attacks, checkpoint, datasets


class Setup(NamedTuple):
  model: Any
  variables: dict
  config: dict
  ds: datasets.Datasets
  trigger: attacks.Trigger
  images: np.ndarray     # the defense subset
  is_poison: np.ndarray  # for printing poisoned shares only, never for a decision


def load(checkpoint_dir: str, subset: int) -> Setup:
  model, variables, meta, record = checkpoint.load_model(checkpoint_dir)
  cfg = meta["config"]
  ds = datasets.load(cfg, None, test=False)
  trigger = attacks.Trigger(np.asarray(record["pattern"]), np.asarray(record["mask"]))
  idx = np.sort(np.random.default_rng(0).choice(len(ds.train.labels), subset, replace=False))
  return Setup(model, variables, cfg, ds, trigger, ds.train.images[idx],
               np.isin(idx, ds.train.poison_idx))
