"""Experiment presets as Python `get_config()` dicts (the big_vision way).

`cpu`: finishes in under an hour on a 2-core CPU (WRN-28-1, few epochs).
`paper`: the paper's schedule (ResNet-18, 150 epochs) for a GPU/TPU.
`tiny`: seconds, for tests and smoke runs.
The same code runs all three; only these numbers differ.
"""
from __future__ import annotations

import copy
from typing import Any

PRESETS = ("cpu", "paper", "tiny")


def get_config(preset: str = "cpu") -> dict[str, Any]:
  """A fresh nested dict of every setting of one training run."""
  base = {
      "preset": preset,
      "seed": 0,
      "model": {"name": "wrn28_1", "width": 1.0},
      "attack": {"name": "badnets", "poison_ratio": 0.1, "target": 0, "alpha": 0.2,
                 "patch_size": 3, "position": "br", "pattern": "random",
                 "blend_pattern": "noise", "seed": 0},
      # 5 % of the training set is held out (as the EP/CLP authors do) for every
      # choice that must not see the test set.
      "data": {"val_fraction": 0.05, "split_seed": 0, "limit_train": None,
               "limit_test": None},
      "train": {"epochs": 12, "batch_size": 128, "lr": 0.1, "momentum": 0.9,
                "weight_decay": 5e-4, "eval_batch_size": 500, "keep_checkpoints": 1},
  }
  if preset == "cpu":
    pass
  elif preset == "paper":
    base["model"] = {"name": "resnet18", "width": 1.0}
    base["train"]["epochs"] = 150
  elif preset == "tiny":
    base["model"] = {"name": "resnet18", "width": 0.125}
    base["data"].update(limit_train=512, limit_test=256)
    base["train"].update(epochs=1, batch_size=32, eval_batch_size=128)
  else:
    raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
  return base


def override(config: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
  """Applies 'a.b=value' strings; values are read by `_value`."""
  config = copy.deepcopy(config)
  for item in assignments:
    key, sep, raw = item.partition("=")
    if not sep:
      raise ValueError(f"override {item!r} is not of the form key.sub=value")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      if not isinstance(node.get(p), dict):
        raise KeyError(f"override {item!r}: no config section {p!r}")
      node = node[p]
    if leaf not in node:
      raise KeyError(f"override {item!r}: unknown key {key!r}")
    if isinstance(node[leaf], dict):
      raise KeyError(f"override {item!r}: {key!r} is a section; set its keys "
                     f"({key}.KEY=VALUE)")
    node[leaf] = _value(raw)
  return config


def _value(raw: str) -> Any:
  """A command-line value: a Python literal where it is one (1.5, True, None, 'a'), a
  list of such values or bare words in brackets ([conv1, conv2]), else the text itself
  (so strings need no quotes: mode=one_pass)."""
  import ast
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    pass
  text = raw.strip()
  if text.startswith("[") and text.endswith("]"):
    inner = text[1:-1].strip()
    return [_value(part.strip()) for part in inner.split(",")] if inner else []
  return raw


def _number(config, path, lo=None, hi=None, *, integer=False, lo_open=False, hi_open=False):
  node = config
  for key in path.split("."):
    node = node[key]
  kind = "an integer" if integer else "a number"
  ok = (isinstance(node, int) if integer else isinstance(node, (int, float))) and not (
      isinstance(node, bool))
  if ok and not integer:
    ok = node == node and abs(node) != float("inf")  # not NaN or Inf
  if ok and lo is not None:
    ok = node > lo if lo_open else node >= lo
  if ok and hi is not None:
    ok = node < hi if hi_open else node <= hi
  if not ok:
    bounds = "".join([f", {'>' if lo_open else '>='} {lo}" if lo is not None else "",
                      f", {'<' if hi_open else '<='} {hi}" if hi is not None else ""])
    raise ValueError(f"{path} must be {kind}{bounds}, got {node!r}")


def validate(config: dict[str, Any]) -> dict[str, Any]:
  """Checks a training config's values before any data is loaded or any work starts;
  raises ValueError naming the first bad setting. Returns the config."""
  from drr_jax import attacks, data, models  # local: keeps this module free of heavy imports
  try:
    name = config["model"]["name"]
    if name not in models.MODELS:
      raise ValueError(f"model.name: unknown model {name!r}; choose one of "
                       f"{tuple(models.MODELS)}")
    _number(config, "model.width", 0, 8, lo_open=True)
    attacks.resolve(config["attack"])  # unknown attack names
    _number(config, "attack.poison_ratio", 0, 1)
    _number(config, "attack.target", 0, len(data.CLASSES) - 1, integer=True)
    _number(config, "seed", 0, integer=True)
    _number(config, "data.val_fraction", 0, 1, hi_open=True)
    _number(config, "train.epochs", 1, integer=True)
    _number(config, "train.batch_size", 1, integer=True)
    _number(config, "train.eval_batch_size", 1, integer=True)
    _number(config, "train.lr", 0, lo_open=True)
    _number(config, "train.momentum", 0, 1, hi_open=True)
    _number(config, "train.weight_decay", 0)
  except (KeyError, TypeError) as e:
    raise ValueError(f"the config lacks or misshapes a setting: {e!r}") from e
  return config
