"""NOTEBOOK.ipynb stays in step with the library: every drr_jax name it uses exists, every
call it makes binds to the current signature, and the files it names are in the repo.
(Running it needs the real data and minutes of compute; this check needs neither.)"""
from __future__ import annotations

import ast
import importlib
import inspect
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cells():
  nb = json.loads((ROOT / "NOTEBOOK.ipynb").read_text(encoding="utf-8"))
  assert nb["nbformat"] == 4
  ids = [c.get("id") for c in nb["cells"]]
  assert None not in ids and len(set(ids)) == len(ids), "cell ids missing or repeated"
  return nb["cells"]


def _code() -> str:
  """The code cells as one module, shell (!) and magic (%) lines dropped."""
  out = []
  for c in _cells():
    if c["cell_type"] != "code":
      continue
    src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
    out += [ln for ln in src.splitlines() if not ln.lstrip().startswith(("!", "%"))]
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


def test_notebook_uses_only_the_current_api():
  tree = ast.parse(_code())
  names = _resolve(tree)
  assert {"drr_jax", "checkpoint", "datasets", "experiment", "report"} <= set(names)
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
