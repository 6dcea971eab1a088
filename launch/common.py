"""Flags shared by the entry points."""
from __future__ import annotations

import argparse
import contextlib
import os
import stat
import sys

from drr_jax import attacks, checkpoint, configs, data, models, sharding

# Multi-host runs (a TPU pod slice, a GPU cluster): DRR_DISTRIBUTED=1 starts
# jax.distributed here, as every entry point imports this module before any JAX
# computation (docs/scaling.md). Unset, nothing happens: all local devices are used.
sharding.initialize_from_env()


class _Parser(argparse.ArgumentParser):
  """argparse whose own refusals (an unknown choice, a value of the wrong type, a
  missing argument) are one line 'error: ...' with exit code 2, like every other bad
  input, instead of the usage text followed by the error."""

  def error(self, message: str):
    self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parser(doc: str, module: str) -> argparse.ArgumentParser:
  """The parser of the entry point `module` ('launch.train') whose docstring is `doc`: its
  first paragraph (whole, as written) is the description, the rest (the examples) the
  epilog."""
  head, _, rest = doc.strip().partition("\n\n")
  return _Parser(prog=f"python -m {module}", description=head,
                 epilog=rest.strip("\n").rstrip() or None,
                 formatter_class=argparse.RawDescriptionHelpFormatter)


def add_config_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--preset", default="cpu", choices=configs.PRESETS,
                 help="experiment preset (drr_jax/configs.py)")
  p.add_argument("--model", help=" | ".join(models.MODELS))
  p.add_argument("--width", type=float, help="channel width multiplier (1.0: the "
                 "published model; DenseNet: its growth rate)")
  p.add_argument("--attack", choices=attacks.NAMES, metavar="ATTACK",
                 help=" | ".join(attacks.NAMES) + " (docs/attacks.md)")
  p.add_argument("--poison_ratio", type=float,
                 help="share of the training set poisoned (default 0.1; "
                 + ", ".join(f"{k} {v}" for k, v in attacks.DEFAULT_RATIOS.items()) + ")")
  p.add_argument("--epochs", type=int)
  p.add_argument("--seed", type=int)
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override any config value, e.g. --set train.lr=0.05")


def config_from_flags(args: argparse.Namespace) -> dict:
  cfg = configs.get_config(args.preset)
  sets = list(args.set)
  for flag, key in [("model", "model.name"), ("width", "model.width"),
                    ("attack", "attack.name"), ("poison_ratio", "attack.poison_ratio"),
                    ("epochs", "train.epochs"), ("seed", "seed")]:
    value = getattr(args, flag)
    if value is not None:
      sets.insert(0, f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}")
  # An attack's own preset-dependent settings (IAB's) join the config once its name is
  # known, before the overrides, so that --set attack.iab_...=... can change them.
  named = configs.override(cfg, [s for s in sets if s.startswith("attack.name=")])
  cfg["attack"].update(attacks.default_settings(named["attack"]["name"], args.preset))
  cfg = configs.override(cfg, sets)
  name = cfg["attack"]["name"]
  if name in attacks.DEFAULT_RATIOS and args.poison_ratio is None and not any(
      s.startswith("attack.poison_ratio=") for s in args.set):
    cfg["attack"]["poison_ratio"] = attacks.DEFAULT_RATIOS[name]
  return configs.validate(cfg)


# What a user can cause (a setting, a path, a file): reported in one line, not a traceback.
USER_ERRORS = (ValueError, KeyError, checkpoint.CheckpointError, data.DataError, OSError)


def add_debug_flag(p: argparse.ArgumentParser) -> None:
  p.add_argument("--debug", action="store_true",
                 help="show the full traceback of an error")


def check_folder(path: str | None, flag: str) -> None:
  """Refuses (ValueError) an output folder argument that is empty, names an existing
  file, or cannot be written (itself, or the nearest folder above it that exists)."""
  if path is None:
    return
  if not path.strip():
    raise ValueError(f"{flag} is empty: give a folder")
  try:
    is_dir = stat.S_ISDIR(os.stat(path).st_mode)
  except FileNotFoundError:
    is_dir = None  # made when needed
  except OSError as e:  # a name too long, a file on the way (NotADirectoryError), ...
    raise ValueError(f"{flag} {path}: {e.strerror or e}") from e
  if is_dir is False:
    raise ValueError(f"{flag} {path} is a file, not a folder")
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(f"{flag} {path}: folder {existing} is not writable")


@contextlib.contextmanager
def output_named(path, flag: str = "--out"):
  """Turns an OSError while writing the output `path` (a full disk, a folder that
  became unwritable) into a ValueError naming it (one line from the CLI)."""
  try:
    yield
  except OSError as e:
    raise ValueError(f"cannot write {flag} {path}: {e.strerror or e}") from e


def fail(e: BaseException, debug: bool) -> None:
  """Exits with one line, `error: <message>`; with --debug raises the error itself
  (its traceback)."""
  if debug:
    raise e
  message = e.args[0] if isinstance(e, KeyError) and e.args else e
  sys.exit(f"error: {message}")
