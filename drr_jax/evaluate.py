"""Clean accuracy (ACC) and attack success rate (ASR), jitted and batched.

ASR = share of test images whose true label differs from the attack's target that the
model, shown the triggered image, sends to the target.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from drr_jax import attacks, data, features

ApplyFn = Callable[[Any, jax.Array], jax.Array]


as_apply_fn = features.as_apply_fn


@functools.lru_cache(maxsize=32)
def _jitted(model: nn.Module | ApplyFn) -> Callable:
  """One compiled predictor per model (Linen modules hash by their fields)."""
  apply_fn = as_apply_fn(model)
  return jax.jit(lambda v, x: jnp.argmax(apply_fn(v, x), axis=-1))


def predict(model: nn.Module | ApplyFn, variables: Any, images: np.ndarray,
            batch_size: int = 500, progress: bool = True, desc: str = "predict"
            ) -> np.ndarray:
  """Predicted classes for uint8 images (N, H, W, C), batch by batch."""
  images = np.asarray(images)
  if images.ndim != 4 or len(images) == 0:
    raise ValueError(f"expected a non-empty batch (N, H, W, C), got shape {images.shape}")
  fn = _jitted(model)
  out = []
  n = len(images)
  # Pad the last batch so one compiled program serves every batch.
  for i in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
    x = images[i:i + batch_size]
    m = len(x)
    if m < batch_size and n > batch_size:
      x = np.concatenate([x, np.zeros((batch_size - m, *x.shape[1:]), x.dtype)])
    out.append(np.asarray(fn(variables, x))[:m])
  return np.concatenate(out)


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
