"""Adversarial Neuron Pruning (ANP; Wu & Wang 2021, NeurIPS), on clean data the caller
provides.

A backdoored network collapses (towards the target) when its neurons are slightly
perturbed; ANP learns which neurons to keep under such perturbations. Every BatchNorm
channel k gets a mask m_k in [0, 1] and perturbations delta_k, xi_k: its output
gamma * x_hat + beta becomes (m_k + delta_k) gamma_k x_hat + (1 + xi_k) beta_k. Each
iteration draws a batch of clean images (with replacement), starts delta, xi uniform in
[-eps, eps], takes `steps` signed-gradient ascent steps of size eps / steps on the loss,
and moves the masks by SGD on alpha * L(m, 0, 0) + (1 - alpha) * L(m, delta, xi),
clipping them to [0, 1]. The BatchNorms use batch statistics throughout, as the
authors' code (model.train() in mask_train). Neurons whose mask ends at or below the
threshold are pruned by zeroing their BatchNorm weight (gamma), as the authors'
prune_neuron_cifar.py and BackdoorBench's defense/anp.py do.

The threshold is chosen without any triggered image: the paper's fixed 0.2 by default,
or with threshold=None the largest value on BackdoorBench's grid (0.05 .. 0.9, step 0.05)
whose pruned network keeps the clean accuracy, on the clean data given, within a
relative drop of max_acc_drop. BackdoorBench picks the threshold with the lowest *test*
ASR (issue #35 there), a leak this implementation does not repeat. ANP needs clean data
that DRR, CLP and EP do not: pass the clean validation split (5 % of the training set),
never the test set.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from drr_jax import data
from drr_jax.defenses import common, head, norms, settings
from drr_jax.defenses.drr.errors import DefenseError
from drr_jax.defenses.drr.inputs import check_fit
from drr_jax.defenses.settings import Setting

METHOD = "anp"

SETTINGS = {
    "eps": Setting(0.4, "Wu & Wang 2021 (perturbation budget 0.4); authors' code "
                   "--anp-eps 0.4; BackdoorBench anp_eps 0.4"),
    "steps": Setting(1, "authors' code --anp-steps 1 (one signed step per iteration); "
                     "BackdoorBench anp_steps 1"),
    "alpha": Setting(0.2, "trade-off of the natural and perturbed losses: paper 0.2; "
                     "authors' code --anp-alpha 0.2; BackdoorBench anp_alpha 0.2"),
    "iterations": Setting(2000, "paper: 2000 iterations; authors' code --nb-iter 2000; "
                          "BackdoorBench nb_iter 2000"),
    "lr": Setting(0.2, "mask learning rate, SGD: paper (constant 0.2); authors' code "
                  "--lr 0.2"),
    "momentum": Setting(0.9, "mask SGD momentum: paper and authors' code 0.9"),
    "batch_size": Setting(128, "paper and authors' code --batch-size 128 (RandomSampler "
                          "with replacement)"),
    "clip_noise": Setting(True, "keep delta, xi within [-eps, eps], the paper's budget "
                          "(the authors' code adds the signed step to a uniform start "
                          "without clipping)"),
    "augment": Setting(True, "the authors' code draws the clean images through its "
                       "training transform (random crop with 4-pixel padding, flip)"),
    "threshold": Setting(0.2, "prune masks <= 0.2, the paper's pruning threshold; None: "
                         "choose on the clean data (see max_acc_drop), never on test ASR"),
    "max_acc_drop": Setting(0.1, "only with threshold=None: BackdoorBench's acc_ratio "
                            "0.1 (relative clean accuracy drop), on the clean data given"),
    "eval_batch_size": Setting(500, "ours: images per forward pass when measuring the "
                               "clean accuracy (no effect on the result)"),
    "seed": Setting(0, "ours: batches, perturbation starts and augmentations"),
}
GRID = np.round(np.arange(0.05, 0.9 + 1e-9, 0.05), 2)  # BackdoorBench pruning_step/max


def default_config() -> dict[str, Any]:
  """ANP's settings (see `SETTINGS` for the source of each)."""
  return settings.defaults(SETTINGS)


