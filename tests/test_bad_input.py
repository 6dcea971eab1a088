"""The rows of docs/bad-input.md that no other test file covers (issue 17): each bad
input is refused in one line `error: ...` naming it, with a non-zero exit and no
traceback, before any long work, and leaves no output behind.

The CLIs run in-process through their main(argv). $DRR_DATA_DIR points at an empty
folder, and the long work a CLI could reach (training, a grid, an evaluation) is replaced
by a stand-in that fails the test, as in tests/test_cli_fuzz.py.
"""
from __future__ import annotations

import errno
import importlib
import json
import os
import shutil
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import serialization

from drr_jax import attacks, checkpoint, configs, evaluate, experiment, train
from tests.conftest import make_fake_zips

ROOT = Path(__file__).resolve().parent.parent
CKPT = ROOT / "artifacts" / "wrn28_1-badnets-cpu"  # committed, small
HERE = Path(__file__).parent
NET = f"{HERE / 'tiny_net.py'}:TinyNet"
ARGS = '{"num_classes": 4}'
# When one array of a damaged checkpoint cannot be read, orbax leaves its reads of the
# others unawaited; they are collected during whichever test runs next.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


class ReachedWork(BaseException):
  """A bad input got past every check: the CLI started the long work."""


def _reached(*args, **kwargs):
  raise ReachedWork("the command went on to the long work")


