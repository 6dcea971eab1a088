"""DRR's cost against one plain inference pass, on every model the grids have defended.

Every grid record (`launch.experiment`) times, in the same process and on the same N
training images, one plain jitted inference pass (the floor of issue 18), `defend` with
the defaults and the `paper` mode. This script prints those figures for every record of
the given results folders: no new run, so it shows the spread over the whole zoo that a
benchmark on two models cannot, at the price of whatever else the machine was doing
then (the records were taken beside other jobs; `defend_bench.py` gives quiet figures).

  python benchmarks/record_costs.py results/zoo-heldout results/new-attacks
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from drr_jax import experiment


def costs(folders: list[str]) -> list[dict[str, Any]]:
  """One row per cell record that holds the three timings, sorted by cell id."""
  rows = []
  for folder in folders:
    for path in sorted(Path(folder).glob("*.json")):
      rec, _ = experiment.read_record(path, required=("cell_id", "times"))
      if rec is None:  # unparsable, unfinished or of another schema
        continue
      times = rec.get("times") or {}
      floor = times.get("plain_pass_seconds")
      drr, paper = times.get("defense_seconds"), times.get("paper_defense_seconds")
      if not floor or drr is None:
        continue
      rows.append({
          "cell": rec["cell_id"], "commit": (rec.get("git") or {}).get(
              "commit", "")[:7], "n": (rec.get("drr") or {}).get("num_images"),
          "floor_s": floor, "drr_s": drr, "drr_x": drr / floor,
          "paper_s": paper, "paper_x": None if paper is None else paper / floor,
          "kept": (rec.get("drr") or {}).get("directions_kept"),
          "passes": (rec.get("drr") or {}).get("feature_passes"),
          "paper_passes": ((rec.get("paper") or {}).get("drr") or {}).get("feature_passes"),
      })
  return sorted(rows, key=lambda r: r["cell"])


def table(rows: list[dict[str, Any]]) -> str:
  """A markdown table of the rows and a line of medians."""
  out = ["| cell | commit | N | floor s | DRR s | DRR x floor | passes | kept | paper s "
         "| paper x floor | paper passes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  f = lambda v, fmt: "" if v is None else fmt.format(v)
  for r in rows:
    out.append(f"| `{r['cell']}` | {r['commit']} | {f(r['n'], '{:,}')} | "
               f"{r['floor_s']:.1f} | {r['drr_s']:.1f} | {r['drr_x']:.2f} | "
               f"{f(r['passes'], '{}')} | {f(r['kept'], '{}')} | {f(r['paper_s'], '{:.1f}')} | "
               f"{f(r['paper_x'], '{:.2f}')} | {f(r['paper_passes'], '{}')} |")
  if rows:
    papers = [r["paper_x"] for r in rows if r["paper_x"] is not None]
    out.append(f"\n{len(rows)} records; median DRR x floor "
               f"{statistics.median(r['drr_x'] for r in rows):.2f} (range "
               f"{min(r['drr_x'] for r in rows):.2f}-{max(r['drr_x'] for r in rows):.2f})"
               + (f", median paper x floor {statistics.median(papers):.2f}" if papers else ""))
  return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("folders", nargs="+", help="results folders of grid records")
  args = p.parse_args(argv)
  missing = [f for f in args.folders if not Path(f).is_dir()]
  if missing:
    p.error(f"no such results folder: {', '.join(missing)}")
  rows = costs(args.folders)
  print(table(rows))
  return rows


if __name__ == "__main__":
  main()
