"""Data parallelism over every device with `jax.sharding`: one Mesh, one axis 'batch'.

The per-batch work of drr_jax (predictions, feature extraction, the confirmation's trial
predictions, the moment statistics of the Stiefel search, the training step) runs as
ordinary `jax.jit` programs whose batch inputs are split over the mesh's 'batch' axis
(`shard_batch`) and whose weights are copied to every device (`replicate`). XLA's SPMD
partitioner (GSPMD) then runs each device on its share of the rows, and every reduction
over the batch axis -- a moment's sum, a mean over the images, BatchNorm's batch
statistics in a training step -- is computed globally: each device sums its rows and the
partial sums are all-reduced across devices. No pmap, no per-device code: the program is
the single-device one, partitioned by XLA.

With ONE device every function here is the identity (no padding, no transfer), so
single-device results are bit-identical to the code without sharding.

The mesh spans `jax.devices()`: all local devices, and on a multi-host run (a TPU pod
slice, a GPU cluster) after `jax.distributed.initialize()` every process's devices. Every
process then holds the same whole batch (the data pipelines are deterministic in the
seed), puts its own devices' rows (`jax.make_array_from_callback`) and reads results back
whole (`to_host`). `initialize_from_env` starts the distributed system when
DRR_DISTRIBUTED=1 (the launch scripts call it); see docs/scaling.md.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

AXIS = "batch"
DISTRIBUTED_ENV = "DRR_DISTRIBUTED"
DEVICES_ENV = "DRR_NUM_DEVICES"  # use only the first K devices (one process; benchmarks)


@functools.lru_cache(maxsize=1)
def _default_mesh() -> Mesh:
  devices = jax.devices()
  wanted = os.environ.get(DEVICES_ENV, "").strip()
  if wanted:
    k = int(wanted)
    if not 1 <= k <= len(devices) or jax.process_count() > 1:
      raise ValueError(f"{DEVICES_ENV}={wanted}: this single process has "
                       f"{len(devices)} device(s)")
    devices = devices[:k]
  return Mesh(np.asarray(devices), (AXIS,))


def batch_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis 'batch' over `devices` (default: every device, `jax.devices()`,
  or its first K with DRR_NUM_DEVICES=K)."""
  if devices is None:
    return _default_mesh()
  return Mesh(np.asarray(list(devices)), (AXIS,))


def padded(n: int, mesh: Mesh | None = None) -> int:
  """n rounded up to a multiple of the mesh's device count (n itself with one device)."""
  d = (mesh or batch_mesh()).size
  return -(-int(n) // d) * d


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
  """x placed with `sharding`; on several processes, each puts only its own devices' part
  of x (every process holds the same x)."""
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_batch(x: Any, mesh: Mesh | None = None, axis: int = 0) -> tuple[Any, int]:
  """(x split over the mesh along `axis`, x's true length along it).

  The axis is padded to a multiple of the device count by repeating its last entry (a
  valid input whose results the caller drops: slice them off, or mask them out of sums).
  With one device, x is returned as it is."""
  mesh = mesh or batch_mesh()
  n = int(np.shape(x)[axis])
  if mesh.size == 1:
    return x, n
  pad = -n % mesh.size
  if pad:
    xp = jnp if isinstance(x, jax.Array) else np
    last = xp.take(x, xp.asarray([n - 1]), axis=axis)
    x = xp.concatenate([x, xp.repeat(last, pad, axis=axis)], axis=axis)
  spec = P(*([None] * axis), AXIS)
  return _put(x, NamedSharding(mesh, spec)), n


def batches(images: np.ndarray, batch_size: int, mesh: Mesh | None = None, *,
            progress: bool = False, desc: str = "batches") -> Iterator[tuple[Any, int]]:
  """(batch split over the mesh, its true length) for the consecutive batches of images.

  Every batch has the same size, batch_size rounded up to whole device shares, the last
  one padded by repeating its last image, so that one compiled program serves them all;
  a lone batch shorter than that is padded only to whole shares. The caller drops what
  the padding adds: results past the true length."""
  mesh = mesh or batch_mesh()
  size = padded(batch_size, mesh)
  n = len(images)
  for i in tqdm(range(0, n, size), desc=desc, disable=not progress, leave=False):
    x = images[i:i + size]
    m = len(x)
    if m < size and n > size:
      x = np.concatenate([x, np.repeat(x[-1:], size - m, 0)])
    yield shard_batch(x, mesh)[0], m


def replicate(tree: Any, mesh: Mesh | None = None) -> Any:
  """Every array of `tree` copied to each device of the mesh (the weights, a key); a
  no-op for arrays already replicated there, and the identity with one device."""
  mesh = mesh or batch_mesh()
  if mesh.size == 1:
    return tree
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(lambda a: _put(a, sharding), tree)


def _fetch(a: Any) -> Any:
  if (isinstance(a, jax.Array) and not a.is_fully_addressable
      and not a.is_fully_replicated):
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))
  return jax.device_get(a)


def to_host(tree: Any) -> Any:
  """`jax.device_get`, also for arrays split over several processes (gathered whole)."""
  return jax.tree.map(_fetch, tree)


def initialize_from_env() -> bool:
  """Starts `jax.distributed` when DRR_DISTRIBUTED=1 (before any JAX computation), with
  DRR_COORDINATOR_ADDRESS (host:port of process 0), DRR_NUM_PROCESSES and DRR_PROCESS_ID
  where set (on a TPU pod, Slurm or Open MPI JAX finds them itself). Returns whether
  this process now runs distributed."""
  if os.environ.get(DISTRIBUTED_ENV, "").strip().lower() not in ("1", "true", "yes"):
    return False
  if jax.distributed.is_initialized():
    return True
  kwargs: dict[str, Any] = {}
  if os.environ.get("DRR_COORDINATOR_ADDRESS"):
    kwargs["coordinator_address"] = os.environ["DRR_COORDINATOR_ADDRESS"]
  for env, key in (("DRR_NUM_PROCESSES", "num_processes"),
                   ("DRR_PROCESS_ID", "process_id")):
    if os.environ.get(env):
      kwargs[key] = int(os.environ[env])
  jax.distributed.initialize(**kwargs)
  return True