def make_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
  cfg = settings.resolve(METHOD, SETTINGS, overrides)
  settings.check_number(cfg, "eps", low=0.0)
  settings.check_number(cfg, "alpha", low=0.0, high=1.0)
  for key in ("steps", "batch_size", "eval_batch_size"):
    settings.check_number(cfg, key, low=1, integer=True)
  settings.check_number(cfg, "iterations", low=0, integer=True)
  settings.check_number(cfg, "lr", low=0.0, open_low=True)
  settings.check_number(cfg, "momentum", low=0.0, high=1.0)
  settings.check_flag(cfg, "clip_noise")
  settings.check_flag(cfg, "augment")
  if cfg["threshold"] is not None:
    settings.check_number(cfg, "threshold", low=0.0, high=1.0)
  settings.check_number(cfg, "max_acc_drop", low=0.0, high=1.0, open_low=True)
  settings.check_number(cfg, "seed", low=0, integer=True)
  return cfg


def perturbed_logits(model: nn.Module, variables: Mapping[str, Any], images: jax.Array,
                     mask: Mapping[str, jax.Array], noise: Mapping[str, jax.Array],
                     noise_bias: Mapping[str, jax.Array]) -> jax.Array:
  """The logits with every BatchNorm output y = gamma x_hat + beta replaced by
  (mask + noise) (y - beta) + (1 + noise_bias) beta, BatchNorms on batch statistics."""
  betas = {p: norms.get(variables, p, "params", "bias") for p in mask}

  def perturb(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if context.method_name != "__call__" or not isinstance(context.module, nn.BatchNorm):
      return y
    path = "/".join(context.module.scope.path)
    if path not in mask:
      return y
    beta = betas[path]
    beta = jnp.zeros(y.shape[-1], y.dtype) if beta is None else beta.astype(y.dtype)
    return (mask[path] + noise[path]) * (y - beta) + (1.0 + noise_bias[path]) * beta

  with nn.intercept_methods(perturb):
    if "batch_stats" in variables:
      logits, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
    else:
      logits = model.apply(variables, images, train=True)
  return logits


def optimize_masks(model: nn.Module, variables: Mapping[str, Any], images: np.ndarray,
                   labels: np.ndarray, paths: list[str], channels: list[int],
                   cfg: Mapping[str, Any], progress: bool = True
                   ) -> tuple[dict[str, np.ndarray], list[float]]:
  """ANP's mask optimization; returns ({BatchNorm path: mask values}, the loss logged
  every 100 iterations)."""
  eps, steps, alpha = float(cfg["eps"]), int(cfg["steps"]), float(cfg["alpha"])
  tx = optax.sgd(float(cfg["lr"]), momentum=float(cfg["momentum"]))
  n, b = len(images), int(cfg["batch_size"])
  augment, clip = bool(cfg["augment"]), bool(cfg["clip_noise"])

  def loss(mask, noise, noise_bias, v, x, y):
    logits = perturbed_logits(model, v, x, mask, noise, noise_bias)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def uniform(key):
    keys = jax.random.split(key, len(paths))
    return {p: jax.random.uniform(k, (c,), jnp.float32, -eps, eps)
            for p, c, k in zip(paths, channels, keys)}

  @jax.jit
  def step(v, x_all, y_all, mask, opt_state, key):
    k_idx, k_aug, k_noise, k_bias = jax.random.split(key, 4)
    idx = jax.random.randint(k_idx, (b,), 0, n)
    x, y = x_all[idx], y_all[idx]
    if augment:
      x = data.augment(k_aug, x)
    zeros = jax.tree.map(jnp.zeros_like, mask)
    noise, noise_b = uniform(k_noise), uniform(k_bias)
    for _ in range(steps):  # signed ascent on the loss
      g, gb = jax.grad(loss, argnums=(1, 2))(mask, noise, noise_b, v, x, y)
      noise = jax.tree.map(lambda d, s: d + eps / steps * jnp.sign(s), noise, g)
      noise_b = jax.tree.map(lambda d, s: d + eps / steps * jnp.sign(s), noise_b, gb)
      if clip:
        noise = jax.tree.map(lambda d: jnp.clip(d, -eps, eps), noise)
        noise_b = jax.tree.map(lambda d: jnp.clip(d, -eps, eps), noise_b)
    rob, g_rob = jax.value_and_grad(loss)(mask, noise, noise_b, v, x, y)
    nat, g_nat = jax.value_and_grad(loss)(mask, zeros, zeros, v, x, y)
    grads = jax.tree.map(lambda a, r: alpha * a + (1 - alpha) * r, g_nat, g_rob)
    updates, opt_state = tx.update(grads, opt_state, mask)
    mask = jax.tree.map(lambda m: jnp.clip(m, 0.0, 1.0), optax.apply_updates(mask, updates))
    return mask, opt_state, alpha * nat + (1 - alpha) * rob

  v = dict(variables)
  x_all, y_all = jnp.asarray(images), jnp.asarray(labels)
  mask = {p: jnp.ones(c, jnp.float32) for p, c in zip(paths, channels)}
  opt_state = tx.init(mask)
  key = jax.random.key(int(cfg["seed"]))
  logged = []
  for i in tqdm(range(int(cfg["iterations"])), desc="ANP masks", disable=not progress,
                leave=False):
    key, sub = jax.random.split(key)
    mask, opt_state, value = step(v, x_all, y_all, mask, opt_state, sub)
    if i % 100 == 0:
      logged.append(float(value))
  return {p: np.asarray(m) for p, m in mask.items()}, logged


def _prune(masks: Mapping[str, np.ndarray], threshold: float) -> dict[str, list[int]]:
  return {p: [int(i) for i in np.flatnonzero(m <= threshold)] for p, m in masks.items()}


def defend(model: nn.Module, variables: Mapping[str, Any], batch: Any = None, *,
           config: Mapping[str, Any] | None = None, clean: Any = None,
           progress: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
  """ANP; returns (new variables, report). `clean` = (images, labels) is required (the
  clean validation split); `batch`, the poisoned training set, is not used. The
  report's 'pruned' maps each BatchNorm to the channels whose weight was zeroed, 'masks'
  holds every mask value, 'threshold' the one used."""
  cfg = make_config(config)
  images, labels = common.clean_data(clean, METHOD, model=model)
  if not isinstance(model, nn.Module):
    raise DefenseError("ANP runs the BatchNorms on batch statistics (train=True), which "
                       "needs a Linen module, not an apply function")
  check_fit(model, variables, images.shape[1:])
  common.check_labels(labels, model, variables, images.shape[1:])
  found = norms.find(model, variables, images.shape[1:])
  if not found:
    raise DefenseError("ANP perturbs BatchNorm channels, and the model has no BatchNorm")
  t0 = time.time()
  paths, channels = [n.path for n in found], [n.channels for n in found]
  masks, losses = optimize_masks(model, variables, images, labels, paths, channels, cfg,
                                 progress)
  chosen, curve = cfg["threshold"], []
  if chosen is None:
    ebs = int(cfg["eval_batch_size"])
    acc0 = head.accuracy(model, variables, images, labels, ebs)
    chosen = 0.0
    for t in tqdm(GRID, desc="ANP thresholds", disable=not progress, leave=False):
      acc = head.accuracy(model, norms.zero_channels(variables, _prune(masks, t)),
                          images, labels, ebs)
      curve.append({"threshold": float(t), "clean_acc": acc})
      if acc0 > 0 and abs(acc - acc0) / acc0 >= float(cfg["max_acc_drop"]):
        break
      chosen = float(t)
  pruned = _prune(masks, float(chosen))
  new = norms.zero_channels(variables, pruned, ("scale",))
  report = common.build_report(
      METHOD, cfg, settings.sources(SETTINGS), "channels", pruned, time.time() - t0,
      clean=len(images), threshold=float(chosen), threshold_curve=curve,
      masks={p: [round(float(v), 4) for v in m] for p, m in masks.items()},
      losses=losses)
  return new, report
