"""Entropy-based pruning (EP; Zheng et al. 2022b, NeurIPS, "Pre-activation distributions
expose backdoor neurons"), on the poisoned training set only, like DRR.

A backdoor neuron's pre-activation over the poisoned set mixes two populations (benign,
poisoned) and so has a lower entropy than a benign neuron's unimodal one. For each
BatchNorm, EP takes each image's per-channel spatial max of the BatchNorm's input,
standardizes each channel over the images (std with n - 1, as torch.std), computes each
channel's histogram entropy (natural log), and prunes the channels whose entropy is below
mean - u * std of that layer, by zeroing the BatchNorm's weight (gamma): the channel then
outputs its mean, beta. Source: the authors' code RJ-T/NIPS2022_EP_BNP (defense.py EP and
batch_entropy_2); BackdoorBench's defense/ep.py is the same with a bin width of 0.1 and
zeroes the bias too.

The histogram: bins of width `step` from the layer's smallest standardized value, as
many as fit below its largest (the authors' n_bars); a value on a bin edge is counted in
the bin above it (the authors' strict comparisons drop such values, and the layer's
minimum). A constant channel (std 0) gets no entropy and is not pruned (in the authors'
code its NaN values fall in no bin, entropy 0, so it would be).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import numpy as np

from drr_jax.defenses import common, norms, settings
from drr_jax.defenses.drr.errors import DefenseError
from drr_jax.defenses.drr.inputs import check_fit
from drr_jax.defenses.settings import Setting

METHOD = "ep"

SETTINGS = {
    "u": Setting(3.0, "Zheng et al. 2022b and the authors' code (test.py -u 3.0); "
                 "BackdoorBench config/defense/ep u: 3"),
    "samples": Setting(500, "the authors' code uses one batch (--batch-size 500) of the "
                       "poisoned training set (EP breaks after the first batch); "
                       "BackdoorBench one batch of 256"),
    "step": Setting(0.01, "histogram bin width of the standardized values: the authors' "
                    "batch_entropy_2 step_size 0.01 (BackdoorBench: 0.1)"),
    "batch_size": Setting(500, "ours: images per forward pass (no effect on the result)"),
    "seed": Setting(0, "ours: which training images are drawn"),
}


def default_config() -> dict[str, Any]:
  """EP's settings (see `SETTINGS` for the source of each)."""
  return settings.defaults(SETTINGS)


def make_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
  cfg = settings.resolve(METHOD, SETTINGS, overrides)
  settings.check_number(cfg, "u")
  settings.check_number(cfg, "samples", low=2, integer=True)
  settings.check_number(cfg, "step", low=0.0, open_low=True)
  settings.check_number(cfg, "batch_size", low=1, integer=True)
  settings.check_number(cfg, "seed", low=0, integer=True)
  return cfg


def standardize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(N, C) -> (each column minus its mean over its std with n - 1; NaN where constant),
  and which columns are constant."""
  x = np.asarray(x, np.float64)
  std = x.std(axis=0, ddof=1)
  constant = ~(std > 0)
  with np.errstate(invalid="ignore", divide="ignore"):
    z = (x - x.mean(axis=0)) / np.where(constant, np.nan, std)
  return z, constant


def histogram_entropy(z: np.ndarray, step: float) -> np.ndarray:
  """(C,) entropy of each column's histogram, bins of width `step` starting at the
  smallest finite value of the whole array (shared by all columns); NaN for a column
  with no finite value."""
  z = np.asarray(z, np.float64)
  finite = np.isfinite(z)
  out = np.full(z.shape[1], np.nan)
  if not finite.any():
    return out
  low, high = z[finite].min(), z[finite].max()
  bars = max(1, int((high - low) / step))
  idx = np.floor((np.where(finite, z, low) - low) / step).astype(np.int64)
  inside = finite & (idx < bars)
  n = z.shape[0]
  for c in np.flatnonzero(finite.any(axis=0)):
    p = np.bincount(idx[inside[:, c], c], minlength=bars) / n
    p = p[p > 0]
    out[c] = float(-(p * np.log(p)).sum())
  return out


def outliers_below(values: np.ndarray, u: float) -> tuple[np.ndarray, float]:
  """(indices with value < mean - u * std over the finite values (std with n - 1), the
  limit); no index where fewer than two values are finite."""
  finite = values[np.isfinite(values)]
  if len(finite) < 2:
    return np.zeros(0, np.int64), float("-inf")
  limit = float(finite.mean() - u * finite.std(ddof=1))
  return np.flatnonzero(np.isfinite(values) & (values < limit)), limit


def layer_entropies(x: np.ndarray, step: float) -> np.ndarray:
  """(C,) EP's entropy of each channel of the features x (N, C)."""
  z, _ = standardize(x)
  return histogram_entropy(z, step)


def defend(model: nn.Module | Callable, variables: Mapping[str, Any], batch: Any,
           *, config: Mapping[str, Any] | None = None, clean: Any = None,
           progress: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
  """EP on `batch`, the poisoned training images; returns (new variables, report).
  `clean` is ignored: EP uses no clean data. The report's 'pruned' maps each BatchNorm
  to the channels whose weight was zeroed, 'entropy' to every channel's entropy and
  'limit' to the layer's threshold."""
  cfg = make_config(config)
  images = common.as_images(batch, METHOD, model=model)
  check_fit(model, variables, images.shape[1:])
  t0 = time.time()
  found = norms.find(model, variables, images.shape[1:])
  if not found:
    raise DefenseError("EP prunes BatchNorm channels, and the model has no BatchNorm")
  pick = common.subset(len(images), int(cfg["samples"]), int(cfg["seed"]))
  feats = norms.max_inputs(model, variables, images[pick], [n.path for n in found],
                           batch_size=int(cfg["batch_size"]), progress=progress)
  pruned, entropy, limits = {}, {}, {}
  for n in found:
    h = layer_entropies(feats[n.path], float(cfg["step"]))
    idx, limit = outliers_below(h, float(cfg["u"]))
    pruned[n.path] = [int(i) for i in idx]
    entropy[n.path] = [None if not np.isfinite(v) else float(v) for v in h]
    limits[n.path] = limit if np.isfinite(limit) else None
  new = norms.zero_channels(variables, pruned, ("scale",))
  report = common.build_report(METHOD, cfg, settings.sources(SETTINGS), "channels",
                               pruned, time.time() - t0, entropy=entropy, limit=limits,
                               num_images=int(len(pick)))
  return new, report
