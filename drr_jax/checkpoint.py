"""Orbax checkpoints of a model run: 'model' (params, batch_stats), 'opt' (optimizer
state, step), 'attack' (poison indices and trigger, for analysis only), 'meta' (JSON:
config, history) and 'digest' (JSON: a sha256 of every saved array).

Orbax writes to a temporary folder and renames it, so a killed save never leaves a
half-written step behind. Orbax's OCDBT store does not check the integrity of the array
data, so every restore compares the arrays it read with the saved digests, and refuses a
checkpoint whose arrays changed on disk, or whose model holds NaN/Inf, naming it.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


ITEMS = ("model", "opt", "attack")
DIGEST = "digest"  # the JSON item holding {item: {array path: sha256}}


class CheckpointError(RuntimeError):
  """A checkpoint that is missing, damaged, or does not fit the model."""


def manager(directory: str | os.PathLike, keep: int = 2, create: bool = True
            ) -> ocp.CheckpointManager:
  directory = Path(directory).absolute()
  if directory.is_file():
    raise CheckpointError(f"checkpoint folder {directory} is a file, not a folder: give "
                          "a run folder (launch.train's --workdir) or its checkpoints/")
  if not create and not directory.is_dir():
    raise CheckpointError(f"checkpoint folder {directory} does not exist")
  if create:  # a writer removes the debris of a save killed midway (orbax's tmp names);
    # here, not in orbax's background cleanup, which can race with a restore
    for debris in directory.glob("*.orbax-checkpoint-tmp*"):
      shutil.rmtree(debris, ignore_errors=True)
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                      enable_async_checkpointing=False)
  handlers = {name: ocp.StandardCheckpointHandler() for name in ITEMS}
  handlers["meta"] = ocp.JsonCheckpointHandler()
  handlers[DIGEST] = ocp.JsonCheckpointHandler()
  return ocp.CheckpointManager(directory, options=opts, item_handlers=handlers)


def _abstract(mngr: ocp.CheckpointManager, step: int, name: str) -> Any:
  """Shapes and dtypes of a saved item, to restore it onto this host's default device."""
  tree = mngr.item_metadata(step)[name]
  if tree is None:
    raise CheckpointError(f"{mngr.directory} step {step} has no item {name!r}")
  return jax.tree.map(lambda m: _on_local_device(m.shape, m.dtype), tree)


def _unreadable(directory: Path, step: int, names, e: BaseException,
                metadata: bool = False) -> CheckpointError:
  """One line for an orbax/TensorStore failure: the item whose files it names (else the
  items asked for), and the error's first words without the store's spec."""
  text = str(e)
  bad = [n for n in ITEMS if f"{os.sep}{step}{os.sep}{n}{os.sep}" in text]
  names = bad[:1] or sorted(n for n in names if n != "meta")
  what = ("the metadata of " if metadata else "") + (
      f"item {names[0]!r}" if len(names) == 1 else f"the items {names}")
  text = re.split(r"See full TensorStore details|\[?tensorstore_spec", text)[0]
  text = " ".join(text.split())[:300]
  return CheckpointError(f"cannot read {what} of {directory} step {step} (damaged, "
                         f"incomplete or of another model): {type(e).__name__}: {text}")


def _on_local_device(shape, dtype) -> jax.ShapeDtypeStruct:
  # Naming this host's device lets a checkpoint written on a GPU/TPU restore anywhere.
  return jax.ShapeDtypeStruct(shape, dtype,
                              sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def _path_name(path) -> str:
  """A pytree path as 'a/b/0', the same whether the tree is a dict or a NamedTuple."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def array_digests(tree: Any) -> dict[str, str]:
  """{path: sha256 of dtype, shape and bytes} of every array leaf of a pytree."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    a = np.ascontiguousarray(np.asarray(leaf))
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    out[_path_name(path)] = h.hexdigest()
  return out


def save(mngr: ocp.CheckpointManager, step: int, items: dict[str, Any]) -> None:
  """Saves items; pytrees of arrays go through StandardSave with their digests in the
  'digest' item, 'meta' as JSON."""
  items = {k: v for k, v in items.items() if k != DIGEST}
  digests = {k: array_digests(v) for k, v in items.items() if k != "meta"}
  args = {k: (ocp.args.JsonSave(v) if k == "meta" else ocp.args.StandardSave(v))
          for k, v in items.items()}
  args[DIGEST] = ocp.args.JsonSave(digests)
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
  mngr = manager(directory, create=False)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"{directory} holds no complete checkpoint step")
  args = {}
  for name, target in targets.items():
    if name == "meta":
      args[name] = ocp.args.JsonRestore()
      continue
    try:
      saved = _abstract(mngr, step, name)
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001
      raise _unreadable(directory, step, [name], e, metadata=True) from e
    if target is None:
      args[name] = ocp.args.StandardRestore(saved)
    else:
      if name == "model":  # shapes first, so that a mismatch names the parameter
        check_fits(saved, target, f"{directory} step {step} item {name!r}")
      args[name] = ocp.args.StandardRestore(
          jax.tree.map(lambda x: _on_local_device(np.shape(x), x.dtype), target))
  try:
    out = mngr.restore(step, args=ocp.args.Composite(**args))
  except Exception as e:  # orbax raises many types for damaged or mismatched files
    raise _unreadable(directory, step, targets, e) from e
  for name, target in targets.items():
    if target is not None and name != "meta":
      check_fits(out[name], target, f"{directory} step {step} item {name!r}")
  arrays = {k: v for k, v in out.items() if k not in ("meta", DIGEST)}
  if arrays:
    verify(directory, step, arrays)
  return {k: v for k, v in out.items() if k != DIGEST}


