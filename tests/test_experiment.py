"""The experiment-grid machinery (issue 5): the analysis on synthetic arrays, and the
'tiny' grid end to end on fake zips (train -> DRR -> records -> resume -> report)."""
from __future__ import annotations

import datetime
import json
import math

import numpy as np
import pytest

from drr_jax import analysis, experiment, grid, report
from drr_jax import train as train_lib
from launch import experiment as launch_experiment
from launch import report as launch_report
from tests.conftest import make_fake_zips

# Small DRR and analysis settings: the point is the machinery, not the defense.
# The pipeline, not the selection, is under test here: DRR with one direction per unit
# on the last stage's layers only (the defaults' ranked landscape at every site and
# k = 4 costs about a minute per tiny cell on this CPU).
FAST_DRR = ["drr.steps=20", "drr.confirm_samples=64", "drr.k=1",
            "drr.layers=['stage4_block1/conv1','stage4_block1/conv2','stage4_block2/conv1',"
            "'stage4_block2/conv2']"]
FAST_PAPER = ["paper.steps=20", "paper." + FAST_DRR[-1][len("drr."):]]
TINY_SETS = [a for kv in FAST_DRR + FAST_PAPER for a in ("--set", kv)] + [
    "--set", "analysis.taus=[1.0,2.0,3.0]"]


def _strict_json(text: str):
  """json.loads that refuses NaN/Infinity (not JSON, though Python writes them)."""
  def refuse(name):
    raise ValueError(f"non-standard JSON constant {name}")
  return json.loads(text, parse_constant=refuse)


