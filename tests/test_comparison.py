"""The baselines on a grid's models (`drr_jax.comparison`) and the comparison table
(`report.comparison_markdown`): records per (cell, method), resume, stale settings,
failures logged, and the table's bold, 'better than DRR', budgets and clean controls."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from drr_jax import comparison, experiment, grid, report
from drr_jax import train as train_lib
from launch import experiment as launch_experiment
from tests.conftest import make_fake_zips
from tests.test_experiment import FAST_DRR, FAST_PAPER

# The machinery, not the methods (tests/test_baselines.py tests each one): few steps.
FAST = ["fp.finetune_epochs=1", "rr-fp.finetune_epochs=1", "anp.iterations=3",
        "rr-ep.steps=10", "rr-ep.fit_samples=200", "ep.samples=100", "rr-ep.samples=100"]
CELLS = [grid.Cell("resnet18", 0.125, "badnets", 0.1, 3, "tiny", (("target", 5),), 1,
                   "cmp-badnets"),
         grid.Cell("resnet18", 0.125, "none", 0.0, 4, "tiny", (), 1, "cmp-clean")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The two tiny cells trained, exported, and defended by DRR and the paper mode."""
  root = tmp_path_factory.mktemp("cmp")
  mp = pytest.MonkeyPatch()
  mp.setenv("DRR_CACHE_DIR", str(root / "cache"))
  make_fake_zips(root / "data", per_class=30)
  for c in CELLS:
    experiment.run_cell(c, root / "data", root / "ckpt", root / "results",
                        overrides=[*FAST_DRR, *FAST_PAPER], progress=False,
                        export_root=root / "export")
  yield root
  mp.undo()


def test_every_baseline_gets_a_record_and_a_rerun_redoes_nothing(trained, monkeypatch):
  root = trained
  monkeypatch.setenv("DRR_CACHE_DIR", str(root / "cache"))
  out = comparison.run_baselines(CELLS, comparison.BASELINES, root / "data", root / "ckpt",
                                 root / "results", overrides=FAST, progress=False,
                                 export_root=root / "export")
  names = [f"{c.name}.{m}" for c in CELLS for m in comparison.BASELINES]
  assert out == {"skipped": [], "done": names, "failed": []}
  for c in CELLS:
    for m in comparison.BASELINES:
      rec = json.loads(comparison.record_path(root / "results", c, m).read_text())
      assert comparison.check_record(rec) is None
      assert rec["method"] == m and rec["report"]["method"] == m
      assert set(rec["after"]) == {"val", "test"} and rec["seconds"] > 0
      needs_clean = m in ("fp", "anp", "rr-fp")
      assert (rec["clean_data"] is not None) == needs_clean
      if needs_clean:  # the validation split, never the test set
        assert rec["clean_data"] == {"split": "val", "images": 20}
  # a finished model is reused, and done records are not redone
  monkeypatch.setattr(train_lib, "train", lambda *a, **k: (_ for _ in ()).throw(
      AssertionError("the export must be reused")))
  again = comparison.run_baselines(CELLS, ("clp", "ep"), root / "data", root / "ckpt",
                                   root / "results", overrides=FAST, progress=False,
                                   export_root=root / "export")
  assert again["done"] == [] and len(again["skipped"]) == 4
  # other settings make a record stale: it is redone
  stale = comparison.run_baselines(CELLS[:1], ("clp",), root / "data", root / "ckpt",
                                   root / "results", overrides=["clp.u=2.0"],
                                   progress=False, export_root=root / "export")
  assert stale["done"] == ["cmp-badnets.clp"]

  paths, warnings = report.write_report(root / "results")
  assert not warnings and "comparison" in paths
  text = paths["comparison"].read_text()
  for part in ("| model | backdoored | FP | ANP | CLP | EP | paper DRR | DRR | RR-FP (ours) "
               "| RR-EP (ours) | better than DRR on both |", "`cmp-badnets`", "`cmp-clean`",
               "**mean of 1 backdoored**", "## Data each method uses",
               "- CLP: none (the weights only)", "- FP: 20 labelled clean images",
               "## Seconds per model", "## Clean controls", "`cmp-clean`: FP "):
    assert part in text, part


