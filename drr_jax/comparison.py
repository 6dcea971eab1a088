"""The baselines (FP, ANP, CLP, EP, RR-FP, RR-EP) on a grid's models: one record per
(cell, method), `<results>/baselines/<cell_id>.<method>.json` (issue 15).

Each record holds the model's ACC / ASR on the validation and test splits before and
after the method, the method's report and settings, the clean data it was given and its
wall-clock seconds. Methods that need clean data get the clean validation split (5 % of
the training set, held out from training), never the test set. DRR and the paper mode
live in the cell's own record (`drr_jax.experiment`); `report.comparison_markdown` puts
them side by side. A record is trusted only if it is complete and was made with the
settings asked for now, so a killed run restarts where it stopped.
"""
from __future__ import annotations

import datetime
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from tqdm.auto import tqdm

from drr_jax import adversary, checkpoint, configs, datasets, utils
from drr_jax.defenses import get_defense
from drr_jax import experiment
from drr_jax.experiment import SCHEMA, metrics, train_cell
from drr_jax.grid import Cell, cell_config, cell_id

BASELINES = ("fp", "anp", "clp", "ep", "rr-fp", "rr-ep")
REQUIRED = ("cell_id", "cell", "method", "config", "before", "after", "report",
            "clean_data", "seconds", "machine", "date")


def baseline_config(cell: Cell, method: str, overrides: Sequence[str] = ()
                    ) -> dict[str, Any]:
  """{'training': the cell's config, 'method': name, 'settings': the method's settings}
  with the '<method>.KEY=VALUE' items of `overrides` applied (others are for other
  methods), checked by the method; as its JSON would read back."""
  if method not in BASELINES:
    raise ValueError(f"unknown baseline {method!r}; choose from {BASELINES} (DRR and the "
                     "paper mode are in every cell's own record)")
  defense = get_defense(method)
  mine = [o for o in overrides if o.partition(".")[0] == method]
  settings = configs.override({method: defense.default_config()}, mine)[method]
  defense.check(settings)
  cfg = {"training": cell_config(cell), "method": method, "settings": settings}
  return json.loads(json.dumps(utils.jsonable(cfg)))


def check_overrides(overrides: Sequence[str], methods: Sequence[str]) -> None:
  """Every --set item must name one of the methods run."""
  for item in overrides:
    if item.partition(".")[0] not in methods:
      raise KeyError(f"override {item!r}: with --methods, settings are "
                     f"'<method>.KEY=VALUE' for one of {tuple(methods)}")


def record_path(results_dir: str | os.PathLike, cell: Cell, method: str) -> Path:
  return Path(results_dir) / "baselines" / f"{cell_id(cell)}.{method}.json"


def check_record(rec: Any) -> str | None:
  """What makes a parsed baseline record unusable, or None when it is complete."""
  return experiment.check_record(rec, REQUIRED)


def is_done(path: Path, config: dict[str, Any]) -> bool:
  """Whether the record at path is complete and was made with `config`."""
  rec, _ = experiment.read_record(path, REQUIRED)
  return rec is not None and rec.get("config") == config


class Model(NamedTuple):
  """A cell's trained model with its data and its ACC / ASR before any defense: loaded
  once, shared by every method run on it."""
  cell: Cell
  workdir: Path
  model: Any
  variables: Any
  ds: datasets.Datasets
  trigger: Any
  before: dict[str, Any]


def load_cell(cell: Cell, data_dir: str | os.PathLike | None, ckpt_root: str | os.PathLike,
              *, cache_dir: str | os.PathLike | None = None, progress: bool = True,
              export_root: str | os.PathLike | None = None) -> Model:
  """The cell's finished model (trained first if there is none), its data, and its ACC /
  ASR on validation and test."""
  tcfg = cell_config(cell)
  workdir = train_cell(cell, data_dir, ckpt_root, export_root, cache_dir=cache_dir,
                       progress=progress)
  model, variables, _, attack_rec = checkpoint.load_model(workdir)
  ds = datasets.load(tcfg, data_dir, cache_dir, record=attack_rec,
                     attacker_model=adversary.beside(workdir))
  trigger = ds.train.trigger if tcfg["attack"]["name"] != "none" else None
  before = metrics(model, variables, ds, trigger, tcfg["attack"],
                   int(tcfg["train"]["eval_batch_size"]), progress)
  return Model(cell, workdir, model, variables, ds, trigger, before)


