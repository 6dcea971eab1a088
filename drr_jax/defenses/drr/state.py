"""The two kinds of state of one defense run, kept apart and explicit.

`Run`: what stays fixed from the first layer to the last (model, settings, images, the
layers to visit, the confirmation subset, how directions are removed). `LoopState`: what
the run accumulates (the tails removed so far, the directions carried into each reader,
the readers of each tensor, the record of carry tries, the tap-coverage cache); stage
functions take it and return an updated copy, never mutating it in place.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import numpy as np

from drr_jax import sites as sites_lib
from drr_jax.defenses.drr.config import DRRConfig
from drr_jax.defenses.drr.confirmation import Confirmer
from drr_jax.defenses.drr.removal import Coverage, Removal


@dataclasses.dataclass(frozen=True)
class Run:
  """The fixed context of one `defend` call."""
  model: nn.Module | Callable
  cfg: DRRConfig
  images: np.ndarray
  order: list[str]             # the layers DRR visits, in call order
  classifier: str              # the model's last layer
  width: Mapping[str, int]     # channels on the projected side, of order and classifier
  removal: Removal
  confirmer: Confirmer | None  # None without confirmation
  original: np.ndarray | None  # the original network's predictions on S, when carrying
  progress: bool
  sites: Mapping[str, sites_lib.Site] = dataclasses.field(default_factory=dict)

  @property
  def n(self) -> int:
    return len(self.images)

  @property
  def outputs(self) -> bool:
    return self.cfg.side == "output"

  def layer_of(self, unit: str) -> str:
    """The layer whose input or output a unit's feature is."""
    return self.sites[unit].layer if unit in self.sites else unit

  def unit_outputs(self, unit: str) -> bool:
    """Whether a unit's feature is a layer output (else the input of its readers)."""
    return self.sites[unit].side == "output" if unit in self.sites else self.outputs

  @property
  def carry(self) -> bool:
    """Whether kept directions are carried to other readers (sequential, input side,
    with confirmation)."""
    return carries(self.cfg, self.confirmer)

  @property
  def readers(self) -> list[str]:
    """The layers that may receive carried directions: those visited, then the classifier."""
    return ([*self.order, self.classifier] if self.classifier not in self.order
            else list(self.order))

  def k(self, name: str) -> int:
    """Directions optimized at a layer: k, at most its width."""
    return min(int(self.cfg.k), self.width[name])

  def search_options(self) -> dict[str, Any]:
    """Keyword arguments of `stiefel.maximize` / `maximize_stacked`, less k."""
    cfg = self.cfg
    return {"steps": int(cfg.steps), "lr": float(cfg.lr),
            "standardize": bool(cfg.standardize), "search": cfg.search}

  def search_rows(self, rows: int, images: int | None = None) -> np.ndarray | None:
    """The rows of a unit's features (`rows` of them over `images` images, by default
    all N; an equal number per image) that the ascent reads: those of a fixed random
    subset of `search_samples` images (seed `seed` + 2; the confirmation uses `seed` and
    `seed` + 1), or None for every row."""
    m, n = self.cfg.search_samples, self.n if images is None else int(images)
    if m is None or int(m) >= n:
      return None
    per = rows // n
    chosen = np.sort(np.random.default_rng(self.cfg.seed + 2).choice(n, int(m),
                                                                      replace=False))
    return (chosen[:, None] * per + np.arange(per)).ravel()

  def later_images(self) -> np.ndarray | None:
    """The defense images (sorted indices) that the rankings after the first read:
    the confirmation images and a fixed random choice of the others (seed `seed` + 3),
    `later_samples` in all; None for every image."""
    m = self.cfg.later_samples
    if m is None or int(m) >= self.n:
      return None
    held = np.zeros(self.n, bool)
    if self.confirmer is not None:
      held[self.confirmer.idx] = True
    others = np.flatnonzero(~held)
    extra = max(0, int(m) - int(held.sum()))
    held[np.random.default_rng(self.cfg.seed + 3).choice(others, min(extra, len(others)),
                                                         replace=False)] = True
    return np.flatnonzero(held)

  def extract_options(self) -> dict[str, Any]:
    """Keyword arguments of `inputs.extract`, less the layers and the progress label."""
    cfg = self.cfg
    return dict(outputs=self.outputs, pooling=cfg.pooling, batch_size=int(cfg.batch_size),
                progress=self.progress, with_means=True)

  def extract(self, variables: Any, units: tuple[str, ...], desc: str = "features",
              images: np.ndarray | None = None):
    """(features, per-image means) of `units` on the network `variables`, over the
    defense images (those at indices `images` when given)."""
    from drr_jax.defenses.drr.inputs import extract_units
    return extract_units(self.model, variables,
                         self.images if images is None else self.images[images], units,
                         dict(self.sites), desc=desc, **self.extract_options())


def carries(cfg: DRRConfig, confirmer: Confirmer | None) -> bool:
  return bool(cfg.carry and cfg.mode == "sequential" and confirmer is not None
              and cfg.side == "input")


class LoopState(NamedTuple):
  """What a run accumulates from layer to layer (replaced, never mutated)."""
  removed_tails: np.ndarray                  # (N,) bool: images in the kept tails so far
  lost: Mapping[str, tuple[np.ndarray, ...]]  # directions carried into each reader
  siblings: Mapping[str, list[str]]          # readers of the same tensor (first pass)
  carried: tuple[dict[str, Any], ...]        # every carry try, kept or not
  coverage: Coverage                         # tap-coverage cache of `Removal.project`

  @classmethod
  def initial(cls, n: int) -> LoopState:
    return cls(removed_tails=np.zeros(n, bool), lost={}, siblings={}, carried=(),
               coverage={})

  def carried_kept(self) -> list[dict[str, Any]]:
    return [c for c in self.carried if c["kept"]]
