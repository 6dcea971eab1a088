"""ACC and ASR of a checkpoint on the real CIFAR-10 test set.

  python -m launch.evaluate --checkpoint artifacts/wrn28_1-badnets-cpu --data_dir ../shared/data
The trigger and attack settings come from the checkpoint's own record.
"""
from __future__ import annotations

import argparse

from drr_jax import attacks, checkpoint, data, evaluate
from launch.common import USER_ERRORS, add_debug_flag, fail, parser


def main(argv: list[str] | None = None) -> dict:
  p = parser(__doc__, "launch.evaluate")
  p.add_argument("--checkpoint", required=True, help="run folder or its checkpoints/")
  p.add_argument("--data_dir", help="folder with cifar10-test.zip (default: $DRR_DATA_DIR)")
  p.add_argument("--batch_size", type=int, default=500, help="images per forward pass")
  add_debug_flag(p)
  args = p.parse_args(argv)
  try:
    return _run(args)
  except USER_ERRORS as e:
    fail(e, args.debug)


def _run(args: argparse.Namespace) -> dict:
  if args.batch_size < 1:
    raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
  if not args.checkpoint.strip():
    raise ValueError("--checkpoint is empty: give a run folder")
  model, variables, meta, record = checkpoint.load_model(args.checkpoint)
  test = data.load_split("test", args.data_dir)
  acfg = meta["config"]["attack"]
  trigger = attacks.trigger_from_record(record)
  metrics = evaluate.evaluate(model, variables, test, trigger, acfg, args.batch_size)
  print(f"{args.checkpoint}: ACC {100 * metrics['acc']:.2f} %  "
        f"ASR {100 * metrics['asr']:.2f} %  ({acfg['name']}, "
        f"poison {acfg['poison_ratio']})")
  return metrics


if __name__ == "__main__":
  main()
