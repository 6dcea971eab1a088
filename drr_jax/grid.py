"""Experiment grids (issue 5): named lists of cells, each one backdoored training run.

A cell is (model, width, attack, poison ratio, seed, preset); its training config is the
preset's (`configs.get_config`) with those five values put in, so two grids that share
a cell share its checkpoint and its record.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from drr_jax import configs


class Cell(NamedTuple):
  model: str           # a name of drr_jax.models.MODELS
  width: float         # channel width multiplier (1.0: the published model)
  attack: str          # 'none' | 'badnets' | 'badnets_a2a' | 'blended'
  poison_ratio: float  # share of the training set poisoned
  seed: int            # training seed (init, batch order, augmentation)
  preset: str          # training schedule of drr_jax/configs.py
  attack_args: tuple = ()  # ((key, value), ...) more attack settings (target, patch...)
  epochs: int | None = None  # the preset's epochs unless set
  name: str | None = None    # the cell's id where it has one (zoo cells)


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


def _zoo(name: str, model: str, width: float, epochs: int, attack: str, ratio: float,
         seed: int, **attack_args) -> Cell:
  return Cell(model, width, attack, ratio, seed, "cpu", tuple(sorted(attack_args.items())),
              epochs, name)


# Epochs per architecture on the CPU (about 30 minutes each at this machine's best measured
# speed, 290 images/s for ResNet-18 x0.25); MobileNetV2 and DenseNet are slower per image
# here, see docs/zoo.md.
_EPOCHS = {"resnet18": 8, "preact_resnet18": 8, "vgg11": 8, "wrn28_1": 5,
           "mobilenet_v2": 5, "densenet121": 4}


def longer_schedule(cell: dict[str, Any] | Cell) -> int | None:
  """A zoo or new-attacks cell's epochs where it trains longer than its architecture's
  zoo schedule (a variant such as `dev-vgg-a2a3-br-p10-e20`), else None; takes a Cell or
  a record's 'cell' dict."""
  c = cell._asdict() if isinstance(cell, Cell) else cell
  standard, epochs = _EPOCHS.get(c["model"]), c.get("epochs")
  return int(epochs) if standard is not None and epochs is not None and (
      int(epochs) > standard) else None


def _z(name, model, width, attack, ratio, seed, **kw) -> Cell:
  return _zoo(name, model, width, _EPOCHS[model], attack, ratio, seed, **kw)


# The zoo split (issue 13), fixed and committed before any DRR setting was chosen on it:
# settings are chosen on zoo-dev's validation images only; zoo-heldout is reported once
# per version of the defaults. Triggers differ between the halves (sizes, places,
# patterns, targets, ratios), and every architecture is in both. The slowest models on
# this CPU (MobileNetV2, DenseNet) come last in each half.
ZOO_DEV = (
    _z("dev-r18-badnets3-br-t0-p10", "resnet18", 0.25, "badnets", 0.10, 101, target=0),
    _z("dev-r18-blend-noise-a20-t3-p10", "resnet18", 0.25, "blended", 0.10, 102,
       target=3, alpha=0.2, blend_pattern="noise"),
    _z("dev-vgg-a2a3-br-p10", "vgg11", 0.25, "badnets_a2a", 0.10, 103),
    _z("dev-pre18-badnets4-white-tl-t5-p5", "preact_resnet18", 0.25, "badnets", 0.05, 104,
       target=5, patch_size=4, pattern="white", position="tl"),
    _z("dev-wrn-blend-smooth-a15-t7-p3", "wrn28_1", 1.0, "blended", 0.03, 105, target=7,
       alpha=0.15, blend_pattern="smooth"),
    _z("dev-r18-clean", "resnet18", 0.25, "none", 0.0, 108),
    _z("dev-mnv2-badnets5-checker-tr-t2-p10", "mobilenet_v2", 0.25, "badnets", 0.10, 106,
       target=2, patch_size=5, pattern="checker", position="tr"),
    _z("dev-dn-blend-noise-a10-t9-p10", "densenet121", 0.25, "blended", 0.10, 107,
       target=9, alpha=0.1, blend_pattern="noise"),
    # Added 2026-12-03, on its backdoored (undefended) validation ASR alone: the
    # all-to-all backdoor of dev-vgg-a2a3-br-p10 did not take in 8 epochs (val ASR 2.28 %,
    # docs/zoo.md); the same model and trigger, trained 20 epochs.
    _zoo("dev-vgg-a2a3-br-p10-e20", "vgg11", 0.25, 20, "badnets_a2a", 0.10, 103),
    # Added 2026-12-06, after version 4's two held-out misses (a faint smooth Blended
    # trigger; 1 % poison), whose kinds the dev half lacked: a smooth Blended trigger that
    # takes (the dev WRN's did not) and a 1 % poisoned model. Other architectures,
    # targets, alphas and pattern seeds than the held-out models; the held-out half is
    # from here on not blind to those two failure kinds (docs/zoo.md).
    _z("dev-pre18-blend-smooth-a12-t2-p10", "preact_resnet18", 0.25, "blended", 0.10, 110,
       target=2, alpha=0.12, blend_pattern="smooth"),
    _z("dev-r18-blend-noise-a20-t6-p1", "resnet18", 0.25, "blended", 0.01, 111, target=6,
       alpha=0.2, blend_pattern="noise"),
    # Added 2026-12-06, after the first new-attacks cell (SIG on ResNet-18) showed that
    # the tail-flip confirmation cannot confirm a clean-label trigger (docs/attacks.md):
    # a clean-label model on which a confirmation for that kind can be chosen. Another
    # target, frequency and seed than the new-attacks cells (target 0, f 6).
    _z("dev-r18-sig-f4-t5-p8", "resnet18", 0.25, "sig", 0.08, 112, target=5, sig_f=4.0),
)
ZOO_HELDOUT = (
    _z("ho-r18-badnets5-bl-t9-p5", "resnet18", 0.25, "badnets", 0.05, 201, target=9,
       patch_size=5, position="bl"),
    _z("ho-r18-blend-smooth-a10-t1-p10", "resnet18", 0.25, "blended", 0.10, 202, target=1,
       alpha=0.1, blend_pattern="smooth"),
    _z("ho-pre18-badnets3-white-br-t0-p10", "preact_resnet18", 0.25, "badnets", 0.10, 203,
       target=0, pattern="white"),
    _z("ho-vgg-blend-noise-a20-t6-p8", "vgg11", 0.25, "blended", 0.08, 204, target=6,
       alpha=0.2, blend_pattern="noise"),
    _z("ho-wrn-badnets4-checker-tr-t8-p10", "wrn28_1", 1.0, "badnets", 0.10, 205, target=8,
       patch_size=4, pattern="checker", position="tr"),
    _z("ho-pre18-blend-noise-a20-t4-p1", "preact_resnet18", 0.25, "blended", 0.01, 206,
       target=4, alpha=0.2, blend_pattern="noise"),
    _z("ho-vgg-clean", "vgg11", 0.25, "none", 0.0, 209),
    _z("ho-mnv2-a2a3-center-p10", "mobilenet_v2", 0.25, "badnets_a2a", 0.10, 207,
       position="center"),
    _z("ho-dn-badnets3-br-t4-p10", "densenet121", 0.25, "badnets", 0.10, 208, target=4),
)