@pytest.fixture
def env(tmp_path, monkeypatch):
  """A cwd, an empty $DRR_DATA_DIR, and no long work reachable."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  (tmp_path / "empty").mkdir()
  monkeypatch.setenv("DRR_DATA_DIR", str(tmp_path / "empty"))
  monkeypatch.setenv("DRR_CACHE_DIR", str(tmp_path / "cache"))
  for module, name in [(train, "train"), (experiment, "run_grid"),
                       (evaluate, "evaluate"), (evaluate, "predict")]:
    monkeypatch.setattr(module, name, _reached)
  return tmp_path


def _files(root: Path) -> set[str]:
  return {str(p.relative_to(root)) for p in root.rglob("*")}


def _error(cli: str, argv: list[str], capsys) -> str:
  """The one line `error: ...` that launch.<cli> exits with (no traceback)."""
  with pytest.raises(SystemExit) as e:
    importlib.import_module(f"launch.{cli}").main([str(a) for a in argv])
  code = e.value.code
  assert isinstance(code, str), f"exit code {code!r} without an error line"
  assert code.startswith("error: ") and "\n" not in code.strip(), code
  assert "Traceback" not in capsys.readouterr().err
  return code


def _unwritable(folder: Path, monkeypatch) -> Path:
  """A folder nobody may write: its mode says so; root ignores modes, so for root the
  writability test (os.access) is told so too."""
  folder.mkdir()
  folder.chmod(0o500)
  if os.geteuid() == 0:
    real = os.access

    def access(path, mode, *args, **kwargs):
      inside = os.path.abspath(path) == str(folder) or os.path.abspath(path).startswith(
          f"{folder}{os.sep}")
      return False if inside and mode & os.W_OK else real(path, mode, *args, **kwargs)
    monkeypatch.setattr(os, "access", access)
  return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """tests/tiny_net.py (4 classes) with its variables as msgpack (and with a NaN), and
  16x16 images as .npz: with labels in range, above it, and none at all."""
  sys.path.insert(0, str(HERE))
  from tiny_net import TinyNet
  sys.path.remove(str(HERE))
  root = tmp_path_factory.mktemp("tiny")
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
  labels = np.arange(24) % 4
  variables = jax.device_get(TinyNet(num_classes=4).init(jax.random.key(0), images[:1]))
  (root / "net.msgpack").write_bytes(serialization.to_bytes(variables))
  nan = jax.tree.map(np.array, variables)
  nan["params"]["conv1"]["kernel"][0, 0, 0, 0] = np.nan
  (root / "nan.msgpack").write_bytes(serialization.to_bytes(nan))
  np.savez(root / "train.npz", images=images, labels=labels)
  np.savez(root / "labels7.npz", images=images, labels=labels + 7)
  np.savez(root / "empty.npz", images=images[:0], labels=labels[:0])
  return {"root": root, "model": TinyNet(num_classes=4), "variables": variables,
          "images": images, "labels": labels,
          "own": ["--model", NET, "--model_args", ARGS, "--variables",
                  root / "net.msgpack", "--images", root / "train.npz"]}


def _copy_ckpt(tmp_path: Path, name: str) -> tuple[Path, Path]:
  """A copy of the committed checkpoint and its step folder."""
  dst = tmp_path / name
  shutil.copytree(CKPT, dst)
  return dst, next((dst / "checkpoints").iterdir())


# ------------------------------------------------------------------- paths given wrong

def test_a_zip_given_as_the_data_folder_is_named_as_a_file(env, capsys):
  """--data_dir .../cifar10-train.zip: 'is a file, not a folder' (and its folder), not
  'does not exist', from every CLI that reads CIFAR-10; nothing written."""
  data = env / "data"
  data.mkdir()
  zipped = data / "cifar10-train.zip"
  zipped.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip
  before = _files(env)
  for cli, argv in [("train", ["--preset", "tiny", "--workdir", env / "run"]),
                    ("evaluate", ["--checkpoint", CKPT]),
                    ("defend", ["--checkpoint", CKPT, "--out", env / "out"]),
                    ("experiment", ["--grid", "tiny", "--results", env / "res"])]:
    msg = _error(cli, [*argv, "--data_dir", zipped], capsys)
    assert f"{zipped} is a file, not a folder" in msg and f"({data})" in msg, msg
  assert _files(env) == before


def test_a_damaged_or_missing_zip_from_each_cli(env, capsys):
  """A zip member that is no JPEG, and a missing zip: one line naming the member or the
  zip, from launch.train, evaluate and defend; no run folder or --out is made."""
  make_fake_zips(env / "bad-train", damage="train/cat/0001.jpg")
  make_fake_zips(env / "bad-test", damage="test/dog/0000.jpg")
  make_fake_zips(env / "no-test")
  (env / "no-test" / "cifar10-test.zip").unlink()
  for cli, argv, data, text in [
      ("train", ["--preset", "tiny", "--workdir", env / "run"], "bad-train",
       "member train/cat/0001.jpg is damaged"),
      ("evaluate", ["--checkpoint", CKPT], "bad-test", "member test/dog/0000.jpg is damaged"),
      ("defend", ["--checkpoint", CKPT, "--out", env / "out"], "bad-train",
       "member train/cat/0001.jpg is damaged"),
      ("evaluate", ["--checkpoint", CKPT], "no-test", "cifar10-test.zip is missing"),
  ]:
    msg = _error(cli, [*argv, "--data_dir", env / data], capsys)
    assert text in msg, msg
  assert not (env / "run").exists() and not (env / "out").exists()


def test_a_file_given_as_the_checkpoint_is_named_as_a_file(env, capsys):
  """--checkpoint <a file>: 'is a file, not a folder', not 'does not exist'."""
  file = env / "model.msgpack"
  file.write_bytes(b"\x80")
  for cli in ("evaluate", "defend"):
    msg = _error(cli, ["--checkpoint", file, *(["--out", env / "out"] if cli == "defend"
                                               else [])], capsys)
    assert f"{file} is a file, not a folder" in msg, msg
  assert not (env / "out").exists()
  with pytest.raises(checkpoint.CheckpointError, match="is a file, not a folder"):
    checkpoint.load_model(file)


# ------------------------------------------------------------------ damaged checkpoints

def test_a_truncated_array_file_names_its_item_without_the_store_spec(tmp_path, capsys):
  """Half of the largest model data file cut off: one line naming item 'model', without
  TensorStore's spec."""
  bad, step = _copy_ckpt(tmp_path, "truncated")
  files = [p for p in (step / "model").rglob("*") if p.is_file()]
  data = max(files, key=lambda p: p.stat().st_size)
  os.truncate(data, data.stat().st_size // 2)
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.load_model(bad)
  msg = str(e.value)
  assert "item 'model'" in msg and "\n" not in msg, msg
  assert "TensorStore" not in msg and "tensorstore_spec" not in msg and len(msg) < 700
  assert "item 'model'" in _error("evaluate", ["--checkpoint", bad], capsys)


def test_a_deleted_manifest_blames_the_model_not_the_attack(tmp_path, capsys):
  """model/manifest.ocdbt deleted: the error names item 'model' (it named 'attack')."""
  bad, step = _copy_ckpt(tmp_path, "no-manifest")
  (step / "model" / "manifest.ocdbt").unlink()
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.load_model(bad)
  msg = str(e.value)
  assert "item 'model'" in msg and "'attack'" not in msg and "\n" not in msg, msg
  assert "tensorstore_spec" not in msg


def test_a_checkpoint_of_another_width_names_the_parameter(tmp_path, capsys):
  """A meta record naming width 0.5 beside width-1 arrays: the first parameter that
  does not fit is named, with its shape, in one line."""
  bad, step = _copy_ckpt(tmp_path, "width")
  meta_file = step / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  meta["config"]["model"]["width"] = 0.5
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"does not fit the model: .*\['params'\]\['\w+'\]"):
    checkpoint.load_model(bad)
  msg = _error("evaluate", ["--checkpoint", bad], capsys)
  assert "['params']" in msg or "['batch_stats']" in msg, msg


