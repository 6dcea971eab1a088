"""Tables and figures of an experiment grid from its records: table.md (the paper's
Table 1 layout), fig_C_per_layer.png and fig_tau_sweep.png.

  python -m launch.report --results results/cpu            # writes next to the records
  python -m launch.report --results results/cpu-v6 --against results/cpu  # + versus.md
  python -m launch.report --settings    # prints DRR's settings table (as in the README)
Re-running it on the same records gives the same files (nothing is dated from the clock).
"""
from __future__ import annotations

import sys

from drr_jax import report
from launch.common import USER_ERRORS, add_debug_flag, check_folder, fail, parser


def main(argv: list[str] | None = None) -> dict:
  p = parser(__doc__, "launch.report")
  p.add_argument("--results", default="results/cpu", help="folder of the grid's records")
  p.add_argument("--out", help="folder for the outputs (default: --results)")
  p.add_argument("--against", help="folder of an earlier version's records of the same "
                 "grid: also writes versus.md, each cell's DRR then and now")
  p.add_argument("--settings", action="store_true", help="print DRR's settings as a "
                 "markdown table (defenses/drr/config.py: settings_markdown) and stop")
  add_debug_flag(p)
  args = p.parse_args(argv)
  if args.settings:
    from drr_jax.defenses.drr.config import settings_markdown
    table = settings_markdown()
    print(table, end="")
    return {"settings": table}
  try:
    check_folder(args.out, "--out")
    paths, warnings = report.write_report(args.results, args.out, args.against)
  except USER_ERRORS as e:
    fail(e, args.debug)
  for w in warnings:
    print(f"warning: {w}", file=sys.stderr)
  print(paths["table"].read_text(encoding="utf-8"))
  if "versus" in paths:
    print(paths["versus"].read_text(encoding="utf-8"))
  print("wrote " + ", ".join(str(v) for v in paths.values()))
  return paths


if __name__ == "__main__":
  main()
