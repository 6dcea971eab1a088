"""What every baseline defense shares: its inputs checked before any work (the images, the
clean data of the methods that need it), a random subset, and the report's common form.

Every baseline returns (variables, report) like `drr_jax.defend`. The report is plain
JSON: 'method', 'config' (every setting), 'sources' (where each default comes from),
'units' ('channels' or 'directions'), 'pruned' ({module: channel indices} or {layer:
unit directions}), 'layers_projected' (the modules changed), 'num_pruned', 'clean_data'
(None, or how many clean images the method was given) and 'seconds'; methods add their
own fields.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import numpy as np

from drr_jax import models
from drr_jax.defenses.drr.errors import DefenseError
from drr_jax.defenses.drr.inputs import check_pixels

CLEAN_HINT = ("pass clean=(images, labels): the clean validation split held out from "
              "training (5 % of the training set), never the test set")


def as_images(batch: Any, method: str, *, minimum: int = 2, model: Any = None
              ) -> np.ndarray:
  """An array (N, H, W, C), or an iterable of arrays or (images, labels) pairs, as one
  array, checked: rank, image shapes that agree, at least `minimum` images, and as DRR
  checks them (`check_pixels`: finite; for drr_jax's own models, pixels 0..255)."""
  if batch is None:
    raise DefenseError(f"{method} needs the (poisoned) training images as `batch`")
  if isinstance(batch, (np.ndarray, jax.Array)):
    parts = [batch]
  elif isinstance(batch, Iterable):
    parts = [b[0] if isinstance(b, (tuple, list)) else b for b in batch]
  else:
    raise DefenseError(f"batch must be an array or an iterable of arrays, got {type(batch)}")
  parts = [np.asarray(p) for p in parts]
  for p in parts:
    if p.ndim != 4:
      raise DefenseError(f"images must have shape (N, H, W, C), got {p.shape}")
    if p.shape[1:] != parts[0].shape[1:]:
      raise DefenseError(f"batches disagree on image shape: {p.shape[1:]} vs "
                         f"{parts[0].shape[1:]}")
  images = np.concatenate(parts) if len(parts) > 1 else (parts[0] if parts else None)
  if images is None or len(images) < minimum:
    raise DefenseError(f"{method} needs at least {minimum} images, got "
                       f"{0 if images is None else len(images)}")
  check_pixels(images, pixels=models.takes_pixels(model))
  return images


def clean_data(clean: Any, method: str, *, minimum: int = 2, model: Any = None
               ) -> tuple[np.ndarray, np.ndarray]:
  """The clean (images, labels) a method needs, checked; a DefenseError naming what is
  missing or wrong otherwise (raised before any long work)."""
  if clean is None:
    raise DefenseError(f"{method} needs clean labelled data, and none was given: "
                       f"{CLEAN_HINT}")
  if not isinstance(clean, (tuple, list)) or len(clean) != 2:
    raise DefenseError(f"clean must be a pair (images, labels), got {type(clean)}")
  images = as_images(clean[0], method, minimum=minimum, model=model)
  labels = np.asarray(clean[1])
  if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
    raise DefenseError(f"clean labels must be {len(images)} integers, got shape "
                       f"{labels.shape} and dtype {labels.dtype}")
  return images, labels.astype(np.int32)


def check_labels(labels: Any, model: Any, variables: Any, image_shape: tuple[int, ...],
                 what: str = "clean labels") -> None:
  """Raises DefenseError unless every label is one of the model's classes (0 .. its
  number of outputs - 1); a model whose output is not (N, classes) is not checked."""
  import jax.numpy as jnp

  from drr_jax import features
  labels = np.asarray(labels).reshape(-1)
  out = jax.eval_shape(features.as_apply_fn(model), variables,
                       jnp.zeros((1, *image_shape), jnp.uint8))
  if not len(labels) or len(getattr(out, "shape", ())) != 2:
    return
  n = int(out.shape[-1])
  lo, hi = int(np.min(labels)), int(np.max(labels))
  if lo < 0 or hi >= n:
    got = str(lo) if lo == hi else f"{lo}..{hi}"
    raise DefenseError(f"{what} must be in 0..{n - 1} (the model's {n} classes), got "
                       f"{got}")


def subset(n: int, size: int, seed: int, skip: np.ndarray | None = None) -> np.ndarray:
  """`size` random indices of range(n) (all of them, shuffled, if n <= size), sorted,
  avoiding `skip`."""
  rng = np.random.default_rng(seed)
  pool = np.arange(n) if skip is None else np.setdiff1d(np.arange(n), skip)
  take = rng.permutation(pool)[:size]
  return np.sort(take)


def build_report(method: str, config: Mapping[str, Any], sources: Mapping[str, str],
                 units: str, pruned: Mapping[str, list], seconds: float,
                 clean: int | None = None, **extra: Any) -> dict[str, Any]:
  """The report's common fields (see the module docstring), then `extra`."""
  pruned = {k: list(v) for k, v in pruned.items()}
  return {"method": method, "config": dict(config), "sources": dict(sources),
          "units": units, "pruned": pruned,
          "layers_projected": [k for k, v in pruned.items() if v],
          "num_pruned": int(sum(len(v) for v in pruned.values())),
          "clean_data": None if clean is None else {"images": int(clean)},
          "seconds": float(seconds), **extra}


def format_report(report: Mapping[str, Any]) -> str:
  """A baseline's report in a few lines: what it removed, where, and its clean data."""
  lines = []
  for layer, units in report["pruned"].items():
    if units:
      shown = (", ".join(str(u) for u in units[:12]) if report["units"] == "channels"
               else f"{len(units)} direction(s)")
      more = " ..." if report["units"] == "channels" and len(units) > 12 else ""
      lines.append(f"  {layer}: {shown}{more}")
  clean = report.get("clean_data")
  lines.append(f"{report['method']}: {report['num_pruned']} {report['units']} removed in "
               f"{len(report['layers_projected'])} module(s), "
               f"{'no clean data' if not clean else str(clean['images']) + ' clean images'}"
               f", {report['seconds']:.1f} s")
  return "\n".join(lines)