# ------------------------------------------------------- clean runs, leftover tmp folders

def test_attack_none_trains_saves_and_reruns_over_a_leftover_tmp_folder(tmp_path):
  """--attack none saves epoch 1 (an empty poison record) and loads, in a run folder
  where a killed save left '<step>.orbax-checkpoint-tmp-*' behind; poison ratio 0 saves
  and restores its record too."""
  cfg = configs.get_config("tiny")
  cfg["attack"]["name"] = "none"
  cfg["train"].update(epochs=1, batch_size=32)
  configs.validate(cfg)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (64, 32, 32, 3)).astype(np.uint8)
  labels = (np.arange(64) % 10).astype(np.int32)
  from drr_jax import data
  debris = tmp_path / "run" / "checkpoints" / "2.orbax-checkpoint-tmp-1234" / "model"
  debris.mkdir(parents=True)
  (debris / "half-written").write_bytes(b"\0" * 10)
  train.train(cfg, attacks.poison(images, labels, cfg["attack"]),
              data.Split(images[:8], labels[:8]), tmp_path / "run", progress=False)
  _, _, meta, record = checkpoint.load_model(tmp_path / "run")
  assert len(checkpoint.poison_indices(record)) == 0 and len(meta["history"]) == 1
  assert not list((tmp_path / "run").rglob("*orbax-checkpoint-tmp*"))
  zero = {**cfg["attack"], "name": "badnets", "poison_ratio": 0.0}
  configs.validate({**cfg, "attack": zero})
  rec = train.attack_record(attacks.poison(images, labels, zero))
  checkpoint.save(checkpoint.manager(tmp_path / "zero", keep=1), 1, {"attack": rec})
  back = checkpoint.restore(tmp_path / "zero", {"attack": None})["attack"]
  assert len(checkpoint.poison_indices(back)) == 0


# ----------------------------------------------------------------------- output folders

def test_an_output_folder_that_exists_is_refused_and_left_alone(env, capsys):
  """launch.train's --workdir holding a run and launch.defend's --out: refused before
  anything is loaded (the data folder is empty), and nothing in them changes."""
  run = env / "run"
  (run / "checkpoints").mkdir(parents=True)
  out = env / "out"
  out.mkdir()
  (out / "mine.txt").write_text("keep me")
  before = _files(env)
  msg = _error("train", ["--preset", "tiny", "--workdir", run], capsys)
  assert f"--workdir {run} already holds a run" in msg
  msg = _error("defend", ["--checkpoint", CKPT, "--out", out], capsys)
  assert f"--out {out} already exists" in msg
  assert _files(env) == before


