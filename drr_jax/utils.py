"""Small helpers: atomic writes, JSON-safe values, and where a result came from
(machine, git commit).

Every file and folder the project writes goes through `atomic_path` or `atomic_dir`:
written under a hidden temporary name beside its destination ('.<name>.<random>.tmp'),
then renamed into place in one step. A writer killed at any point leaves the old
destination (or none) and at most such hidden debris, which no reader looks at.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np


def _umask() -> int:
  """The process's umask (Python can only read it by setting it)."""
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
  """Yields a temporary file beside `path` to write; renames it to `path` when the block
  ends without error (replacing any old file), deletes it otherwise."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  os.close(fd)
  os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make every result private
  try:
    yield Path(tmp)
    os.replace(tmp, path)
  finally:
    Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
  """Yields an empty temporary folder beside `path` to fill; renames it to `path` (which
  must not exist) when the block ends without error, deletes it otherwise."""
  path = Path(path)
  parent = path.absolute().parent
  parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
  os.chmod(tmp, 0o777 & ~_umask())
  try:
    yield tmp
    if path.exists():
      raise FileExistsError(f"{path} appeared while it was being written")
    os.rename(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  """Writes JSON atomically (`atomic_path`)."""
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    json.dump(obj, f, indent=1, default=float)


def cpu_description(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
  """The CPU's model name and widest x86 vector extension, e.g. 'AMD EPYC, avx512f':
  XLA's CPU kernels depend on them, so two machines with different ones round floats
  differently (docs/design.md). platform.processor() where /proc/cpuinfo cannot be read."""
  try:
    text = Path(cpuinfo).read_text()
  except OSError:
    return platform.processor()
  first = text.split("\n\n")[0].splitlines()  # the first processor's block
  pairs = (line.split(":", 1) for line in first if ":" in line)
  fields = {k.strip(): v.strip() for k, v in pairs}
  flags = set(fields.get("flags", "").split())
  isa = next((f for f in ("avx512f", "avx2", "avx", "sse4_2") if f in flags), "")
  return ", ".join(x for x in (fields.get("model name", ""), isa) if x)


def machine_description() -> str:
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", dev.platform)
  cpu = cpu_description()
  return (f"{platform.machine()} {os.cpu_count()} cores{f' ({cpu})' if cpu else ''}, "
          f"jax {jax.__version__} on {dev.platform} ({kind})")


def jsonable(obj: Any) -> Any:
  """A copy of obj that json.dump writes as strict JSON: numpy scalars and arrays become
  Python numbers and lists, tuples lists, mapping keys strings, NaN and Inf None."""
  if isinstance(obj, dict):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  if isinstance(obj, (np.ndarray, jax.Array)):
    return jsonable(np.asarray(obj).tolist())
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return float(obj) if np.isfinite(obj) else None
  if obj is None or isinstance(obj, str):
    return obj
  raise TypeError(f"cannot write {type(obj).__name__} as JSON: {obj!r}")


def git_commit(path: str | os.PathLike | None = None) -> dict[str, Any] | None:
  """{'commit': sha, 'dirty': tracked files changed, 'changed': their paths} of the git
  checkout holding `path` (default: this package), or None outside a checkout or without
  git. The paths let a reader see whether an uncommitted change could touch a result."""
  cwd = Path(path) if path is not None else Path(__file__).resolve().parent
  try:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                         text=True, timeout=10, check=True).stdout.strip()
    changed = subprocess.run(["git", "diff", "--name-only", "HEAD", "--"], cwd=cwd,
                             capture_output=True, text=True, timeout=10,
                             check=True).stdout.split()
  except (OSError, subprocess.SubprocessError):
    return None
  return {"commit": sha, "dirty": bool(changed), "changed": changed}
