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

from drr_jax import features, models, sites
from drr_jax.defenses.drr.config import DRRConfig
from drr_jax.defenses.drr.errors import DefenseError


def as_images(batch: Any, model: Any = None) -> np.ndarray:
  """An array (N, H, W, C), or an iterable of such arrays or of (images, labels) pairs,
  as one array; checks rank, emptiness, dtype, finiteness and, for drr_jax's own models
  (which take pixels 0..255), the value range (`check_pixels`)."""
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
  check_pixels(images, pixels=models.takes_pixels(model))
  return images


def check_pixels(images: np.ndarray, pixels: bool = True) -> None:
  """Bool or non-numeric images, integers outside 0..255, NaN/Inf are refused; with
  `pixels` (drr_jax's models read pixel values 0..255, uint8 or floats on that scale, and
  normalize them themselves) so are floats out of range or scaled to [0, 1]: such
  images run without error and would defend a meaningless input."""
  dtype = images.dtype
  if dtype == np.bool_ or not np.issubdtype(dtype, np.number):
    raise DefenseError(f"images must be uint8 pixels 0..255, got dtype {dtype}")
  if np.issubdtype(dtype, np.complexfloating):
    raise DefenseError(f"images must be uint8 pixels 0..255, got dtype {dtype}")
  if np.issubdtype(dtype, np.floating) and not np.all(np.isfinite(images)):
    raise DefenseError("the images contain NaN or Inf")
  if pixels and images.shape[-1] != 3:
    raise DefenseError(f"the images have {images.shape[-1]} channel(s) (shape "
                       f"{images.shape[1:]}); the model takes 3 (RGB): for grey images "
                       "repeat the channel, np.repeat(images, 3, axis=-1)")
  if dtype == np.uint8 or (np.issubdtype(dtype, np.floating) and not pixels):
    return
  lo, hi = float(np.min(images)), float(np.max(images))
  if lo < 0 or hi > 255:
    raise DefenseError(f"images must be pixels 0..255 (uint8), got values from {lo:g} to "
                       f"{hi:g}: pass the raw images, not normalized ones")
  if np.issubdtype(dtype, np.floating) and hi <= 1.0:
    raise DefenseError(f"the images hold floats in [{lo:g}, {hi:g}], which looks like "
                       "pixels scaled to [0, 1]; the models take pixels 0..255 (uint8): "
                       "pass (images * 255).round().astype(np.uint8)")


def check_fit(model: nn.Module | Callable, variables: Any, image_shape: tuple[int, ...]
              ) -> None:
  """Raises DefenseError when the variables cannot run the model on such images."""
  apply = features.as_apply_fn(model)
  try:
    jax.eval_shape(apply, variables, jnp.zeros((1, *image_shape), jnp.uint8))
  except Exception as e:  # noqa: BLE001 - Flax raises many types for mismatched params
    if len(image_shape) == 3 and image_shape[-1] != 3:
      try:
        jax.eval_shape(apply, variables, jnp.zeros((1, *image_shape[:2], 3), jnp.uint8))
      except Exception:  # noqa: BLE001
        pass
      else:
        raise DefenseError(
            f"the images have {image_shape[-1]} channel(s) (shape {image_shape}); the "
            "model takes 3 (RGB): for grey images repeat the channel, "
            "np.repeat(images, 3, axis=-1)") from e
    raise DefenseError(f"the params do not fit the model: {type(e).__name__}: "
                       f"{str(e)[:400]}") from e


class LayerPlan(NamedTuple):
  """The units DRR visits (in call order: layers, or with side 'sites' the site names
  'layer:in' / 'layer:out'), the model's last layer, each unit's width on the projected
  side, and with side 'sites' the `sites.Site` of each unit."""
  order: list[str]
  classifier: str
  width: dict[str, int]
  sites: dict[str, sites.Site] = {}


