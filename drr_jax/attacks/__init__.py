"""Poisoning attacks as pure functions of (images, labels, seed, config).

config keys: name ('badnets', 'badnets_a2a', 'blended', 'sig', 'cla', 'wanet', 'iab',
'none'), poison_ratio
(0.1), target (0, all-to-one), label_mode ('all2one' / 'all2all', set by the name),
clean_label (set by the name: SIG, CLA), alpha (Blended, 0.2), patch_size (BadNets, 3), seed
(the trigger's and the choice's); each attack's module lists its own keys.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from drr_jax.attacks import badnets, blended, cla, iab, sig, wanet
from drr_jax.attacks.core import (PoisonedSet, Trigger, apply_trigger, choose_poison,
                                  poison_with, target_labels, trigger_from_record)
from drr_jax.attacks.schedule import GENERATED, PER_BATCH, train_batches, trained_set

_MAKERS = {"badnets": badnets.make_trigger, "badnets_a2a": badnets.make_trigger,
           "blended": blended.make_trigger, "sig": sig.make_trigger,
           "wanet": wanet.make_trigger, "cla": cla.make_trigger, "iab": iab.make_trigger}
NAMES = ("none",) + tuple(_MAKERS)
CLEAN_LABEL = ("sig", "cla")
# Attacks whose poisoned images come from the attacker's own model (`drr_jax.adversary`).
NEEDS_ADVERSARY = ("cla",)
# Poison ratios (shares of the whole training set) where an attack's own default differs
# from the config's 10 %: a clean-label attack can poison at most its target class.
DEFAULT_RATIOS = {"sig": 0.08, "cla": 0.08}


def default_settings(name: str, preset: str) -> dict[str, Any]:
  """Settings an attack adds to a config once its name is known (IAB's depend on the
  preset: schedule and network width; SIG's signal; CLA's PGD): `grid.cell_config` and the
  launchers put them in, so that a checkpoint's config names them and `--set` can change
  them."""
  if name == "iab":
    return iab.defaults(preset)
  if name == "sig":
    return sig.defaults()
  if name == "cla":
    return cla.defaults()
  return {}


# Trigger settings every training config gained on 2026-12-03 (106ccf3), at the values
# that reproduce the single BadNets patch and Blended pattern of the code before them.
ADDED_2026_12_03 = {"position": "br", "pattern": "random", "blend_pattern": "noise"}
# Settings whose absence means another value than today's default: IAB models trained
# before `iab_accumulate_g` existed (2026-12-07) zeroed G's gradients every step.
ABSENT_MEANS = {"iab": {"iab_accumulate_g": False}}


def same_training_config(stored: dict[str, Any], wanted: dict[str, Any]) -> bool:
  """Whether a training config read back from a checkpoint is `wanted`. An attack setting
  added to configs after the checkpoint was written (the patch's and blend's on
  2026-12-03, `ADDED_2026_12_03`; SIG's and CLA's `default_settings` on 2026-12-06) is
  absent from it; those runs used the default, so an absent key reads as its default.
  An IAB config without `iab_accumulate_g` predates it and reads as False
  (`ABSENT_MEANS`). Any other difference is a different config."""
  if stored == wanted:
    return True

  def filled(cfg: dict[str, Any]) -> dict[str, Any]:
    attack = dict(cfg.get("attack", {}))
    name = str(attack.get("name", "none"))
    added = {**ADDED_2026_12_03, **default_settings(name, str(cfg.get("preset", "cpu"))),
             **ABSENT_MEANS.get(name, {})}
    for key, value in added.items():
      attack.setdefault(key, value)
    return {**cfg, "attack": attack}
  return filled(stored) == filled(wanted)


def resolve(config: dict[str, Any]) -> dict[str, Any]:
  """Fills in what the attack's name implies (label mode)."""
  config = dict(config)
  name = config.get("name", "none")
  if name not in NAMES:
    raise ValueError(f"unknown attack {name!r}; choose one of {NAMES}")
  config.setdefault("label_mode", "all2all" if name == "badnets_a2a" else "all2one")
  config["clean_label"] = name in CLEAN_LABEL
  return config


def make_trigger(config: dict[str, Any], image_shape=(32, 32, 3)) -> Trigger | None:
  config = resolve(config)
  if config["name"] == "none":
    return None
  return _MAKERS[config["name"]](int(config.get("seed", 0)), config, image_shape)


def poison(images: np.ndarray, labels: np.ndarray, config: dict[str, Any], *,
           perturb: Callable[[np.ndarray], np.ndarray] | None = None) -> PoisonedSet:
  """The training set an attacker hands over: triggered copies relabelled in place. For
  a per-batch attack (WaNet), the clean set with its trigger: training poisons each batch
  (`schedule.train_batches`), and `schedule.trained_set` rebuilds what it used. For IAB,
  the clean set: its training poisons each batch with its generator and records what it
  used in the checkpoint (`iab.trained_set`)."""
  config = resolve(config)
  trigger = make_trigger(config, images.shape[1:])
  if trigger is not None and config["name"] in NEEDS_ADVERSARY:
    if perturb is None:
      raise ValueError(f"{config['name']!r} poisons with images computed against the "
                       "attacker's own clean model: load the data with "
                       "drr_jax.datasets.load, which trains and caches that model")
    rng = np.random.default_rng(int(config.get("seed", 0)) + 1)
    idx = choose_poison(labels, float(config.get("poison_ratio", 0.1)), rng, config)
    out = np.array(images, copy=True)
    if len(idx):
      out[idx] = apply_trigger(perturb(idx), trigger)
    return PoisonedSet(out, np.asarray(labels, np.int32), idx, trigger)
  if trigger is not None and config["name"] in PER_BATCH + GENERATED:
    return PoisonedSet(np.asarray(images), np.asarray(labels, np.int32),
                       np.zeros((0,), np.int64), trigger)
  if trigger is None:
    return PoisonedSet(np.asarray(images), np.asarray(labels, np.int32),
                       np.zeros((0,), np.int64),
                       Trigger(np.zeros(images.shape[1:], np.uint8),
                               np.zeros(images.shape[1:], np.float32)))
  # The poison choice uses a seed distinct from the trigger's so they vary independently.
  return poison_with(images, labels, trigger, int(config.get("seed", 0)) + 1, config)


__all__ = ["CLEAN_LABEL", "DEFAULT_RATIOS", "GENERATED", "NAMES", "NEEDS_ADVERSARY",
           "PER_BATCH", "PoisonedSet", "Trigger", "apply_trigger", "choose_poison",
           "default_settings", "iab", "make_trigger", "poison", "resolve",
           "target_labels", "train_batches", "trained_set", "trigger_from_record"]
