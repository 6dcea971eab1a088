"""What `defend` is given, checked before any work: the images, whether the params fit the
model, which layers it may visit; and the feature read, with its errors as DefenseError.

Every problem is a `DefenseError` whose message names it, so that callers (the launchers)
can report it in one line.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from drr_jax import features
from drr_jax.defenses.drr.config import DRRConfig
from drr_jax.defenses.drr.errors import DefenseError


def as_images(batch: Any) -> np.ndarray:
  """An array (N, H, W, C), or an iterable of such arrays or of (images, labels) pairs,
  as one array; checks rank, emptiness and finiteness."""
  if isinstance(batch, (np.ndarray, jax.Array)):
    parts = [batch]
  elif isinstance(batch, Iterable):
    parts = [b[0] if isinstance(b, (tuple, list)) else b for b in batch]
  else:
    raise DefenseError(f"batch must be an array or an iterable of arrays, got {type(batch)}")
  if not parts:
    raise DefenseError("the batch is empty: DRR needs the (poisoned) training images")
  parts = [np.asarray(p) for p in parts]
  for p in parts:
    if p.ndim != 4:
      raise DefenseError(f"images must have shape (N, H, W, C), got {p.shape}")
    if p.shape[1:] != parts[0].shape[1:]:
      raise DefenseError(f"batches disagree on image shape: {p.shape[1:]} vs "
                         f"{parts[0].shape[1:]}")
  images = np.concatenate(parts) if len(parts) > 1 else parts[0]
  if len(images) < 2:
    raise DefenseError(f"the batch holds {len(images)} image(s); DRR needs at least 2")
  if np.issubdtype(images.dtype, np.floating) and not np.all(np.isfinite(images)):
    raise DefenseError("the images contain NaN or Inf")
  return images


def check_fit(model: nn.Module | Callable, variables: Any, image_shape: tuple[int, ...]
              ) -> None:
  """Raises DefenseError when the variables cannot run the model on such images."""
  apply = features.as_apply_fn(model)
  try:
    jax.eval_shape(apply, variables, jnp.zeros((1, *image_shape), jnp.uint8))
  except Exception as e:  # noqa: BLE001 - Flax raises many types for mismatched params
    raise DefenseError(f"the params do not fit the model: {type(e).__name__}: "
                       f"{str(e)[:400]}") from e


class LayerPlan(NamedTuple):
  """The layers DRR visits (in call order), the model's last layer, and each one's width
  on the projected side (input or output channels)."""
  order: list[str]
  classifier: str
  width: dict[str, int]


def layer_plan(model: nn.Module | Callable, variables: Any, image_shape: tuple[int, ...],
               cfg: DRRConfig) -> LayerPlan:
  """The layers to visit: all conv/dense layers in call order, less the classifier with
  `skip_classifier`, restricted to `cfg.layers`; checks that k fits their widths."""
  order = features.layer_order(model, variables, image_shape)
  if not order:
    raise DefenseError("the model has no conv or dense layer to defend")
  classifier = order[-1]
  if cfg.skip_classifier and len(order) > 1:
    order = order[:-1]
  if cfg.layers is not None:
    unknown = set(cfg.layers) - set(order)
    if unknown:
      raise DefenseError(f"unknown layer(s) {sorted(unknown)}; DRR can visit {order}")
    order = [l for l in order if l in set(cfg.layers)]
  outputs = cfg.side == "output"
  kernels = features.layer_kernels(variables["params"])
  width = {name: kernels[name].shape[-1 if outputs else -2]
           for name in [*order, classifier]}
  if cfg.search != "multistart":  # multistart's k counts starts, capped at C later
    for name in order:
      c = width[name]
      if cfg.k > c:
        raise DefenseError(f"k = {cfg.k} exceeds the {c} channels of layer {name!r}")
  return LayerPlan(order, classifier, width)


def extract(model: nn.Module | Callable, variables: Any, images: np.ndarray,
            layers: tuple[str, ...], *, outputs: bool, pooling: str, batch_size: int,
            progress: bool = True, desc: str = "features", with_means: bool = False
            ) -> dict[str, np.ndarray] | tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """`features.extract` (the pooled features on the host; see there), with NaN or Inf
  features reported as a DefenseError naming the layer."""
  try:
    return features.extract(model, variables, images, layers, outputs=outputs,
                            pooling=pooling, batch_size=batch_size, progress=progress,
                            desc=desc, with_means=with_means)
  except features.FeatureError as e:
    raise DefenseError(str(e)) from e
