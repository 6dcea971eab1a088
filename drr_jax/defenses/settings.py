"""The settings of the baseline defenses: each one a default value and its source.

A method's settings are a table {name: Setting(value, source)}: the source says where the
value comes from (the method's paper, its authors' code, BackdoorBench's defaults where
both are silent, or 'ours' for a choice of this project), so that a report can carry
both. `resolve` applies a caller's overrides and rejects unknown names; the `check_*`
helpers raise a DefenseError that names the setting.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, NamedTuple

import numpy as np

from drr_jax.defenses.drr.errors import DefenseError


class Setting(NamedTuple):
  value: Any
  source: str


def defaults(table: Mapping[str, Setting]) -> dict[str, Any]:
  """{name: default value}, in the table's order."""
  return {k: s.value for k, s in table.items()}


def sources(table: Mapping[str, Setting]) -> dict[str, str]:
  """{name: where the default comes from}."""
  return {k: s.source for k, s in table.items()}


def resolve(method: str, table: Mapping[str, Setting],
            overrides: Mapping[str, Any] | None) -> dict[str, Any]:
  """The defaults with `overrides` applied; an unknown name raises DefenseError."""
  overrides = dict(overrides or {})
  unknown = set(overrides) - set(table)
  if unknown:
    raise DefenseError(f"unknown {method} setting(s) {sorted(unknown, key=str)}; its "
                       f"settings are {list(table)}")
  return {k: overrides.get(k, s.value) for k, s in table.items()}


def _is_real(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_number(cfg: Mapping[str, Any], key: str, *, low: float | None = None,
                 high: float | None = None, integer: bool = False,
                 open_low: bool = False) -> None:
  """cfg[key] is a finite number (an integer if asked) in [low, high] ((low, high] with
  `open_low`)."""
  v = cfg[key]
  if not _is_real(v) or not math.isfinite(v):
    raise DefenseError(f"{key} must be a finite number, got {v!r}")
  if integer and not float(v).is_integer():
    raise DefenseError(f"{key} must be an integer, got {v!r}")
  if low is not None and (v < low or (open_low and v == low)):
    raise DefenseError(f"{key} must be {'>' if open_low else '>='} {low}, got {v!r}")
  if high is not None and v > high:
    raise DefenseError(f"{key} must be <= {high}, got {v!r}")


def check_flag(cfg: Mapping[str, Any], key: str) -> None:
  if not isinstance(cfg[key], (bool, np.bool_)):
    raise DefenseError(f"{key} must be True or False, got {cfg[key]!r}")