def run_baseline(loaded: Model, method: str, results_dir: str | os.PathLike, *,
                 config: dict[str, Any], progress: bool = True,
                 git: dict[str, Any] | None = None) -> dict[str, Any]:
  """One method on one loaded model, with its `baseline_config`; writes and returns its
  record."""
  git = git if git is not None else utils.git_commit()
  cell, ds, cfg = loaded.cell, loaded.ds, config
  defense = get_defense(method)
  acfg = cfg["training"]["attack"]
  clean = (ds.val.images, ds.val.labels) if defense.needs_clean else None
  t0 = time.time()
  defended, report = defense.defend(loaded.model, loaded.variables, ds.train.images,
                                    config=cfg["settings"], clean=clean, progress=progress)
  seconds = time.time() - t0
  after = metrics(loaded.model, defended, ds, loaded.trigger, acfg,
                  int(cfg["training"]["train"]["eval_batch_size"]), progress)
  record = {
      "schema": SCHEMA, "status": "done", "cell_id": cell_id(cell), "cell": cell._asdict(),
      "method": method, "config": cfg, "before": loaded.before, "after": after,
      "report": report,
      "clean_data": (None if clean is None else
                     {"split": "val", "images": int(len(ds.val.labels))}),
      "seconds": seconds, "checkpoint": str(loaded.workdir),
      "num_train": int(len(ds.train.labels)), "machine": utils.machine_description(),
      "git": git,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  record = utils.jsonable(record)
  utils.write_json_atomic(record_path(results_dir, cell, method), record)
  return record


def run_baselines(cells: Sequence[Cell], methods: Sequence[str],
                  data_dir: str | os.PathLike | None, ckpt_root: str | os.PathLike,
                  results_dir: str | os.PathLike, *, overrides: Sequence[str] = (),
                  cache_dir: str | os.PathLike | None = None, progress: bool = True,
                  export_root: str | os.PathLike | None = None) -> dict[str, list[str]]:
  """Every (cell, method) whose record is not done, cell by cell; a failure is logged to
  `<results>/baselines/<cell_id>.<method>.error.txt` and the rest goes on. Returns
  '<cell_id>.<method>' names by outcome: {'skipped', 'done', 'failed'}."""
  check_overrides(overrides, BASELINES)
  configs_ = {(cell_id(c), m): baseline_config(c, m, overrides) for c in cells
              for m in methods}  # every setting checked before any work
  git = utils.git_commit()
  outcome: dict[str, list[str]] = {"skipped": [], "done": [], "failed": []}
  todo = [(c, m) for c in cells for m in methods]
  loaded: Model | None = None
  for cell, method in tqdm(todo, desc="baselines", disable=not progress):
    name = f"{cell_id(cell)}.{method}"
    path = record_path(results_dir, cell, method)
    err = path.with_suffix(".error.txt")
    if is_done(path, configs_[cell_id(cell), method]):
      outcome["skipped"].append(name)
      continue
    try:
      if loaded is None or loaded.cell != cell:
        loaded = None  # the previous cell's model and data are freed first
        loaded = load_cell(cell, data_dir, ckpt_root, cache_dir=cache_dir,
                           progress=progress, export_root=export_root)
      run_baseline(loaded, method, results_dir, config=configs_[cell_id(cell), method],
                   progress=progress, git=git)
    except Exception as e:  # noqa: BLE001 - one failing method must not stop the rest
      err.parent.mkdir(parents=True, exist_ok=True)
      err.write_text(traceback.format_exc())
      tqdm.write(f"{name}: FAILED ({type(e).__name__}: {e}); traceback in {err}")
      outcome["failed"].append(name)
      continue
    err.unlink(missing_ok=True)
    outcome["done"].append(name)
  return outcome


def load_records(results_dir: str | os.PathLike
                 ) -> tuple[dict[tuple[str, str], dict[str, Any]], list[str]]:
  """{(cell_id, method): record} of `<results_dir>/baselines/`, and a warning for each
  file skipped."""
  out, warnings = {}, []
  for path in sorted((Path(results_dir) / "baselines").glob("*.json")):
    rec, problem = experiment.read_record(path, REQUIRED)
    if problem:
      warnings.append(f"baselines/{path.name}: skipped, {problem}")
      continue
    out[rec["cell_id"], rec["method"]] = rec
  return out, warnings