def test_separation_constant_matches_the_analytic_value():
  rng = np.random.default_rng(0)
  c = 6
  q, _ = np.linalg.qr(rng.normal(size=(c, c)))  # a rotation: eigenvalues stay put
  s1 = np.diag([2.0, 1.0, 1.0, 0.5, 0.5, 0.2])
  s2 = q @ np.diag([3.0, 0.3, 0.3, 0.3, 0.1, 0.1]) @ q.T
  mu2 = np.array([3.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # ||mu1 - mu2||^2 = 10
  benign = rng.multivariate_normal(np.zeros(c), s1, size=100_000)
  poisoned = rng.multivariate_normal(mu2, s2, size=40_000)
  stats = analysis.separation_stats(benign, poisoned)
  assert stats["dist2"] == pytest.approx(10.0, rel=0.01)
  assert stats["lambda_benign"] == pytest.approx(2.0, rel=0.03)
  assert stats["lambda_poisoned"] == pytest.approx(3.0, rel=0.03)
  assert analysis.separation_constant(benign, poisoned) == pytest.approx(10 / 3, rel=0.03)
  # scale-free, as a ratio of squared distance and variance must be
  assert analysis.separation_constant(7 * benign, 7 * poisoned) == pytest.approx(
      stats["C"], rel=1e-9)
  assert math.isnan(analysis.separation_constant(benign, poisoned[:1]))
  with pytest.raises(ValueError, match="expected"):
    analysis.separation_constant(benign, poisoned[:, :3])


def test_frames_above_orthonormalizes_and_drops_duplicates():
  e = np.eye(4)
  near_dup = (e[:, 0] + 0.1 * e[:, 1]) / np.linalg.norm(e[:, 0] + 0.1 * e[:, 1])
  dirs = {"a": {"frame": np.stack([e[:, 0], near_dup, e[:, 2]], 1),
                "values": np.array([3.0, 2.5, 1.5])},
          "b": {"frame": e[:, :1], "values": np.array([0.5])}}
  frames = analysis.frames_above(dirs, 2.0)
  assert list(frames) == ["a"] and frames["a"].shape == (4, 1)  # duplicate dropped
  frames = analysis.frames_above(dirs, 1.0)
  f = frames["a"]
  assert f.shape == (4, 2) and np.allclose(f.T @ f, np.eye(2), atol=1e-6)
  assert analysis.frames_above(dirs, 5.0) == {}


def _check_record(rec: dict, cid: str) -> None:
  assert rec["schema"] == experiment.SCHEMA and rec["status"] == "done"
  assert rec["cell_id"] == cid and rec["config"]["drr"]["steps"] == 20
  for when in ("before", "after"):
    for split in ("val", "test"):
      for k in ("acc", "asr"):
        assert 0.0 <= rec[when][split][k] <= 1.0, (when, split, k)
  assert rec["drr"]["layers"] and rec["drr"]["num_images"] == rec["data"]["num_train"]
  layers = rec["analysis"]["layers"]
  assert [e["index"] for e in layers] == list(range(len(layers)))
  # the analysis is per layer (the paper's view): every conv/dense layer; DRR visits
  # the exact sites of those layers (input or output), one of them the classifier's input
  assert {e["layer"].rsplit(":", 1)[0] for e in rec["drr"]["layers"]} <= {
      e["layer"] for e in layers}
  assert all(e["C"] is not None and e["C"] >= 0 and math.isfinite(e["top_criterion"])
             for e in layers)
  sweep = rec["analysis"]["tau_sweep"]
  assert [s["tau"] for s in sweep] == [1.0, 2.0, 3.0]
  kept = [s["kept"] for s in sweep]
  assert kept == sorted(kept, reverse=True)  # a higher threshold keeps no more
  assert all(0.0 <= s["acc"] <= 1.0 and 0.0 <= s["asr"] <= 1.0 for s in sweep)
  for key in ("train_seconds", "plain_pass_seconds", "defense_seconds",
              "analysis_seconds", "cell_wall_seconds"):
    assert math.isfinite(rec["times"][key]) and rec["times"][key] >= 0, key
  assert rec["machine"] and datetime.datetime.fromisoformat(rec["date"]).tzinfo


def test_tiny_grid_end_to_end_resumes_and_reports(tmp_path, monkeypatch):
  monkeypatch.setenv("DRR_CACHE_DIR", str(tmp_path / "cache"))
  data_dir, results, ckpts = tmp_path / "data", tmp_path / "results", tmp_path / "ckpt"
  make_fake_zips(data_dir, per_class=30)  # 2 validation images of every class
  argv = ["--grid", "tiny", "--data_dir", str(data_dir), "--ckpt_root", str(ckpts),
          "--results", str(results), *TINY_SETS]
  ids = [grid.cell_id(c) for c in grid.get_grid("tiny")]

  # (b) the whole grid: one strict-JSON record per cell, with every field
  out = launch_experiment.main(argv)
  assert out == {"skipped": [], "done": ids, "failed": []}
  paths = {cid: results / f"{cid}.json" for cid in ids}
  for cid, path in paths.items():
    rec = _strict_json(path.read_text())
    _check_record(rec, cid)
    assert rec["checkpoint"]["reused"] is False

  # (c) a second run redoes nothing and trains nothing ...
  def no_training(*args, **kwargs):
    raise AssertionError("a finished checkpoint must be reused, not trained again")
  monkeypatch.setattr(train_lib, "train", no_training)
  stamps = {cid: p.stat().st_mtime_ns for cid, p in paths.items()}
  assert launch_experiment.main(argv) == {"skipped": ids, "done": [], "failed": []}
  assert {cid: p.stat().st_mtime_ns for cid, p in paths.items()} == stamps
  # ... a truncated record is redone (from the cached checkpoint), the other kept
  text = paths[ids[0]].read_text()
  paths[ids[0]].write_text(text[:len(text) // 2])
  assert launch_experiment.main(argv) == {"skipped": ids[1:], "done": ids[:1],
                                          "failed": []}
  redone = _strict_json(paths[ids[0]].read_text())
  _check_record(redone, ids[0])
  assert redone["checkpoint"]["reused"] is True
  assert paths[ids[1]].stat().st_mtime_ns == stamps[ids[1]]

  # records that must not be trusted: unfinished, another schema, another config
  cfg = experiment.experiment_config(grid.get_grid("tiny")[0], TINY_SETS[1::2])
  assert experiment.record_status(paths[ids[0]], cfg) == "done"
  for change, expect in (({"status": "running"}, "invalid"), ({"schema": 0}, "invalid"),
                         ({"config": {**cfg, "drr": {**cfg["drr"], "k": 2}}}, "stale")):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**redone, **change}))
    assert experiment.record_status(bad, cfg).startswith(expect)
  assert experiment.record_status(tmp_path / "absent.json", cfg) == "missing"
  # a record made before a setting that reproduces the code before it (search_samples
  # None) is still done; one made before ranked_rounds (which changed the defaults) is not
  for key, expect in (("search_samples", "done"), ("ranked_rounds", "stale")):
    old = tmp_path / "old.json"
    stored = {s: {k: v for k, v in cfg[s].items() if k != key} for s in ("drr", "paper")}
    old.write_text(json.dumps({**redone, "config": {**cfg, **stored}}))
    assert experiment.record_status(old, cfg).startswith(expect), key

  # (d) the report: Table 1 layout and both figures, byte-identical when re-run, and a
  # broken file in the results folder is skipped
  out_dir = tmp_path / "report"
  written = launch_report.main(["--results", str(results), "--out", str(out_dir)])
  table = written["table"].read_text(encoding="utf-8")
  for part in ("| Attack | ResNet-18 x0.125: Backdoored ACC", "DRR ASR", "**Average**",
               "BadNets (all-to-one)", "Blended", report.CAVEAT, redone["date"][:10],
               "## Poison ratio 10 %"):
    assert part in table, part
  first = {k: p.read_bytes() for k, p in written.items()}
  assert first["fig_C"][:8] == first["fig_tau"][:8] == b"\x89PNG\r\n\x1a\n"
  (results / "junk.json").write_text("{\"schema\": 1, ")
  again = launch_report.main(["--results", str(results), "--out", str(out_dir)])
  assert {k: p.read_bytes() for k, p in again.items()} == first


def test_failing_cells_are_logged_and_the_grid_goes_on(tmp_path, monkeypatch):
  monkeypatch.setenv("DRR_CACHE_DIR", str(tmp_path / "cache"))
  make_fake_zips(tmp_path / "data", per_class=30)

  def broken(*args, **kwargs):
    raise RuntimeError("simulated crash")
  monkeypatch.setattr(train_lib, "train", broken)
  results = tmp_path / "results"
  with pytest.raises(SystemExit) as exit_info:
    launch_experiment.main(["--grid", "tiny", "--data_dir", str(tmp_path / "data"),
                            "--ckpt_root", str(tmp_path / "ckpt"), "--results",
                            str(results), *TINY_SETS])
  assert exit_info.value.code == 1
  for c in grid.get_grid("tiny"):  # both cells were tried
    assert "simulated crash" in (results / f"{grid.cell_id(c)}.error.txt").read_text()
    assert not (results / f"{grid.cell_id(c)}.json").exists()


def test_experiment_cli_errors(tmp_path, monkeypatch):
  monkeypatch.delenv("DRR_DATA_DIR", raising=False)
  with pytest.raises(SystemExit, match="DRR_DATA_DIR"):
    launch_experiment.main(["--grid", "tiny"])
  (tmp_path / "data").mkdir()  # only its existence is checked before these errors
  base = ["--grid", "tiny", "--data_dir", str(tmp_path / "data")]
  with pytest.raises(SystemExit, match="^error: .*only"):  # one line, no traceback
    launch_experiment.main(base + ["--set", "training.train.epochs=2"])
  with pytest.raises(SystemExit, match="^error: .*unknown key"):
    launch_experiment.main(base + ["--set", "drr.kk=2"])
  with pytest.raises(SystemExit, match="no cell"):
    launch_experiment.main(base + ["--only", "densenet"])
  with pytest.raises(SystemExit, match="no usable record"):
    launch_report.main(["--results", str(tmp_path / "empty")])


def test_grids_name_the_issue_cells():
  cells = grid.get_grid("cpu")
  ids = [grid.cell_id(c) for c in cells]
  assert len(set(ids)) == len(ids) == 10  # 2 models x 3 attacks + 2 attacks x 2 ratios
  assert "wrn28_1-badnets-p10-s0" in ids and "resnet18x0.25-blended-p10-s0" in ids
  assert {"wrn28_1-blended-p1-s0", "wrn28_1-badnets-p5-s0"} <= set(ids)
  cfg = grid.cell_config(cells[0])
  assert cfg["model"] == {"name": "resnet18", "width": 0.25}
  assert cfg["train"]["epochs"] == 12 and cfg["preset"] == "cpu"
  with pytest.raises(ValueError, match="unknown grid"):
    grid.get_grid("huge")
  new = grid.get_grid("new-attacks")  # issue 14: three models x CLA, SIG, WaNet, IAB
  longer = [c for c in new if c.epochs != grid._EPOCHS[c.model]]
  new = [c for c in new if c not in longer]
  # a longer schedule repeats a cell (model, attack, ratio, seed) with more epochs
  assert [grid.cell_id(c) for c in longer] == ["new-r18-wanet-p10-e20"]
  assert all(any(c._replace(epochs=None, name=None) == n._replace(epochs=None, name=None)
                 and c.epochs > n.epochs for n in new) for c in longer)
  assert {(c.model, c.attack, c.poison_ratio) for c in new} == {
      (m, a, r) for m in ("resnet18", "preact_resnet18", "wrn28_1")
      for a, r in (("cla", 0.08), ("sig", 0.08), ("wanet", 0.10), ("iab", 0.10))}
  assert len({grid.cell_id(c) for c in new}) == len({c.seed for c in new}) == 12
  # the first nine kept the ids and seeds they had before IAB joined
  assert grid.cell_id(new[0]) == "new-r18-cla-p8" and new[0].seed == 301
  assert [c.seed for c in new if c.attack == "iab"] == [310, 311, 312]
  assert grid.cell_config(new[-1])["attack"]["name"] == "iab"


def test_records_name_the_uncommitted_files_they_ran_with(tmp_path):
  import subprocess

  from drr_jax import utils
  assert utils.git_commit(tmp_path) is None  # not a checkout
  run = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True,
                                  capture_output=True)
  run("init", "-q")
  (tmp_path / "a.py").write_text("x = 1\n")
  (tmp_path / "b.md").write_text("notes\n")
  run("add", ".")
  run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
  clean = utils.git_commit(tmp_path)
  assert clean["dirty"] is False and clean["changed"] == [] and len(clean["commit"]) == 40
  assert report._commit({"git": clean}) == clean["commit"][:10]
  (tmp_path / "b.md").write_text("more notes\n")
  dirty = utils.git_commit(tmp_path)
  assert dirty["dirty"] is True and dirty["changed"] == ["b.md"]
  assert report._commit({"git": dirty}).endswith("(uncommitted changes in b.md)")
  # Records written before the file list existed still read as dirty.
  assert report._commit({"git": {"commit": "f" * 40, "dirty": True}}).endswith(
      "(with uncommitted changes)")


