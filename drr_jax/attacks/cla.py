"""CLA, the label-consistent attack (Turner, Tsipras & Madry, 2019; DRR paper section 5.1).

Images of the target class are made hard to classify by an adversarial perturbation
(PGD, L-inf, in pixel space, against a separately trained clean model), then stamped
with the trigger; their labels stay correct, so the model can only fit them by leaning
on the trigger. At test time the trigger alone is stamped on images of other classes.

- Poisoned: 80 % of the target class, which is 8 % of CIFAR-10's training set
  (`poison_ratio` 0.08, a share of the whole set, drawn from the target class).
- PGD: eps 12/255, step 2/255, 7 steps, from the clean image (no random start), as the
  EP/CLP authors' code (the DRR paper's evaluation setting). BackdoorBench uses eps 8/255
  and 100 steps; `cla_eps`, `cla_step`, `cla_steps` (pixel units, 0..255) change it.
  The perturbed images are rounded to uint8 pixels within eps of the original.
- Trigger: a 3x3 checkerboard (`cla_patch`) in each of the four corners, full amplitude.

The clean model and the perturbed images are cached artefacts (`drr_jax.adversary`).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from drr_jax.attacks.core import Trigger

PGD = {"cla_eps": 12.0, "cla_step": 2.0, "cla_steps": 7}
DEFAULTS = {**PGD, "cla_patch": 3}


def defaults() -> dict[str, Any]:
  """The CLA settings a config starts from: PGD's and the trigger's size."""
  return dict(DEFAULTS)


def settings(config: dict[str, Any]) -> tuple[float, float, int]:
  """(eps, step, steps) in pixel units, checked."""
  eps = float(config.get("cla_eps", PGD["cla_eps"]))
  step = float(config.get("cla_step", PGD["cla_step"]))
  steps = int(config.get("cla_steps", PGD["cla_steps"]))
  if not 0 < eps <= 255 or not 0 < step <= 255 or steps < 1:
    raise ValueError(f"CLA's PGD needs 0 < eps, step <= 255 and steps >= 1; got eps "
                     f"{eps}, step {step}, steps {steps}")
  return eps, step, steps


def make_trigger(seed: int, config: dict[str, Any], image_shape=(32, 32, 3)) -> Trigger:
  """A size x size checkerboard (white where i + j is even) in all four corners."""
  del seed  # deterministic
  size = int(config.get("cla_patch", DEFAULTS["cla_patch"]))
  h, w, c = image_shape
  if not 1 <= size <= min(h, w) // 2:
    raise ValueError(f"cla_patch must be in [1, {min(h, w) // 2}], got {size}")
  ii, jj = np.indices((size, size))
  patch = np.repeat(((ii + jj) % 2 == 0)[..., None], c, axis=-1) * 255
  pattern = np.zeros(image_shape, np.uint8)
  mask = np.zeros(image_shape, np.float32)
  for top in (0, h - size):
    for left in (0, w - size):
      pattern[top:top + size, left:left + size] = patch
      mask[top:top + size, left:left + size] = 1.0
  return Trigger(pattern, mask)


def pgd(apply_fn: Callable, variables: Any, images: np.ndarray, labels: np.ndarray, *,
        eps: float, step: float, steps: int, batch_size: int = 256) -> np.ndarray:
  """Untargeted L-inf PGD in pixel space: each step moves every pixel by `step` along the
  sign of the cross-entropy gradient of the true label, projected back within eps of
  the image and into [0, 255]. Returns uint8 images within eps (rounded, then clipped)."""
  def loss(x, y):
    logits = apply_fn(variables, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()

  @jax.jit
  def attack(x0, y):
    x0 = x0.astype(jnp.float32)

    def body(_, x):
      g = jax.grad(loss)(x, y)
      x = x + step * jnp.sign(g)
      return jnp.clip(jnp.clip(x, x0 - eps, x0 + eps), 0.0, 255.0)

    return jax.lax.fori_loop(0, steps, body, x0)

  out = []
  images, labels = np.asarray(images), np.asarray(labels, np.int32)
  for i in range(0, len(images), batch_size):
    x, y = images[i:i + batch_size], labels[i:i + batch_size]
    adv = np.asarray(attack(x, y))
    lo, hi = x.astype(np.float32) - eps, x.astype(np.float32) + eps
    out.append(np.clip(np.rint(np.clip(adv, lo, hi)), np.ceil(np.maximum(lo, 0)),
                       np.floor(np.minimum(hi, 255))).astype(np.uint8))
  return np.concatenate(out) if out else np.zeros_like(images, np.uint8)
