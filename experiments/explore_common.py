"""Shared set-up of the exploration scripts: a checkpoint, its splits, and a random subset
of its poisoned training set (seed 0) as the defense images."""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp
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


def removing(model, layer: str, frame, *, shift_in=None, shift_out=None):
  """apply(variables, images) of `model` with the columns of `frame` (C, m) removed from
  the input h of `layer` (h - h V V^T), applied exactly by a Flax interceptor; `shift_in`
  is a constant added to that input, `shift_out` one added to the layer's output (or a
  function of the layer's input giving it)."""
  fr = jnp.asarray(frame, jnp.float32)

  def icpt(next_fun, a, kw, ctx):
    if not (ctx.method_name == "__call__" and "/".join(ctx.module.scope.path) == layer):
      return next_fun(*a, **kw)
    h = a[0] - (a[0] @ fr) @ fr.T
    if shift_in is not None:
      h = h + shift_in
    out = next_fun(h, *a[1:], **kw)
    if shift_out is None:
      return out
    return out + (shift_out(a[0]) if callable(shift_out) else shift_out)

  def apply(variables, images):
    with nn.intercept_methods(icpt):
      return model.apply(variables, images, train=False)

  return apply
