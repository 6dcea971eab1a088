"""Runs `drr_jax.defend` under several configs and collects the defended params and the
reports (without their timings) as flat arrays, for tests that compare runs made in
separate processes (tests/test_determinism.py, tests/test_sharding.py)."""
from __future__ import annotations

import json
from typing import Any, Sequence

import jax
import numpy as np

import drr_jax


def flat(prefix: str, tree: Any) -> dict[str, np.ndarray]:
  """{prefix + key path: array} for every leaf of `tree`."""
  return {prefix + jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def timeless(obj: Any) -> Any:
  """A report without its timings (the keys that name seconds)."""
  if isinstance(obj, dict):
    return {k: timeless(v) for k, v in obj.items() if "seconds" not in k}
  if isinstance(obj, (list, tuple)):
    return [timeless(v) for v in obj]
  return obj


def defend_all(model: Any, variables: Any, images: np.ndarray,
               configs: Sequence[tuple[str, Any]]) -> dict[str, np.ndarray]:
  """For each (name, config): the defended params under `name...` and the report, as
  sorted JSON bytes, under `name + ' report'`."""
  out = {}
  for name, config in configs:
    defended, report = drr_jax.defend(model, variables, images, config=config,
                                      progress=False)
    out.update(flat(name, defended))
    out[name + " report"] = np.frombuffer(
        json.dumps(timeless(report), sort_keys=True, default=str).encode(), np.uint8)
  return out
