"""A user's own model, variables and images, for `launch.defend` (issue 16, point 2).

  model      any Flax module by import path: 'my_pkg.nets:Net' or 'path/to/nets.py:Net',
             built with keyword arguments from JSON ('{"num_classes": 10}'); a class or a
             function returning a module. It is called as drr_jax calls its own models,
             `module.apply(variables, images, train=False)`.
  variables  an orbax folder (`orbax.checkpoint.StandardCheckpointer` save, or a
             drr_jax run/checkpoint folder) or a flax msgpack file
             (`flax.serialization.to_bytes`), holding {'params': ..., ...} or the params
             alone; written back in the same form (`save_variables`).
  images     a folder of PNG/JPEG files (ImageFolder layout: one subfolder per class,
             sorted names -> labels 0, 1, ...; or flat: no labels), a `.npz` (images under
             'images' or 'x', optional labels under 'labels' or 'y'), or 'tfds:name/split'
             (tensorflow_datasets, imported only then; it must be able to download).

Every problem is an `AssetError` naming the input, raised before any long work.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from drr_jax import utils

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class AssetError(ValueError):
  """A model, variables or images input that cannot be used; the message names it."""


# ------------------------------------------------------------------ model

def _import_target(path: str) -> Any:
  if ":" not in path:
    raise AssetError(f"--model {path!r}: expected 'module.path:Name' or 'file.py:Name'")
  where, _, name = path.rpartition(":")
  if where.endswith(".py"):
    file = Path(where)
    if not file.is_file():
      raise AssetError(f"--model {path!r}: file {where} does not exist")
    mod_name = f"_drr_user_model_{abs(hash(str(file.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
      spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's code may raise anything
      raise AssetError(f"--model {path!r}: importing {where} failed: "
                       f"{type(e).__name__}: {e}") from e
  else:
    try:
      module = importlib.import_module(where)
    except Exception as e:  # noqa: BLE001
      raise AssetError(f"--model {path!r}: cannot import module {where!r}: "
                       f"{type(e).__name__}: {e}") from e
  obj = module
  for part in name.split("."):
    if not hasattr(obj, part):
      raise AssetError(f"--model {path!r}: {where} has no attribute {name!r}")
    obj = getattr(obj, part)
  return obj


def load_model_spec(path: str, args_json: str | None = None) -> nn.Module:
  """The Flax module at import path `path`, built with the JSON object `args_json`."""
  try:
    kwargs = json.loads(args_json) if args_json else {}
  except json.JSONDecodeError as e:
    raise AssetError(f"--model_args is not JSON ({e}): {args_json!r}") from e
  if not isinstance(kwargs, dict):
    raise AssetError(f"--model_args must be a JSON object, got {args_json!r}")
  target = _import_target(path)
  if isinstance(target, nn.Module):
    if kwargs:
      target = target.clone(**kwargs)
    model = target
  elif callable(target):
    try:
      model = target(**kwargs)
    except Exception as e:  # noqa: BLE001
      raise AssetError(f"--model {path!r} with --model_args {kwargs}: "
                       f"{type(e).__name__}: {e}") from e
  else:
    raise AssetError(f"--model {path!r} is a {type(target).__name__}, not a Flax module")
  if not isinstance(model, nn.Module):
    raise AssetError(f"--model {path!r} gave a {type(model).__name__}, not a Flax module")
  try:
    params = inspect.signature(type(model).__call__).parameters
  except (TypeError, ValueError):
    params = {}
  if params and "train" not in params and not any(
      p.kind == p.VAR_KEYWORD for p in params.values()):
    raise AssetError(f"--model {path!r}: its __call__ takes no 'train' argument; "
                     "drr_jax calls model.apply(variables, images, train=False)")
  return model


# ------------------------------------------------------------------ variables

class Variables(NamedTuple):
  variables: dict       # {'params': ..., and other collections}
  format: str           # 'orbax' | 'orbax-run' | 'msgpack'
  params_only: bool     # the file held the params alone (written back the same way)
  path: str


def variables_template(model: nn.Module, image_shape: tuple[int, ...]) -> Any:
  """The variables' shapes (no computation) of `model` on images of `image_shape`."""
  try:
    return jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, *image_shape), jnp.uint8),
                                             train=False))
  except Exception as e:  # noqa: BLE001
    raise AssetError(f"the model cannot run on images of shape {tuple(image_shape)}: "
                     f"{type(e).__name__}: {str(e)[:400]}") from e


def _fits(tree: Any, template: Any, what: str) -> None:
  from drr_jax.checkpoint import CheckpointError, check_fits
  try:
    check_fits(tree, template, what)
  except CheckpointError as e:
    raise AssetError(str(e)) from e


def _plain(tree: Any) -> Any:
  if isinstance(tree, dict) or hasattr(tree, "items"):
    return {k: _plain(v) for k, v in tree.items()}
  return tree


