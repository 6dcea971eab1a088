"""Directional Rank Reduction (Algorithm 1 of the paper) over any Flax Linen model.

For each conv/dense layer, first to last: take the feature matrix X of the (poisoned)
data at that layer, find k orthonormal directions maximizing the third central moment of
X v (`stiefel`), keep those whose criterion exceeds tau, and fold P = I - V V^T into the
layer's kernel (`projection`). By default (see docs/design.md for the evidence) a kept
candidate v is replaced by the mean difference d of its skewed tail and the rest (the
direction Theorem 1 says v approximates), confirmed by whether removing it flips its
tail's predictions, and removed by replacing the component with its benign mean rather
than zero, the constant folded into biases or BatchNorm running means; a kept direction
is also removed from the later layers that read the same channels through identity
shortcuts, and from every layer that reads the very same input tensor whatever the order
the model calls them in (`carry`, sequential mode). In the faithful 'sequential' mode the
features of later layers come from the network as modified so far; they are re-extracted
only after a layer was actually projected (before that, the original network's features
are exact).
The 'one_pass' mode takes every layer's features from the original network and
optimizes all frames of equal width together in one vmapped program.

Modules, one concept each:
  config        DRRConfig: every setting, its default and its validation
  errors        DefenseError
  inputs        the images, the params' fit, the layers to visit, the feature read
  candidates    candidate directions: skewed tail, tail mean, orthogonality, tail overlap,
                the located estimate
  confirmation  Confirmer: tail flip, collateral, residual flips on a confirmation subset
  removal       Removal.project: fold and mean replacement, with the tap-coverage cache
  readers       channel_link, same_input, carrying kept directions to other readers
  state         Run (fixed per call) and LoopState (accumulated, passed explicitly)
  decision      decide: one layer's kept directions
  ranking       ranked mode: every unit confirmed alone, removed least collateral first
  loop          the layer loop: sequential, one_pass and ranked
  report        the per-layer report and its text table
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax.numpy as jnp

from drr_jax.defenses.drr.confirmation import Confirmer
from drr_jax.defenses.drr.config import DRRConfig, default_config, make_config
from drr_jax.defenses.drr.errors import DefenseError
from drr_jax.defenses.drr.inputs import (as_images, capped_k, check_fit, extract,
                                        layer_plan)
from drr_jax.defenses.drr.loop import run_layers
from drr_jax.defenses.drr.readers import channel_link, same_input
from drr_jax.defenses.drr.removal import Removal
from drr_jax.defenses.drr.report import build_report, format_report
from drr_jax.defenses.drr.state import LoopState, Run, carries

PROBE = 4  # images on which mean shifts are traced to the BatchNorms that absorb them

__all__ = ["DRRConfig", "DefenseError", "as_images", "channel_link", "default_config",
           "defend", "extract", "format_report", "make_config", "same_input"]


def defend(model: nn.Module | Callable, variables: Mapping[str, Any], batch: Any, *,
           config: Mapping[str, Any] | DRRConfig | None = None, progress: bool = True
           ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Runs DRR; returns (new variables, report).

  model: a Linen module (applied with train=False) or an apply(variables, images)
  function that calls Linen modules inside. batch: the (poisoned) training images, as an
  array or an iterable of arrays or (images, labels) pairs. config: overrides of
  `default_config()` (or a DRRConfig). The report holds, per layer, the criterion of each
  optimized direction, the confirmation statistics of the candidates, how many directions
  were kept, and the seconds spent.
  """
  cfg = make_config(config)
  images = as_images(batch, model)
  check_fit(model, variables, images.shape[1:])
  plan = layer_plan(model, variables, images.shape[1:], cfg, images[:PROBE])
  t_start = time.time()
  variables = dict(variables)
  confirmer = (Confirmer(model, images, samples=cfg.confirm_samples,
                         batch_size=cfg.batch_size, seed=cfg.seed)
               if cfg.confirm else None)
  removal = Removal(model, cfg.side, cfg.keep_mean, cfg.mean_fit,
                    jnp.asarray(images[:PROBE]), plan.sites)
  original = confirmer.base(variables) if carries(cfg, confirmer) else None
  run = Run(model, cfg, images, plan.order, plan.classifier, plan.width, removal,
            confirmer, original, progress, plan.sites)
  out = run_layers(run, variables, LoopState.initial(len(images)))
  report = build_report(cfg, out.entries, out.state.carried, out.passes, len(images),
                        time.time() - t_start)
  report["capped_k"] = capped_k(cfg, plan)
  return out.variables, report
