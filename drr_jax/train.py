"""Training a (possibly backdoored) classifier: a plain-dict state, one jitted update_fn,
orbax checkpoints every epoch, resumable."""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from drr_jax import attacks, checkpoint, data, evaluate
from drr_jax.attacks import PoisonedSet
from drr_jax.models import get_model

State = dict[str, Any]


def build_model(config: dict[str, Any]) -> nn.Module:
  m = config["model"]
  return get_model(m["name"], width=m.get("width", 1.0))


def make_optimizer(config: dict[str, Any], total_steps: int) -> optax.GradientTransformation:
  """SGD + momentum with coupled weight decay (as PyTorch's SGD) and cosine decay."""
  t = config["train"]
  schedule = optax.cosine_decay_schedule(t["lr"], max(1, total_steps))
  return optax.chain(optax.add_decayed_weights(t["weight_decay"]),
                     optax.sgd(schedule, momentum=t["momentum"]))


def init_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
               image_shape=data.IMAGE_SHAPE) -> State:
  variables = model.init(key, jnp.zeros((1, *image_shape), jnp.uint8), train=False)
  params = variables["params"]
  return {"params": params, "batch_stats": variables.get("batch_stats", {}),
          "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def make_update_fn(model: nn.Module, tx: optax.GradientTransformation,
                   augment: bool = True) -> Callable:
  """update_fn(state, images uint8, labels, key) -> (state, metrics), jitted."""

  def loss_fn(params, batch_stats, images, labels):
    logits, new_vars = model.apply({"params": params, "batch_stats": batch_stats},
                                   images, train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, new_vars["batch_stats"])

  @jax.jit
  def update_fn(state: State, images: jax.Array, labels: jax.Array, key: jax.Array):
    # A (N, H, W) batch or labels of another length would broadcast into nonsense.
    chex.assert_rank([images, labels], [4, 1])
    chex.assert_equal_shape_prefix([images, labels], 1)
    if augment:
      images = data.augment(jax.random.fold_in(key, state["step"]), images)
    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["batch_stats"], images, labels)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {"params": optax.apply_updates(state["params"], updates),
                 "batch_stats": batch_stats, "opt_state": opt_state,
                 "step": state["step"] + 1}
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
    return new_state, metrics

  return update_fn


def attack_record(poisoned: PoisonedSet) -> dict[str, np.ndarray]:
  """What a checkpoint keeps of its attack (for analysis only): the trigger, and which
  training images were poisoned as a 0/1 mask (N,), which orbax can also save for a clean
  run, where an index list would be empty (`checkpoint.poison_indices` reads both)."""
  mask = np.zeros(len(poisoned.labels), np.uint8)
  mask[np.asarray(poisoned.poison_idx, np.int64)] = 1
  record = {"poison_mask": mask, "pattern": poisoned.trigger.pattern,
            "mask": poisoned.trigger.mask}
  for extra in ("offset", "grid"):  # an additive trigger (SIG), a warp (WaNet)
    if getattr(poisoned.trigger, extra) is not None:
      record[extra] = getattr(poisoned.trigger, extra)
  return record


def train(config: dict[str, Any], train_set: PoisonedSet, val_set: data.Split,
          workdir: str | os.PathLike, *, resume: bool = False,
          progress: bool = True) -> tuple[State, dict[str, Any]]:
  """Trains on `train_set` (for a per-batch attack, its clean base: each batch is
  poisoned as it is drawn), checkpointing every epoch under `workdir`.

  With resume=True, continues from the latest complete epoch in `workdir`. Returns the
  final state and the meta record (config, per-epoch history).
  """
  t = config["train"]
  n = len(train_set.labels)
  if n < t["batch_size"]:
    raise ValueError(f"training set of {n} images is smaller than one batch "
                     f"({t['batch_size']})")
  steps_per_epoch = n // t["batch_size"]
  total = steps_per_epoch * t["epochs"]
  model, tx = build_model(config), make_optimizer(config, total)
  key = jax.random.key(config["seed"])
  init_key, aug_key = jax.random.split(key)
  state = init_state(model, tx, init_key, train_set.images.shape[1:])
  # a per-batch attack (WaNet) records the set its final epoch will have used
  record = attack_record(attacks.trained_set(train_set, config["attack"], config["seed"],
                                             t["epochs"], t["batch_size"]))
  meta = {"config": config, "history": [], "steps_per_epoch": steps_per_epoch,
          "num_train": n}
  mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"),
                            keep=t.get("keep_checkpoints", 2))
  start_epoch = 0
  if resume and mngr.latest_step() is not None:
    step = mngr.latest_step()
    restored = checkpoint.restore(
        os.path.join(workdir, "checkpoints"),
        {"model": {"params": state["params"], "batch_stats": state["batch_stats"]},
         "opt": {"opt_state": state["opt_state"], "step": state["step"]}, "meta": None},
        step)
    if restored["meta"]["config"] != config:
      raise checkpoint.CheckpointError(
          f"{workdir} was written with another config; use a fresh --workdir or the "
          "same settings to resume")
    state = {**restored["model"], **restored["opt"]}
    meta = restored["meta"]
    start_epoch = int(state["step"]) // steps_per_epoch
    print(f"resuming from {workdir} at epoch {start_epoch} (step {step})")
  update_fn = make_update_fn(model, tx)
  for epoch in range(start_epoch, t["epochs"]):
    t0 = time.time()
    batches = attacks.train_batches(train_set, config["attack"], config["seed"], epoch,
                                    t["batch_size"])
    bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{t['epochs']}",
               disable=not progress, leave=False)
    sums, count = {"loss": 0.0, "accuracy": 0.0}, 0
    for i, batch in enumerate(bar):
      state, m = update_fn(state, batch.images, batch.labels, aug_key)
      if i % 20 == 0 or i == steps_per_epoch - 1:
        m = jax.device_get(m)
        for k in sums:
          sums[k] += float(m[k])
        count += 1
        bar.set_postfix(loss=f"{sums['loss'] / count:.3f}",
                        acc=f"{sums['accuracy'] / count:.3f}")
    jax.block_until_ready(state["params"])
    seconds = time.time() - t0
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    val_acc = evaluate.accuracy(model, variables, val_set, t["eval_batch_size"],
                                progress=False) if len(val_set.labels) else float("nan")
    entry = {"epoch": epoch + 1, "train_loss": sums["loss"] / max(count, 1),
             "train_accuracy": sums["accuracy"] / max(count, 1), "val_accuracy": val_acc,
             "seconds": seconds, "images_per_second": steps_per_epoch * t["batch_size"]
             / seconds}
    meta["history"].append(entry)
    if progress:
      print(f"epoch {epoch + 1}: loss {entry['train_loss']:.3f} "
            f"train acc {entry['train_accuracy']:.3f} val acc {val_acc:.4f} "
            f"({seconds:.0f} s, {entry['images_per_second']:.0f} img/s)", flush=True)
    checkpoint.save(mngr, int(state["step"]), {
        "model": variables, "opt": {"opt_state": state["opt_state"],
                                    "step": state["step"]},
        "attack": record, "meta": meta})
  return state, meta
