"""Nasty argument values for every entry point (launch.*), and each one's --help.

The property: a bad value ends the command at once (before any data is loaded or any
training starts) with a non-zero exit and one line 'error: ...' and no traceback; or it
is argparse's own refusal (exit 2, one line 'error: ...' on stderr). The CLIs are
called in-process through their main(argv). $DRR_DATA_DIR points at an empty folder,
and the long work a CLI could reach (training, a grid, an evaluation) is replaced by a
stand-in that fails the test, so that a value that gets through cannot start anything.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re

import pytest

from drr_jax import evaluate, experiment, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, "artifacts", "wrn28_1-badnets-cpu")  # committed, small
CLIS = ("train", "defend", "evaluate", "experiment", "report")
LONG = "x" * 5000  # longer than any file name (255) and any path (4096)
UNI = "d\u00e9j\u00e0-\u6a21\u578b-\u2603-\U0001f600"


class ReachedWork(BaseException):
  """A value got past every check: the CLI started the long work."""


def _reached(*args, **kwargs):
  raise ReachedWork("the command went on to the long work")


USAGE = "usage"  # expectation: argparse's own error (exit 2)

# (cli, argv, expected text in the error line, or USAGE, or None for any error line).
# {missing}: a path that does not exist; {file}: a file; {empty}: an empty folder; {out}:
# a free path inside a temporary folder; {ckpt}: the committed checkpoint; {work}: a free
# run folder. train gets --preset tiny --workdir {work} first.
CASES = [
    # --- launch.train
    ("train", ["--preset", ""], USAGE),
    ("train", ["--preset", "nope"], USAGE),
    ("train", ["--model", ""], "unknown model"),
    ("train", ["--model", UNI], "unknown model"),
    ("train", ["--model", LONG], "unknown model"),
    ("train", ["--width", "nan"], "model.width"),
    ("train", ["--width", "inf"], "model.width"),
    ("train", ["--width", "1e309"], "model.width"),
    ("train", ["--width", "-1"], "model.width"),
    ("train", ["--width", ""], USAGE),
    ("train", ["--epochs", "nan"], USAGE),
    ("train", ["--epochs", "1e309"], USAGE),
    ("train", ["--epochs", "-1"], "train.epochs"),
    ("train", ["--seed", "-1"], "seed"),
    ("train", ["--poison_ratio", "nan"], "attack.poison_ratio"),
    ("train", ["--poison_ratio", "-1"], "attack.poison_ratio"),
    ("train", ["--poison_ratio", "inf"], "attack.poison_ratio"),
    ("train", ["--attack", ""], USAGE),
    ("train", ["--attack", UNI], USAGE),
    ("train", ["--set", ""], "not of the form"),
    ("train", ["--set", "="], "unknown key"),
    ("train", ["--set", "=1"], "unknown key"),
    ("train", ["--set", "train.lr"], "not of the form"),
    ("train", ["--set", "train..lr=1"], "no config section"),
    ("train", ["--set", "train.lr.x=1"], "no config section"),
    ("train", ["--set", "nope=1"], "unknown key"),
    ("train", ["--set", f"{LONG}=1"], "unknown key"),
    ("train", ["--set", f"train.{UNI}=1"], "unknown key"),
    ("train", ["--set", "train.lr=abc"], "train.lr"),
    ("train", ["--set", "train.lr=nan"], "train.lr"),
    ("train", ["--set", "train.lr=1e309"], "train.lr"),
    ("train", ["--set", "train.lr=-1"], "train.lr"),
    ("train", ["--set", "train.lr=[1, 2]"], "train.lr"),
    ("train", ["--set", "train.lr=(("], "train.lr"),
    ("train", ["--set", "train.epochs=True"], "train.epochs"),
    ("train", ["--set", "train.epochs=2.5"], "train.epochs"),
    ("train", ["--set", "train.batch_size=0"], "train.batch_size"),
    ("train", ["--set", "attack=1"], "section"),
    ("train", ["--set", "model=None"], "section"),
    ("train", ["--set", "train={}"], "section"),
    ("train", ["--set", "attack.name=nope"], "nope"),
    ("train", ["--set", "attack.name="], None),
    ("train", ["--set", "attack.target=-1"], "attack.target"),
    ("train", ["--set", "attack.target=10"], "attack.target"),
    ("train", ["--set", "data.val_fraction=1"], "data.val_fraction"),
    ("train", ["--data_dir", ""], "CIFAR-10"),
    ("train", ["--data_dir", "{missing}"], "does not exist"),
    ("train", ["--data_dir", "{file}"], "not a folder"),
    ("train", ["--data_dir", LONG], None),
    ("train", ["--data_dir", "{empty}"], "missing"),
    ("train", ["--workdir", "{file}"], "--workdir"),
    ("train", ["--workdir", LONG], "--workdir"),
    ("train", ["--workdir", "{file}/sub"], "--workdir"),
    ("train", ["--workdir", ""], "--workdir"),
    # --- launch.evaluate
    ("evaluate", [], USAGE),
    ("evaluate", ["--checkpoint", ""], None),
    ("evaluate", ["--checkpoint", "{missing}"], None),
    ("evaluate", ["--checkpoint", "{file}"], None),
    ("evaluate", ["--checkpoint", "{empty}"], None),
    ("evaluate", ["--checkpoint", UNI], None),
    ("evaluate", ["--checkpoint", LONG], None),
    ("evaluate", ["--checkpoint", "{ckpt}", "--batch_size", "0"], "--batch_size"),
    ("evaluate", ["--checkpoint", "{ckpt}", "--batch_size", "-1"], "--batch_size"),
    ("evaluate", ["--checkpoint", "{ckpt}", "--batch_size", "nan"], USAGE),
    ("evaluate", ["--checkpoint", "{ckpt}", "--batch_size", "1e309"], USAGE),
    ("evaluate", ["--checkpoint", "{ckpt}", "--data_dir", "{file}"], "not a folder"),
    ("evaluate", ["--checkpoint", "{ckpt}", "--data_dir", ""], "CIFAR-10"),
    ("evaluate", ["--checkpoint", "{ckpt}"], "missing"),  # $DRR_DATA_DIR: no zips
    # --- launch.defend (a free --out unless the case is about --out)
    ("defend", ["--method", "nope"], USAGE),
    ("defend", ["--method", ""], USAGE),
    ("defend", ["--preset", "fp"], USAGE),
    ("defend", ["--target", "nan"], USAGE),
    ("defend", ["--max_images", "1e309"], USAGE),
    ("defend", ["--method", "drr", "--preset", "paper"], "disagree"),
    ("defend", ["--checkpoint", ""], "--checkpoint"),
    ("defend", ["--checkpoint", "{missing}"], None),
    ("defend", ["--checkpoint", "{file}"], None),
    ("defend", ["--checkpoint", "{empty}"], None),
    ("defend", ["--checkpoint", UNI], None),
    ("defend", ["--checkpoint", LONG], None),
    ("defend", ["--checkpoint", "{ckpt}", "--model", "pkg:Net"], "give one of"),
    ("defend", ["--checkpoint", "{ckpt}", "--set", ""], "not of the form"),
    ("defend", ["--checkpoint", "{ckpt}", "--set", "="], "unknown key"),
    ("defend", ["--checkpoint", "{ckpt}", "--set", "k"], "not of the form"),
    ("defend", ["--checkpoint", "{ckpt}", "--set", "nope=1"], "unknown key"),
    ("defend", ["--checkpoint", "{ckpt}", "--set", "k.x=1"], "no config section"),
    ("defend", ["--checkpoint", "{ckpt}", "--set", "k=nan"], "k"),
    ("defend", ["--checkpoint", "{ckpt}", "--set", "k=-1"], "k"),
    ("defend", ["--checkpoint", "{ckpt}", "--set", "k=1e309"], "k"),
    ("defend", ["--checkpoint", "{ckpt}", "--set", "k=abc"], "k"),
    ("defend", ["--checkpoint", "{ckpt}", "--set", "tau=inf"], "tau"),
    ("defend", ["--checkpoint", "{ckpt}", "--set", "tau=-1"], "tau"),
    ("defend", ["--checkpoint", "{ckpt}", "--set", f"{UNI}=1"], "unknown key"),
    ("defend", ["--checkpoint", "{ckpt}", "--method", "clp", "--set", "u=nan"], "u"),
    ("defend", ["--checkpoint", "{ckpt}", "--method", "fp", "--set", "nope=1"],
     "unknown key"),
    ("defend", ["--checkpoint", "{ckpt}", "--out", "{file}"], "already exists"),
    ("defend", ["--checkpoint", "{ckpt}", "--data_dir", "{file}"], "not a folder"),
    ("defend", ["--checkpoint", "{ckpt}"], "missing"),  # $DRR_DATA_DIR: no zips
    ("defend", ["--model", ""], "--model"),
    ("defend", ["--model", "pkg:Net"], "--model needs"),
    ("defend", ["--model", "no_such_pkg_xyz.nets:Net", "--variables", "{missing}",
                "--images", "{missing}"], None),
    ("defend", ["--model", "{file}:Net", "--variables", "{file}", "--images", "{file}"],
     None),
    ("defend", ["--model", UNI, "--variables", "{file}", "--images", "{empty}"], None),
    ("defend", ["--model", "pkg:Net", "--model_args", "{not json", "--variables",
                "{file}", "--images", "{empty}"], None),
    ("defend", ["--model", "pkg:Net", "--model_args", "[1, 2]", "--variables",
                "{file}", "--images", "{empty}"], None),
    ("defend", ["--torch_checkpoint", ""], "--torch_checkpoint"),
    ("defend", ["--torch_checkpoint", "{missing}"], "--torch_checkpoint"),
    ("defend", ["--torch_checkpoint", "{file}"], "--torch_checkpoint"),
    ("defend", ["--torch_checkpoint", "{empty}"], "--torch_checkpoint"),
    # --- launch.experiment ($DRR_DATA_DIR is the empty folder; results under {out})
    ("experiment", ["--grid", ""], USAGE),
    ("experiment", ["--grid", "nope"], USAGE),
    ("experiment", ["--data_dir", ""], "CIFAR-10"),
    ("experiment", ["--data_dir", "{missing}"], "does not exist"),
    ("experiment", ["--data_dir", "{file}"], "not a folder"),
    ("experiment", ["--data_dir", LONG], None),
    ("experiment", ["--grid", "tiny", "--only", "zzz"], "no cell"),
    ("experiment", ["--grid", "tiny", "--only", UNI], "no cell"),
    ("experiment", ["--grid", "tiny", "--set", ""], "only"),
    ("experiment", ["--grid", "tiny", "--set", "="], "only"),
    ("experiment", ["--grid", "tiny", "--set", "bad"], "only"),
    ("experiment", ["--grid", "tiny", "--set", "train.lr=1"], "only"),
    ("experiment", ["--grid", "tiny", "--set", "drr"], "not of the form"),
    ("experiment", ["--grid", "tiny", "--set", "drr.nope=1"], "unknown key"),
    ("experiment", ["--grid", "tiny", "--set", "drr.k=-1"], "k"),
    ("experiment", ["--grid", "tiny", "--set", "drr.k=nan"], "k"),
    ("experiment", ["--grid", "tiny", "--set", "drr.tau=1e309"], "tau"),
    ("experiment", ["--grid", "tiny", "--set", "drr=1"], "only"),
    ("experiment", ["--grid", "tiny", "--set", "analysis=None"], "only"),
    ("experiment", ["--grid", "tiny", "--set", "analysis.taus=abc"], "analysis.taus"),
    ("experiment", ["--grid", "tiny", "--set", "analysis.taus=[nan]"], "analysis.taus"),
    ("experiment", ["--grid", "tiny", "--set", "analysis.taus=[]"], "analysis.taus"),
    ("experiment", ["--grid", "tiny", "--results", "{file}"], "--results"),
    ("experiment", ["--grid", "tiny", "--ckpt_root", "{file}"], "--ckpt_root"),
    ("experiment", ["--grid", "tiny", "--ckpt_root", ""], "--ckpt_root"),
    ("experiment", ["--grid", "tiny", "--export", "{file}"], "--export"),
    ("experiment", ["--grid", "tiny", "--results", LONG], "--results"),
    ("experiment", ["--grid", "tiny", "--results", "{file}/sub"], "--results"),
    # --- launch.report
    ("report", ["--results", "{missing}"], None),
    ("report", ["--results", "{file}"], None),
    ("report", ["--results", "{empty}"], "no usable record"),
    ("report", ["--results", ""], None),
    ("report", ["--results", LONG], None),
    ("report", ["--results", UNI], None),
    ("report", ["--results", "{junk}"], "no usable record"),
    ("report", ["--results", "{empty}", "--out", "{file}"], "--out"),
    ("report", ["--results", "{empty}", "--out", ""], "--out"),
    ("report", ["--results", "{empty}", "--out", LONG], "--out"),
]


@pytest.fixture
def paths(tmp_path, monkeypatch):
  cwd = tmp_path / "cwd"  # relative defaults (runs/, results/) land here
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  empty = tmp_path / "empty"
  empty.mkdir()
  file = tmp_path / "a_file.txt"
  file.write_text("not what was asked for\n")
  junk = tmp_path / "junk"
  junk.mkdir()
  (junk / "cell.json").write_text("{not json")
  (junk / "other.json").write_text("[1, 2, 3]")
  monkeypatch.setenv("DRR_DATA_DIR", str(empty))
  monkeypatch.setenv("DRR_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setattr(train, "train", _reached)
  monkeypatch.setattr(experiment, "run_grid", _reached)
  monkeypatch.setattr(evaluate, "evaluate", _reached)
  monkeypatch.setattr(evaluate, "predict", _reached)
  return {"missing": str(tmp_path / "no" / "such" / "thing"), "file": str(file),
          "empty": str(empty), "junk": str(junk), "ckpt": CKPT,
          "out": str(tmp_path / "out"), "work": str(tmp_path / "work")}


def _argv(cli: str, argv: list[str], paths: dict[str, str]) -> list[str]:
  argv = [re.sub(r"\{(\w+)\}", lambda m: paths.get(m.group(1), m.group(0)), a)
          for a in argv]
  if cli == "train":
    argv = ["--preset", "tiny", "--workdir", paths["work"], *argv]
  elif cli == "defend" and "--out" not in argv:
    argv = [*argv, "--out", paths["out"]]
  elif cli == "experiment":
    argv = [*argv, "--results", paths["out"]] if "--results" not in argv else argv
  return argv


def _case_id(case) -> str:
  cli, argv, _ = case
  text = " ".join(a if len(a) < 20 else a[:8] + "..." for a in argv)
  return f"{cli}:{text}"


@pytest.mark.parametrize("cli, argv, expect", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_values_end_in_one_error_line(cli, argv, expect, paths, capsys):
  main = importlib.import_module(f"launch.{cli}").main
  with pytest.raises(SystemExit) as e:
    main(_argv(cli, argv, paths))
  err = capsys.readouterr().err
  code = e.value.code
  assert "Traceback" not in err
  if expect == USAGE or code == 2:
    assert expect == USAGE, f"argparse refused it, not the CLI: {err}"
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return
  assert isinstance(code, str), f"exit code {code!r} without an error line"
  assert code.startswith("error: ") and "\n" not in code.strip(), code
  if expect is not None:
    assert expect in code, code


def test_debug_shows_the_error_itself(paths):
  """--debug: the error with its traceback, on every CLI that reports one line."""
  from drr_jax import data
  with pytest.raises(data.DataError):
    importlib.import_module("launch.evaluate").main(
        ["--checkpoint", CKPT, "--data_dir", paths["file"], "--debug"])
  with pytest.raises(KeyError, match="only"):
    importlib.import_module("launch.experiment").main(
        ["--grid", "tiny", "--set", "drr=1", "--debug"])
  with pytest.raises(ValueError, match="no usable record"):
    importlib.import_module("launch.report").main(["--results", paths["empty"], "--debug"])


# ----------------------------------------------------------------------------- --help

def _help(cli: str, monkeypatch, capsys) -> tuple[argparse.ArgumentParser, str]:
  """(the parser, its --help text at 100 columns)."""
  monkeypatch.setenv("COLUMNS", "100")
  seen = []
  original = argparse.ArgumentParser.parse_args

  def record(self, *args, **kwargs):
    seen.append(self)
    return original(self, *args, **kwargs)

  monkeypatch.setattr(argparse.ArgumentParser, "parse_args", record)
  with pytest.raises(SystemExit) as e:
    importlib.import_module(f"launch.{cli}").main(["--help"])
  assert e.value.code in (0, None)
  return seen[-1], capsys.readouterr().out


def _words(text: str) -> str:
  return " ".join(text.split())


@pytest.mark.parametrize("cli", CLIS)
def test_help_is_whole(cli, monkeypatch, capsys):
  parser, text = _help(cli, monkeypatch, capsys)
  module = importlib.import_module(f"launch.{cli}")
  assert text.startswith(f"usage: python -m launch.{cli} ")
  description = parser.description.strip()
  assert description[-1] in ".):", f"the description stops mid-sentence: {description!r}"
  # the description is the docstring's whole first paragraph, not its first line
  assert _words(description) == _words(module.__doc__.strip().split("\n\n")[0])
  assert _words(description) in _words(text)
  for action in parser._actions:  # every option's help is shown in full
    if action.help and action.help != argparse.SUPPRESS:
      assert _words(action.help % {"default": action.default}) in _words(text), action.help
  # the rest of the docstring (the examples) follows the options, line by line as written
  rest = module.__doc__.strip().partition("\n\n")[2].strip("\n")
  lines = text.splitlines()
  for line in rest.splitlines():
    assert line.rstrip() in lines, line
  # and no line of the docstring was joined to the next (a shell continuation '\' at
  # the end of a line in a docstring that is not raw)
  source = inspect.getsource(module)
  start = source.index('"""') + 3
  assert module.__doc__.count("\n") == source[start:source.index('"""', start)].count("\n")