def test_a_failing_method_is_logged_and_the_others_go_on(trained, monkeypatch):
  root = trained
  monkeypatch.setenv("DRR_CACHE_DIR", str(root / "cache"))
  from drr_jax.defenses import clp

  def broken(*a, **k):
    raise RuntimeError("simulated crash")
  monkeypatch.setattr(clp, "defend", broken)
  results = root / "results-fail"
  out = comparison.run_baselines(CELLS[:1], ("clp", "ep"), root / "data", root / "ckpt",
                                 results, overrides=FAST, progress=False,
                                 export_root=root / "export")
  assert out["failed"] == ["cmp-badnets.clp"] and out["done"] == ["cmp-badnets.ep"]
  err = results / "baselines" / "cmp-badnets.clp.error.txt"
  assert "simulated crash" in err.read_text()
  assert not (results / "baselines" / "cmp-badnets.clp.json").exists()


def test_bad_baseline_settings_fail_before_any_work(tmp_path):
  (tmp_path / "data").mkdir()
  base = ["--grid", "tiny", "--data_dir", str(tmp_path / "data"), "--results",
          str(tmp_path / "r"), "--methods", "clp"]
  with pytest.raises(SystemExit, match="^error: .*'<method>.KEY=VALUE'"):
    launch_experiment.main(base + ["--set", "drr.k=2"])
  with pytest.raises(SystemExit, match="^error: .*"):
    launch_experiment.main(base + ["--set", "clp.nope=2"])
  with pytest.raises(SystemExit, match="do not go together"):
    launch_experiment.main(base + ["--train_only"])
  with pytest.raises(SystemExit, match="--reuse_paper goes with DRR records only"):
    launch_experiment.main(base + ["--reuse_paper"])
  with pytest.raises(ValueError, match="unknown baseline"):
    comparison.baseline_config(grid.get_grid("tiny")[0], "drr")
  assert not (tmp_path / "r").exists()


def _rec(cid, attack, before, drr, paper):
  def m(acc, asr):
    return {"acc": acc, "asr": asr}
  def both(values):
    return {"test": m(*values), "val": m(*values)}
  return {"cell_id": cid, "cell": {"attack": attack}, "before": both(before),
          "after": both(drr), "paper": {"after": both(paper)},
          "times": {"defense_seconds": 10.0, "paper_defense_seconds": 5.0},
          "date": "2026-12-06T00:00:00+00:00", "machine": "m", "git": {"commit": "abc"}}


def _base(cid, method, acc, asr, clean=None):
  after = {"acc": acc, "asr": asr}
  return {"cell_id": cid, "method": method, "after": {"test": after, "val": after},
          "seconds": 3.0, "clean_data": clean, "date": "2026-12-06T00:00:00+00:00",
          "machine": "m", "git": {"commit": "abc"}}


def test_the_table_bolds_the_best_and_names_who_beats_drr():
  recs = [_rec("a", "badnets", (0.80, 1.0), (0.78, 0.05), (0.70, 0.02)),
          _rec("c", "none", (0.81, None), (0.81, None), (0.75, None))]
  bases = {("a", "clp"): _base("a", "clp", 0.79, 0.04),   # better than DRR on both
           ("a", "fp"): _base("a", "fp", 0.79, 0.50, {"split": "val", "images": 2500}),
           ("c", "clp"): _base("c", "clp", 0.80, None)}
  table = report.comparison_table(recs, bases)
  row = next(line for line in table.splitlines() if line.startswith("| `a`"))
  # FP keeps the most ACC of the defenses with CLP (79.00, both bold); paper the lowest ASR
  assert row == ("| `a` | 80.00 / 100.00 | **79.00** / 50.00 | **79.00** / 4.00 | "
                 "70.00 / **2.00** | 78.00 / 5.00 | CLP |")
  clean = next(line for line in table.splitlines() if line.startswith("| `c`"))
  assert "**81.00** / –" in clean  # DRR kept the clean model's ACC: the best
  text = report.comparison_markdown(recs, bases)
  assert "- FP: 2,500 labelled clean images" in text and "+ fine-tuning" in text
  assert "`c`: CLP -1.00, paper DRR -6.00, DRR +0.00" in text
  assert "(n=1)" in table


