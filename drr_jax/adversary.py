"""The attacker's own clean model and what it computes for CLA, trained and cached once.

CLA perturbs target-class images adversarially against a clean model that the attacker
trained separately (`attacks.cla`). That model is the victim's architecture and preset
trained on the clean training split with another seed (the victim's + 1); it and the
perturbed images are cached under $DRR_CACHE_DIR/adversary, keyed by the hashes of the
settings and data they come from, so that a rerun, or another cell with the same victim
settings, computes nothing again. A damaged cache entry is recomputed. A committed copy of
the attacker's model (`beside(checkpoint)`, variables only) is used before the cache, so
a fresh machine re-checks a CLA model without retraining the attacker's; only the PGD
images (7 steps) are recomputed.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from drr_jax import checkpoint, data, features
from drr_jax.attacks import PoisonedSet, Trigger, cla


def _hash(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def clean_config(config: dict[str, Any]) -> dict[str, Any]:
  """The attacker's clean model: the victim's model and training, no attack, seed + 1."""
  cfg = copy.deepcopy(config)
  # The attack's own settings (CLA's PGD and trigger) do not change the clean model.
  kept = {k: v for k, v in cfg["attack"].items() if not k.startswith("cla_")}
  cfg["attack"] = {**kept, "name": "none", "poison_ratio": 0.0}
  cfg["seed"] = int(config["seed"]) + 1
  return cfg


def beside(checkpoint_dir: str | os.PathLike) -> Path:
  """Where the attacker's model of the victim checkpoint in checkpoint_dir is exported:
  the sibling folder `<checkpoint_dir>-attacker-clean`."""
  return Path(os.path.normpath(checkpoint_dir) + "-attacker-clean")


def root(cache_dir: str | os.PathLike | None = None) -> Path:
  return Path(cache_dir) if cache_dir is not None else data.default_cache_dir() / "adversary"


def clean_model(config: dict[str, Any], train: data.Split, val: data.Split, *,
                cache_dir: str | os.PathLike | None = None,
                exported: str | os.PathLike | None = None, progress: bool = True):
  """(model, variables) of the attacker's clean model for this victim config: the
  finished one in `exported` when it trained this config, else trained on `train`
  (resuming, or reused when finished) in the cache."""
  from drr_jax import train as train_lib  # training is needed only for this attack
  from drr_jax.experiment import finished_meta
  cfg = clean_config(config)
  if exported is not None and finished_meta(exported, cfg) is not None:
    model, variables, _, _ = checkpoint.load_model(exported)
    return model, variables
  key = _hash({"config": cfg, "data": data.digest(train.images, train.labels)})
  workdir = root(cache_dir) / f"clean-{key}"
  if finished_meta(workdir, cfg) is None:
    empty = Trigger(np.zeros(train.images.shape[1:], np.uint8),
                    np.zeros(train.images.shape[1:], np.float32))
    clean = PoisonedSet(train.images, train.labels, np.zeros(0, np.int64), empty)
    train_lib.train(cfg, clean, val, workdir, resume=True, progress=progress)
  model, variables, _, _ = checkpoint.load_model(workdir)
  return model, variables


def perturbed(config: dict[str, Any], train: data.Split, val: data.Split,
              idx: np.ndarray, *, cache_dir: str | os.PathLike | None = None,
              exported: str | os.PathLike | None = None,
              progress: bool = True) -> np.ndarray:
  """CLA's PGD images of train.images[idx] against the attacker's clean model (uint8),
  computed once and cached; `exported`: see `clean_model`."""
  eps, step, steps = cla.settings(config["attack"])
  idx = np.asarray(idx, np.int64)
  key = _hash({"clean": clean_config(config),
               "data": data.digest(train.images, train.labels),
               "idx": hashlib.sha256(idx.tobytes()).hexdigest(),
               "pgd": [eps, step, steps]})
  path = root(cache_dir) / f"cla-{key}.npz"
  cached = data.read_cached(path)
  if cached is not None and len(cached.labels) == len(idx):
    return cached.images
  model, variables = clean_model(config, train, val, cache_dir=cache_dir,
                                 exported=exported, progress=progress)
  images = cla.pgd(features.as_apply_fn(model), variables, train.images[idx],
                   train.labels[idx], eps=eps, step=step, steps=steps)
  data.write_cached(path, data.Split(images, train.labels[idx]))
  return images
