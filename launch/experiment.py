"""Run an experiment grid: train (or reuse) -> evaluate -> DRR -> evaluate, one JSON
record per cell under --results; re-run it after a kill to finish the missing cells.
With --methods, the baselines instead (one record per cell and method under
<results>/baselines/), on the same models.

  python -m launch.experiment --grid cpu --data_dir ../shared/data
  python -m launch.experiment --grid zoo-heldout --methods fp anp clp ep rr-fp rr-ep
  python -m launch.report --results results/cpu      # + comparison.md with baselines
"""
from __future__ import annotations

import argparse
import os
import sys

from drr_jax import comparison, data, experiment, grid
from launch.common import USER_ERRORS, add_debug_flag, check_folder, fail, parser


def main(argv: list[str] | None = None) -> dict[str, list[str]]:
  p = parser(__doc__, "launch.experiment")
  p.add_argument("--grid", default="cpu", choices=tuple(grid.GRIDS), help="drr_jax/grid.py")
  p.add_argument("--data_dir", help="folder with cifar10-{train,test}.zip "
                 "(default: $DRR_DATA_DIR)")
  p.add_argument("--ckpt_root", default=os.path.join("runs", "grid"),
                 help="checkpoints go to <ckpt_root>/<cell_id>, and are reused from there")
  p.add_argument("--results", help="folder for the records (default: results/<grid>)")
  p.add_argument("--export", help="finished models are copied (variables only) to "
                 "<export>/<cell_id> and reused from there (default: artifacts/checkpoints, "
                 "the committed ones; none for the tiny grid); '' to keep them only under "
                 "--ckpt_root")
  p.add_argument("--train_only", action="store_true",
                 help="only train (and export) the cells' models; write no records")
  p.add_argument("--reuse_paper", action="store_true",
                 help="keep the paper-DRR part of a cell's old record when it ran the same "
                 "paper settings on the same model (to report a new DRR version without "
                 "rerunning the paper mode; the record names where it came from)")
  p.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                 help="run only cells whose id contains this (repeatable: any of them)")
  p.add_argument("--methods", nargs="+", choices=comparison.BASELINES,
                 help="run these baselines on the cells' models instead of DRR (records "
                 "in <results>/baselines/)")
  p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                 help="DRR or analysis setting, e.g. --set drr.k=8 "
                 "--set analysis.taus=[2.0,3.0]; with --methods, a baseline's, e.g. "
                 "--set anp.threshold=0.3")
  add_debug_flag(p)
  args = p.parse_args(argv)
  try:
    cells, data_dir, results, export = _check(args)
  except USER_ERRORS as e:
    fail(e, args.debug)
  print(f"grid {args.grid}: {len(cells)} cell(s) -> {results}", flush=True)
  if args.methods:
    outcome = comparison.run_baselines(cells, args.methods, data_dir, args.ckpt_root,
                                       results, overrides=args.set,
                                       export_root=export or None)
  else:
    outcome = experiment.run_grid(cells, data_dir, args.ckpt_root, results,
                                  overrides=args.set, export_root=export or None,
                                  train_only=args.train_only,
                                  reuse_paper=args.reuse_paper)
  print(f"done {len(outcome['done'])}, already done {len(outcome['skipped'])}, "
        f"failed {len(outcome['failed'])} {outcome['failed']}")
  if outcome["failed"]:
    sys.exit(1)
  return outcome


def _check(args: argparse.Namespace):
  """(cells, data folder, results folder, export root): every argument checked before
  the grid starts hours of work."""
  data_dir = data.resolve_data_dir(args.data_dir)
  cells = grid.get_grid(args.grid)
  if args.only:
    cells = [c for c in cells if any(s in grid.cell_id(c) for s in args.only)]
    if not cells:
      raise ValueError(f"no cell of grid {args.grid!r} matches --only {args.only}")
  if args.methods and args.train_only:
    raise ValueError("--methods and --train_only do not go together")
  if args.reuse_paper and (args.methods or args.train_only):
    raise ValueError("--reuse_paper goes with DRR records only (not --methods or "
                     "--train_only)")
  for c in cells:  # a bad --set fails here, before hours of training
    if args.methods:
      comparison.check_overrides(args.set, args.methods)
      for m in args.methods:
        comparison.baseline_config(c, m, args.set)
    else:
      experiment.experiment_config(c, args.set)
  results = args.results or os.path.join("results", args.grid)
  export = args.export
  if export is None and args.grid != "tiny":
    export = os.path.join("artifacts", "checkpoints")
  for path, flag in ((results, "--results"), (args.ckpt_root, "--ckpt_root"),
                     (export or None, "--export")):
    check_folder(path, flag)
  return cells, data_dir, results, export


if __name__ == "__main__":
  main()
