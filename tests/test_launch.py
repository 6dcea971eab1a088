"""The entry points end to end on the real zips with the `tiny` preset (seconds)."""
from __future__ import annotations

import json

import pytest

from launch import evaluate as launch_evaluate
from launch import train as launch_train


def test_train_then_evaluate_cli(real_data_dir, real_cifar, session_cache, tmp_path,
                                 monkeypatch):
  monkeypatch.setenv("DRR_CACHE_DIR", str(session_cache))
  work = tmp_path / "run"
  result = launch_train.main(["--preset", "tiny", "--attack", "blended", "--data_dir",
                              real_data_dir, "--workdir", str(work)])
  saved = json.loads((work / "result.json").read_text())
  assert saved["test"] == result["test"]
  assert 0.0 <= result["test"]["acc"] <= 1.0 and 0.0 <= result["test"]["asr"] <= 1.0
  metrics = launch_evaluate.main(["--checkpoint", str(work), "--data_dir", real_data_dir])
  # the tiny preset evaluates a 256-image test subset, launch.evaluate the full set
  assert 0.0 <= metrics["acc"] <= 1.0
  with pytest.raises(SystemExit, match="already holds a run"):
    launch_train.main(["--preset", "tiny", "--data_dir", real_data_dir, "--workdir", str(work)])


def test_cli_errors_name_the_problem(tmp_path, monkeypatch, capsys):
  monkeypatch.delenv("DRR_DATA_DIR", raising=False)
  with pytest.raises(SystemExit, match="does not exist"):
    launch_evaluate.main(["--checkpoint", str(tmp_path / "missing")])
  from drr_jax.data import DataError
  with pytest.raises(DataError, match="DRR_DATA_DIR"):
    launch_train.main(["--preset", "tiny", "--workdir", str(tmp_path / "w")])
  with pytest.raises(KeyError, match="unknown key"):
    launch_train.main(["--preset", "tiny", "--set", "train.lrr=1", "--workdir", str(tmp_path / "w")])
