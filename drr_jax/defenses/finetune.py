"""Fine-tuning a pruned network on clean data, the pruning held after every step.

FP (and its rank-reduction version) end by fine-tuning on the clean data they were
given. PyTorch's pruning masks keep pruned weights at zero while the rest trains;
here a `hold(params) -> params` function (e.g. re-applying the projection P = I - V V^T to
the classifier's kernel) is applied after every optimizer step, with the same effect.
SGD with momentum, coupled weight decay and a cosine schedule, BatchNorm in training mode
(its running statistics update), as BackdoorBench fine-tunes (config/defense/fp).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from drr_jax import data


def finetune(model: nn.Module, variables: Mapping[str, Any], images: np.ndarray,
             labels: np.ndarray, *, epochs: int, batch_size: int, lr: float,
             momentum: float, weight_decay: float, augment: bool, seed: int,
             hold: Callable[[Any], Any] = lambda p: p, progress: bool = True
             ) -> tuple[dict[str, Any], list[float]]:
  """(fine-tuned variables, mean loss of each epoch). Each epoch visits a fresh random
  order of the images in floor(N / batch_size) full batches (at least one; a batch
  larger than N is cut to N)."""
  variables = dict(variables)
  n = len(images)
  batch_size = int(min(batch_size, n))
  steps_per_epoch = max(1, n // batch_size)
  total = steps_per_epoch * int(epochs)
  if total == 0:
    return variables, []
  tx = optax.chain(optax.add_decayed_weights(weight_decay),
                   optax.sgd(optax.cosine_decay_schedule(lr, total), momentum=momentum))
  has_stats = "batch_stats" in variables

  def loss_fn(params, stats, x, y):
    if has_stats:
      logits, new = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                mutable=["batch_stats"])
      stats = new["batch_stats"]
    else:
      logits = model.apply({"params": params}, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), stats

  @jax.jit
  def step(params, stats, opt_state, x, y, key):
    if augment:
      x = data.augment(key, x)
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = hold(optax.apply_updates(params, updates))
    return params, stats, opt_state, loss

  params = hold(variables["params"])
  stats = variables.get("batch_stats", {})
  opt_state = tx.init(params)
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  losses = []
  bar = tqdm(range(int(epochs)), desc="fine-tune", disable=not progress, leave=False)
  for _ in bar:
    order = rng.permutation(n)
    total_loss = 0.0
    for s in range(steps_per_epoch):
      idx = order[s * batch_size:(s + 1) * batch_size]
      key, sub = jax.random.split(key)
      params, stats, opt_state, loss = step(params, stats, opt_state, images[idx],
                                            labels[idx], sub)
      total_loss += float(loss)
    losses.append(total_loss / steps_per_epoch)
    bar.set_postfix(loss=f"{losses[-1]:.3f}")
  out = {**variables, "params": params}
  if has_stats:
    out["batch_stats"] = stats
  return out, losses