def layer_plan(model: nn.Module | Callable, variables: Any, image_shape: tuple[int, ...],
               cfg: DRRConfig, probe: Any = None) -> LayerPlan:
  """The layers to visit: all conv/dense layers in call order, less the classifier with
  `skip_classifier`, restricted to `cfg.layers`; checks that k fits their widths. With
  side 'sites', the exact sites of those layers (`sites.find_sites` on `probe` images)."""
  order = features.layer_order(model, variables, image_shape)
  if not order:
    raise DefenseError("the model has no conv or dense layer to defend")
  classifier = order[-1]
  if cfg.side == "sites":
    return _site_plan(model, variables, cfg, order, classifier, probe)
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
  _check_k(cfg, {name: width[name] for name in order}, "layer")
  return LayerPlan(order, classifier, width)


def _check_k(cfg: DRRConfig, width: dict[str, int], what: str) -> None:
  """k above a unit's width is an error for a frame search (St(C, k) needs k <= C); for
  multistart, whose k counts starts, such a unit gets one start per channel, which the
  report lists (`capped_k`)."""
  if cfg.search == "multistart":
    return
  for name, c in width.items():
    if cfg.k > c:
      raise DefenseError(f"k = {cfg.k} exceeds the {c} channels of {what} {name!r}")


def capped_k(cfg: DRRConfig, plan: LayerPlan) -> dict[str, int]:
  """The units where multistart's k starts exceed the width: unit -> starts used."""
  return {u: int(plan.width[u]) for u in plan.order if cfg.k > plan.width[u]}


def _site_plan(model, variables, cfg: DRRConfig, order: list[str], classifier: str,
               probe: Any) -> LayerPlan:
  if probe is None:
    raise DefenseError("side 'sites' needs probe images to find the sites")
  found = sites.find_sites(model, variables, jnp.asarray(probe))
  if cfg.skip_classifier:
    found = [s for s in found if s.layer != classifier]
  if cfg.layers is not None:
    names = {s.name for s in found} | {s.layer for s in found}
    unknown = set(cfg.layers) - names
    if unknown:
      raise DefenseError(f"unknown layer(s) or site(s) {sorted(unknown)}; DRR can visit "
                         f"{[s.name for s in found]}")
    found = [s for s in found if s.layer in cfg.layers or s.name in cfg.layers]
  if not found:
    raise DefenseError("the model has no site where a direction can be removed exactly")
  kernels = features.layer_kernels(variables["params"])
  width = {s.name: int(kernels[s.layer].shape[-2 if s.side == "input" else -1])
           for s in found}
  width[classifier] = int(kernels[classifier].shape[-2])
  _check_k(cfg, {s.name: width[s.name] for s in found}, "site")
  return LayerPlan([s.name for s in found], classifier, width, {s.name: s for s in found})


def extract_units(model: nn.Module | Callable, variables: Any, images: np.ndarray,
                  units: tuple[str, ...], site_of: dict[str, sites.Site], *,
                  outputs: bool, pooling: str, batch_size: int, progress: bool = True,
                  desc: str = "features", with_means: bool = False):
  """`extract` for DRR's units: layers (on the run's side), or sites (each on its own
  side: the inputs and the outputs are read in the same pass)."""
  kw = dict(pooling=pooling, batch_size=batch_size, progress=progress, desc=desc)
  if not site_of:
    out = extract(model, variables, images, units, outputs=outputs, with_means=True, **kw)
    return out if with_means else out[0]
  # both sides in one pass over the images
  layers = {side: tuple(dict.fromkeys(site_of[u].layer for u in units
                                      if site_of[u].side == side))
            for side in ("input", "output")}
  try:
    found = dict(zip(("input", "output"), features.extract_sides(
        model, variables, images, inputs=layers["input"], outputs=layers["output"], **kw)))
  except features.FeatureError as e:
    raise DefenseError(str(e)) from e
  feats = {u: found[site_of[u].side][0][site_of[u].layer] for u in units}
  means = {u: found[site_of[u].side][1][site_of[u].layer] for u in units}
  return (feats, means) if with_means else feats


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