def load_variables(path: str | os.PathLike, model: nn.Module,
                   image_shape: tuple[int, ...]) -> Variables:
  """The model's variables from an orbax folder or a msgpack file, checked against the
  shapes the model has on images of `image_shape`."""
  p = Path(path)
  if not p.exists():
    raise AssetError(f"--variables {path}: does not exist")
  template = _plain(variables_template(model, image_shape))
  if p.is_dir():
    run = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if any(c.name.isdigit() and (c / "model").is_dir() for c in run.iterdir()):
      from drr_jax import checkpoint
      try:  # shapes first: orbax reading a mismatched array leaves coroutines behind
        mngr = checkpoint.manager(run, create=False)
        step = mngr.latest_step()
        saved = None if step is None else mngr.item_metadata(step)["model"]
      except Exception as e:  # noqa: BLE001
        raise AssetError(f"--variables {path}: cannot read its checkpoint metadata: "
                         f"{type(e).__name__}: {str(e)[:300]}") from e
      if saved is not None:
        _fits(_plain(saved), template, f"--variables {path}")
      try:
        out = checkpoint.restore(run, {"model": template})["model"]
      except checkpoint.CheckpointError as e:
        raise AssetError(f"--variables {path}: {e}") from e
      return Variables(_plain(out), "orbax-run", False, str(p))
    import orbax.checkpoint as ocp
    try:
      raw = ocp.StandardCheckpointer().metadata(p.absolute())
      raw = getattr(raw, "item_metadata", raw)
      raw = getattr(raw, "tree", raw)
      raw = _plain(raw)
    except Exception as e:  # noqa: BLE001 - orbax raises many types
      raise AssetError(f"--variables {path}: not an orbax checkpoint folder: "
                       f"{type(e).__name__}: {str(e)[:300]}") from e
    params_only = isinstance(raw, dict) and "params" not in raw
    target = template["params"] if params_only else template
    _fits(raw, target, f"--variables {path}")
    try:
      out = ocp.StandardCheckpointer().restore(p.absolute(), target)
    except Exception as e:  # noqa: BLE001
      raise AssetError(f"--variables {path}: cannot restore: {type(e).__name__}: "
                       f"{str(e)[:300]}") from e
    out = _plain(out)
    return Variables({"params": out} if params_only else out, "orbax", params_only,
                     str(p))
  from flax import serialization
  try:
    raw = serialization.msgpack_restore(p.read_bytes())
  except Exception as e:  # noqa: BLE001
    raise AssetError(f"--variables {path}: not a flax msgpack file: "
                     f"{type(e).__name__}: {str(e)[:300]}") from e
  if not isinstance(raw, dict):
    raise AssetError(f"--variables {path}: holds a {type(raw).__name__}, not a dict")
  params_only = "params" not in raw
  target = template["params"] if params_only else template
  _fits(raw, target, f"--variables {path}")
  out = jax.tree.map(lambda t, v: np.asarray(v, dtype=t.dtype), target, raw)
  return Variables({"params": out} if params_only else out, "msgpack", params_only,
                   str(p))


def check_output(out: str | os.PathLike, what: str = "--out") -> None:
  """Refuses an output that exists or whose folder cannot be written."""
  out = Path(out)
  if out.exists():
    raise AssetError(f"{what} {out} already exists; choose another")
  parent = out.absolute().parent
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
    raise AssetError(f"{what} {out}: folder {parent} is not writable")


def save_variables(variables: Any, like: Variables, out: str | os.PathLike) -> Path:
  """Writes `variables` to `out` in the format (and params-only form) they came in;
  atomically: to a temporary name in the same folder, then renamed."""
  out = Path(out)
  check_output(out)
  out.absolute().parent.mkdir(parents=True, exist_ok=True)
  tree = jax.tree.map(np.asarray, _plain(variables))
  if like.params_only:
    tree = tree["params"]
  if like.format == "msgpack":
    from flax import serialization
    with utils.atomic_path(out) as tmp, open(tmp, "wb") as f:
      f.write(serialization.to_bytes(tree))
      f.flush()
      os.fsync(f.fileno())
    return out
  if like.format == "orbax-run":
    from drr_jax import checkpoint
    with utils.atomic_dir(out) as tmp:
      checkpoint.save(checkpoint.manager(tmp / "checkpoints", keep=1), 0, {"model": tree})
  else:  # orbax writes the folder atomically itself (a temporary name, then a rename)
    import orbax.checkpoint as ocp
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(out.absolute(), tree)
    ckptr.wait_until_finished()
  return out


# ------------------------------------------------------------------ images

class Images(NamedTuple):
  images: np.ndarray         # uint8 (N, H, W, 3)
  labels: np.ndarray | None  # int64 (N,), or None where the source has none
  classes: list[str] | None  # ImageFolder class names (label i = classes[i])
  source: str


def _read_image(path: Path, what: str) -> np.ndarray:
  from PIL import Image
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"), dtype=np.uint8)
  except Exception as e:  # noqa: BLE001 - PIL raises many types
    raise AssetError(f"{what}: cannot read image {path}: {type(e).__name__}: {e}") from e


