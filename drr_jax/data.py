"""CIFAR-10 from the offline image-folder zips, decoded once and cached as uint8 arrays.

Images stay in pixel space (uint8, NHWC) everywhere outside the model: attacks write
triggers into pixels and the models normalize their own input (`models.common`), so
normalization happens in exactly one place.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import os
import zipfile
from pathlib import Path
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

from drr_jax import utils

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
NUM_CLASSES = len(CLASSES)
IMAGE_SHAPE = (32, 32, 3)
DATA_ENV = "DRR_DATA_DIR"
CACHE_ENV = "DRR_CACHE_DIR"
_CACHE_FORMAT = 1


class DataError(RuntimeError):
  """A data folder, zip or cache that cannot be used; the message says what to do."""


class Split(NamedTuple):
  images: np.ndarray  # (N, 32, 32, 3) uint8
  labels: np.ndarray  # (N,) int32


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
  """The folder holding cifar10-{train,test}.zip: the argument, else $DRR_DATA_DIR."""
  if data_dir is None:
    data_dir = os.environ.get(DATA_ENV)
  if not data_dir:
    raise DataError(
        f"No CIFAR-10 folder given: pass --data_dir or set ${DATA_ENV} to the folder "
        "holding cifar10-train.zip and cifar10-test.zip (e.g. ../shared/data).")
  path = Path(data_dir).expanduser()
  if path.is_file():
    raise DataError(f"CIFAR-10 folder {path} is a file, not a folder: give the folder "
                    f"that holds cifar10-train.zip and cifar10-test.zip"
                    + (f" ({path.parent})" if path.suffix == ".zip" else "") + ".")
  if not path.is_dir():
    raise DataError(f"CIFAR-10 folder {path} does not exist: pass --data_dir or set "
                    f"${DATA_ENV} to the folder holding cifar10-train.zip and "
                    "cifar10-test.zip.")
  return path


def _zip_path(data_dir: Path, split: str) -> Path:
  path = data_dir / f"cifar10-{split}.zip"
  if not path.is_file():
    raise DataError(f"{path} is missing: the CIFAR-10 folder must hold "
                    f"cifar10-{split}.zip (see the README of the shared data copy).")
  return path


def file_sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def _decode_member(name: str, data: bytes, zip_path: Path) -> np.ndarray:
  try:
    with Image.open(io.BytesIO(data)) as img:
      arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise DataError(f"{zip_path}: member {name} is damaged and cannot be decoded "
                    f"({e}); replace the zip with an intact copy.") from e
  if arr.shape != IMAGE_SHAPE:
    raise DataError(f"{zip_path}: member {name} has shape {arr.shape}, expected "
                    f"{IMAGE_SHAPE}; this is not the CIFAR-10 copy.")
  return arr


def decode_zip(zip_path: Path, split: str, workers: int = 4) -> Split:
  """Decodes `split/<class>/*.jpg` of one zip, sorted by (label, file name)."""
  try:
    zf = zipfile.ZipFile(zip_path)
  except (zipfile.BadZipFile, OSError) as e:
    raise DataError(f"{zip_path} is not a readable zip ({e}); replace it with an "
                    "intact copy.") from e
  with zf:
    members: list[tuple[int, str]] = []
    for name in zf.namelist():
      parts = name.split("/")
      if len(parts) == 3 and parts[0] == split and parts[2].lower().endswith(".jpg"):
        if parts[1] not in CLASSES:
          raise DataError(f"{zip_path}: unknown class folder {parts[1]!r} in {name}.")
        members.append((CLASSES.index(parts[1]), name))
    present = {c for c, _ in members}
    missing = [CLASSES[c] for c in range(NUM_CLASSES) if c not in present]
    if missing:
      raise DataError(f"{zip_path}: class folder(s) {missing} missing under {split}/; "
                      "the zip is incomplete, replace it with an intact copy.")
    members.sort()
    try:
      blobs = [zf.read(name) for _, name in members]
    except (zipfile.BadZipFile, OSError, EOFError) as e:  # CRC mismatch, truncation
      raise DataError(f"{zip_path} is damaged ({e}); replace it with an intact copy."
                      ) from e
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    images = list(pool.map(lambda m: _decode_member(m[0][1], m[1], zip_path),
                           zip(members, blobs), chunksize=256))
  labels = np.asarray([c for c, _ in members], np.int32)
  return Split(np.stack(images), labels)


def default_cache_dir() -> Path:
  return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "drr_jax"))


def _digest(images: np.ndarray, labels: np.ndarray) -> str:
  h = hashlib.sha256()
  h.update(np.ascontiguousarray(images).tobytes())
  h.update(np.ascontiguousarray(labels).tobytes())
  return h.hexdigest()


def _read_cache(path: Path) -> Split | None:
  """The cached split, or None when the file is absent, unreadable or inconsistent."""
  if not path.is_file():
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      images, labels = z["images"], z["labels"]
      digest, fmt = str(z["digest"]), int(z["format"])
  except Exception:  # any damage means: rebuild  # noqa: BLE001
    return None
  if (fmt != _CACHE_FORMAT or images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE
      or labels.shape != images.shape[:1] or _digest(images, labels) != digest):
    return None
  return Split(images, labels.astype(np.int32))


def _write_cache(path: Path, split: Split) -> None:
  with utils.atomic_path(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, images=split.images, labels=split.labels,
             digest=_digest(split.images, split.labels), format=_CACHE_FORMAT)


def digest(images: np.ndarray, labels: np.ndarray) -> str:
  """SHA-256 of a split's images and labels (cache keys and checks)."""
  return _digest(images, labels)


