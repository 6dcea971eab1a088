r"""Train a (backdoored) CIFAR-10 classifier and report its ACC/ASR on the test set.

  python -m launch.train --preset cpu --attack badnets --data_dir ../shared/data \
      --workdir runs/wrn28_1-badnets
Re-run with --resume to continue a killed run from its last epoch.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax

from drr_jax import attacks, checkpoint, datasets, evaluate, train, utils
from launch.common import (USER_ERRORS, add_config_flags, add_debug_flag, check_folder,
                           config_from_flags, fail, parser)


def main(argv: list[str] | None = None) -> dict:
  p = parser(__doc__, "launch.train")
  add_config_flags(p)
  p.add_argument("--data_dir", help="folder with cifar10-{train,test}.zip "
                 "(default: $DRR_DATA_DIR)")
  p.add_argument("--workdir", help="run folder (default: runs/<model>-<attack>-<preset>)")
  p.add_argument("--resume", action="store_true", help="continue from the last epoch")
  add_debug_flag(p)
  args = p.parse_args(argv)
  try:
    return _run(args)
  except USER_ERRORS as e:
    fail(e, args.debug)


def _run(args: argparse.Namespace) -> dict:
  config = config_from_flags(args)
  check_folder(args.workdir, "--workdir")
  workdir = args.workdir or os.path.join(
      "runs", f"{config['model']['name']}-{config['attack']['name']}-{config['preset']}")
  check_folder(workdir, "--workdir")  # the default one too: writable
  if not args.resume and os.path.isdir(os.path.join(workdir, "checkpoints")):
    sys.exit(f"error: --workdir {workdir} already holds a run: pass --resume to "
             "continue it, or choose another --workdir")
  t0 = time.time()
  ds = datasets.load(config, args.data_dir)
  poisoned = ("per batch, by its generator" if ds.train is None
              else len(ds.train.poison_idx))
  print(f"data: {len(ds.base.labels)} train ({poisoned} poisoned), "
        f"{len(ds.val.labels)} val, {len(ds.test.labels)} test; "
        f"devices {jax.devices()}", flush=True)
  state, meta = train.train(config, ds.base, ds.val, workdir, resume=args.resume)
  model = train.build_model(config)
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  if config["attack"]["name"] in attacks.GENERATED:  # the trained networks' trigger
    trigger = attacks.trigger_from_record(checkpoint.load_model(workdir)[3])
  else:
    trigger = ds.train.trigger if config["attack"]["name"] != "none" else None
  metrics = evaluate.evaluate(model, variables, ds.test, trigger, config["attack"],
                              config["train"]["eval_batch_size"])
  hist = meta["history"]
  result = {"workdir": workdir, "config": config, "test": metrics,
            "train_seconds": sum(h["seconds"]  # with IAB's mask pre-training
                                 for h in hist + meta.get("mask_history", [])),
            "images_per_second": sum(h["images_per_second"] for h in hist) / len(hist),
            "wall_seconds_this_invocation": time.time() - t0,
            "machine": utils.machine_description()}
  utils.write_json_atomic(os.path.join(workdir, "result.json"), result)
  print(f"test ACC {100 * metrics['acc']:.2f} %  ASR {100 * metrics['asr']:.2f} %  "
        f"(train {result['train_seconds'] / 60:.1f} min, "
        f"{result['images_per_second']:.0f} img/s)")
  return result


if __name__ == "__main__":
  main()