def _image_files(folder: Path) -> list[Path]:
  return sorted(f for f in folder.iterdir()
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def _stack(arrays: list[np.ndarray], files: list[Path], what: str) -> np.ndarray:
  first = arrays[0].shape
  for a, f in zip(arrays, files):
    if a.shape != first:
      raise AssetError(f"{what}: images of several sizes: {f} is {a.shape}, {files[0]} "
                       f"is {first}; resize them to one size")
  return np.stack(arrays)


def _load_folder(folder: Path, what: str) -> Images:
  subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
  flat = _image_files(folder)
  if subdirs and not flat:
    classes, files, labels = [], [], []
    for i, d in enumerate(subdirs):
      classes.append(d.name)
      fs = _image_files(d)
      files += fs
      labels += [i] * len(fs)
    if not files:
      raise AssetError(f"{what} {folder}: no PNG/JPEG images in its class folders")
    arrays = [_read_image(f, what) for f in files]
    return Images(_stack(arrays, files, what), np.asarray(labels, np.int64), classes,
                  str(folder))
  if not flat:
    raise AssetError(f"{what} {folder}: the folder holds no PNG/JPEG images")
  arrays = [_read_image(f, what) for f in flat]
  return Images(_stack(arrays, flat, what), None, None, str(folder))


def _load_npz(path: Path, what: str) -> Images:
  try:
    with np.load(path, allow_pickle=False) as z:
      keys = list(z.keys())
      ik = next((k for k in ("images", "x") if k in keys), None)
      lk = next((k for k in ("labels", "y") if k in keys), None)
      if ik is None:
        raise AssetError(f"{what} {path}: no 'images' or 'x' array (it has {keys})")
      images, labels = z[ik], (z[lk] if lk else None)
  except AssetError:
    raise
  except Exception as e:  # noqa: BLE001
    raise AssetError(f"{what} {path}: cannot read: {type(e).__name__}: {e}") from e
  return Images(*_checked(images, labels, f"{what} {path}"), None, str(path))


def _checked(images: np.ndarray, labels, what: str):
  images = np.asarray(images)
  if images.ndim == 3:  # grey (N, H, W)
    images = images[..., None]
  if images.ndim != 4 or len(images) == 0:
    raise AssetError(f"{what}: images must be a non-empty (N, H, W, C) array, got shape "
                     f"{images.shape}")
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  if images.dtype != np.uint8:
    if not np.issubdtype(images.dtype, np.number) or images.dtype == np.bool_:
      raise AssetError(f"{what}: images must be uint8 pixels 0..255, got {images.dtype}")
    lo, hi = float(np.min(images)), float(np.max(images))
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 255:
      raise AssetError(f"{what}: images must be pixels 0..255, got values {lo:g}..{hi:g}")
    if np.issubdtype(images.dtype, np.floating) and hi <= 1.0:
      raise AssetError(f"{what}: images hold floats in [{lo:g}, {hi:g}] (pixels scaled "
                       "to [0, 1]?); give uint8 pixels 0..255")
    images = np.rint(images).astype(np.uint8)
  if labels is not None:
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
      raise AssetError(f"{what}: labels must be {len(images)} integers, got "
                       f"{labels.dtype} {labels.shape}")
    labels = labels.astype(np.int64)
  return images, labels


def _load_tfds(spec: str, what: str) -> Images:
  rest = spec[len("tfds:"):]
  name, sep, split = rest.partition("/")
  if not name or not sep or not split:
    raise AssetError(f"{what} {spec!r}: expected 'tfds:name/split', e.g. "
                     "'tfds:cifar10/train'")
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise AssetError(f"{what} {spec!r}: tensorflow_datasets is not installed "
                     "(pip install tensorflow tensorflow-datasets)") from e
  try:
    data = tfds.as_numpy(tfds.load(name, split=split, as_supervised=True, batch_size=-1))
  except Exception as e:  # noqa: BLE001 - no network, unknown name, ...
    raise AssetError(f"{what} {spec!r}: tensorflow_datasets cannot load it (it needs to "
                     f"download the data the first time): {type(e).__name__}: "
                     f"{str(e)[:300]}") from e
  images, labels = data
  return Images(*_checked(images, labels, f"{what} {spec}"), None, spec)


def load_images(spec: str | os.PathLike, what: str = "--images") -> Images:
  """Images (uint8 NHWC, RGB) and labels where the source has them."""
  spec = str(spec)
  if spec.startswith("tfds:"):
    return _load_tfds(spec, what)
  p = Path(spec)
  if not p.exists():
    raise AssetError(f"{what} {spec}: does not exist")
  if p.is_dir():
    return _load_folder(p, what)
  if p.suffix.lower() == ".npz":
    return _load_npz(p, what)
  raise AssetError(f"{what} {spec}: expected a folder of PNG/JPEG images, a .npz file or "
                   "'tfds:name/split'")


__all__ = ["AssetError", "Images", "Variables", "check_output", "load_images",
           "load_model_spec", "load_variables", "save_variables", "variables_template"]
