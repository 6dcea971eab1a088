"""The splits one experiment uses: the poisoned training set (what a defender holds),
a clean validation split held out from training, and the clean test set."""
from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np

from drr_jax import attacks, data


class Datasets(NamedTuple):
  # poisoned training set (95 % of CIFAR-10 train), as trained on; for IAB, None unless a
  # checkpoint's attack record was given (its poisoned samples exist only once trained)
  train: attacks.PoisonedSet | None
  val: data.Split             # clean held-out 5 %
  test: data.Split | None     # clean test set (None when not asked for)
  # what `train.train` consumes: `train` itself, or for a per-batch attack (WaNet) the
  # clean base whose batches training poisons as it draws them
  train_base: attacks.PoisonedSet | None = None

  @property
  def base(self) -> attacks.PoisonedSet:
    return self.train if self.train_base is None else self.train_base


def load(config: dict[str, Any], data_dir: str | os.PathLike | None = None,
         cache_dir: str | os.PathLike | None = None, test: bool = True,
         record: dict[str, Any] | None = None,
         attacker_model: str | os.PathLike | None = None) -> Datasets:
  """Reads CIFAR-10, holds out validation, and poisons the rest as config['attack'] says:
  `train` is the set the model was trained on (a per-batch attack's: as its final epoch
  used it), `base` what `train.train` takes.

  IAB's poisoned samples are made by networks trained with the model, so its `train` is
  read from the trained checkpoint's attack `record` (`checkpoint.load_model`): the final
  epoch's samples as training made them (`attacks.iab.trained_set`). Without a record it
  is None, so that no clean set passes for the poisoned one; `base` is the clean set.

  With test=False the test zip is not read (e.g. while choosing settings on validation).
  `attacker_model`: a folder that may hold CLA's attacker model, finished
  (`adversary.beside(checkpoint)`), used instead of training it.
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
  perturb = None
  if config["attack"].get("name") in attacks.NEEDS_ADVERSARY:
    from drr_jax import adversary  # trains the attacker's model: only for these attacks
    adv_root = None if cache_dir is None else os.path.join(cache_dir, "adversary")
    perturb = lambda idx: adversary.perturbed(config, train, val, idx, cache_dir=adv_root,
                                              exported=attacker_model)
  base = attacks.poison(train.images, train.labels, config["attack"], perturb=perturb)
  if config["attack"].get("name") in attacks.GENERATED:
    used = None if record is None else attacks.iab.trained_set(base, record)
    return Datasets(used, val, test, base)
  if config["attack"].get("name") not in attacks.PER_BATCH:
    return Datasets(base, val, test)
  t = config["train"]
  used = attacks.trained_set(base, config["attack"], config["seed"], t["epochs"],
                             t["batch_size"])
  return Datasets(used, val, test, base)
