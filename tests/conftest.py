"""Shared fixtures. Real-data tests read the CIFAR-10 zips from $DRR_DATA_DIR
(.ci/run points it at ../shared/data) and skip, saying so, where it is unset."""
from __future__ import annotations

import io
import os
import zipfile

# The suite is bound by XLA's compile time (hundreds of small programs, each run a few
# times on tiny inputs): unoptimized code generation compiles about 3.5x faster here and
# changes no result beyond float rounding. Set before any computation initializes the
# backend; a caller's own XLA_FLAGS win.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import numpy as np
import pytest
from PIL import Image

from drr_jax import data


@pytest.fixture(scope="session")
def real_data_dir():
  path = os.environ.get(data.DATA_ENV)
  if not path:
    pytest.skip(f"${data.DATA_ENV} is not set: real CIFAR-10 tests need the shared zips")
  return path


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("cifar_cache")


@pytest.fixture(scope="session")
def real_cifar(real_data_dir, session_cache):
  """Both real splits, decoded once per test session into a private cache."""
  return {s: data.load_split(s, real_data_dir, session_cache) for s in ("train", "test")}


def jpeg_bytes(rgb: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def make_fake_zips(folder, per_class: int = 2, classes=data.CLASSES, seed: int = 0,
                   damage: str | None = None) -> None:
  """Writes tiny cifar10-{train,test}.zip image folders; `damage` names a member to spoil."""
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  for split in ("train", "test"):
    with zipfile.ZipFile(os.path.join(folder, f"cifar10-{split}.zip"), "w",
                         zipfile.ZIP_STORED) as zf:
      for c in classes:
        for i in range(per_class):
          name = f"{split}/{c}/{i:04d}.jpg"
          blob = jpeg_bytes(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
          if name == damage:
            blob = b"not a jpeg at all" + blob[:20]
          zf.writestr(name, blob)
