"""The entry points end to end on the real zips with the `tiny` preset (seconds)."""
from __future__ import annotations

import json

import pytest

from drr_jax import checkpoint
from launch import defend as launch_defend
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

  # defend it: a bad setting writes nothing, a good one writes a loadable checkpoint
  out = tmp_path / "defended"
  with pytest.raises(SystemExit, match="exceeds"):
    launch_defend.main(["--checkpoint", str(work), "--data_dir", real_data_dir, "--out",
                        str(out), "--set", "k=4", "--set", "search='joint'", "--no_test"])
  assert not out.exists()
  res = launch_defend.main(["--checkpoint", str(work), "--data_dir", real_data_dir, "--out",
                            str(out), "--set", "tau=0.0", "--set", "steps=5", "--set", "k=1",
                            "--set", "mode='one_pass'", "--set", "confirm=False",
                            "--no_test"])  # launch.evaluate above covers the test split
  kept = [e["kept"] for e in res["drr"]["layers"]]
  assert res["drr"]["directions_kept"] == sum(kept) > 0
  assert set(res["after"]) == {"val"}
  model, variables, meta, _ = checkpoint.load_model(out)
  assert meta["defense"]["after"]["val"] == res["after"]["val"]
  with pytest.raises(SystemExit, match="already exists"):
    launch_defend.main(["--checkpoint", str(work), "--out", str(out)])


def test_cli_errors_name_the_problem(tmp_path, monkeypatch, capsys):
  monkeypatch.delenv("DRR_DATA_DIR", raising=False)
  with pytest.raises(SystemExit, match="does not exist"):
    launch_evaluate.main(["--checkpoint", str(tmp_path / "missing")])
  with pytest.raises(SystemExit, match="error: No CIFAR-10 folder given.*DRR_DATA_DIR"):
    launch_train.main(["--preset", "tiny", "--workdir", str(tmp_path / "w")])
  with pytest.raises(SystemExit, match="error: .*unknown key"):
    launch_train.main(["--preset", "tiny", "--set", "train.lrr=1", "--workdir", str(tmp_path / "w")])
  from drr_jax.data import DataError
  with pytest.raises(DataError, match="DRR_DATA_DIR"):  # --debug: the error itself
    launch_train.main(["--preset", "tiny", "--workdir", str(tmp_path / "w"), "--debug"])


def test_an_attack_with_its_own_default_ratio_gets_it_unless_one_is_given():
  import argparse

  from launch import common
  p = argparse.ArgumentParser()
  common.add_config_flags(p)
  ratio = lambda argv: common.config_from_flags(p.parse_args(argv))["attack"]["poison_ratio"]
  assert ratio(["--attack", "sig"]) == 0.08
  assert ratio(["--attack", "sig", "--poison_ratio", "0.05"]) == 0.05
  assert ratio(["--attack", "sig", "--set", "attack.poison_ratio=0.03"]) == 0.03
  assert ratio(["--attack", "badnets"]) == 0.1


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "train.epochs must be an integer, >= 1"),
    (["--width", "0"], "model.width must be a number, > 0"),
    (["--set", "train.lr=nan"], "train.lr must be a number"),
    (["--set", "attack.poison_ratio=1.5"], "attack.poison_ratio"),
    (["--model", "nope"], "unknown model 'nope'"),
    (["--set", "nope=1"], "unknown key 'nope'"),
    (["--data_dir", "/nonexistent/cifar"], "/nonexistent/cifar does not exist"),
])
def test_train_refuses_bad_input_in_one_line_before_any_work(flags, message, tmp_path,
                                                              capsys):
  from launch import train as launch_train
  workdir = tmp_path / "run"
  with pytest.raises(SystemExit) as e:
    launch_train.main(["--preset", "tiny", "--workdir", str(workdir), *flags])
  assert str(e.value.code).startswith("error: ") and message in str(e.value.code)
  assert "Traceback" not in capsys.readouterr().err
  assert not workdir.exists()  # nothing written