def read_cached(path: str | os.PathLike) -> Split | None:
  """A split cached by `write_cached`, or None when absent, damaged or inconsistent."""
  return _read_cache(Path(path))


def write_cached(path: str | os.PathLike, split: Split) -> None:
  """Caches a split atomically, with a digest that `read_cached` checks."""
  _write_cache(Path(path), split)


def load_split(split: str, data_dir: str | os.PathLike | None = None,
               cache_dir: str | os.PathLike | None = None) -> Split:
  """One CIFAR-10 split ('train' or 'test') as uint8 images and int32 labels.

  The first call decodes the zip (about 30 s for the training set on 2 cores) and caches
  the arrays under a name keyed by the zip's sha256; a stale, damaged or tampered cache
  file fails its content digest and is rebuilt.
  """
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  zpath = _zip_path(resolve_data_dir(data_dir), split)
  cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
  cpath = cache / f"cifar10-{split}-{file_sha256(zpath)[:20]}.npz"
  cached = _read_cache(cpath)
  if cached is not None:
    return cached
  result = decode_zip(zpath, split)
  try:
    _write_cache(cpath, result)
  except OSError as e:  # a read-only cache folder only costs speed
    print(f"warning: could not write the CIFAR-10 cache {cpath}: {e}")
  return result


def holdout_split(split: Split, fraction: float, seed: int = 0) -> tuple[Split, Split]:
  """Stratified (train, validation) split; validation gets `fraction` of each class."""
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
  rng = np.random.default_rng(seed)
  val_idx = []
  for c in np.unique(split.labels):
    idx = np.flatnonzero(split.labels == c)
    val_idx.append(rng.choice(idx, int(round(fraction * len(idx))), replace=False))
  val_mask = np.zeros(len(split.labels), bool)
  val_mask[np.concatenate(val_idx)] = True
  # Both parts come out in a seeded random order, so any prefix is a random subset.
  order = rng.permutation(len(split.labels))
  take = lambda m: Split(split.images[order[m[order]]], split.labels[order[m[order]]])
  return take(~val_mask), take(val_mask)


def batches(split: Split, batch_size: int, *, seed: int | None = None,
            drop_last: bool = False) -> Iterator[Split]:
  """Yields consecutive (or, with a seed, shuffled) batches as numpy arrays."""
  n = len(split.labels)
  order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
  stop = n - n % batch_size if drop_last else n
  for i in range(0, stop, batch_size):
    idx = order[i:i + batch_size]
    yield Split(split.images[idx], split.labels[idx])


def augment(key: jax.Array, images: jax.Array, pad: int = 4) -> jax.Array:
  """Random crop after zero padding by `pad` pixels, then random horizontal flip.

  Works on a batch (N, H, W, C) of any dtype inside jit; each image gets its own
  offsets and flip from `key`.
  """
  n, h, w, c = images.shape
  k_off, k_flip = jax.random.split(key)
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = jax.random.randint(k_off, (n, 2), 0, 2 * pad + 1)
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))
  out = jax.vmap(crop)(padded, offsets)
  flip = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
  return jnp.where(flip, out[:, :, ::-1, :], out)
