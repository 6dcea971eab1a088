"""Tables and figures of an experiment grid from its records: table.md (the paper's
Table 1 layout), fig_C_per_layer.png and fig_tau_sweep.png.

  python -m launch.report --results results/cpu            # writes next to the records
  python -m launch.report --settings    # prints DRR's settings table (as in the README)
Re-running it on the same records gives the same files (nothing is dated from the clock).
"""
from __future__ import annotations

import argparse
import sys

from drr_jax import report


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--results", default="results/cpu", help="folder of the grid's records")
  p.add_argument("--out", help="folder for the outputs (default: --results)")
  p.add_argument("--settings", action="store_true", help="print DRR's settings as a "
                 "markdown table (defenses/drr/config.py: settings_markdown) and stop")
  args = p.parse_args(argv)
  if args.settings:
    from drr_jax.defenses.drr.config import settings_markdown
    table = settings_markdown()
    print(table, end="")
    return {"settings": table}
  try:
    paths, warnings = report.write_report(args.results, args.out)
  except ValueError as e:
    sys.exit(f"error: {e}")
  for w in warnings:
    print(f"warning: {w}", file=sys.stderr)
  print(paths["table"].read_text(encoding="utf-8"))
  print("wrote " + ", ".join(str(v) for v in paths.values()))
  return paths


if __name__ == "__main__":
  main()
