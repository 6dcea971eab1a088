"""Training a (possibly backdoored) classifier: a plain-dict state, one jitted update_fn,
orbax checkpoints every epoch, resumable. IAB trains its trigger networks along with the
classifier (`_train_iab`).

With several devices (`sharding.batch_mesh`) the training step is data-parallel: each
batch is split over the devices and the state is replicated on each; under jit the loss,
the gradients and BatchNorm's batch statistics are means over the whole global batch
(XLA all-reduces the per-device sums), so the step is the single-device step, up to float
rounding, and BatchNorm is synchronized. The batch size must then be a multiple of the
device count. With one device nothing changes. IAB's training runs on one device.
"""
from __future__ import annotations

import functools
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

from drr_jax import attacks, checkpoint, data, evaluate, sharding
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
                   augment: bool = True, mesh: jax.sharding.Mesh | None = None
                   ) -> Callable:
  """update_fn(state, images uint8, labels, key) -> (state, metrics), jitted.

  On a `mesh` of several devices (default: every device, `sharding.batch_mesh()`),
  update_fn splits each batch over them and keeps the state replicated (the batch size
  must be a multiple of the device count): a data-parallel step whose BatchNorm
  statistics are those of the whole batch. With one device, the plain jitted step."""

  def loss_fn(params, batch_stats, images, labels):
    logits, new_vars = model.apply({"params": params, "batch_stats": batch_stats},
                                   images, train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, new_vars["batch_stats"])

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

  mesh = sharding.batch_mesh() if mesh is None else mesh
  if mesh.size == 1:
    return jax.jit(update_fn)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  jitted = jax.jit(update_fn, out_shardings=replicated)

  def data_parallel(state: State, images, labels, key):
    if len(images) % mesh.size:
      raise ValueError(f"a batch of {len(images)} images cannot be split evenly over "
                       f"{mesh.size} devices: use a multiple of {mesh.size}")
    images, _ = sharding.shard_batch(images, mesh)
    labels, _ = sharding.shard_batch(labels, mesh)
    state, key = sharding.replicate((state, key), mesh)  # no-ops after the first step
    return jitted(state, images, labels, key)

  return data_parallel


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
  final state and the meta record (config, per-epoch history). IAB trains its own way
  (`_train_iab`).
  """
  if config["attack"].get("name") in attacks.GENERATED:
    return _train_iab(config, train_set, val_set, workdir, resume=resume,
                      progress=progress)
  t = config["train"]
  n = len(train_set.labels)
  if n < t["batch_size"]:
    raise ValueError(f"training set of {n} images is smaller than one batch "
                     f"({t['batch_size']})")
  devices = sharding.batch_mesh().size
  if t["batch_size"] % devices:
    raise ValueError(f"train.batch_size {t['batch_size']} is not a multiple of the "
                     f"{devices} devices, over which each batch is split")
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
    if not attacks.same_training_config(restored["meta"]["config"], config):
      raise checkpoint.CheckpointError(
          f"{workdir} was written with another config; use a fresh --workdir or the "
          "same settings to resume")
    state = {**restored["model"], **restored["opt"]}
    meta = restored["meta"]
    start_epoch = int(state["step"]) // steps_per_epoch
    print(f"resuming from {workdir} at epoch {start_epoch} (step {step})")
  update_fn = make_update_fn(model, tx)  # data-parallel over every device
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


# ---------------------------------------------------------------- IAB


@functools.lru_cache(maxsize=4)
def _iab_programs(model: nn.Module, optim: tuple, s, total: int, mask_total: int):
  """The optimizers and jitted updates of an IAB training, built once per setting (a
  resumed run in the same process reuses the compiled programs)."""
  from drr_jax.attacks import iab
  lr, momentum, weight_decay = optim
  tx = make_optimizer({"train": {"lr": lr, "momentum": momentum,
                                 "weight_decay": weight_decay}}, total)
  gen, mask_net = iab.networks(s.channels)
  tx_g, tx_m = iab.generator_optimizer(s, total), iab.mask_optimizer(s, mask_total)

  @functools.partial(jax.jit, static_argnums=1)
  def init(key, image_shape):
    """The classifier as `init_state` makes it (the clean model's start), G and M."""
    init_key, _ = jax.random.split(key)
    g_key, m_key = jax.random.split(jax.random.fold_in(key, iab.INIT_STREAM))
    return {**init_state(model, tx, init_key, image_shape),
            "gen": iab.init_net(gen, tx_g, g_key, image_shape),
            "mask": iab.init_net(mask_net, tx_m, m_key, image_shape),
            "mask_step": jnp.zeros((), jnp.int32)}

  return (tx, tx_g, tx_m, gen, mask_net, init,
          iab.make_update_fn(model, tx, gen, mask_net, tx_g, s),
          iab.make_mask_update_fn(mask_net, tx_m, s))


def _train_iab(config: dict[str, Any], base: PoisonedSet, val_set: data.Split,
               workdir: str | os.PathLike, *, resume: bool, progress: bool
               ) -> tuple[State, dict[str, Any]]:
  """IAB (`attacks.iab`): iab_mask_epochs of M's pre-training, then train.epochs of the
  classifier and G trained jointly, each batch poisoned by G and M as they are then.

  The state is train.py's classifier state plus 'gen' and 'mask' (each {'params',
  'batch_stats', 'opt_state'}) and 'mask_step'. Every epoch of either phase ends in a
  checkpoint at step mask_step + step: 'model' the classifier, 'opt' every optimizer
  state, 'attack' both networks' variables (the trigger) and the poisoned samples that
  the epoch trained on (`iab.record`); the final checkpoint's are the final epoch's.
  meta['history'] has the classifier epochs (with val ASR), meta['mask_history'] the
  pre-training's.
  """
  from drr_jax.attacks import iab
  t = config["train"]
  acfg = attacks.resolve(config["attack"])
  s = iab.settings(config["attack"], config.get("preset", "cpu"))
  n, bs = len(base.labels), t["batch_size"]
  if n < bs:
    raise ValueError(f"training set of {n} images is smaller than one batch ({bs})")
  if len(base.poison_idx):
    raise ValueError("IAB trains on the clean set (attacks.poison's base for 'iab'); this "
                     "one is poisoned already")
  spe = n // bs
  total, mask_total = spe * t["epochs"], spe * s.mask_epochs
  model = build_model(config)
  tx, tx_g, tx_m, gen, mask_net, init_fn, update_fn, mask_update_fn = _iab_programs(
      model, (t["lr"], t["momentum"], t["weight_decay"]), s, total, mask_total)
  shape = tuple(base.images.shape[1:])
  key = jax.random.key(config["seed"])
  _, aug_key = jax.random.split(key)
  state = jax.eval_shape(lambda k: init_fn(k, shape), key)  # made below unless restored
  meta = {"config": config, "history": [], "mask_history": [], "steps_per_epoch": spe,
          "num_train": n}
  ckpt_dir = os.path.join(workdir, "checkpoints")
  mngr = checkpoint.manager(ckpt_dir, keep=t.get("keep_checkpoints", 2))

  def opt_item(st):
    return {"opt_state": st["opt_state"], "step": st["step"],
            "gen_opt_state": st["gen"]["opt_state"],
            "mask_opt_state": st["mask"]["opt_state"], "mask_step": st["mask_step"]}

  if resume and mngr.latest_step() is not None:
    step = mngr.latest_step()
    restored = checkpoint.restore(
        ckpt_dir, {"model": {"params": state["params"], "batch_stats": state["batch_stats"]},
                   "opt": opt_item(state), "attack": None, "meta": None}, step)
    if not attacks.same_training_config(restored["meta"]["config"], config):
      raise checkpoint.CheckpointError(
          f"{workdir} was written with another config; use a fresh --workdir or the "
          "same settings to resume")
    rec, opt = restored["attack"], restored["opt"]
    for name, part in (("iab_generator", "gen"), ("iab_mask_net", "mask")):
      checkpoint.check_fits(rec[name], iab.variables(state[part]),
                            f"{workdir} step {step} attack record {name!r}")
    state = {**restored["model"], "opt_state": opt["opt_state"], "step": opt["step"],
             "gen": {**rec["iab_generator"], "opt_state": opt["gen_opt_state"]},
             "mask": {**rec["iab_mask_net"], "opt_state": opt["mask_opt_state"]},
             "mask_step": opt["mask_step"]}
    # as plain host data: arrays that orbax restores are committed to a device, which
    # would make the jitted programs compile once more for them
    state = jax.tree.map(np.asarray, state)
    meta = restored["meta"]
    print(f"resuming from {workdir} at mask epoch {int(state['mask_step']) // spe}, "
          f"epoch {int(state['step']) // spe} (step {step})")
  else:
    state = init_fn(key, shape)

  def save(st, rec):
    checkpoint.save(mngr, int(st["mask_step"]) + int(st["step"]), {
        "model": {"params": st["params"], "batch_stats": st["batch_stats"]},
        "opt": opt_item(st), "attack": rec, "meta": meta})

  empty = (np.zeros(0, np.int64), np.zeros((0, *shape), np.uint8), np.zeros(0, np.int32),
           np.zeros(0, np.int8))
  for epoch in range(int(state["mask_step"]) // spe, s.mask_epochs):
    t0 = time.time()
    sums, count = {"loss": 0.0, "norm": 0.0, "diversity": 0.0, "density": 0.0}, 0
    bar = tqdm(iab.mask_batches(n, config["seed"], epoch, bs), total=spe, leave=False,
               desc=f"mask epoch {epoch + 1}/{s.mask_epochs}", disable=not progress)
    for i, (rows1, rows2) in enumerate(bar):
      mask_key = jax.random.fold_in(jax.random.fold_in(aug_key, iab.MASK_STREAM),
                                    epoch * spe + i)
      state["mask"], m = mask_update_fn(state["mask"], base.images[rows1],
                                        base.images[rows2], mask_key)
      state["mask_step"] = state["mask_step"] + 1
      if i % 20 == 0 or i == spe - 1:
        m = jax.device_get(m)
        for k in sums:
          sums[k] += float(m[k])
        count += 1
        bar.set_postfix(loss=f"{sums['loss'] / count:.3f}",
                        density=f"{sums['density'] / count:.3f}")
    jax.block_until_ready(state["mask"]["params"])
    entry = {"epoch": epoch + 1, **{k: v / max(count, 1) for k, v in sums.items()},
             "seconds": time.time() - t0}
    meta["mask_history"].append(entry)
    if progress:
      print(f"mask epoch {epoch + 1}: loss {entry['loss']:.3f} norm {entry['norm']:.4f} "
            f"diversity {entry['diversity']:.3f} density {entry['density']:.4f} "
            f"({entry['seconds']:.0f} s)", flush=True)
    save(state, iab.record(n, shape, iab.variables(state["gen"]),
                           iab.variables(state["mask"]), *empty))

  ratio = float(acfg.get("poison_ratio", 0.1))
  mask_vars = iab.variables(state["mask"])  # frozen from here on
  for epoch in range(int(state["step"]) // spe, t["epochs"]):
    t0 = time.time()
    bar = tqdm(iab.batches(n, ratio, config["seed"], epoch, bs), total=spe,
               desc=f"epoch {epoch + 1}/{t['epochs']}", disable=not progress, leave=False)
    sums, count = {"loss": 0.0, "accuracy": 0.0, "diversity": 0.0}, 0
    rows, images, labels, kind = [], [], [], []
    for i, b in enumerate(bar):
      k = b.n_bd
      y = base.labels[b.index].astype(np.int32)
      y[:k] = attacks.target_labels(y[:k], acfg)
      joint = {name: v for name, v in state.items() if name not in ("mask", "mask_step")}
      joint, m, inputs = update_fn(joint, mask_vars, base.images[b.index], y,
                                   base.images[b.partners], aug_key)
      state.update(joint)
      if k:
        rows.append(b.index[:2 * k])
        images.append(inputs[:2 * k])  # kept on the device until the epoch ends
        labels.append(y[:2 * k])
        kind.append(np.repeat(np.int8([1, 2]), k))
      if i % 20 == 0 or i == spe - 1:
        m = jax.device_get(m)
        for key_ in sums:
          sums[key_] += float(m[key_])
        count += 1
        bar.set_postfix(loss=f"{sums['loss'] / count:.3f}",
                        acc=f"{sums['accuracy'] / count:.3f}")
    jax.block_until_ready(state["params"])
    seconds = time.time() - t0
    used = ((np.concatenate(rows), np.concatenate([np.asarray(x) for x in images]),
             np.concatenate(labels), np.concatenate(kind)) if rows else empty)
    rec = iab.record(n, shape, iab.variables(state["gen"]), iab.variables(state["mask"]),
                     *used, base=base.images)
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    val_acc = val_asr = float("nan")
    if len(val_set.labels):
      val_acc = evaluate.accuracy(model, variables, val_set, t["eval_batch_size"],
                                  progress=False)
      keep = attacks.target_labels(val_set.labels, acfg) != val_set.labels
      if keep.any():
        val_asr = evaluate.attack_success_rate(
            model, variables, val_set, iab.trigger_from_record(rec), acfg,
            t["eval_batch_size"], progress=False)
    entry = {"epoch": epoch + 1, "train_loss": sums["loss"] / max(count, 1),
             "train_accuracy": sums["accuracy"] / max(count, 1),
             "train_diversity_loss": sums["diversity"] / max(count, 1),
             "val_accuracy": val_acc, "val_asr": val_asr, "seconds": seconds,
             "images_per_second": spe * bs / seconds}
    meta["history"].append(entry)
    if progress:
      print(f"epoch {epoch + 1}: loss {entry['train_loss']:.3f} "
            f"diversity {entry['train_diversity_loss']:.3f} "
            f"train acc {entry['train_accuracy']:.3f} val acc {val_acc:.4f} "
            f"val ASR {val_asr:.4f} ({seconds:.0f} s, "
            f"{entry['images_per_second']:.0f} img/s)", flush=True)
    save(state, rec)
  return state, meta
