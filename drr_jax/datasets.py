"""The splits one experiment uses: the poisoned training set (what a defender holds),
a clean validation split held out from training, and the clean test set."""
from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np

from drr_jax import attacks, data


class Datasets(NamedTuple):
  train: attacks.PoisonedSet  # poisoned training set (95 % of CIFAR-10 train)
  val: data.Split             # clean held-out 5 %
  test: data.Split | None     # clean test set (None when not asked for)


def load(config: dict[str, Any], data_dir: str | os.PathLike | None = None,
         cache_dir: str | os.PathLike | None = None, test: bool = True) -> Datasets:
  """Reads CIFAR-10, holds out validation, and poisons the rest as config['attack'] says.

  With test=False the test zip is not read (e.g. while choosing settings on validation).
  """
  dcfg = config["data"]
  full = data.load_split("train", data_dir, cache_dir)
  test = data.load_split("test", data_dir, cache_dir) if test else None
  train, val = data.holdout_split(full, dcfg["val_fraction"], dcfg["split_seed"])
  if dcfg.get("limit_train"):
    train = data.Split(*(a[:dcfg["limit_train"]] for a in train))
    val = data.Split(*(a[:max(1, dcfg["limit_train"] // 10)] for a in val))
  if test is not None and dcfg.get("limit_test"):
    keep = np.sort(np.random.default_rng(dcfg["split_seed"]).permutation(
        len(test.labels))[:dcfg["limit_test"]])
    test = data.Split(test.images[keep], test.labels[keep])
  return Datasets(attacks.poison(train.images, train.labels, config["attack"]), val, test)