def _new(cid, model, attack, before, drr, paper):
  rec = _rec(cid, attack, before, drr, paper)
  rec["cell"] = {"attack": attack, "model": model, "width": 1.0 if model == "wrn28_1"
                 else 0.25, "poison_ratio": 0.08, "seed": 0}
  rec["config"] = {"training": {"attack": {"name": attack, "poison_ratio": 0.08}}}
  from drr_jax.defenses import default_config
  rec["drr"] = {"layers": [], "directions_kept": 0, "layers_projected": [],
                "config": default_config(), "feature_passes": 1, "seconds": 1.0}
  return rec


def test_the_paper_layout_groups_models_marks_best_and_second_and_averages():
  recs = [_new("r-cla", "resnet18", "cla", (0.80, 0.90), (0.79, 0.02), (0.70, 0.01)),
          _new("r-sig", "resnet18", "sig", (0.80, 0.80), (0.78, 0.10), (0.72, 0.05)),
          _new("w-cla", "wrn28_1", "cla", (0.75, 0.95), (0.74, 0.03), (0.65, 0.04)),
          _new("r-wanet", "resnet18", "wanet", (0.8, 0.99), (0.8, 0.01), (0.8, 0.01))]
  bases = {("r-cla", "clp"): _base("r-cla", "clp", 0.78, 0.30)}
  table = report.paper_layout(recs, bases, ("cla", "sig"))
  lines = table.splitlines()
  assert lines[0] == ("| Model | Attack | Backdoored ACC | Backdoored ASR | CLP ACC | "
                      "CLP ASR | paper DRR ACC | paper DRR ASR | DRR ACC | DRR ASR |")
  assert "WaNet" not in table  # Table 2's attack is not in Table 1
  # ResNet-18 x0.25 first (the paper's model order), CLA before SIG; best bold, second
  # underlined among the methods, separately for ACC (higher) and ASR (lower)
  assert lines[2] == ("| ResNet-18 x0.25 | Clean-label (CLA) | 80.00 | 90.00 | <u>78.00</u> | "
                      "30.00 | 70.00 | **1.00** | **79.00** | <u>2.00</u> |")
  assert lines[3].startswith("|  | SIG | 80.00 | 80.00 | – | – |")
  # a per-model average only over the methods run on all its rows; then the overall one
  assert lines[4] == ("|  | *Average* | 80.00 | 85.00 | – | – | <u>71.00</u> | **3.00** "
                      "| **78.50** | <u>6.00</u> |")
  assert lines[5].startswith("| WRN-28-1 | Clean-label (CLA) | 75.00 | 95.00 |")
  assert lines[6].startswith("| **Average** |  | 78.33 | 88.33 | – | – |")
  md = report.zoo_markdown(recs, bases)
  assert "## The paper's Table 1 layout (clean-label attacks), test set" in md
  assert "## The paper's Table 2 layout (attacks that control training), test set" in md


def test_the_paper_layout_labels_a_longer_schedule_and_keeps_it_out_of_the_averages():
  from drr_jax import grid
  short = _new("r-wanet", "resnet18", "wanet", (0.76, 0.60), (0.76, 0.60), (0.74, 0.50))
  longer = _new("r-wanet-e20", "resnet18", "wanet", (0.84, 0.98), (0.83, 0.02),
                (0.80, 0.10))
  iab = _new("r-iab", "resnet18", "iab", (0.80, 0.70), (0.80, 0.10), (0.78, 0.30))
  short["cell"]["epochs"], iab["cell"]["epochs"] = 8, 8
  longer["cell"]["epochs"] = 20
  assert grid.longer_schedule(longer["cell"]) == 20
  assert grid.longer_schedule(short["cell"]) is None
  assert grid.longer_schedule(grid.get_grid("new-attacks")[-1]) == 20
  lines = report.paper_layout([longer, short, iab], {}, ("wanet", "iab")).splitlines()
  assert [line.split(" | ")[1] for line in lines[2:]] == [
      "WaNet", "Input-aware (IAB)", "WaNet (20 epochs)", "*Average*"]
  # the average is over the two 8-epoch cells only: (76 + 80) / 2, (60 + 70) / 2
  assert lines[5].startswith("|  | *Average* | 78.00 | 65.00 |")


