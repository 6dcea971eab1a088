"""Do two code versions make the same decisions? (issue 18, point 2)

Compares the folders that `defend_bench.py --save DIR` wrote from two checkouts (say the
commit before an optimization and after it), file by file: the layers where directions
were kept, the directions themselves (largest |1 - |cos||), and the defended variables
(largest absolute difference over all leaves, and relative to the leaf's scale).

  DRR_DATA_DIR=../shared/data python benchmarks/defend_bench.py --n 5000 \\
      --modes default --models artifacts/checkpoints/dev-r18-badnets3-br-t0-p10 --save /tmp/old
  (the same from the other checkout, --save /tmp/new)
  python benchmarks/same_decisions.py /tmp/old /tmp/new

Exit status 1 when a file differs in its kept layers or beyond --tol.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def compare(a: Path, b: Path) -> dict:
  """Kept layers equal?, the worst direction mismatch and the worst variable difference."""
  x, y = np.load(a), np.load(b)
  kept_a, kept_b = json.loads(str(x["__kept__"])), json.loads(str(y["__kept__"]))
  same_layers = [k["layer"] for k in kept_a] == [k["layer"] for k in kept_b]
  cos_gap = 0.0
  if same_layers:
    for ka, kb in zip(kept_a, kept_b):
      for u, v in zip(ka["directions"], kb["directions"]):
        cos_gap = max(cos_gap, 1.0 - abs(float(np.dot(u, v))))
  keys_a = sorted(k for k in x.files if k != "__kept__")
  keys_b = sorted(k for k in y.files if k != "__kept__")
  if keys_a != keys_b:
    return {"same_layers": same_layers, "cos_gap": cos_gap, "max_abs": float("inf"),
            "max_rel": float("inf"), "kept": [k["layer"] for k in kept_a],
            "note": "the variables' structures differ"}
  max_abs = max_rel = 0.0
  for k in keys_a:
    d = float(np.max(np.abs(x[k].astype(np.float64) - y[k].astype(np.float64)), initial=0))
    scale = max(1.0, float(np.max(np.abs(x[k]), initial=0)))
    max_abs, max_rel = max(max_abs, d), max(max_rel, d / scale)
  return {"same_layers": same_layers, "cos_gap": cos_gap, "max_abs": max_abs,
          "max_rel": max_rel, "kept": [k["layer"] for k in kept_a]}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("old", type=Path)
  p.add_argument("new", type=Path)
  p.add_argument("--tol", type=float, default=1e-4,
                 help="largest relative variable difference that counts as the same "
                      "(default 1e-4)")
  args = p.parse_args(argv)
  names = sorted(f.name for f in args.old.glob("*.npz"))
  missing = [n for n in names if not (args.new / n).exists()]
  if not names or missing:
    print(f"nothing to compare: {args.old} has {len(names)} file(s); missing in "
          f"{args.new}: {missing}", file=sys.stderr)
    return 1
  bad = 0
  for n in names:
    r = compare(args.old / n, args.new / n)
    ok = r["same_layers"] and r["max_rel"] <= args.tol
    bad += not ok
    print(f"{n:60s} {'same' if ok else 'DIFFERENT':9s} kept {len(r['kept'])} "
          f"({', '.join(r['kept'][:4])}{' ...' if len(r['kept']) > 4 else ''}); "
          f"1-|cos| {r['cos_gap']:.1e}; variables max |diff| {r['max_abs']:.2e} "
          f"(relative {r['max_rel']:.2e}){'; ' + r['note'] if 'note' in r else ''}")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
