"""Measures `--set key=value` (drr_jax's flags) against ml_collections' `--config.key=value`
(absl + config_flags, as big_vision and the flax examples use) on the DRR settings.

For each case, both parsers get the same override in a fresh process. drr_jax's side is
`launch.defend --checkpoint <committed> --set k=v` with a free --out: it validates every
setting before loading anything. The ml_collections side is an absl app holding the DRR
defaults as a ConfigDict that, once parsed, builds the same DRRConfig and reports its
errors in one line as drr_jax does (so validation after parsing is identical; only the
parsing layer differs). Prints a markdown table.

  pip install ml_collections   # not a drr_jax dependency
  PYTHONPATH=. python experiments/config_flags.py
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, "artifacts", "wrn28_1-badnets-cpu")

# (key, value as typed on the command line, is the override a valid setting?)
CASES = [
    ("mode", "one_pass", True),
    ("side", "input", True),
    ("tau", "1.5", True),
    ("k", "2", True),
    ("confirm_samples", "2000", True),
    ("layers", "conv1", True),       # one layer by name (default None: every layer)
    ("layers", "[conv1,conv2]", True),
    ("tau", "nan", False),
    ("k", "2.5", False),
    ("steps", "-1", False),
    ("confirm", "maybe", False),
    ("mode", "nope", False),
    ("nope", "1", False),
]

ABSL_APP = r'''
import dataclasses, sys
from absl import app
from ml_collections import ConfigDict, config_flags
from drr_jax.defenses.drr.config import DRRConfig
defaults = {f.name: f.default for f in dataclasses.fields(DRRConfig)}
_CONFIG = config_flags.DEFINE_config_dict("config", ConfigDict(defaults))
def main(_):
  try:  # drr_jax's own validation, unchanged, and its one-line error
    cfg = DRRConfig(**_CONFIG.value.to_dict())
  except Exception as e:
    sys.exit(f"error: {e}")
  print("accepted:", {k: v for k, v in dataclasses.asdict(cfg).items() if v != defaults[k]})
app.run(main)
'''


def _outcome(proc: subprocess.CompletedProcess, stop_marker: str) -> str:
  err = [line for line in proc.stderr.splitlines() if line.strip()
         and "Warning" not in line and "warn(" not in line]
  if proc.returncode == 0 or stop_marker in proc.stdout + proc.stderr:
    return "accepted"
  tb = any("Traceback" in line for line in err)
  return (f"refused, {'traceback, ' if tb else ''}{len(err)} line"
          f"{'s' if len(err) != 1 else ''}")


def main() -> None:
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])}
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for key, value, valid in CASES:
      out = os.path.join(tmp, "never")
      # drr_jax: the checkpoint loads only after every setting passed, so 'loading' in the
      # output marks an accepted setting; the run is stopped there (timeout) to stay short
      ours = subprocess.run(
          [sys.executable, "-c", "import sys; from launch import defend; "
           "import drr_jax.checkpoint as c; c.load_model = lambda *a, **k: sys.exit("
           "'ACCEPTED'); defend.main(sys.argv[1:])", "--checkpoint", CKPT, "--out", out,
           "--set", f"{key}={value}"], capture_output=True, text=True, env=env, cwd=ROOT)
      theirs = subprocess.run([sys.executable, "-c", ABSL_APP, f"--config.{key}={value}"],
                              capture_output=True, text=True, env=env, cwd=ROOT)
      rows.append((f"`{key}={value}`", "valid" if valid else "invalid",
                   _outcome(ours, "ACCEPTED"), _outcome(theirs, "accepted:")))
  print("| override | setting | drr_jax `--set` | ml_collections `--config.` |")
  print("|---|---|---|---|")
  for r in rows:
    print("| " + " | ".join(r) + " |")
  good = lambda i: sum((r[i] == "accepted") == (r[1] == "valid") and
                       ("traceback" not in r[i]) and
                       (r[i] == "accepted" or r[i].endswith(" 1 line")) for r in rows)
  print(f"\nright outcome in one line: drr_jax {good(2)}/{len(rows)}, "
        f"ml_collections {good(3)}/{len(rows)}")


if __name__ == "__main__":
  main()