def test_an_unwritable_output_folder_is_refused_before_any_work(env, capsys, monkeypatch):
  """Every CLI's output under a folder it cannot write: one line naming the flag, before
  the data (absent here) or the checkpoint is read; nothing written."""
  ro = _unwritable(env / "ro", monkeypatch)
  before = _files(env)
  cases = [
      ("train", ["--preset", "tiny", "--workdir", ro / "run"], "--workdir"),
      ("defend", ["--checkpoint", CKPT, "--out", ro / "out"], "--out"),
      ("defend", ["--model", NET, "--model_args", ARGS, "--variables", env / "none",
                  "--images", env / "none", "--out", ro / "o.msgpack"], "--out"),
      ("experiment", ["--grid", "tiny", "--results", ro / "res"], "--results"),
      ("experiment", ["--grid", "tiny", "--results", env / "res", "--ckpt_root",
                      ro / "ckpt"], "--ckpt_root"),
      ("report", ["--results", env / "empty", "--out", ro / "rep"], "--out"),
  ]
  for cli, argv, flag in cases:
    msg = _error(cli, argv, capsys)
    assert msg.startswith(f"error: {flag} ") and "not writable" in msg, msg
  assert _files(env) == before
  ro.chmod(0o700)


def _identity_defense(monkeypatch, launch_defend):
  """The defense returns the variables as they are (the writer is what is tested)."""
  real = launch_defend.get_defense
  report = {"seconds": 0.0}
  monkeypatch.setattr(launch_defend, "get_defense", lambda name: real(name)._replace(
      defend=lambda model, variables, batch, config=None, clean=None: (variables, report),
      format_report=lambda r: "(report)"))


def _enospc(*args, **kwargs):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_named_and_leaves_no_output(tmp_path, monkeypatch, capsys, tiny):
  """The disk fills while the defended model is written (simulated: ENOSPC from the
  writer): one line naming --out, and neither --out nor a temporary file is left, for a
  msgpack file and for a run folder (whose checkpoint was already written)."""
  from launch import defend as launch_defend
  _identity_defense(monkeypatch, launch_defend)
  work = tmp_path / "work"
  work.mkdir()
  monkeypatch.setattr(os, "fsync", _enospc)  # the msgpack writer syncs before renaming
  out = work / "net-drr.msgpack"
  msg = _error("defend", [*tiny["own"], "--out", out], capsys)
  assert msg == f"error: cannot write --out {out}: No space left on device", msg
  assert _files(work) == set()
  monkeypatch.undo()

  # a run folder: the checkpoint is saved, then result.json fills the disk
  _identity_defense(monkeypatch, launch_defend)
  from drr_jax import utils
  x = np.zeros((4, 32, 32, 3), np.uint8)
  split = types.SimpleNamespace(images=x, labels=np.zeros(4, np.int32))
  monkeypatch.setattr(launch_defend.datasets, "load", lambda *a, **k: types.SimpleNamespace(
      train=split, val=split, test=None))
  monkeypatch.setattr(launch_defend, "_metrics", lambda *a, **k: {"acc": 0.5, "asr": 0.5})

  def half_written(path, obj):
    Path(path).write_text('{"method": ')
    _enospc()
  monkeypatch.setattr(utils, "write_json_atomic", half_written)
  out = work / "defended"
  msg = _error("defend", ["--checkpoint", CKPT, "--out", out, "--no_test"], capsys)
  assert msg == f"error: cannot write --out {out}: No space left on device", msg
  assert _files(work) == set()


# ------------------------------------------------------------- settings, names, widths

def test_settings_of_the_wrong_kind_from_the_clis(env, capsys):
  """DRR settings from --set (NaN, strings, a layer name for the list): one line naming
  the setting, before the checkpoint's data (absent) is read or the grid starts."""
  for cli, argv, name in [
      ("defend", ["--set", "tau=nan"], "tau"),
      ("defend", ["--set", "tau='high'"], "tau"),
      ("defend", ["--set", "steps='5'"], "steps"),
      ("defend", ["--set", "layers='conv'"], "layers"),
      ("experiment", ["--set", "drr.tau=-1"], "tau"),
      ("experiment", ["--set", "drr.tau=nan"], "tau"),
  ]:
    base = (["--checkpoint", CKPT, "--out", env / "out"] if cli == "defend"
            else ["--grid", "tiny", "--results", env / "res"])
    msg = _error(cli, [*base, *argv], capsys)
    assert msg.startswith(f"error: {name} must be"), msg
  assert not (env / "out").exists() and not (env / "res").exists()


