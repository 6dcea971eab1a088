"""Clean accuracy (ACC) and attack success rate (ASR), jitted and batched.

ASR = share of test images whose true label differs from the attack's target that the
model, shown the triggered image, sends to the target. The predictions come from
`inference.predict` (re-exported here as `evaluate.predict`).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from drr_jax import attacks, data, features
from drr_jax.inference import ApplyFn, _jitted, predict  # noqa: F401 - re-exported

as_apply_fn = features.as_apply_fn


def accuracy(model, variables, split: data.Split, batch_size: int = 500,
             progress: bool = True) -> float:
  preds = predict(model, variables, split.images, batch_size, progress, "ACC")
  return float(np.mean(preds == split.labels))


def attack_success_rate(model, variables, split: data.Split, trigger: attacks.Trigger,
                        attack_config: dict[str, Any], batch_size: int = 500,
                        progress: bool = True) -> float:
  targets = attacks.target_labels(split.labels, attacks.resolve(attack_config))
  keep = targets != split.labels
  if not keep.any():
    raise ValueError("no test image has a label that differs from the attack target")
  triggered = attacks.apply_trigger(split.images[keep], trigger)
  preds = predict(model, variables, triggered, batch_size, progress, "ASR")
  return float(np.mean(preds == targets[keep]))


def evaluate(model, variables, split: data.Split, trigger: attacks.Trigger | None,
             attack_config: dict[str, Any], batch_size: int = 500,
             progress: bool = True) -> dict[str, float]:
  """{'acc': ..., 'asr': ...} in [0, 1]; asr is NaN for a clean (no-attack) model."""
  acc = accuracy(model, variables, split, batch_size, progress)
  asr = float("nan")
  if trigger is not None and attack_config.get("name", "none") != "none":
    asr = attack_success_rate(model, variables, split, trigger, attack_config,
                              batch_size, progress)
  return {"acc": acc, "asr": asr}
