"""Does a changed setting keep DRR's decisions? (issue 18, point 2)

Compares DRR runs of `python -m launch.defend --checkpoint <cell> --set KEY=VALUE --out
DIR/<cell>` (their `result.json`) with the grid records of the same models
(`results/<grid>/<cell>.json`, the defaults): the units where directions were kept, the
directions themselves (for each kept one, the largest |cos| with a kept direction of
the same unit in the other run), validation ACC / ASR after, and seconds. Reads the
validation split only, as settings are chosen on it (docs/zoo.md).

  python benchmarks/compare_runs.py --runs /work/drr_runs/ss-8192 --records results/zoo-dev
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def kept(report: dict) -> dict[str, list[np.ndarray]]:
  """{unit: its removed unit vectors} over all of a report's layer visits."""
  out: dict[str, list[np.ndarray]] = {}
  for e in report["layers"]:
    for d in e.get("directions", []):
      out.setdefault(e["layer"], []).append(np.asarray(d, np.float64))
  return out


def worst_cos(a: dict[str, list[np.ndarray]], b: dict[str, list[np.ndarray]]) -> float:
  """The smallest, over a's kept directions, of the largest |cos| with b's kept
  directions of the same unit (0 where b kept none there)."""
  worst = 1.0
  for unit, vs in a.items():
    for v in vs:
      best = max((abs(float(v @ u)) for u in b.get(unit, [])), default=0.0)
      worst = min(worst, best)
  return worst


def compare(run: dict, record: dict) -> dict:
  ra, rb = record["drr"], run["drr"]["report"] if "report" in run["drr"] else run["drr"]
  ka, kb = kept(ra), kept(rb)
  return {"units_default": sorted(ka), "units_run": sorted(kb),
          "same_units": sorted(ka) == sorted(kb) and all(
              len(ka[u]) == len(kb[u]) for u in ka),
          "cos": min(worst_cos(ka, kb), worst_cos(kb, ka)) if ka or kb else 1.0,
          "val_default": (record["after"]["val"]["acc"], record["after"]["val"]["asr"]),
          "val_run": (run["after"]["val"]["acc"], run["after"]["val"]["asr"]),
          "s_default": ra["seconds"], "s_run": rb["seconds"]}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--runs", type=Path, required=True, help="folder of launch.defend outputs")
  p.add_argument("--records", type=Path, required=True, help="folder of grid records")
  args = p.parse_args(argv)
  rows = []
  for res in sorted(args.runs.glob("*/result.json")):
    cell = res.parent.name
    rec = args.records / f"{cell}.json"
    if not rec.exists():
      print(f"{cell}: no record in {args.records}")
      continue
    c = compare(json.loads(res.read_text()), json.loads(rec.read_text()))
    pct = lambda t: "/".join("-" if x is None or x != x else f"{100 * x:.2f}" for x in t)
    rows.append(f"| `{cell}` | {len(c['units_default'])} / {len(c['units_run'])} | "
                f"{'yes' if c['same_units'] else 'no'} | {c['cos']:.4f} | "
                f"{pct(c['val_default'])} | {pct(c['val_run'])} | "
                f"{c['s_default']:.0f} / {c['s_run']:.0f} |")
    if not c["same_units"]:
      rows.append(f"|  | default: {', '.join(c['units_default']) or '-'}; run: "
                  f"{', '.join(c['units_run']) or '-'} | | | | | |")
  print("| model | units kept (default / run) | same units | worst cos | val ACC/ASR default "
        "| val ACC/ASR run | DRR s (default / run) |")
  print("|---|---|---|---|---|---|---|")
  print("\n".join(rows))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