def test_unknown_preset_method_attack_and_model(env, capsys):
  """From the CLIs: one line 'error: ...' naming the value (exit 2 from argparse for the
  flags with fixed choices, 1 for the rest); from the API: an error
  naming the value and the choices."""
  for cli, argv in [("train", ["--preset", "nope"]), ("train", ["--attack", "nope"]),
                    ("defend", ["--method", "nope"]), ("defend", ["--preset", "nope"]),
                    ("experiment", ["--grid", "nope"])]:
    with pytest.raises(SystemExit) as e:
      importlib.import_module(f"launch.{cli}").main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'nope'" in err, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
  base = ["--preset", "tiny", "--workdir", env / "run"]
  assert "unknown model 'nope'" in _error("train", [*base, "--model", "nope"], capsys)
  assert "unknown attack 'nope'" in _error("train", [*base, "--set", "attack.name='nope'"],
                                           capsys)
  assert not (env / "run").exists()
  from drr_jax.defenses import DefenseError, get_defense
  from drr_jax.models import get_model
  with pytest.raises(ValueError, match="unknown preset 'nope'"):
    configs.get_config("nope")
  with pytest.raises(DefenseError, match="unknown defense 'nope'"):
    get_defense("nope")
  with pytest.raises(ValueError, match="unknown attack 'nope'"):
    attacks.resolve({"name": "nope"})
  with pytest.raises(ValueError, match="unknown model 'nope'"):
    get_model("nope")


def test_width_changes_wrn28_1_and_densenet121():
  """--width reaches the two models that ignored it: both change size with it."""
  from drr_jax.models import get_model

  def count(name, width):
    model = get_model(name, width=width)
    v = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                          np.zeros((1, 32, 32, 3), np.uint8)))
    return sum(x.size for x in jax.tree.leaves(v["params"]))
  for name in ("wrn28_1", "densenet121"):
    assert count(name, 0.25) < count(name, 0.5), name


# --------------------------------------------------------------- the user's own assets

def test_labels_out_of_range_are_refused(tiny, tmp_path, capsys):
  """Labels that are no class of the model (a 4-class net given labels 7..10, --target
  9): one line naming the flag, from the CLI; a DefenseError from the API (FP)."""
  out = tmp_path / "out.msgpack"
  for extra, text in [
      (["--clean_eval", tiny["root"] / "labels7.npz"], "--clean_eval"),
      (["--triggered_eval", tiny["root"] / "train.npz", "--target", "9"], "--target"),
      (["--method", "fp", "--clean_data", tiny["root"] / "labels7.npz"], "--clean_data"),
  ]:
    msg = _error("defend", [*tiny["own"], *extra, "--out", out], capsys)
    assert msg.startswith(f"error: {text}") and "must be in 0..3" in msg, msg
  assert not out.exists()
  from drr_jax.defenses import DefenseError, get_defense
  with pytest.raises(DefenseError, match=r"clean labels must be in 0..3 .*got 7..10"):
    get_defense("fp").defend(tiny["model"], tiny["variables"], tiny["images"],
                             clean=(tiny["images"], tiny["labels"] + 7), progress=False)


def test_nan_params_and_an_empty_image_set_from_the_cli(tiny, tmp_path, capsys):
  """--variables holding a NaN: the parameter is named before the defense starts; an
  empty --images file: refused as empty; nothing written."""
  own = tiny["own"]
  out = tmp_path / "out.msgpack"
  msg = _error("defend", [*own[:5], tiny["root"] / "nan.msgpack", *own[6:], "--out", out],
               capsys)
  assert "NaN or Inf in ['params']['conv1']['kernel']" in msg, msg
  msg = _error("defend", [*own[:7], tiny["root"] / "empty.npz", "--out", out], capsys)
  assert "non-empty" in msg and "empty.npz" in msg, msg
  assert not out.exists()
