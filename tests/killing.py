"""Runs Python code in a subprocess that SIGKILLs itself at a chosen moment.

The moment is a rename (`os.rename` / `os.replace`, which every writer of the project and
orbax ends with) whose destination contains a given text, after `skip` such renames have
gone through; or, with `at_step`, the training step of that number. A kill there is the
worst case for an atomic writer: everything is written except the final rename.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_HOOK = '''
import os, signal
_KILL_ON, _SKIP, _STEP = {kill_on!r}, {skip!r}, {at_step!r}

def _die():
  os.kill(os.getpid(), signal.SIGKILL)

def _hooked(real):
  def rename(src, dst, *args, **kwargs):
    global _SKIP
    if _KILL_ON is not None and _KILL_ON in os.fspath(dst):
      if _SKIP == 0:
        _die()
      _SKIP -= 1
    return real(src, dst, *args, **kwargs)
  return rename

os.rename, os.replace = _hooked(os.rename), _hooked(os.replace)

if _STEP is not None:  # die inside the training loop, before update step _STEP runs
  from drr_jax import train as _train
  _make = _train.make_update_fn
  def _make_dying(*args, **kwargs):
    fn, count = _make(*args, **kwargs), [0]
    def update(*a, **k):
      count[0] += 1
      if count[0] == _STEP:
        _die()
      return fn(*a, **k)
    return update
  _train.make_update_fn = _make_dying
'''


def run(code: str, *, kill_on: str | None = None, skip: int = 0, at_step: int | None = None,
        env: dict[str, str] | None = None, timeout: float = 300
        ) -> subprocess.CompletedProcess:
  """Runs `code` (dedented) after the kill hook; returns the finished process."""
  script = _HOOK.format(kill_on=kill_on, skip=skip, at_step=at_step) + textwrap.dedent(code)
  full_env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
  return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=full_env,
                        capture_output=True, text=True, timeout=timeout)


def killed(proc: subprocess.CompletedProcess) -> bool:
  return proc.returncode == -signal.SIGKILL


def debris(folder: str | os.PathLike) -> list[str]:
  """Names of hidden temporary files and folders anywhere under `folder`."""
  out = []
  for dirpath, dirnames, filenames in os.walk(folder):
    for name in dirnames + filenames:
      if name.endswith(".tmp") or "orbax-checkpoint-tmp" in name:
        out.append(os.path.relpath(os.path.join(dirpath, name), folder))
  return sorted(out)
