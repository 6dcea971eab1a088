"""Channel Lipschitzness-based Pruning (CLP; Zheng et al. 2022a, ECCV), data-free.

A backdoor channel reacts strongly to a small trigger, so its Lipschitz constant is
large. CLP bounds it by the largest singular value of the channel's conv kernel (the
(in, kh*kw) matrix of one output channel) times the BatchNorm factor |gamma / sigma|,
sigma = sqrt(running variance) as the authors' code (no epsilon). Within each BatchNorm,
channels whose bound exceeds mean + u * std of that layer (std with n - 1, as
torch.std) are pruned by zeroing the BatchNorm's weight and bias (the authors' code,
rkteddy/channel-Lipschitzness-based-pruning defense.py CLP; BackdoorBench defense/clp.py
does the same).

Which conv goes with which BatchNorm: the authors pair each BatchNorm with the conv
defined last before it, which is right where a conv feeds its BatchNorm (their ResNet-18;
their README asks to adapt the pairing to other architectures). The default,
pairing='previous', is that rule, as BackdoorBench applies it to its PreAct-ResNet-18: a
BatchNorm that reads a sum, a concatenation or an activation (the first BatchNorm of a
pre-activation block, DenseNet's) takes the last layer with a kernel called before it,
if its channels match, so that the comparison is with CLP as published. With
pairing='direct' (ours) a BatchNorm is paired only with the layer whose output it reads
directly, traced from the model (`norms.find`); one with no such conv is skipped, and
the report lists it. No data is used: `batch`
only gives the image shape to trace.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import numpy as np

from drr_jax import features
from drr_jax.defenses import common, norms, settings
from drr_jax.defenses.drr.errors import DefenseError
from drr_jax.defenses.drr.inputs import check_fit
from drr_jax.defenses.settings import Setting

METHOD = "clp"
CIFAR_SHAPE = (32, 32, 3)  # the image shape traced when no batch is given

SETTINGS = {
    "u": Setting(3.0, "Zheng et al. 2022a and the authors' code (test.py -u 3.0); "
                 "BackdoorBench config/defense/clp u: 3"),
    "pairing": Setting("previous", "the authors' rule (defense.py CLP: the conv defined "
                       "last before the BatchNorm) and BackdoorBench's; 'direct' (ours): "
                       "only the conv whose output the BatchNorm reads"),
}
PAIRINGS = ("direct", "previous")


def default_config() -> dict[str, Any]:
  """CLP's settings (see `SETTINGS` for the source of each)."""
  return settings.defaults(SETTINGS)


def make_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
  cfg = settings.resolve(METHOD, SETTINGS, overrides)
  settings.check_number(cfg, "u")
  if cfg["pairing"] not in PAIRINGS:
    raise DefenseError(f"pairing must be one of {PAIRINGS}, got {cfg['pairing']!r}")
  return cfg


def upper_bounds(kernel: np.ndarray, scale: np.ndarray, var: np.ndarray) -> np.ndarray:
  """(C_out,) the UCLC of each output channel: sigma_max(kernel[..., k]) |scale_k| /
  sqrt(var_k), the kernel's channel as an (taps * C_in) matrix."""
  k = np.asarray(kernel, np.float64)
  mats = np.moveaxis(k.reshape(-1, k.shape[-2], k.shape[-1]), -1, 0)  # (C_out, taps, C_in)
  top = np.linalg.svd(mats, compute_uv=False)[:, 0]
  with np.errstate(divide="ignore"):
    return top * np.abs(np.asarray(scale, np.float64) / np.sqrt(np.asarray(var, np.float64)))


def outliers_above(values: np.ndarray, u: float) -> np.ndarray:
  """Indices with value > mean + u * std (std with n - 1)."""
  if len(values) < 2:
    return np.zeros(0, np.int64)
  finite = values[np.isfinite(values)]
  limit = finite.mean() + u * finite.std(ddof=1) if len(finite) > 1 else np.inf
  return np.flatnonzero(values > limit)


def defend(model: nn.Module | Callable, variables: Mapping[str, Any], batch: Any = None,
           *, config: Mapping[str, Any] | None = None, clean: Any = None,
           progress: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
  """CLP; returns (new variables, report). Uses no data (`batch`, if given, only for the
  image shape; `clean` is ignored). The report's 'pruned' maps each BatchNorm to the
  channels zeroed, 'bounds' to every channel's UCLC, 'paired' to the conv used, and
  'skipped' lists the BatchNorms left without one."""
  cfg = make_config(config)
  shape = (CIFAR_SHAPE if batch is None
           else common.as_images(batch, METHOD, minimum=1, model=model).shape[1:])
  check_fit(model, variables, shape)
  t0 = time.time()
  found = norms.find(model, variables, shape)
  if not found:
    raise DefenseError("CLP prunes BatchNorm channels, and the model has no BatchNorm")
  kernels = features.layer_kernels(variables["params"])  # depthwise ones included
  pruned, bounds, skipped, paired = {}, {}, [], {}
  for n in found:
    conv = n.feeder or (n.previous if cfg["pairing"] == "previous" else None)
    kernel = kernels.get(conv) if conv else None
    scale = norms.get(variables, n.path, "params", "scale", np.ones(n.channels))
    var = norms.get(variables, n.path, "batch_stats", "var")
    if kernel is None or var is None or np.shape(kernel)[-1] != n.channels:
      skipped.append(n.path)
      continue
    paired[n.path] = conv
    ub = upper_bounds(kernel, scale, var)
    bounds[n.path] = [float(b) for b in ub]
    pruned[n.path] = [int(i) for i in outliers_above(ub, float(cfg["u"]))]
  new = norms.zero_channels(variables, pruned, ("scale", "bias"))
  report = common.build_report(METHOD, cfg, settings.sources(SETTINGS), "channels",
                               pruned, time.time() - t0, bounds=bounds, skipped=skipped,
                               paired=paired)
  return new, report

