"""NOTEBOOK.ipynb stays runnable: it is stored clean (no outputs, unique cell ids, a
`parameters` cell first), every drr_jax name it uses exists and every call binds to the
current signature, the files it names are in the repo, and -- with the real CIFAR-10 --
it runs top to bottom in a Jupyter kernel of this interpreter, with a tiny set of
parameters injected after its `parameters` cell (as papermill does), and removes the
backdoor it shows."""
from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "NOTEBOOK.ipynb"
# Small enough that the whole notebook runs in about a minute and a half on a 2-core
# CPU (most of it DRR's per-layer compiles); DRR still removes the backdoor with these.
TINY = {"N_DEFEND": 2000, "N_EVAL": 1000, "N_IMAGES": 4,
        "DRR": {"steps": 20, "confirm_samples": 500, "k": 2}}
CELL_TIMEOUT_S = 600


def _notebook() -> dict:
  nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
  assert nb["nbformat"] == 4
  return nb


def _source(cell: dict) -> str:
  src = cell["source"]
  return "".join(src) if isinstance(src, list) else src


def _cells():
  cells = _notebook()["cells"]
  ids = [c.get("id") for c in cells]
  assert None not in ids and len(set(ids)) == len(ids), "cell ids missing or repeated"
  return cells


def _code() -> str:
  """The code cells as one module, shell (!) and magic (%) lines dropped."""
  out = []
  for c in _cells():
    if c["cell_type"] != "code":
      continue
    out += [ln for ln in _source(c).splitlines() if not ln.lstrip().startswith(("!", "%"))]
  return "\n".join(out)


def _resolve(tree: ast.Module) -> dict[str, object]:
  """Local name -> drr_jax object, for the notebook's drr_jax imports."""
  names: dict[str, object] = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.split(".")[0] == "drr_jax":
          names[a.asname or a.name] = importlib.import_module(a.name)
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("drr_jax"):
      mod = importlib.import_module(node.module)
      for a in node.names:
        obj = getattr(mod, a.name, None)
        if obj is None:
          obj = importlib.import_module(f"{node.module}.{a.name}")
        names[a.asname or a.name] = obj
  return names


def _target(node: ast.AST, names: dict[str, object]):
  """The drr_jax object an expression like `mod.fn` or `fn` names, else None."""
  if isinstance(node, ast.Name):
    return names.get(node.id)
  if isinstance(node, ast.Attribute):
    base = _target(node.value, names)
    if base is None:
      return None
    assert hasattr(base, node.attr), f"NOTEBOOK.ipynb uses {ast.unparse(node)}: gone"
    return getattr(base, node.attr)
  return None


def _parameters_index(cells) -> int:
  return next(i for i, c in enumerate(cells)
              if "parameters" in c.get("metadata", {}).get("tags", []))


def test_notebook_is_stored_clean():
  cells = _cells()
  code = [c for c in cells if c["cell_type"] == "code"]
  for c in code:
    assert c.get("outputs") == [] and c.get("execution_count") is None, (
        f"cell {c['id']} has outputs: clear them before committing")
  # The first code cell holds the knobs, plain constants, so that a runner (papermill,
  # this test) can override them in a cell of its own right after it.
  params = code[0]
  assert "parameters" in params.get("metadata", {}).get("tags", [])
  tree = ast.parse(_source(params))
  assigned = set()
  for stmt in tree.body:
    assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1, ast.unparse(stmt)
    ast.literal_eval(stmt.value)
    assigned.add(stmt.targets[0].id)
  assert set(TINY) | {"CHECKPOINT", "OUT_DIR", "DATA_DIR"} <= assigned
  # No machine's own paths: the data folder comes from $DRR_DATA_DIR (or tfds on Colab).
  text = NOTEBOOK.read_text(encoding="utf-8")
  assert "/work/" not in text and "shared/data" not in text


def test_notebook_uses_only_the_current_api():
  tree = ast.parse(_code())
  names = _resolve(tree)
  assert {"drr_jax", "attacks", "checkpoint", "data", "evaluate", "plots"} <= set(names)
  calls = 0
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute):
      _target(node, names)
    if isinstance(node, ast.Call):
      fn = _target(node.func, names)
      if fn is None or not callable(fn):
        continue
      args = [None] * len(node.args)
      kwargs = {k.arg: None for k in node.keywords if k.arg}
      try:
        inspect.signature(fn).bind(*args, **kwargs)
      except TypeError as e:
        raise AssertionError(f"NOTEBOOK.ipynb: {ast.unparse(node)}: {e}") from None
      calls += 1
  assert calls >= 8


def test_notebook_names_files_that_exist():
  tree = ast.parse(_code())
  paths = [n.value for n in ast.walk(tree)
           if isinstance(n, ast.Constant) and isinstance(n.value, str)
           and n.value.startswith("artifacts/")]
  assert paths
  for p in paths:
    assert (ROOT / p).exists(), f"NOTEBOOK.ipynb loads {p}, which is not in the repo"


def test_notebook_runs_top_to_bottom(real_data_dir, tmp_path, monkeypatch):
  if not Path(real_data_dir).is_dir():
    pytest.skip(f"$DRR_DATA_DIR={real_data_dir} does not exist: the notebook needs the "
                "real CIFAR-10 zips")
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  # The kernel inherits this environment (XLA_FLAGS from conftest included); an absolute
  # data folder, since the kernel runs in the repository root.
  monkeypatch.setenv("DRR_DATA_DIR", str(Path(real_data_dir).resolve()))
  out_dir = tmp_path / "out"
  nb = nbformat.read(NOTEBOOK, as_version=4)
  at = _parameters_index(nb.cells)
  injected = "\n".join(
      ["# Injected by tests/test_notebook.py (papermill-style)",
       *(f"{k} = {v!r}" for k, v in {**TINY, "OUT_DIR": str(out_dir)}.items()),
       # the kernel is this interpreter (the venv's), not some other python3 on PATH
       "import sys as _sys",
       f"assert _sys.prefix == {sys.prefix!r}, ('kernel runs', _sys.executable)"])
  nb.cells.insert(at + 1, nbformat.v4.new_code_cell(
      injected, id="injected-parameters", metadata={"tags": ["injected-parameters"]}))
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": str(ROOT)}})
  client.execute()  # a failing cell raises CellExecutionError with its traceback

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "CIFAR-10 source: the offline zips" in text
  pngs = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
  assert len(pngs) >= 2, "the ACC/ASR bar chart and the defense figure were not shown"
  result = json.loads(next(ln for ln in text.splitlines()
                           if ln.startswith("RESULT "))[len("RESULT "):])
  print(f"notebook: before {result['before']}, after {result['after']}")
  assert result["n_defend"] == TINY["N_DEFEND"] and result["n_eval"] == TINY["N_EVAL"]
  assert result["before"]["asr"] > 0.9, "the committed model should carry its backdoor"
  assert result["after"]["asr"] < result["before"]["asr"] / 2, "DRR removed no backdoor"
  assert result["after"]["acc"] > result["before"]["acc"] - 0.15
  # Everything it wrote is under OUT_DIR: the defended checkpoint and the figures.
  for path in [result["defended_checkpoint"], *result["figures"]]:
    assert Path(path).exists() and Path(path).resolve().is_relative_to(out_dir)
  assert (Path(result["defended_checkpoint"]) / "result.json").is_file()
