"""One experiment-grid cell end to end, and a resumable loop over a grid (issue 5).

A cell: train (or reuse a finished checkpoint) -> ACC/ASR on val and test -> DRR ->
ACC/ASR again, plus the analysis (`drr_jax.analysis`: C of Assumption 2 per layer, tau
sweep on val) from one feature pass. Each cell ends in one JSON record,
`<results>/<cell_id>.json`, written atomically. A record is trusted only if it parses,
says status 'done' in this schema, and was made with the config the cell asks for now;
anything else (missing, truncated, stale) is redone, so a killed grid restarts where it
stopped.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from drr_jax import (adversary, analysis, attacks, checkpoint, configs, data, datasets,
                     evaluate, features, utils)
from drr_jax import train as train_lib
from drr_jax.defenses import drr
from drr_jax.defenses.paper import paper_config
from drr_jax.defenses.drr.config import settings_read, with_added_settings
from drr_jax.grid import Cell, cell_config, cell_id

SCHEMA = 1
OVERRIDABLE = ("drr", "paper", "analysis")  # sections --set may change; training is fixed


def experiment_config(cell: Cell, overrides: Sequence[str] = ()) -> dict[str, Any]:
  """Everything a cell's record depends on: {'training', 'drr', 'analysis'}, with
  'drr.KEY=VALUE' / 'analysis.KEY=VALUE' overrides applied; as its JSON would read back."""
  for item in overrides:
    if item.partition(".")[0] not in OVERRIDABLE:
      raise KeyError(f"override {item!r}: only {OVERRIDABLE} settings can be set for a "
                     "grid (a cell's training config is fixed by the grid)")
  # Zoo cells (named ones) skip the analysis (C per layer, tau sweep): it needs the poison
  # indices and a second feature pass, and the zoo's tables do not show it.
  cfg = {"training": cell_config(cell), "drr": drr.default_config(),
         "paper": {**drr.default_config(), **paper_config()},
         "analysis": None if cell.name else {"taus": list(analysis.TAUS)}}
  cfg = configs.override(cfg, list(overrides))
  for section in ("drr", "paper"):  # bad settings fail here, before any training
    drr.make_config(cfg[section])
  if cfg["analysis"] is not None:
    taus = cfg["analysis"]["taus"]
    if not (isinstance(taus, (list, tuple)) and taus and all(
        isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
        for t in taus)):
      raise ValueError(f"analysis.taus must be a non-empty list of finite numbers, got "
                       f"{taus!r}")
  return json.loads(json.dumps(utils.jsonable(cfg)))


def record_path(results_dir: str | os.PathLike, cell: Cell) -> Path:
  return Path(results_dir) / f"{cell_id(cell)}.json"


REQUIRED = ("cell_id", "cell", "config", "before", "after", "drr", "analysis", "times",
            "machine", "date")


def check_record(rec: Any, required: Sequence[str] = REQUIRED) -> str | None:
  """What makes a parsed record unusable (not an object, another schema, not 'done', a
  field of `required` missing), or None when it is complete."""
  if not isinstance(rec, dict):
    return "not a JSON object"
  if rec.get("schema") != SCHEMA:
    return f"schema {rec.get('schema')!r}, expected {SCHEMA}"
  if rec.get("status") != "done":
    return f"status {rec.get('status')!r}"
  missing = [k for k in required if k not in rec]
  if missing:
    return f"fields {missing} missing"
  return None


def read_record(path: str | os.PathLike, required: Sequence[str] = REQUIRED
                ) -> tuple[dict[str, Any] | None, str | None]:
  """(the record at path, None), or (None, what makes it unusable: unparsable, or
  `check_record`'s reason)."""
  try:
    rec = json.loads(Path(path).read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    return None, f"cannot parse ({type(e).__name__}: {e})"
  problem = check_record(rec, required)
  return (None, problem) if problem else (rec, None)


def record_status(path: str | os.PathLike, config: dict[str, Any]) -> str:
  """'done' if the record at path can be trusted for `config`; else 'missing' or a reason
  starting with 'invalid' (unreadable, wrong schema, unfinished) or 'stale' (made with
  another config)."""
  path = Path(path)
  if not path.is_file():
    return "missing"
  rec, problem = read_record(path)
  if problem:
    return f"invalid: {problem}"
  if not same_config(rec.get("config"), config):
    return "stale: made with another config"
  return "done"


def same_config(stored: Any, config: dict[str, Any]) -> bool:
  """Whether a record's config is `config`, its DRR sections read with the settings
  added since at the values that reproduce the code it was made with
  (`drr.config.ADDED_LATER`)."""
  if not isinstance(stored, dict):
    return False
  stored = dict(stored)
  for section in ("drr", "paper"):
    if isinstance(stored.get(section), dict):
      stored[section] = with_added_settings(stored[section])
  return stored == config


def reusable_paper(path: str | os.PathLike, config: dict[str, Any],
                   history: Sequence[Any], train_sha256: str
                   ) -> dict[str, Any] | None:
  """The paper-DRR part of the record at path (its `paper` block, with the seconds it
  took and the checkout and date it came from), when that record ran the same paper
  settings on the same training (config and epoch history) and data (the training
  zip's sha256); else None (also when absent or unreadable). Settings that the paper's
  mode does not read (`settings_read`: those of the ranked mode, some added after the
  record) do not count. What a record made for another `drr` section can lend to the
  new one: the paper mode reads none of the `drr` settings."""
  rec, problem = read_record(path)
  if problem:
    return None
  old = rec.get("config") or {}
  if old.get("training") != config["training"] or not isinstance(old.get("paper"), dict):
    return None
  if settings_read(old["paper"]) != settings_read(config["paper"]):
    return None
  if utils.jsonable(list(history)) != (rec.get("checkpoint") or {}).get("history"):
    return None
  if (rec.get("data") or {}).get("train_zip_sha256") != train_sha256:
    return None
  paper, seconds = rec.get("paper"), (rec.get("times") or {}).get("paper_defense_seconds")
  if not isinstance(paper, dict) or seconds is None:
    return None
  source = paper.get("reused_from") or {"git": rec.get("git"), "date": rec.get("date")}
  return {**paper, "reused_from": source, "seconds": float(seconds)}


def is_done(path: str | os.PathLike, config: dict[str, Any]) -> bool:
  """Whether the record at path is complete and was made with `config`."""
  return record_status(path, config) == "done"


def finished_meta(workdir: str | os.PathLike, config: dict[str, Any]
                  ) -> dict[str, Any] | None:
  """The meta record of a checkpoint in workdir that trained `config` for all its epochs,
  or None (absent, unreadable, another config, or unfinished)."""
  ckpt = Path(workdir) / "checkpoints"
  if not ckpt.is_dir():
    return None
  try:
    meta = checkpoint.restore(ckpt, {"meta": None})["meta"]
  except checkpoint.CheckpointError:
    return None
  if not attacks.same_training_config(meta.get("config") or {}, config):
    return None
  if len(meta.get("history", [])) < config["train"]["epochs"]:
    return None
  return meta


def lacks_samples(folder: str | os.PathLike) -> bool:
  """Whether the checkpoint in folder holds an IAB record exported without its recorded
  samples (`checkpoint.export_variables(samples=False)`, the committed form): it gives
  the model and the trigger, not the training set a defense reads."""
  try:
    rec = checkpoint.restore(Path(folder) / "checkpoints", {"attack": None})["attack"]
  except checkpoint.CheckpointError:
    return False
  return bool(rec and "iab_generator" in rec and "iab_rows" not in rec
              and np.any(rec.get("poison_mask", False)))


def reuse_folder(exported: str | os.PathLike, workdir: str | os.PathLike,
                 config: dict[str, Any]) -> Path:
  """The finished checkpoint to reuse, given a finished export: the export, unless it
  lacks IAB's recorded samples and the training checkpoint in workdir, which has them,
  is finished too (then a rerun can still rebuild the defense set)."""
  if lacks_samples(exported) and finished_meta(workdir, config) is not None:
    return Path(workdir)
  return Path(exported)


def train_cell(cell: Cell, data_dir: str | os.PathLike | None,
               ckpt_root: str | os.PathLike, export_root: str | os.PathLike | None = None,
               *, cache_dir: str | os.PathLike | None = None, progress: bool = True
               ) -> Path:
  """Trains a cell's model (resuming in <ckpt_root>/<cell_id>) unless a finished
  checkpoint for its config exists there or in <export_root>/<cell_id>; exports the
  variables-only copy to <export_root>/<cell_id> when that is given. Returns the folder
  holding the finished checkpoint (the export where there is one)."""
  tcfg = cell_config(cell)
  cid = cell_id(cell)
  workdir = Path(ckpt_root) / cid
  exported = Path(export_root) / cid if export_root is not None else None
  if exported is not None and finished_meta(exported, tcfg) is not None:
    return reuse_folder(exported, workdir, tcfg)
  if finished_meta(workdir, tcfg) is None:
    ds = datasets.load(tcfg, data_dir, cache_dir, test=False, attacker_model=(
        None if exported is None else adversary.beside(exported)))
    train_lib.train(tcfg, ds.base, ds.val, workdir, resume=True, progress=progress)
  if exported is None:
    return workdir
  if exported.exists():  # debris of an export killed midway, or of another config
    import shutil
    shutil.rmtree(exported)
  return checkpoint.export_variables(workdir, exported)


def metrics(model, variables, ds: datasets.Datasets, trigger, acfg, batch_size: int,
            progress: bool) -> dict[str, dict[str, float]]:
  """{'val': {'acc', 'asr'}, 'test': {...}} of a model's variables."""
  out = {}
  for name, split in (("val", ds.val), ("test", ds.test)):
    out[name] = evaluate.evaluate(model, variables, split, trigger, acfg, batch_size,
                                  progress=progress)
  return out


def run_cell(cell: Cell, data_dir: str | os.PathLike | None,
             ckpt_root: str | os.PathLike, results_dir: str | os.PathLike, *,
             overrides: Sequence[str] = (), cache_dir: str | os.PathLike | None = None,
             progress: bool = True, git: dict[str, Any] | None = None,
             export_root: str | os.PathLike | None = None,
             reuse_paper: bool = False) -> dict[str, Any]:
  """Runs one cell and writes its record; returns the record. `git` is the checkout state
  of the code that runs (default: taken now, before the cell starts). The model comes
  from `train_cell` (a finished checkpoint is reused, an export preferred). With
  `reuse_paper`, the paper-DRR part of the cell's old record is kept when that record
  ran the same paper settings on the same model (`reusable_paper`; the record says so
  in `paper.reused_from`): a new DRR version is then reported without rerunning it."""
  t_cell = time.time()
  git = git if git is not None else utils.git_commit()
  cfg = experiment_config(cell, overrides)
  tcfg, dcfg = cfg["training"], cfg["drr"]
  cid = cell_id(cell)
  workdir = Path(ckpt_root) / cid
  times: dict[str, float] = {}

  reused = (finished_meta(workdir, tcfg) is not None or (
      export_root is not None and finished_meta(Path(export_root) / cid, tcfg) is not None))
  t0 = time.time()
  workdir = train_cell(cell, data_dir, ckpt_root, export_root, cache_dir=cache_dir,
                       progress=progress)
  if not reused:
    times["train_wall_seconds_this_run"] = time.time() - t0
  model, variables, meta, attack_rec = checkpoint.load_model(workdir)
  # IAB's training set is the one its record holds (what the final epoch trained on)
  ds = datasets.load(tcfg, data_dir, cache_dir, record=attack_rec,
                     attacker_model=adversary.beside(workdir))
  if not np.array_equal(checkpoint.poison_indices(attack_rec), ds.train.poison_idx):
    raise checkpoint.CheckpointError(
        f"{workdir}: its poison indices differ from the data loaded now (another data "
        "copy or attack code?); move the checkpoint away to retrain")
  times["train_seconds"] = float(sum(h["seconds"] for h in meta["history"]
                                    + meta.get("mask_history", [])))  # IAB's mask phase
  acfg = tcfg["attack"]
  trigger = ds.train.trigger if acfg["name"] != "none" else None
  bs = int(tcfg["train"]["eval_batch_size"])

  t0 = time.time()
  evaluate.predict(model, variables, ds.train.images, bs, progress, "plain pass")
  times["plain_pass_seconds"] = time.time() - t0
  t0 = time.time()
  before = metrics(model, variables, ds, trigger, acfg, bs, progress)
  times["evaluate_seconds"] = time.time() - t0

  t0 = time.time()
  defended, report = drr.defend(model, variables, ds.train.images, config=dcfg,
                                progress=progress)
  times["defense_seconds"] = time.time() - t0
  after = metrics(model, defended, ds, trigger, acfg, bs, progress)
  del defended

  train_sha256 = data.file_sha256(data.resolve_data_dir(data_dir) / "cifar10-train.zip")
  old_paper = (reusable_paper(record_path(results_dir, cell), cfg, meta["history"],
                              train_sha256) if reuse_paper else None)
  if old_paper is not None:
    times["paper_defense_seconds"] = old_paper.pop("seconds")
    paper = old_paper
  else:
    t0 = time.time()
    defended, paper_report = drr.defend(model, variables, ds.train.images,
                                        config=cfg["paper"], progress=progress)
    times["paper_defense_seconds"] = time.time() - t0
    paper = {"after": metrics(model, defended, ds, trigger, acfg, bs, progress),
             "drr": paper_report}
    del defended

  result = None
  if cfg["analysis"] is not None:
    result, seconds = _analysis(model, variables, ds, trigger, acfg, dcfg, cfg, progress)
    times.update(seconds)
  times["cell_wall_seconds"] = time.time() - t_cell

  record = {
      "schema": SCHEMA, "status": "done", "cell_id": cid, "cell": cell._asdict(),
      "config": cfg, "seed": cell.seed,
      "data": {"num_train": len(ds.train.labels), "num_poisoned": len(ds.train.poison_idx),
               "num_val": len(ds.val.labels), "num_test": len(ds.test.labels),
               "train_zip_sha256": train_sha256},
      "checkpoint": {"dir": str(workdir), "reused": reused,
                     "epochs": len(meta["history"]), "history": meta["history"]},
      "before": before, "after": after, "drr": report, "paper": paper, "analysis": result,
      "times": times, "machine": utils.machine_description(), "git": git,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  record = utils.jsonable(record)
  utils.write_json_atomic(record_path(results_dir, cell), record)
  return record


def _analysis(model, variables, ds, trigger, acfg, dcfg, cfg, progress):
  """C of Assumption 2 per layer and the tau sweep (`drr_jax.analysis`), and its times."""
  times = {}
  t0 = time.time()
  if dcfg["side"] == "sites":  # the analysis is per layer: the paper's view, its input side
    dcfg = {**dcfg, "side": "input"}
  order = features.layer_order(model, variables, ds.train.images.shape[1:])
  feats = drr.extract(model, variables, ds.train.images, tuple(order),
                      outputs=dcfg["side"] == "output", pooling=dcfg["pooling"],
                      batch_size=int(dcfg["batch_size"]), progress=progress,
                      desc="analysis features")
  times["analysis_feature_pass_seconds"] = time.time() - t0
  result = analysis.analyze(model, variables, feats, order, ds.train.poison_idx, ds.val,
                            trigger, acfg, dcfg, taus=cfg["analysis"]["taus"],
                            progress=progress)
  del feats
  times["analysis_seconds"] = time.time() - t0
  return result, times


def run_grid(cells: Sequence[Cell], data_dir: str | os.PathLike | None,
             ckpt_root: str | os.PathLike, results_dir: str | os.PathLike, *,
             overrides: Sequence[str] = (), cache_dir: str | os.PathLike | None = None,
             progress: bool = True, export_root: str | os.PathLike | None = None,
             train_only: bool = False, reuse_paper: bool = False
             ) -> dict[str, list[str]]:
  """Runs every cell whose record is not done, in order; a failing cell is logged to
  `<results>/<cell_id>.error.txt` and the grid goes on. Returns the cell ids by outcome:
  {'skipped', 'done', 'failed'}. With `train_only`, each cell is only trained and
  exported (`train_cell`), and no record is written; `reuse_paper`: see `run_cell`."""
  # The code this process runs is the checkout as it was now; later edits do not reach it.
  git = utils.git_commit()
  results_dir = Path(results_dir)
  results_dir.mkdir(parents=True, exist_ok=True)
  outcome: dict[str, list[str]] = {"skipped": [], "done": [], "failed": []}
  bar = tqdm(cells, desc="grid", disable=not progress)
  for cell in bar:
    cid = cell_id(cell)
    bar.set_postfix_str(cid)
    path = record_path(results_dir, cell)
    err_path = results_dir / f"{cid}.error.txt"
    status = record_status(path, experiment_config(cell, overrides))
    if train_only:
      status = "missing"
    if status == "done":
      outcome["skipped"].append(cid)
      continue
    if status != "missing":
      tqdm.write(f"{cid}: the record {path} is not usable ({status}); redoing the cell")
    try:
      if train_only:
        train_cell(cell, data_dir, ckpt_root, export_root, cache_dir=cache_dir,
                   progress=progress)
      else:
        run_cell(cell, data_dir, ckpt_root, results_dir, overrides=overrides,
                 cache_dir=cache_dir, progress=progress, git=git, export_root=export_root,
                 reuse_paper=reuse_paper)
    except Exception as e:  # noqa: BLE001 - one failing cell must not stop the grid
      err_path.write_text(traceback.format_exc())
      tqdm.write(f"{cid}: FAILED ({type(e).__name__}: {e}); traceback in {err_path}")
      outcome["failed"].append(cid)
      continue
    err_path.unlink(missing_ok=True)
    outcome["done"].append(cid)
  return outcome
