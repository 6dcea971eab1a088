"""Orbax checkpoints of a model run: 'model' (params, batch_stats), 'opt' (optimizer
state, step), 'attack' (poison indices and trigger, for analysis only) and 'meta' (JSON:
config, history). Orbax writes to a temporary folder and renames it, so a killed save
never leaves a half-written step behind.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


ITEMS = ("model", "opt", "attack")


class CheckpointError(RuntimeError):
  """A checkpoint that is missing, damaged, or does not fit the model."""


def manager(directory: str | os.PathLike, keep: int = 2, create: bool = True
            ) -> ocp.CheckpointManager:
  directory = Path(directory).absolute()
  if not create and not directory.is_dir():
    raise CheckpointError(f"checkpoint folder {directory} does not exist")
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                      enable_async_checkpointing=False)
  handlers = {name: ocp.StandardCheckpointHandler() for name in ITEMS}
  handlers["meta"] = ocp.JsonCheckpointHandler()
  return ocp.CheckpointManager(directory, options=opts, item_handlers=handlers)


def _abstract(mngr: ocp.CheckpointManager, step: int, name: str) -> Any:
  """Shapes and dtypes of a saved item, to restore it onto this host's default device."""
  tree = mngr.item_metadata(step)[name]
  if tree is None:
    raise CheckpointError(f"{mngr.directory} step {step} has no item {name!r}")
  return jax.tree.map(lambda m: _on_local_device(m.shape, m.dtype), tree)


def _on_local_device(shape, dtype) -> jax.ShapeDtypeStruct:
  # Naming this host's device lets a checkpoint written on a GPU/TPU restore anywhere.
  return jax.ShapeDtypeStruct(shape, dtype,
                              sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def save(mngr: ocp.CheckpointManager, step: int, items: dict[str, Any]) -> None:
  """Saves items; pytrees of arrays go through StandardSave, 'meta' as JSON."""
  args = {k: (ocp.args.JsonSave(v) if k == "meta" else ocp.args.StandardSave(v))
          for k, v in items.items()}
  mngr.save(step, args=ocp.args.Composite(**args))
  mngr.wait_until_finished()


def latest_step(mngr: ocp.CheckpointManager) -> int | None:
  return mngr.latest_step()


def restore(directory: str | os.PathLike, targets: dict[str, Any | None],
            step: int | None = None) -> dict[str, Any]:
  """Restores the named items of a step (latest by default).

  targets: item name -> an abstract/concrete pytree to restore into (shapes checked),
  or None to restore as saved. 'meta' is always JSON.
  """
  directory = Path(directory).absolute()
  if not directory.is_dir():
    raise CheckpointError(f"checkpoint folder {directory} does not exist")
  mngr = manager(directory, create=False)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"{directory} holds no complete checkpoint step")
  args = {}
  for name, target in targets.items():
    if name == "meta":
      args[name] = ocp.args.JsonRestore()
    elif target is None:
      try:
        args[name] = ocp.args.StandardRestore(_abstract(mngr, step, name))
      except CheckpointError:
        raise
      except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read the metadata of {name!r} in {directory} "
                              f"step {step}: {type(e).__name__}: {e}") from e
    else:
      args[name] = ocp.args.StandardRestore(
          jax.tree.map(lambda x: _on_local_device(np.shape(x), x.dtype), target))
  try:
    out = mngr.restore(step, args=ocp.args.Composite(**args))
  except Exception as e:  # orbax raises many types for damaged or mismatched files
    raise CheckpointError(
        f"cannot restore {sorted(targets)} from {directory} step {step}: "
        f"{type(e).__name__}: {str(e)[:500]}") from e
  for name, target in targets.items():
    if target is not None and name != "meta":
      check_fits(out[name], target, f"{directory} step {step} item {name!r}")
  return dict(out)


def check_fits(tree: Any, reference: Any, what: str) -> None:
  """Raises CheckpointError unless `tree` has the structure and shapes of `reference`."""
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  ref = {jax.tree_util.keystr(k): v for k, v in
         jax.tree_util.tree_leaves_with_path(reference)}
  missing, extra = sorted(set(ref) - set(flat)), sorted(set(flat) - set(ref))
  if missing or extra:
    raise CheckpointError(f"{what} does not fit the model: missing {missing[:5]}, "
                          f"unexpected {extra[:5]}")
  for k, r in ref.items():
    if tuple(np.shape(flat[k])) != tuple(np.shape(r)):
      raise CheckpointError(f"{what} does not fit the model: {k} has shape "
                            f"{np.shape(flat[k])}, the model needs {np.shape(r)}")


def export_variables(workdir: str | os.PathLike, out: str | os.PathLike) -> Path:
  """Copies a run's model variables, attack record and meta (no optimizer state: a few
  MB) from its latest checkpoint in `workdir` to a new checkpoint folder `out`, the form
  in which the project commits the checkpoints its results come from. Returns `out`."""
  src = Path(workdir)
  if (src / "checkpoints").is_dir():
    src = src / "checkpoints"
  mngr_src = manager(src, create=False)
  step = mngr_src.latest_step()
  if step is None:
    raise CheckpointError(f"{src} holds no complete checkpoint step")
  items = restore(src, {"model": None, "attack": None, "meta": None}, step)
  out = Path(out)
  save(manager(out / "checkpoints", keep=1), step, items)
  return out


def poison_indices(attack: dict[str, Any]) -> np.ndarray:
  """The sorted poisoned-image indices of an attack record: from its 'poison_mask', or
  the 'poison_idx' list that checkpoints written before 2026-12-03 hold."""
  if "poison_mask" in attack:
    return np.flatnonzero(np.asarray(attack["poison_mask"])).astype(np.int64)
  return np.asarray(attack["poison_idx"], np.int64)


def load_model(directory: str | os.PathLike, step: int | None = None):
  """(model, variables, meta, attack record) of a run's checkpoint folder.

  `directory` is a run's workdir or its 'checkpoints' folder. The params are checked
  against the model that the stored config describes.
  """
  import jax.numpy as jnp  # local: keeps this module light for tests of the I/O alone
  from drr_jax.models import get_model

  directory = Path(directory)
  if (directory / "checkpoints").is_dir():
    directory = directory / "checkpoints"
  meta = restore(directory, {"meta": None}, step)["meta"]
  try:
    mcfg = meta["config"]["model"]
    model = get_model(mcfg["name"], width=mcfg.get("width", 1.0))
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{directory}: its meta record names no usable model ({e})"
                          ) from e
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((1, 32, 32, 3), jnp.uint8)))
  variables = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
  out = restore(directory, {"model": variables, "attack": None}, step)
  return model, out["model"], meta, out["attack"]
