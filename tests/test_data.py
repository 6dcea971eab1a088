from __future__ import annotations

import os
import zipfile

import jax
import numpy as np
import pytest
from PIL import Image

from drr_jax import data
from tests.conftest import make_fake_zips


# --- the real shared copy ---------------------------------------------------------

def test_real_zips_shapes_and_balance(real_cifar):
  train, test = real_cifar["train"], real_cifar["test"]
  assert train.images.shape == (50000, 32, 32, 3) and train.images.dtype == np.uint8
  assert test.images.shape == (10000, 32, 32, 3)
  np.testing.assert_array_equal(np.bincount(train.labels, minlength=10), [5000] * 10)
  np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), [1000] * 10)


def test_real_zips_label_order(real_cifar, real_data_dir):
  """Label c holds exactly the images of folder CLASSES[c] (CIFAR-10's order)."""
  train = real_cifar["train"]
  with zipfile.ZipFile(os.path.join(real_data_dir, "cifar10-train.zip")) as zf:
    names = zf.namelist()
    for c, cls in enumerate(data.CLASSES):
      first = sorted(n for n in names if n.startswith(f"train/{cls}/") and n.endswith(".jpg"))[0]
      with zf.open(first) as f:
        expected = np.asarray(Image.open(f).convert("RGB"))
      np.testing.assert_array_equal(train.images[train.labels == c][0], expected)
  assert data.CLASSES[0] == "airplane" and data.CLASSES[9] == "truck"


def test_cache_is_reused_and_rebuilt_when_corrupt(real_data_dir, real_cifar, session_cache):
  (cached,) = [p for p in session_cache.iterdir() if p.name.startswith("cifar10-test-")]
  again = data.load_split("test", real_data_dir, session_cache)
  np.testing.assert_array_equal(again.images, real_cifar["test"].images)
  with open(cached, "r+b") as f:  # flip bytes in the middle of the file
    f.seek(os.path.getsize(cached) // 2)
    f.write(b"\xff" * 64)
  rebuilt = data.load_split("test", real_data_dir, session_cache)
  np.testing.assert_array_equal(rebuilt.images, real_cifar["test"].images)
  assert data._read_cache(cached) is not None  # the damaged file was replaced


# --- damaged and missing inputs (tiny synthetic zips) --------------------------------

def test_fake_zips_load(tmp_path):
  make_fake_zips(tmp_path / "d")
  split = data.load_split("train", tmp_path / "d", tmp_path / "cache")
  assert split.images.shape == (20, 32, 32, 3)
  np.testing.assert_array_equal(split.labels, np.repeat(np.arange(10), 2))


def test_missing_folder_names_path(tmp_path, monkeypatch):
  monkeypatch.delenv(data.DATA_ENV, raising=False)
  with pytest.raises(data.DataError, match="DRR_DATA_DIR"):
    data.load_split("train", None, tmp_path)
  with pytest.raises(data.DataError, match="nowhere"):
    data.load_split("train", tmp_path / "nowhere", tmp_path)


def test_env_var_is_used(tmp_path, monkeypatch):
  make_fake_zips(tmp_path / "d")
  monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "d"))
  assert len(data.load_split("test", None, tmp_path / "c").labels) == 20


def test_missing_zip(tmp_path):
  make_fake_zips(tmp_path / "d")
  os.remove(tmp_path / "d" / "cifar10-test.zip")
  with pytest.raises(data.DataError, match="cifar10-test.zip is missing"):
    data.load_split("test", tmp_path / "d", tmp_path / "c")


def test_missing_class(tmp_path):
  make_fake_zips(tmp_path / "d", classes=data.CLASSES[:9])
  with pytest.raises(data.DataError, match="truck"):
    data.load_split("train", tmp_path / "d", tmp_path / "c")


def test_damaged_member_is_named(tmp_path):
  make_fake_zips(tmp_path / "d", damage="train/cat/0001.jpg")
  with pytest.raises(data.DataError, match="train/cat/0001.jpg"):
    data.load_split("train", tmp_path / "d", tmp_path / "c")


def test_truncated_zip(tmp_path):
  make_fake_zips(tmp_path / "d")
  path = tmp_path / "d" / "cifar10-train.zip"
  path.write_bytes(path.read_bytes()[:500])
  with pytest.raises(data.DataError, match="cifar10-train.zip"):
    data.load_split("train", tmp_path / "d", tmp_path / "c")


def test_new_zip_invalidates_cache(tmp_path):
  make_fake_zips(tmp_path / "d", seed=0)
  a = data.load_split("train", tmp_path / "d", tmp_path / "c")
  make_fake_zips(tmp_path / "d", seed=1)
  b = data.load_split("train", tmp_path / "d", tmp_path / "c")
  assert not np.array_equal(a.images, b.images)


# --- splitting, batching, augmentation ------------------------------------------------

def test_holdout_is_stratified_and_disjoint():
  ids = np.arange(1000)
  split = data.Split(ids.reshape(-1, 1, 1, 1), np.repeat(np.arange(10), 100).astype(np.int32))
  train, val = data.holdout_split(split, 0.05, seed=3)
  np.testing.assert_array_equal(np.bincount(val.labels), [5] * 10)
  tr_ids, va_ids = set(train.images.ravel()), set(val.images.ravel())
  assert not tr_ids & va_ids and len(tr_ids | va_ids) == 1000
  np.testing.assert_array_equal(train.labels, train.images.ravel() // 100)  # pairs kept


def test_batches_cover_everything_once():
  split = data.Split(np.arange(10).reshape(10, 1, 1, 1), np.arange(10))
  seen = np.concatenate([b.labels for b in data.batches(split, 3, seed=1)])
  assert sorted(seen) == list(range(10)) and len(seen) == 10
  assert sum(1 for _ in data.batches(split, 3, seed=1, drop_last=True)) == 3


def test_augment_is_a_shifted_or_flipped_crop():
  img = np.random.default_rng(0).integers(1, 255, (1, 32, 32, 3)).astype(np.uint8)
  imgs = np.repeat(img, 64, 0)
  out = np.asarray(data.augment(jax.random.key(0), imgs))
  assert out.shape == imgs.shape and out.dtype == imgs.dtype
  padded = np.pad(img[0], ((4, 4), (4, 4), (0, 0)))
  for o in out:
    ok = any(np.array_equal(o, cand) for dy in range(9) for dx in range(9)
             for cand in (padded[dy:dy + 32, dx:dx + 32], padded[dy:dy + 32, dx:dx + 32][:, ::-1]))
    assert ok
  assert len({o.tobytes() for o in out}) > 10  # images get different crops