# The paper's other attacks (issue 14) at their papers' ratios, target 0, on the three
# architectures of its Tables 1-2 that this CPU trains: defended with the defaults that
# the zoo fixes, never tuned on. IAB was added after the first nine cells (seeds 310-312),
# so their ids and seeds stay as they were.
_NEW_MODELS = (("r18", "resnet18", 0.25), ("pre18", "preact_resnet18", 0.25),
               ("wrn", "wrn28_1", 1.0))
NEW_ATTACKS = tuple(
    _z(f"new-{tag}-{attack}-p{round(ratio * 100)}", model, width, attack, ratio, seed)
    for seed, (tag, model, width, attack, ratio) in enumerate(
        ((tag, model, width, attack, ratio) for tag, model, width in _NEW_MODELS
         for attack, ratio in (("cla", 0.08), ("sig", 0.08), ("wanet", 0.10))),
        start=301)) + tuple(
    _z(f"new-{tag}-iab-p10", model, width, "iab", 0.10, seed)
    for seed, (tag, model, width) in enumerate(_NEW_MODELS, start=310)) + (
    # WaNet's backdoor took only in part in the `cpu` schedule's 8 epochs (val ASR 62 %,
    # ACC 5.4 points below the clean model; docs/attacks.md): the same cell (model, seed,
    # attack) trained 20 epochs, to tell a short schedule from a weak attack.
    _zoo("new-r18-wanet-p10-e20", "resnet18", 0.25, 20, "wanet", 0.10, 303),
)

GRIDS = {"cpu": _cpu_grid, "tiny": _tiny_grid, "zoo-dev": lambda: list(ZOO_DEV),
         "zoo-heldout": lambda: list(ZOO_HELDOUT), "new-attacks": lambda: list(NEW_ATTACKS)}


def get_grid(name: str) -> list[Cell]:
  """The cells of a named grid, in the order they run."""
  if name not in GRIDS:
    raise ValueError(f"unknown grid {name!r}; choose one of {tuple(GRIDS)}")
  return GRIDS[name]()


def model_tag(model: str, width: float) -> str:
  """'wrn28_1', 'resnet18x0.25': a model and its width, as used in file names."""
  return model if width == 1.0 else f"{model}x{width:g}"


def cell_id(cell: Cell) -> str:
  """A file-name-safe name: the cell's own, or e.g. 'wrn28_1-badnets-p10-s0' (non-`cpu`
  presets appended)."""
  if cell.name:
    return cell.name
  tag = (f"{model_tag(cell.model, cell.width)}-{cell.attack}"
         f"-p{100 * cell.poison_ratio:g}-s{cell.seed}")
  return tag if cell.preset == "cpu" else f"{tag}-{cell.preset}"


def cell_config(cell: Cell) -> dict[str, Any]:
  """The training config of a cell: its preset with model, attack, ratio and seed set."""
  cfg = configs.get_config(cell.preset)
  cfg["model"] = {"name": cell.model, "width": float(cell.width)}
  cfg["attack"].update(name=cell.attack, poison_ratio=float(cell.poison_ratio))
  from drr_jax.attacks import default_settings  # IAB's preset-dependent settings
  cfg["attack"].update(default_settings(cell.attack, cell.preset))
  for key, value in cell.attack_args:
    if key not in cfg["attack"]:
      raise KeyError(f"cell {cell_id(cell)}: unknown attack setting {key!r}")
    cfg["attack"][key] = value
  if cell.epochs is not None:
    cfg["train"]["epochs"] = int(cell.epochs)
  cfg["seed"] = int(cell.seed)
  cfg["attack"]["seed"] = int(cell.seed) if cell.name else cfg["attack"]["seed"]
  return cfg