def _saved_digests(directory: Path, step: int) -> dict[str, dict[str, str]]:
  if not (directory / str(step) / DIGEST).is_dir():
    raise CheckpointError(
        f"{directory} step {step} carries no array digest, so its data cannot be "
        "checked (it was written before digests existed); if you trust it, add one "
        "with drr_jax.checkpoint.seal(folder)")
  mngr = manager(directory, create=False)
  try:
    return mngr.restore(step, args=ocp.args.Composite(
        **{DIGEST: ocp.args.JsonRestore()}))[DIGEST]
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"cannot read the array digest of {directory} step {step}: "
                          f"{type(e).__name__}: {str(e)[:300]}") from e


def verify(directory: str | os.PathLike, step: int, items: dict[str, Any]) -> None:
  """Raises CheckpointError unless every restored array matches the digest saved with
  it, and the model's arrays are finite."""
  directory = Path(directory).absolute()
  saved = _saved_digests(directory, step)
  for name, tree in items.items():
    if name not in saved:
      raise CheckpointError(f"{directory} step {step}: no digest for item {name!r}")
    got, want = array_digests(tree), saved[name]
    if set(got) == set(want):
      bad = sorted(k for k in want if got[k] != want[k])
    else:  # restored in another container type than saved (e.g. no target given)
      bad = ["(some array)"] if sorted(got.values()) != sorted(want.values()) else []
    if bad:
      raise CheckpointError(
          f"{directory} step {step} is damaged: item {name!r} does not match the digest "
          f"saved with it ({', '.join(bad[:5])}); do not use this checkpoint")
    if name == "model":
      nonfinite = [_path_name(p) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)
                   if np.issubdtype(np.asarray(leaf).dtype, np.floating)
                   and not np.all(np.isfinite(np.asarray(leaf)))]
      if nonfinite:
        raise CheckpointError(f"{directory} step {step}: the model holds NaN or Inf "
                              f"values in {', '.join(nonfinite[:5])}")


def seal(folder: str | os.PathLike) -> Path:
  """Adds array digests to a checkpoint written before they existed (every step, in
  place). Only for checkpoints you trust: whatever the arrays hold now is what later
  loads will be checked against. Each step gains its 'digest' item in one rename, so a
  killed seal leaves the checkpoint as it was (and loadable once sealed again)."""
  directory = Path(folder)
  if (directory / "checkpoints").is_dir():
    directory = directory / "checkpoints"
  mngr = manager(directory, create=False)
  for step in mngr.all_steps():
    if (directory / str(step) / DIGEST).is_dir():
      continue
    names = [n for n in ITEMS if (directory / str(step) / n).is_dir()]
    args = {n: ocp.args.StandardRestore(_abstract(mngr, step, n)) for n in names}
    items = dict(mngr.restore(step, args=ocp.args.Composite(**args)))
    ckptr = ocp.Checkpointer(ocp.JsonCheckpointHandler())  # writes to a temporary name
    ckptr.save((directory / str(step) / DIGEST).absolute(),
               args=ocp.args.JsonSave({k: array_digests(v) for k, v in items.items()}))
  return Path(folder)


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


SAMPLE_KEYS = ("iab_rows", "iab_labels", "iab_kind", "iab_delta", "iab_images")


def export_variables(workdir: str | os.PathLike, out: str | os.PathLike, *,
                     samples: bool = True) -> Path:
  """Copies a run's model variables, attack record and meta (no optimizer state: a few
  MB) from its latest checkpoint in `workdir` to a new checkpoint folder `out`, the form
  in which the project commits the checkpoints its results come from. Returns `out`.

  `samples=False` leaves out the poisoned samples an IAB record keeps (`SAMPLE_KEYS`:
  thousands of images, a data set rather than model variables); such an export still
  gives the model and the test-time trigger, but not the defense set
  (`attacks.iab.trained_set` says so)."""
  src = Path(workdir)
  if (src / "checkpoints").is_dir():
    src = src / "checkpoints"
  mngr_src = manager(src, create=False)
  step = mngr_src.latest_step()
  if step is None:
    raise CheckpointError(f"{src} holds no complete checkpoint step")
  items = restore(src, {"model": None, "attack": None, "meta": None}, step)
  if not samples:
    items["attack"] = {k: v for k, v in items["attack"].items() if k not in SAMPLE_KEYS}
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
