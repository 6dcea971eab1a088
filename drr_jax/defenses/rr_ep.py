"""RR-EP: entropy-based pruning recast as rank reduction (this project's own method,
after the paper's section 6, which leaves such versions as future work).

EP prunes the neurons whose standardized pre-activation has an unusually low histogram
entropy (`ep`). RR-EP looks for the *direction* of lowest entropy instead: a backdoor
whose two populations (benign, poisoned) separate along a direction that mixes several
channels is bimodal along that direction, while each channel alone may look unimodal.

Where: the output of every conv/dense layer but the classifier (its pre-BatchNorm
output, EP's BatchNorm input wherever a conv feeds its BatchNorm), per-image spatial max
as EP. Removing a direction there is exact (`drr_jax.sites`: every path reads that tensor
through the layer) by folding P = I - V V^T into the kernel's output side.

How, per layer, from one pass over the original network:
1. EP's entropy of every channel on `samples` poisoned training images gives the
   layer's limit, mean - u * std, exactly as EP's.
2. A direction is sought that minimizes a smooth stand-in for that entropy (a histogram
   with Gaussian soft bins of width `bandwidth`) on `fit_samples` other images, by Cayley
   descent on the unit sphere (`stiefel.cayley_step`) from the `starts` lowest-entropy
   channels, within the directions along which the features vary (variance above 1e-4 of
   the largest; a constant direction would have zero entropy).
3. It is kept if its EP entropy, on the first images (which the search did not see), is
   below the limit; then the next is sought orthogonal to the kept ones, up to `k`.
4. The kept directions are removed with their mean kept (x -> x - (x - mu) V V^T, the
   constant folded into the BatchNorm's running mean, as DRR's removal), as EP's zeroed
   BatchNorm weight leaves a pruned channel at its mean, beta; where the constant cannot
   be folded exactly, the component is zeroed (the report says which).
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from drr_jax import features, stiefel
from drr_jax.defenses import common, ep, settings
from drr_jax.defenses.drr.errors import DefenseError
from drr_jax.defenses.drr.inputs import check_fit, extract
from drr_jax.defenses.drr.removal import Removal
from drr_jax.defenses.settings import Setting

METHOD = "rr-ep"
PROBE = 4  # images on which mean shifts are traced to the BatchNorms that absorb them
_GRID = 8.0  # soft-histogram bins cover [-8, 8] standard deviations (values clipped)

SETTINGS = {
    "u": Setting(3.0, "EP's (Zheng et al. 2022b; authors' code -u 3.0)"),
    "samples": Setting(500, "EP's: the entropies that decide are measured on one batch "
                       "of 500 poisoned training images, as the authors' EP"),
    "step": Setting(0.01, "EP's histogram bin width (authors' batch_entropy_2)"),
    "fit_samples": Setting(2000, "ours: other training images on which directions are "
                           "sought, so that the deciding entropy is measured on images "
                           "the search did not see"),
    "k": Setting(4, "ours: at most this many directions per layer"),
    "starts": Setting(4, "ours: descents started from the lowest-entropy channels"),
    "steps": Setting(100, "ours: Cayley steps per descent"),
    "lr": Setting(0.1, "ours: Cayley step size (DRR's)"),
    "bandwidth": Setting(0.1, "ours: soft-bin width of the smooth entropy, in standard "
                         "deviations (BackdoorBench's EP bin width)"),
    "keep_mean": Setting(True, "ours: replace the removed component by its mean, as EP's "
                         "zeroed gamma leaves a channel at its mean"),
    "batch_size": Setting(500, "ours: images per forward pass (no effect on the result)"),
    "seed": Setting(0, "ours: which training images are drawn"),
}


def default_config() -> dict[str, Any]:
  """RR-EP's settings (see `SETTINGS` for the source of each)."""
  return settings.defaults(SETTINGS)


def make_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
  cfg = settings.resolve(METHOD, SETTINGS, overrides)
  settings.check_number(cfg, "u")
  for key in ("samples", "fit_samples"):
    settings.check_number(cfg, key, low=2, integer=True)
  for key in ("k", "starts", "batch_size"):
    settings.check_number(cfg, key, low=1, integer=True)
  settings.check_number(cfg, "steps", low=0, integer=True)
  for key in ("step", "lr", "bandwidth"):
    settings.check_number(cfg, key, low=0.0, open_low=True)
  settings.check_flag(cfg, "keep_mean")
  settings.check_number(cfg, "seed", low=0, integer=True)
  return cfg


def soft_entropy(x: jax.Array, v: jax.Array, width: float) -> jax.Array:
  """Entropy of the histogram, with Gaussian soft bins of `width`, of the standardized
  projection of the centered features x (N, C) on v (C,): smooth in v."""
  p = x @ v
  z = p / jnp.sqrt(jnp.mean(p * p) + 1e-12)
  grid = jnp.arange(-_GRID, _GRID + width / 2, width)
  z = jnp.clip(z, -_GRID, _GRID)
  w = jnp.exp(-0.5 * jnp.square((z[:, None] - grid[None, :]) / width))
  w = w / (jnp.sum(w, axis=1, keepdims=True) + 1e-12)
  q = jnp.mean(w, axis=0)
  return -jnp.sum(q * jnp.log(q + 1e-12))