def test_a_grid_records_the_checkout_its_process_started_from(tmp_path, monkeypatch):
  # Edits made while a long grid runs do not reach the running code, so every cell's
  # record must carry the state taken when the grid started, not when the cell ended.
  from drr_jax import utils
  states = iter([{"commit": "a" * 40, "dirty": False, "changed": []},
                 {"commit": "b" * 40, "dirty": True, "changed": ["README.md"]}])
  monkeypatch.setattr(utils, "git_commit", lambda *a, **k: next(states))
  seen = []
  monkeypatch.setattr(experiment, "run_cell", lambda *a, git=None, **k: seen.append(git))
  out = experiment.run_grid(grid.get_grid("tiny"), None, tmp_path / "ckpt",
                            tmp_path / "results", progress=False)
  assert out["done"] == [grid.cell_id(c) for c in grid.get_grid("tiny")]
  assert seen == [{"commit": "a" * 40, "dirty": False, "changed": []}] * 2


def test_zoo_cells_train_export_and_record_both_defenses(tmp_path, monkeypatch):
  """A named (zoo) cell with attack settings, and a clean one: trained once, exported
  (variables only) and reused from the export; the record holds the project's DRR and
  the paper's, and no analysis."""
  from drr_jax import checkpoint
  monkeypatch.setenv("DRR_CACHE_DIR", str(tmp_path / "cache"))
  data_dir = tmp_path / "data"
  make_fake_zips(data_dir, per_class=30)
  cells = [grid.Cell("resnet18", 0.125, "badnets", 0.1, 3, "tiny",
                     (("patch_size", 4), ("position", "tl"), ("target", 5)), 1,
                     "zoo-test-badnets"),
           grid.Cell("resnet18", 0.125, "none", 0.0, 4, "tiny", (), 1, "zoo-test-clean")]
  cfg = grid.cell_config(cells[0])
  assert cfg["attack"]["patch_size"] == 4 and cfg["attack"]["target"] == 5
  assert cfg["attack"]["seed"] == 3 and cfg["train"]["epochs"] == 1
  export = tmp_path / "export"
  out = experiment.run_grid(cells, data_dir, tmp_path / "ckpt", tmp_path / "results",
                            export_root=export, train_only=True, progress=False)
  assert out["done"] == ["zoo-test-badnets", "zoo-test-clean"]
  assert not list((tmp_path / "results").glob("*.json"))  # train_only writes no record
  for c in cells:
    model, variables, meta, rec = checkpoint.load_model(export / c.name)
    assert set(variables) == {"params", "batch_stats"}
    assert "opt" not in checkpoint.manager(export / c.name / "checkpoints",
                                           create=False).item_metadata(
        checkpoint.manager(export / c.name / "checkpoints", create=False).latest_step())
  assert len(checkpoint.poison_indices(rec)) == 0  # the clean cell saved its empty record
  monkeypatch.setattr(train_lib, "train", lambda *a, **k: (_ for _ in ()).throw(
      AssertionError("the export must be reused")))
  rec = experiment.run_cell(cells[0], data_dir, tmp_path / "ckpt2", tmp_path / "results",
                            overrides=[*FAST_DRR, *FAST_PAPER],
                            progress=False, export_root=export)
  assert rec["analysis"] is None and rec["checkpoint"]["reused"] is True
  assert rec["paper"]["drr"]["config"]["confirm"] is False
  assert rec["paper"]["drr"]["config"]["k"] == 1
  assert set(rec["paper"]["after"]) == {"val", "test"}
  # a new DRR version keeps the paper part of the old record (same paper settings, same
  # model) with --reuse_paper, and reruns it when the paper settings differ
  calls = []
  real_defend = experiment.drr.defend
  monkeypatch.setattr(experiment.drr, "defend", lambda *a, config, **k: (
      calls.append(config.get("confirm")), real_defend(*a, config=config, **k))[1])
  new = experiment.run_cell(cells[0], data_dir, tmp_path / "ckpt2", tmp_path / "results",
                            overrides=[*FAST_DRR, *FAST_PAPER, "drr.tau=3.0"],
                            progress=False, export_root=export, reuse_paper=True)
  assert calls == [True]  # the project's DRR only
  assert new["paper"]["reused_from"] == {"git": rec["git"], "date": rec["date"]}
  assert new["paper"]["after"] == rec["paper"]["after"]
  assert new["times"]["paper_defense_seconds"] == rec["times"]["paper_defense_seconds"]
  assert new["config"]["drr"]["tau"] == 3.0
  path = experiment.record_path(tmp_path / "results", cells[0])
  history, sha = new["checkpoint"]["history"], new["data"]["train_zip_sha256"]
  assert experiment.reusable_paper(path, new["config"], history, sha) is not None
  assert experiment.reusable_paper(path, new["config"], history, "0" * 64) is None
  assert experiment.reusable_paper(path, new["config"], history[:-1] + [
      {**history[-1], "train_loss": -1.0}], sha) is None  # another training run
  calls.clear()
  other = experiment.run_cell(cells[0], data_dir, tmp_path / "ckpt2",
                              tmp_path / "results",
                              overrides=[*FAST_DRR, *FAST_PAPER, "paper.tau=3.0"],
                              progress=False, export_root=export, reuse_paper=True)
  assert calls == [True, False] and "reused_from" not in other["paper"]
  monkeypatch.setattr(experiment.drr, "defend", real_defend)
  # the zoo report: one row per model, the paper's DRR beside the project's, the controls
  experiment.run_cell(cells[1], data_dir, tmp_path / "ckpt2", tmp_path / "results",
                      overrides=[*FAST_DRR, *FAST_PAPER], progress=False,
                      export_root=export)
  paths, warnings = report.write_report(tmp_path / "results")
  assert not warnings and set(paths) == {"table", "fig_zoo"}
  table = paths["table"].read_text()
  assert "`zoo-test-badnets`" in table and "BadNets 4x4 random tl, target 5, 10 %" in table
  assert "paper DRR ACC / ASR" in table and "**mean of 1 backdoored**" in table
  assert "## Clean controls" in table and "`zoo-test-clean`: DRR" in table
  assert paths["fig_zoo"].stat().st_size > 1000


