"""Fine-pruning (FP; Liu, Dolan-Gavitt & Garg 2018), on clean data the caller provides.

FP holds that backdoor neurons lie dormant on clean inputs. It runs clean images through
the network, ranks the channels of the last convolutional layer by their mean activation,
prunes them in increasing order until the clean accuracy has dropped by a set margin,
keeps the last network within it, and fine-tunes that network on the clean data.

Here (see `head` for why this is the last conv layer's pruning): the channels are the
classifier's inputs, pruned by zeroing the classifier kernel's input rows, one channel at
a time (the paper's procedure; BackdoorBench prunes 1 % of the channels per step), the
accuracy read on the clean data given, and the pruned rows held at zero while
fine-tuning. FP needs clean data that DRR, CLP and EP do not: pass the clean validation
split (5 % of the training set) -- never the test set. BackdoorBench measures the
accuracy drop on the test set, a leak this implementation does not repeat.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import numpy as np

from drr_jax.defenses import common, head, settings
from drr_jax.defenses.drr.inputs import check_fit
from drr_jax.defenses.settings import Setting

METHOD = "fp"

FINETUNE = {
    "max_acc_drop": Setting(0.1, "BackdoorBench config/defense/fp acc_ratio 0.1: stop "
                            "before the clean accuracy drops by 10 % of itself (Liu et al. "
                            "stop at a preset drop of validation accuracy; the paper's "
                            "Table 1 FP numbers lose 4.5-10 ACC points, as this margin "
                            "allows)"),
    "finetune_epochs": Setting(100, "BackdoorBench config/defense/fp epochs 100 (Liu et al. "
                               "give no schedule)"),
    "finetune_batch_size": Setting(256, "BackdoorBench config/defense/fp batch_size 256"),
    "finetune_lr": Setting(0.01, "BackdoorBench config/defense/fp lr 0.01, "
                           "CosineAnnealingLR"),
    "finetune_momentum": Setting(0.9, "BackdoorBench config/defense/fp sgd_momentum 0.9"),
    "finetune_weight_decay": Setting(5e-4, "BackdoorBench config/defense/fp wd 5e-4"),
    "augment": Setting(True, "BackdoorBench fine-tunes with its training transform "
                       "(random crop with 4-pixel padding, horizontal flip)"),
    "batch_size": Setting(500, "ours: images per forward pass (no effect on the result)"),
    "seed": Setting(0, "ours: the order of fine-tuning batches and augmentations"),
}

SETTINGS = dict(FINETUNE)


def default_config() -> dict[str, Any]:
  """FP's settings (see `SETTINGS` for the source of each)."""
  return settings.defaults(SETTINGS)


def make_config(overrides: Mapping[str, Any] | None = None,
                table: Mapping[str, Setting] = SETTINGS, method: str = METHOD
                ) -> dict[str, Any]:
  """The defaults with `overrides`, every value checked (DefenseError names a bad one)."""
  cfg = settings.resolve(method, table, overrides)
  settings.check_number(cfg, "max_acc_drop", low=0.0, high=1.0, open_low=True)
  settings.check_number(cfg, "finetune_epochs", low=0, integer=True)
  for key in ("finetune_batch_size", "batch_size"):
    settings.check_number(cfg, key, low=1, integer=True)
  settings.check_number(cfg, "finetune_lr", low=0.0, open_low=True)
  settings.check_number(cfg, "finetune_momentum", low=0.0, high=1.0)
  settings.check_number(cfg, "finetune_weight_decay", low=0.0)
  settings.check_flag(cfg, "augment")
  settings.check_number(cfg, "seed", low=0, integer=True)
  return cfg


def run(method: str, cfg: Mapping[str, Any], sources: Mapping[str, str],
        model: nn.Module | Callable, variables: Mapping[str, Any], clean: Any,
        order: Callable[[head.Head], tuple[np.ndarray, np.ndarray]], units: str,
        progress: bool) -> tuple[dict[str, Any], dict[str, Any]]:
  """The FP procedure with a given ranking: order(head) -> (frame (C, C) whose columns
  are removed first to last, the criterion of each). Shared with RR-FP."""
  images, labels = common.clean_data(clean, method, model=model)
  head.require_module(model, cfg, method)
  check_fit(model, variables, images.shape[1:])
  common.check_labels(labels, model, variables, images.shape[1:])
  t0 = time.time()
  h = head.read(model, variables, images, batch_size=int(cfg["batch_size"]),
                progress=progress)
  frame, criterion = order(h)
  schedule = head.prune_until_drop(h, labels, frame, float(cfg["max_acc_drop"]))
  kept = frame[:, :schedule.removed]
  pruned = head.remove(variables, h.name, kept)
  tuned, losses = head.finetune(model, pruned, h.name, kept, images, labels, cfg, progress)
  after = head.accuracy(model, tuned, images, labels, int(cfg["batch_size"]))
  if units == "channels":
    removed = [int(np.argmax(np.abs(kept[:, j]))) for j in range(kept.shape[1])]
  else:
    removed = kept.T.tolist()
  report = common.build_report(
      method, cfg, sources, units, {h.name: removed}, time.time() - t0, clean=len(images),
      criterion=[float(c) for c in criterion[:schedule.removed]],
      clean_acc={"before": schedule.accuracies[0], "pruned": schedule.accuracy,
                 "finetuned": after},
      prune_curve=schedule.accuracies, finetune_losses=losses,
      channels=int(frame.shape[0]))
  return tuned, report


def _order(h: head.Head) -> tuple[np.ndarray, np.ndarray]:
  """The channels by increasing mean activation on the clean data, as axis columns."""
  means = h.x.mean(0)
  idx = np.argsort(means, kind="stable")
  return np.eye(len(means))[:, idx], means[idx]


def defend(model: nn.Module | Callable, variables: Mapping[str, Any], batch: Any = None,
           *, config: Mapping[str, Any] | None = None, clean: Any = None,
           progress: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
  """Fine-pruning; returns (new variables, report). `clean` = (images, labels) is
  required (the clean validation split); `batch`, the poisoned training set, is not used.
  The report's 'pruned' lists the classifier input channels zeroed, in pruning order;
  'clean_acc' the accuracy on the clean data before, after pruning and after
  fine-tuning (on the very data fine-tuned on: not a held-out figure)."""
  cfg = make_config(config)
  return run(METHOD, cfg, settings.sources(SETTINGS), model, variables, clean, _order,
             "channels", progress)
