"""docs/bad-input.md's table cannot drift from the tests: every row names a test function
that a test file defines, and every bad input of issue 17 still has its row."""
from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "bad-input.md"
HEADER = ["input", "where", "what the user sees", "test"]
TEST = re.compile(r"^`(tests/[\w/]+\.py)::(\w+)(\[[^`]*\])?`$")

# The bad inputs of issue 17 (its list, then its additions), each with the words its
# row's input cell must hold.
CASES = {
    "random bytes in a checkpoint's model data": "64 random bytes",
    "restored params checked finite": "NaN params in a checkpoint",
    "launch.train --attack none": "--attack none",
    "launch.train --poison_ratio 0": "--poison_ratio 0",
    "a leftover orbax tmp folder": "orbax-checkpoint-tmp",
    "launch.defend --out unwritable": "unwritable place",
    "launch.experiment --set drr.tau=-1": "drr.tau=-1",
    "launch.defend checks DRR settings after the data": "DRR setting for `launch.defend`",
    "--set tau=nan": "--set tau=nan",
    "--width 0": "--width 0",
    "--width ignored for wrn28_1 and densenet121": "wrn28_1 or densenet121",
    "--epochs 0": "--epochs 0",
    "a missing data folder": "no data folder",
    "a missing zip": "a missing zip",
    "a damaged zip": "a damaged zip",
    "unknown --set keys": "unknown `--set` key",
    "an unwritable workdir": "not writable: `--workdir`",
    "--data_dir given the zip file": "given the zip file",
    "--checkpoint given a file": "`--checkpoint` given a file",
    "a truncated array file": "truncated array file",
    "a deleted manifest.ocdbt": "manifest.ocdbt",
    "a checkpoint of another width": "another width",
    "images in [0, 1] floats": "floats in [0, 1]",
    "out-of-range integer images": "out-of-range integer",
    "bool images": "bool images",
    "1-channel images": "1-channel images",
    "layers given as a string": "`layers` given as a string",
    "a string tau": "a string `tau`",
    "a string steps": "a string `steps`",
    "k above the channel count": "`k` above",
    "launch.experiment --help": "launch.experiment --help",
    "launch.report --help": "launch.report --help",
    "NaN params": "NaN params",
    "an empty batch": "an empty batch",
    "labels out of range": "labels out of range",
    "an output directory that exists": "an output directory that exists",
    "an output directory that is not writable": "an output directory that is not writable",
    "a full disk": "full disk",
    "an unknown preset": "an unknown preset",
    "an unknown method": "an unknown method",
    "an unknown attack": "an unknown attack",
    "an unknown model": "an unknown model",
}


def _rows(text: str) -> list[list[str]]:
  """The table's rows (header first) as lists of stripped cells."""
  lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
  rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
  return [r for r in rows if not all(set(c) <= set("-: ") for c in r)]


@functools.lru_cache(maxsize=None)
def _functions(path: Path) -> frozenset[str]:
  """The names of the functions defined at a file's top level."""
  tree = ast.parse(path.read_text(encoding="utf-8"))
  return frozenset(n.name for n in tree.body
                   if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def _problems(rows: list[list[str]]) -> list[str]:
  """What is wrong with a table (header first): each row's test, and the cases."""
  problems = []
  if not rows or rows[0] != HEADER:
    return [f"the header is {rows[:1]}, not {HEADER}"]
  for row in rows[1:]:
    if len(row) != len(HEADER) or not all(row):
      problems.append(f"row {row}: expected {len(HEADER)} non-empty cells")
      continue
    m = TEST.match(row[3])
    if not m:
      problems.append(f"row {row[0]!r}: the test cell {row[3]!r} is not "
                      "`tests/<file>.py::<test>[<id>]`")
      continue
    path, name = ROOT / m.group(1), m.group(2)
    if not path.is_file():
      problems.append(f"row {row[0]!r}: {m.group(1)} does not exist")
    elif not name.startswith("test_") or name not in _functions(path):
      problems.append(f"row {row[0]!r}: {m.group(1)} defines no test {name}")
  inputs = [r[0].lower() for r in rows[1:]]
  for case, words in CASES.items():
    if not any(words.lower() in cell for cell in inputs):
      problems.append(f"no row for {case!r} (an input cell with {words!r})")
  if len(rows) - 1 < len(CASES):
    problems.append(f"{len(rows) - 1} rows for {len(CASES)} cases")
  return problems


def test_every_row_names_a_test_that_exists_and_every_case_has_a_row():
  rows = _rows(DOC.read_text(encoding="utf-8"))
  assert _problems(rows) == []
  assert len(rows) - 1 >= len(CASES)


def test_a_row_naming_a_missing_test_or_a_lost_case_is_caught():
  """The check above can fail: a test that is not there, a file that is not there, a
  cell that names no test, and a case without its row are each reported."""
  rows = _rows(DOC.read_text(encoding="utf-8"))
  bad = [*rows,
         ["x", "API", "y", "`tests/test_bad_input.py::test_no_such_thing`"],
         ["x", "API", "y", "`tests/test_nowhere.py::test_a`"],
         ["x", "API", "y", "a test somewhere"],
         ["x", "API", "y", "`tests/test_bad_input.py::_error`"]]  # a helper, no test
  found = _problems(bad)
  assert len(found) == 4, found
  assert "defines no test test_no_such_thing" in found[0]
  assert "test_nowhere.py does not exist" in found[1]
  assert "is not `tests/" in found[2] and "defines no test _error" in found[3]
  lost = [r for r in rows if "full disk" not in r[0]]
  assert any("'a full disk'" in p for p in _problems(lost))
  assert _problems(rows[:1]) and _problems([["input", "test"]])
