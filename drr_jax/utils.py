"""Small helpers: atomic JSON writes and a description of the machine a result came from."""
from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import jax


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  """Writes JSON to a temporary file in the same folder, then renames it into place."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=1, default=float)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def machine_description() -> str:
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", dev.platform)
  return (f"{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} on "
          f"{dev.platform} ({kind})")
