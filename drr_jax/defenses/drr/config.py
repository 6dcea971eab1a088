"""DRR's settings as one frozen, validated dataclass.

`DRRConfig` holds every setting with its default (see docs/design.md for the evidence
behind each). Building one checks every value (`__post_init__`), so a bad setting fails with a
`DefenseError` naming it before any data is loaded. `DRRConfig.from_overrides` (also
`make_config`) builds one from a dict of overrides, as `defend(config={...})` takes them;
`to_dict()` is the plain JSON-able dict that reports and experiment records store, for the
defaults exactly `default_config()`.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

import numpy as np

from drr_jax import features, stiefel
from drr_jax.defenses.drr.errors import DefenseError

SIDES = ("input", "output", "sites")
MODES = ("sequential", "one_pass", "ranked")
DIRECTIONS = ("skew", "tail_mean")
MEAN_FITS = ("average", "interior")
FLIP_ON = ("tail", "majority")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DRRConfig:
  """DRR settings; see docs/design.md for the evidence behind each default.

  `layers`: None (every layer) or a list/tuple of layer names, held as a tuple (`to_dict`
  gives it back as a list). A plain string is rejected rather than read as one name (or
  split into characters): write ['stage1_block1/conv1'].
  Integer settings (steps, search_samples, rounds, ranked_rounds, later_samples,
  batch_size, confirm_samples) take integers or integral floats (200.0), which `int()` reads; `k`
  and `seed` take integers only.
  """
  side: str = "sites"         # 'sites': remove a feature's direction wherever the
                              # network reads it, at every exact site, input or output
                              # (drr_jax/sites.py); 'input': the feature a weight
                              # consumes (paper: W^ = P W); 'output': a layer's output
  pooling: str = "max"        # conv feature -> per-channel spatial max per image
  k: int = 4                  # directions optimized per layer (multistart: starts, <= C)
  search: str = "multistart"  # 'joint' (St(C, k), Algorithm 1), 'greedy' (deflation) or
                              # 'multistart' (k independent ascents from the top axes)
  tau: float = 0.0            # a direction is a candidate if its criterion exceeds tau
                              # (0: every optimized direction; confirmation decides)
  direction: str = "tail_mean"  # what a kept candidate removes: 'skew' (the optimized
                              # direction v) or 'tail_mean' (mean of v's skewed tail
                              # minus the rest's: Theorem 1's d, which v approximates)
  locate: bool = True         # conv, 'tail_mean': for a confirmed candidate, also try the
                              # tail mean of the feature at the position where it fires
                              # most (a local trigger's place); keep whichever removal
                              # flips more of the tail
  mean_fit: str = "average"   # a 3x3 conv's mean-replacement constant: its exact value
                              # averaged over output positions ('average') or its value
                              # away from the zero-padded border ('interior')
  keep_mean: bool = True      # replace the component by its benign mean (outside the
                              # skewed tail) instead of zeroing it: x - (x - mu) V V^T,
                              # the constant folded into biases / BatchNorm means
  standardize: bool = True    # criterion = skewness m3 / m2^1.5 (scale-free), not raw m3
  steps: int = 200            # Cayley ascent steps
  search_samples: int | None = None  # images whose features the ascent reads (a fixed
                              # random subset, seeded by `seed`); the criterion of the
                              # found directions, their tails and everything after are
                              # on all images. None: every image (issue 18: the ascent
                              # costs 0.65 floors per ranking at N = 47,500)
  lr: float = 0.005           # Cayley step size. 0.1 (up to version 7) overshoots
                              # where the features' covariance is thin: the ascent
                              # wanders, and float rounding decides where it ends
                              # (version 8; docs/design.md "The search does not ascend")
  mode: str = "ranked"        # 'ranked': every unit's candidates confirmed on the
                              # original network, removed least collateral first
                              # (ranking.py); 'sequential' (Algorithm 1's layer order);
                              # 'one_pass'.
  rounds: int = 1             # sequential: revisit a layer, with re-extracted features,
                              # up to this many times while directions are still kept
  ranked_rounds: int = 8      # ranked: rankings, each on the network as the last one
                              # left it, while the last one kept something (at most
                              # this many: a bound on time, not reached on zoo-dev)
  later_samples: int | None = 10000  # ranked: images that the rankings after the first
                              # read (a fixed random subset holding the confirmation
                              # images, seeded by `seed`); they look for what the first
                              # removals left, on those images. None: every image
                              # (version 6; docs/design.md "Reading fewer images")
  stop_left: float | None = 0.05  # ranked: once at most this share of the removed
                              # tails' confirmation images is still predicted as the
                              # original network did (what the removals so far left of
                              # the backdoor, on the defense set), no further candidate
                              # aimed mostly at those tails is removed and no later
                              # ranking runs; a candidate aimed mostly at other images
                              # (another trigger) is judged as before. None: off
                              # (version 7; docs/design.md "Version 7")
  residual_tail: bool = True  # ranked, ranked_rounds > 1: a later round also tries,
                              # at every unit, the mean difference of the residual tail
                              # (removed-tail images still predicted as the original
                              # network did) and the rest, with the later round's gates
  batch_size: int = 500       # images per forward pass while extracting features
  layers: tuple[str, ...] | None = None  # optional layer names to consider (default: all)
  skip_classifier: bool = True  # never project the last layer's input (class directions)
  # Confirmation (ours, not the paper's): a candidate direction (criterion > tau) is
  # projected only if removing it changes the prediction of most images in its skewed
  # tail (z > tail_z) -- the signature of a sub-population whose label the direction
  # decides. Measured on `confirm_samples` images of the defense set.
  confirm: bool = True         # confirm candidates (False: keep every candidate)
  confirm_samples: int = 5000  # images of the defense set the confirmation uses
  tail_z: float = 2.0          # a direction's tail: images with z-score above this
  min_tail_flip: float = 0.6   # least share of the tail whose prediction it must change
  flip_on: str = "tail"         # ranked, first round: the tail flip measured on the
                               # whole tail ('tail') or on the tail images the network
                               # puts in the tail's majority class ('majority': a small
                               # poisoned group's tail is mostly benign images)
  # Experimental (ranked mode, first round): a candidate whose removal flips too
  # little of its tail is confirmed anyway if adding its tail's mean image difference
  # to other images (an implant) moves at least this share of them into the tail's
  # class, the tail being mostly (80 %) one class: a trigger whose poisoned images keep
  # their labels (clean-label: SIG, CLA), which no removal can flip. Such candidates
  # are removed along the tail less the rest of its class, after the others, while
  # each cuts the implant further. Off (None) by default: on the dev SIG model it
  # leaves 9.6 % ASR for 2.4 ACC points (docs/design.md).
  min_implant: float | None = None
  # ... and only if it changes at most this share of the predictions outside its
  # tail (measured on up to 1,000 of the confirmation images): a removal that moves
  # many images it is not aimed at is a class direction, not a backdoor's.
  max_collateral: float = 0.15
  # ... and, among the images outside the tail that the network puts in the tail's
  # majority class, at most this share (1.0: off): a class direction moves them all.
  max_class_collateral: float = 0.5
  # Once a direction was kept, a later candidate is tried only if at least this share
  # of its tail lies in the tails already removed: the same sub-population, not a
  # class surfacing once the poison direction is gone. None: off.
  tail_overlap: float | None = 0.5
  # Sequential, input side: a kept direction is also removed from the later layers
  # (the classifier included) that read the same channels through identity shortcuts
  # -- per-channel correlation of the two inputs over images, less that of unmatched
  # channels, at least `carry_link` -- where that flips at least half of the tail
  # images whose prediction the removals so far left unchanged. Layers that read the
  # very same tensor (e.g. a 1x1 shortcut conv beside a block's first conv) are tried
  # first, even if the model calls them earlier.
  carry: bool = True
  carry_link: float = 0.3  # the least channel link (above) for carrying a direction
  seed: int = 0            # random seed of the confirmation's image sample

  def __post_init__(self) -> None:
    _validate(self)
    if self.layers is not None:
      object.__setattr__(self, "layers", tuple(self.layers))

  @classmethod
  def from_overrides(cls, overrides: Mapping[str, Any] | DRRConfig | None = None
                     ) -> DRRConfig:
    """The defaults with `overrides` (a dict of settings, as `defend(config=...)` takes
    them) applied; a DRRConfig passes as it is. Unknown keys raise DefenseError."""
    if isinstance(overrides, DRRConfig):
      return overrides
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(FIELDS)
    if unknown:
      raise DefenseError(f"unknown DRR setting(s) {sorted(unknown, key=str)}")
    return cls(**overrides)

  def to_dict(self) -> dict[str, Any]:
    """Every setting by name, in definition order, as plain Python values (layers as a
    list): what reports and experiment records store."""
    return {name: _plain(getattr(self, name)) for name in FIELDS}


FIELDS = tuple(f.name for f in dataclasses.fields(DRRConfig))

# Settings added after records were written, each at the value that reproduces the code
# before it (an experimental setting off, a new option at "all" or "as before"): stored
# settings without one were made with that value (`with_added_settings`). A setting
# whose arrival changed what the defaults do (ranked_rounds) is not here.
ADDED_LATER = {"flip_on": "tail", "min_implant": None, "search_samples": None,
               "later_samples": None, "stop_left": None}


# Settings that only mode 'ranked' reads (loop.ranked, ranking.py, Run.later_images):
# another mode runs the same whatever their values.
RANKED_ONLY = ("ranked_rounds", "later_samples", "residual_tail", "flip_on", "min_implant",
               "stop_left")


def settings_read(settings: Mapping[str, Any]) -> dict[str, Any]:
  """Stored or given settings less those that their mode does not read (RANKED_ONLY
  outside mode 'ranked'): two runs whose `settings_read` are equal decide alike."""
  settings = with_added_settings(settings)
  if settings.get("mode") == "ranked":
    return settings
  return {k: v for k, v in settings.items() if k not in RANKED_ONLY}


def with_added_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
  """Stored settings (a record's `config`), with the ADDED_LATER settings that they
  predate at the values that reproduce the code they were made with."""
  return {**{k: v for k, v in ADDED_LATER.items() if k not in settings}, **settings}


def make_config(overrides: Mapping[str, Any] | DRRConfig | None = None) -> DRRConfig:
  """`DRRConfig.from_overrides(overrides)`."""
  return DRRConfig.from_overrides(overrides)


def default_config() -> dict[str, Any]:
  """DRR settings (the defaults, as a plain dict); see docs/design.md for the evidence
  behind each default."""
  return DRRConfig().to_dict()


def _plain(value: Any) -> Any:
  if isinstance(value, tuple):
    return [_plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def _is_real(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _real(name: str, value: Any) -> None:
  if not _is_real(value):
    raise DefenseError(f"{name} must be a number, got {value!r}")


def _integer(name: str, value: Any, strict: bool = False) -> None:
  """An integer, or unless `strict` a float with an integral value (read with int())."""
  if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
    return
  if (not strict and _is_real(value) and math.isfinite(value)
      and float(value).is_integer()):
    return
  raise DefenseError(f"{name} must be an integer, got {value!r}")


def _choice(name: str, value: Any, options: tuple[str, ...]) -> None:
  if not isinstance(value, str) or value not in options:
    raise DefenseError(f"{name} must be one of {options}, got {value!r}")


def _flag(name: str, value: Any) -> None:
  if not isinstance(value, (bool, np.bool_)):
    raise DefenseError(f"{name} must be True or False, got {value!r}")


def _validate(cfg: DRRConfig) -> None:
  """The checks `defend` always made, in the same order and with the same messages, each
  preceded by a type check that names the setting (instead of a raw TypeError)."""
  _choice("side", cfg.side, SIDES)
  _choice("search", cfg.search, tuple(stiefel.SEARCHES))
  _choice("direction", cfg.direction, DIRECTIONS)
  for key in ("keep_mean", "locate", "carry", "residual_tail"):
    _flag(key, getattr(cfg, key))
  _choice("mean_fit", cfg.mean_fit, MEAN_FITS)
  _choice("mode", cfg.mode, MODES)
  if cfg.mode == "ranked" and cfg.confirm is not True:
    raise DefenseError("mode 'ranked' ranks confirmed candidates: it needs confirm=True")
  _choice("pooling", cfg.pooling, features.POOLINGS)
  if (not isinstance(cfg.k, (int, np.integer)) or isinstance(cfg.k, (bool, np.bool_))
      or cfg.k < 1):
    raise DefenseError(f"k must be an integer >= 1, got {cfg.k!r}")
  _real("tau", cfg.tau)
  if not np.isfinite(cfg.tau) or cfg.tau < 0:
    raise DefenseError(f"tau must be finite and >= 0, got {cfg.tau!r}")
  _integer("steps", cfg.steps)
  _real("lr", cfg.lr)
  _integer("batch_size", cfg.batch_size)
  if cfg.steps < 0 or not cfg.lr > 0 or cfg.batch_size < 1:
    raise DefenseError("steps must be >= 0, lr > 0 and batch_size >= 1")
  for key in ("search_samples", "later_samples"):
    value = getattr(cfg, key)
    if value is not None:
      _integer(key, value)
      if int(value) < 2:
        raise DefenseError(f"{key} must be None or an integer >= 2, got {value!r}")
  _integer("rounds", cfg.rounds)
  if int(cfg.rounds) < 1:
    raise DefenseError(f"rounds must be >= 1, got {cfg.rounds!r}")
  _integer("ranked_rounds", cfg.ranked_rounds)
  if int(cfg.ranked_rounds) < 1:
    raise DefenseError(f"ranked_rounds must be >= 1, got {cfg.ranked_rounds!r}")
  _choice("flip_on", cfg.flip_on, FLIP_ON)
  _real("min_tail_flip", cfg.min_tail_flip)
  _integer("confirm_samples", cfg.confirm_samples)
  if not 0.0 <= cfg.min_tail_flip <= 1.0 or cfg.confirm_samples < 2:
    raise DefenseError("min_tail_flip must be in [0, 1] and confirm_samples >= 2")
  if cfg.tail_overlap is not None:
    _real("tail_overlap", cfg.tail_overlap)
    if not 0.0 <= cfg.tail_overlap <= 1.0:
      raise DefenseError(f"tail_overlap must be None or in [0, 1], got "
                         f"{cfg.tail_overlap!r}")
  _real("carry_link", cfg.carry_link)
  if not -1.0 <= cfg.carry_link <= 1.0:
    raise DefenseError(f"carry_link must be in [-1, 1], got {cfg.carry_link!r}")
  if cfg.min_implant is not None:
    _real("min_implant", cfg.min_implant)
    if not 0.0 < cfg.min_implant <= 1.0:
      raise DefenseError(f"min_implant must be None or in (0, 1], got "
                         f"{cfg.min_implant!r}")
  if cfg.stop_left is not None:
    _real("stop_left", cfg.stop_left)
    if not 0.0 <= cfg.stop_left <= 1.0:
      raise DefenseError(f"stop_left must be None or in [0, 1], got {cfg.stop_left!r}")
  _real("max_class_collateral", cfg.max_class_collateral)
  if not 0.0 <= cfg.max_class_collateral <= 1.0:
    raise DefenseError("max_class_collateral must be in [0, 1], got "
                       f"{cfg.max_class_collateral!r}")
  _real("max_collateral", cfg.max_collateral)
  if not 0.0 <= cfg.max_collateral <= 1.0:
    raise DefenseError(f"max_collateral must be in [0, 1], got {cfg.max_collateral!r}")
  # settings that were used without a check before
  for key in ("standardize", "confirm", "skip_classifier"):
    _flag(key, getattr(cfg, key))
  _real("tail_z", cfg.tail_z)
  if not np.isfinite(cfg.tail_z):
    raise DefenseError(f"tail_z must be finite, got {cfg.tail_z!r}")
  _integer("seed", cfg.seed, strict=True)
  if cfg.seed < 0:
    raise DefenseError(f"seed must be an integer >= 0, got {cfg.seed!r}")
  if isinstance(cfg.layers, str):
    raise DefenseError(f"layers must be None or a list of layer names, got the string "
                       f"{cfg.layers!r} (one layer: [{cfg.layers!r}])")
  if cfg.layers is not None and (not isinstance(cfg.layers, (list, tuple)) or not all(
      isinstance(name, str) for name in cfg.layers)):
    raise DefenseError(f"layers must be None or a list of layer names, got {cfg.layers!r}")


def field_help() -> dict[str, str]:
  """{setting: its help text}: the comments of `DRRConfig`'s source, read once -- a
  field's own comment (on its line and the indented comment lines under it), then the
  block comment above it where there is one (e.g. the confirmation settings')."""
  import inspect
  import re
  lines = inspect.getsource(DRRConfig).splitlines()
  helps: dict[str, list[str]] = {}
  pending: list[str] = []
  current = None
  field_re = re.compile(r"^  (\w+): [^#=]+=[^#]*?(?:#\s?(.*))?$")
  for line in lines:
    m = field_re.match(line)
    if m and m.group(1) in FIELDS:
      current = m.group(1)
      helps[current] = ([m.group(2).strip()] if m.group(2) else []) + pending
      pending = []
    elif line.strip().startswith("#"):
      text = line.strip()[1:].strip()
      if current is not None and len(line) - len(line.lstrip()) > 2:
        helps[current].append(text)  # the continuation of a field's comment
      else:
        current = None
        pending.append(text)
    elif line.strip().startswith("def "):
      break
  return {k: " ".join(v).replace("... ", "") for k, v in helps.items()}


def settings_markdown() -> str:
  """DRR's settings as a markdown table (setting, default, what it does), generated from
  `DRRConfig` so that the README's copy cannot drift (tests/test_readme.py)."""
  defaults = DRRConfig().to_dict()
  helps = field_help()
  rows = ["| setting | default | what it does |", "|---|---|---|"]
  for name in FIELDS:
    text = helps.get(name, "").replace("|", "\\|")
    rows.append(f"| `{name}` | `{defaults[name]!r}` | {text} |")
  return "\n".join(rows) + "\n"
