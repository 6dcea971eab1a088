"""ACC and ASR of a checkpoint on the real CIFAR-10 test set.

  python -m launch.evaluate --checkpoint artifacts/wrn28_1-badnets-cpu --data_dir ../shared/data
The trigger and attack settings come from the checkpoint's own record.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from drr_jax import attacks, checkpoint, data, evaluate


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True, help="run folder or its checkpoints/")
  p.add_argument("--data_dir", help="folder with cifar10-test.zip (default: $DRR_DATA_DIR)")
  p.add_argument("--batch_size", type=int, default=500)
  args = p.parse_args(argv)
  try:
    model, variables, meta, record = checkpoint.load_model(args.checkpoint)
  except checkpoint.CheckpointError as e:
    sys.exit(f"error: {e}")
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
