"""Backdoor defenses that map (model, variables, poisoned data) -> new variables.

`defend` is DRR (the project's method, and `drr_jax.defend`). The baselines the paper
compares it with, and this project's rank-reduction versions of two of them, share one
call shape through the registry:

  defense = get_defense("clp")
  new_variables, report = defense.defend(model, variables, train_images,
                                         config={...}, clean=(images, labels))

  drr     DRR with this project's defaults            poisoned training set
  paper   DRR as the paper's Algorithm 1 writes it   poisoned training set
  fp      fine-pruning (Liu et al. 2018)             clean data (+ fine-tuning)
  anp     adversarial neuron pruning (Wu & Wang 2021) clean data
  clp     channel Lipschitzness pruning (Zheng et al. 2022a)   no data
  ep      entropy-based pruning (Zheng et al. 2022b) poisoned training set
  rr-fp   FP as rank reduction (ours)                 clean data (+ fine-tuning)
  rr-ep   EP as rank reduction (ours)                 poisoned training set

Methods that need clean data (`needs_clean`) raise a DefenseError before any work when
given none; pass the clean validation split (5 % of the training set), never the test
set. The others accept `clean` and ignore it.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, NamedTuple

from drr_jax.defenses.drr import (DefenseError, DRRConfig, default_config, defend,
                                  format_report)
from drr_jax.defenses.paper import paper_config


class Defense(NamedTuple):
  """A registered defense: defend(model, variables, batch, *, config=None, clean=None,
  progress=True) -> (variables, report); default_config() -> its settings; check(config)
  raises DefenseError for a bad setting; format_report(report) -> text."""
  name: str
  defend: Callable[..., tuple[dict[str, Any], dict[str, Any]]]
  default_config: Callable[[], dict[str, Any]]
  check: Callable[[Mapping[str, Any] | None], Any]
  format_report: Callable[[Mapping[str, Any]], str]
  needs_clean: bool
  ours: bool
  summary: str


METHODS = ("drr", "paper", "fp", "anp", "clp", "ep", "rr-fp", "rr-ep")

_BASELINES = {  # name -> (module, needs clean data, the project's own, summary)
    "fp": ("fp", True, False, "fine-pruning (Liu et al. 2018)"),
    "anp": ("anp", True, False, "adversarial neuron pruning (Wu & Wang 2021)"),
    "clp": ("clp", False, False, "channel Lipschitzness-based pruning (Zheng et al. "
            "2022a), data-free"),
    "ep": ("ep", False, False, "entropy-based pruning (Zheng et al. 2022b)"),
    "rr-fp": ("rr_fp", True, True, "fine-pruning as rank reduction (this project's)"),
    "rr-ep": ("rr_ep", False, True, "entropy-based pruning as rank reduction (this "
              "project's)"),
}


def _drr(name: str, base: Callable[[], dict[str, Any]]) -> Defense:
  from drr_jax.defenses.drr import make_config

  def run(model, variables, batch, *, config=None, clean=None, progress=True):
    del clean  # DRR uses the poisoned training set only
    merged = config if isinstance(config, DRRConfig) else {**base(), **dict(config or {})}
    new, report = defend(model, variables, batch, config=merged, progress=progress)
    return new, {**report, "method": name}

  return Defense(name, run, lambda: {**default_config(), **base()},
                 lambda config=None: make_config({**base(), **dict(config or {})}),
                 format_report, False, name == "drr",
                 "DRR, this project's defaults" if name == "drr"
                 else "DRR as Algorithm 1 of the paper writes it")


def get_defense(name: str) -> Defense:
  """The defense registered as `name` (one of `METHODS`)."""
  if name == "drr":
    return _drr("drr", dict)
  if name == "paper":
    return _drr("paper", paper_config)
  if name not in _BASELINES:
    raise DefenseError(f"unknown defense {name!r}; choose one of {METHODS}")
  module, needs_clean, ours, summary = _BASELINES[name]
  mod = importlib.import_module(f"drr_jax.defenses.{module}")
  from drr_jax.defenses.common import format_report as baseline_report
  return Defense(name, mod.defend, mod.default_config, mod.make_config, baseline_report,
                 needs_clean, ours, summary)


__all__ = ["METHODS", "Defense", "DefenseError", "DRRConfig", "default_config", "defend",
           "format_report", "get_defense", "paper_config"]
