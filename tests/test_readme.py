"""The README stays true: its settings table is the one generated from DRRConfig, its
first lines reach the main command, its relative links resolve, and the main command's
defaults (the committed checkpoint, a fresh output folder) hold."""
from __future__ import annotations

import re
from pathlib import Path

from drr_jax.defenses.drr.config import FIELDS, settings_markdown
from launch import defend as launch_defend

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- settings:start -->", "<!-- settings:end -->"


def _readme() -> str:
  return (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_settings_table_is_the_generated_one():
  text = _readme()
  table = text.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"
  assert table == settings_markdown(), (
      "README's settings table is stale: regenerate it with "
      "`python -m launch.report --settings` between the settings markers")


def test_settings_table_has_every_field_with_help():
  rows = settings_markdown().splitlines()[2:]
  assert [r.split("`")[1] for r in rows] == list(FIELDS)
  assert all(not r.rstrip().endswith("|  |") for r in rows), "a setting has no help text"


def test_main_command_within_the_first_30_lines():
  head = "\n".join(_readme().splitlines()[:30])
  assert "python -m launch.defend" in head
  assert ("python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && "
          "DRR_DATA_DIR=../shared/data .venv/bin/python -m pytest") in head
  ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
  assert ".venv/bin/pip install -q -e '.[test]' && DRR_DATA_DIR=../shared/data " \
         ".venv/bin/python -m pytest" in ci


def test_readme_and_docs_links_resolve():
  for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8")):
      if target.startswith(("http://", "https://", "#", "mailto:")):
        continue
      path = (doc.parent / target.split("#", 1)[0]).resolve()
      assert path.exists(), f"{doc.name}: link to {target} does not resolve"


def test_defaults_of_the_main_command(tmp_path):
  assert (Path(launch_defend.DEFAULT_CHECKPOINT) / "checkpoints").is_dir()
  base = tmp_path / "run-drr"
  assert launch_defend._free_out(str(base)) == str(base)
  base.mkdir()
  assert launch_defend._free_out(str(base)) == f"{base}-2"
  Path(f"{base}-2").mkdir()
  assert launch_defend._free_out(str(base)) == f"{base}-3"