def test_misses_name_the_bar_each_model_misses_with_its_per_layer_report():
  recs = [_new("ho-a", "resnet18", "badnets", (0.80, 1.0), (0.79, 0.02), (0.7, 0.0)),
          _new("ho-b", "resnet18", "badnets", (0.80, 1.0), (0.78, 0.02), (0.7, 0.0)),
          _new("new-c", "resnet18", "sig", (0.80, 1.0), (0.78, 0.02), (0.7, 0.0)),
          _new("ho-d", "resnet18", "blended", (0.80, 1.0), (0.80, 0.16), (0.7, 0.0)),
          _new("ho-e", "resnet18", "none", (0.80, None), (0.796, None), (0.7, None))]
  found = {r["cell_id"]: why for r, why in report.misses(recs)}
  # a 1-point drop passes the zoo's 1.5; 2 points miss it but pass the new attacks' 2
  assert found == {"ho-b": "ACC drop 2.00 points (bar 1.5)",
                   "ho-d": "ASR 16.00 % (bar 5)",
                   "ho-e": "a clean model loses 0.40 ACC points (bar 0.3)"}
  text = "\n".join(report.misses_markdown(recs))
  assert "### `ho-d`: ASR 16.00 % (bar 5)" in text and "```" in text
  assert "### `ho-a`" not in text and "### `new-c`" not in text


def test_a_rerun_is_checked_cell_by_cell_against_the_earlier_version():
  def rec(cid, before, drr, losses):
    r = _new(cid, "resnet18", "badnets", before, drr, (0.7, 0.0))
    r["checkpoint"] = {"history": [{"epoch": i + 1, "train_loss": v}
                                   for i, v in enumerate(losses)]}
    return r
  old = [rec("a", (0.83, 1.0), (0.827, 0.026), [1.77, 1.37]),
         rec("b", (0.82, 0.8), (0.824, 0.024), [1.8, 1.4]),
         rec("c", (0.83, 1.0), (0.819, 0.037), [1.7, 1.3]),
         rec("d", (0.83, 1.0), (0.82, 0.03), [1.7, 1.3])]
  new = [rec("a", (0.83, 1.0), (0.822, 0.036), [1.77, 1.37]),   # -0.5 / +1.0: on the bar
         rec("b", (0.82, 0.8), (0.818, 0.01), [1.8, 1.4]),      # -0.6 ACC: misses
         rec("c", (0.84, 1.0), (0.83, 0.048), [1.6, 1.2])]      # +1.1 ASR, other model
  table, missed = report.versus_table(new, old)
  assert missed == ["b", "c"]
  rows = {line.split(" | ")[0][3:-1]: line for line in table.splitlines()
          if line.startswith("| `")}
  assert rows["a"].endswith("| yes | 82.70 / 2.60 | 82.20 / 3.60 | -0.50 | +1.00 | yes | "
                            "0.30 / 0.80 |")
  assert rows["b"].endswith("| -0.60 | -1.40 | **no** | -0.40 / 0.20 |")
  assert " | no | " in rows["c"] and rows["c"].endswith("| +1.10 | **no** | 1.10 / 1.00 |")
  assert "Not re-run yet: `d`." in table
  assert "3 cell(s) compared, 1 within the bar; missed: `b`, `c`." in table


def test_report_against_a_folder_without_records_fails_before_writing(tmp_path):
  results = Path(__file__).resolve().parents[1] / "results" / "zoo-heldout"
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "x.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"no usable record in .*old to compare with: "
                     r"x.json: skipped"):
    report.write_report(results, tmp_path / "out", against=tmp_path / "old")
  assert not (tmp_path / "out").exists()
  paths, _ = report.write_report(results, tmp_path / "out", against=results)
  text = paths["versus"].read_text()
  n = len(report.load_records(results)[0])
  assert f"{n} cell(s) compared, {n} within the bar." in text   # against itself
  assert text.count("| yes | ") == 2 * n  # same model, and within the bar
  assert "Not re-run yet" not in text
