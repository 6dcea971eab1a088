"""Experiment grids (issue 5): named lists of cells, each one backdoored training run.

A cell is (model, width, attack, poison ratio, seed, preset); its training config is the
preset's (`configs.get_config`) with those five values put in, so two grids that share
a cell share its checkpoint and its record.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from drr_jax import configs


class Cell(NamedTuple):
  model: str           # 'resnet18' | 'wrn28_1' | 'densenet121'
  width: float         # ResNet-18 width multiplier (1.0 for the others)
  attack: str          # 'badnets' | 'badnets_a2a' | 'blended'
  poison_ratio: float  # share of the training set poisoned
  seed: int            # training seed (init, batch order, augmentation)
  preset: str          # training schedule of drr_jax/configs.py


ATTACKS = ("badnets", "badnets_a2a", "blended")


def _cpu_grid() -> list[Cell]:
  """ResNet-18 x0.25 and WRN-28-1 x 3 attacks at 10 %; BadNets and Blended on WRN-28-1
  at 5 % and 1 %; all on the `cpu` schedule."""
  cells = [Cell(m, w, a, 0.1, 0, "cpu")
           for m, w in (("resnet18", 0.25), ("wrn28_1", 1.0)) for a in ATTACKS]
  cells += [Cell("wrn28_1", 1.0, a, r, 0, "cpu")
            for a in ("badnets", "blended") for r in (0.05, 0.01)]
  return cells


def _tiny_grid() -> list[Cell]:
  """Two cells of the `tiny` preset (one model, two attacks): tests and smoke runs."""
  return [Cell("resnet18", 0.125, a, 0.1, 0, "tiny") for a in ("badnets", "blended")]


GRIDS = {"cpu": _cpu_grid, "tiny": _tiny_grid}


def get_grid(name: str) -> list[Cell]:
  """The cells of a named grid, in the order they run."""
  if name not in GRIDS:
    raise ValueError(f"unknown grid {name!r}; choose one of {tuple(GRIDS)}")
  return GRIDS[name]()


def model_tag(model: str, width: float) -> str:
  """'wrn28_1', 'resnet18x0.25': a model and its width, as used in file names."""
  return model if width == 1.0 else f"{model}x{width:g}"


def cell_id(cell: Cell) -> str:
  """A file-name-safe name, e.g. 'wrn28_1-badnets-p10-s0' (non-`cpu` presets appended)."""
  tag = (f"{model_tag(cell.model, cell.width)}-{cell.attack}"
         f"-p{100 * cell.poison_ratio:g}-s{cell.seed}")
  return tag if cell.preset == "cpu" else f"{tag}-{cell.preset}"


def cell_config(cell: Cell) -> dict[str, Any]:
  """The training config of a cell: its preset with model, attack, ratio and seed set."""
  cfg = configs.get_config(cell.preset)
  cfg["model"] = {"name": cell.model, "width": float(cell.width)}
  cfg["attack"].update(name=cell.attack, poison_ratio=float(cell.poison_ratio))
  cfg["seed"] = int(cell.seed)
  return cfg