def test_the_report_names_the_new_attacks():
  def text(**attack):
    return report._attack_text({"config": {"training": {"attack": attack}}})
  assert text(name="cla", poison_ratio=0.08, target=2) == (
      "Clean-label (CLA), target 2, 8 % of the set")
  assert text(name="sig", poison_ratio=0.08) == "SIG, target 0, 8 % of the set"
  assert text(name="wanet", poison_ratio=0.1) == "WaNet k 4 s 0.5, target 0, 10 % per batch"


def test_the_report_says_which_paper_figures_were_reused():
  rec = {"date": "2026-12-07T00:00:00+00:00", "machine": "m",
         "git": {"commit": "a" * 40, "dirty": False}, "paper": {"after": {}}}
  assert not any("--reuse_paper" in line for line in report.provenance([rec]))
  reused = {**rec, "paper": {"after": {}, "reused_from": {
      "git": {"commit": "b" * 40, "dirty": False}, "date": "2026-12-06T00:00:00+00:00"}}}
  lines = report.provenance([rec, reused])
  assert any("1 record(s) come from an earlier run" in line and "bbbbbbbbbb" in line
             for line in lines), lines


def test_the_report_names_records_made_with_earlier_defaults():
  now = experiment.experiment_config(grid.get_grid("tiny")[0])["drr"]
  base = {"date": "2026-12-07T00:00:00+00:00", "machine": "m",
          "git": {"commit": "a" * 40, "dirty": False}}
  current = {**base, "cell_id": "today", "config": {"drr": now}}
  older = {**base, "cell_id": "older", "config": {"drr": {**now, "lr": 0.1}}}
  baseline = {**base, "cell_id": "fp-run", "method": "fp", "config": {"fp": {}}}
  assert report.earlier_defaults([current, older, older, baseline]) == ["older"]
  assert not any("earlier version" in line for line in report.provenance([current]))
  assert any("1 record(s)" in line and "`older`" in line and "earlier version" in line
             for line in report.provenance([current, older]))