@functools.partial(jax.jit, static_argnames=("steps", "width"))
def _descend(x: jax.Array, starts: jax.Array, steps: int, lr: float, width: float
             ) -> tuple[jax.Array, jax.Array]:
  """From each start column (C, S), `steps` Cayley steps down the soft entropy; returns
  the end directions (C, S) and their soft entropies (S,)."""
  neg = lambda f: -soft_entropy(x, f[:, 0], width)
  grad = jax.grad(neg)

  def one(start):
    def step(f, _):
      return stiefel.cayley_step(f, grad(f), lr), None
    f, _ = jax.lax.scan(step, start[:, None], None, length=steps)
    f = f / jnp.linalg.norm(f)
    return f[:, 0], soft_entropy(x, f[:, 0], width)

  return jax.vmap(one, in_axes=1, out_axes=(1, 0))(starts)


def _varying(x: np.ndarray) -> np.ndarray:
  """(C, C') orthonormal basis of the directions along which x (N, C) varies."""
  values, vectors = np.linalg.eigh(np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1]))
  return vectors[:, values > 1e-4 * max(float(values.max()), 1e-30)]


def _entropy_along(x: np.ndarray, v: np.ndarray, step: float) -> float:
  """EP's entropy of the features' projection on v (NaN if constant)."""
  return float(ep.layer_entropies((x @ v)[:, None], step)[0])


def search(x_fit: np.ndarray, x_eval: np.ndarray, cfg: Mapping[str, Any]
           ) -> tuple[np.ndarray, dict[str, Any]]:
  """The kept directions (C, m) of one layer's features, and what was measured."""
  axes = ep.layer_entropies(x_eval, float(cfg["step"]))
  idx, limit = ep.outliers_below(axes, float(cfg["u"]))
  info = {"limit": limit if np.isfinite(limit) else None,
          "axes_below": [int(i) for i in idx], "tried": []}
  c = x_fit.shape[1]
  kept = np.zeros((c, 0))
  if not np.isfinite(limit):
    return kept, info
  order = np.argsort(np.where(np.isfinite(axes), axes, np.inf), kind="stable")
  fit = x_fit - x_fit.mean(0)
  for _ in range(int(cfg["k"])):
    proj = np.eye(c) - kept @ kept.T
    basis = _varying(fit @ proj)  # (C, C')
    if basis.shape[1] < 2:
      break
    within = basis @ basis.T  # the search stays in this subspace: its gradient lies there
    starts = [within[:, i] for i in order if np.linalg.norm(within[:, i]) > 0.5]
    starts += [basis[:, j % basis.shape[1]]
               for j in range(int(cfg["starts"]))]  # too few channels: principal axes
    starts = np.stack([s / np.linalg.norm(s) for s in starts[:int(cfg["starts"])]], 1)
    # full width C (one compiled program per layer width), projected on the subspace
    ends, soft = _descend(jnp.asarray(fit @ within, jnp.float32),
                          jnp.asarray(starts, jnp.float32), int(cfg["steps"]),
                          float(cfg["lr"]), float(cfg["bandwidth"]))
    best = int(np.argmin(np.asarray(soft)))
    v = within @ np.asarray(ends[:, best], np.float64)
    v /= np.linalg.norm(v)
    h = _entropy_along(x_eval, v, float(cfg["step"]))
    info["tried"].append({"entropy": None if not np.isfinite(h) else h,
                          "soft_entropy": float(np.asarray(soft)[best])})
    if not (np.isfinite(h) and h < limit):
      break
    kept = np.concatenate([kept, v[:, None]], 1)
  return kept, info


def defend(model: nn.Module | Callable, variables: Mapping[str, Any], batch: Any,
           *, config: Mapping[str, Any] | None = None, clean: Any = None,
           progress: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
  """RR-EP on `batch`, the poisoned training images; returns (new variables, report).
  `clean` is ignored. The report's 'pruned' maps each layer to its removed unit
  directions (on the layer's output), 'search' to what was measured there."""
  cfg = make_config(config)
  images = common.as_images(batch, METHOD, minimum=4, model=model)
  check_fit(model, variables, images.shape[1:])
  t0 = time.time()
  order = features.layer_order(model, variables, images.shape[1:])
  layers = tuple(order[:-1])
  if not layers:
    raise DefenseError("RR-EP needs a conv or dense layer before the classifier")
  ev = common.subset(len(images), int(cfg["samples"]), int(cfg["seed"]))
  fit = common.subset(len(images), int(cfg["fit_samples"]), int(cfg["seed"]) + 1, skip=ev)
  if len(fit) < 2:  # too few images for two sets: search and decide on the same ones
    fit = ev
  both = np.concatenate([ev, fit])
  feats, means = extract(model, variables, images[both], layers, outputs=True,
                         pooling="max", batch_size=int(cfg["batch_size"]),
                         progress=progress, desc="layer outputs", with_means=True)
  removal = Removal(model, "output", bool(cfg["keep_mean"]), "average",
                    jnp.asarray(images[:PROBE]))
  current = dict(variables)
  pruned, searched, mean_kept = {}, {}, {}
  for name in tqdm(layers, desc="RR-EP layers", disable=not progress, leave=False):
    x = np.asarray(feats[name], np.float64)
    kept, info = search(x[len(ev):], x[:len(ev)], cfg)
    searched[name] = info
    pruned[name] = kept.T.tolist()
    if kept.shape[1]:
      mu = np.asarray(means[name], np.float64).mean(0)
      current, ok, _ = removal.project(current, name, jnp.asarray(kept, jnp.float32),
                                       jnp.asarray(mu, jnp.float32), {})
      mean_kept[name] = bool(ok)
  report = common.build_report(METHOD, cfg, settings.sources(SETTINGS), "directions",
                               pruned, time.time() - t0, search=searched,
                               mean_kept=mean_kept, num_images=int(len(both)))
  return current, report
