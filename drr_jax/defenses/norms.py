"""The BatchNorm layers of any Flax Linen model: which there are, which layer feeds each,
the per-channel features they receive, and zeroing their channels.

The neuron-pruning baselines (CLP, EP, ANP) work on BatchNorm channels: CLP scores a
channel by its conv kernel scaled by the BatchNorm factor, EP by the distribution of the
BatchNorm's input, ANP by a mask on the BatchNorm's scale; all three prune by zeroing
BatchNorm parameters. `find` traces one forward pass (shapes only, nothing computed) and
pairs each `nn.BatchNorm` with the module whose output it reads *directly*: a layer with a
'kernel' (a conv, depthwise or not, or a dense layer), or None where the BatchNorm reads a
sum, a concatenation or an activation (e.g. the first BatchNorm of a pre-activation block,
which reads the residual stream).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

from drr_jax import features


class Norm(NamedTuple):
  """A BatchNorm: its module path ('stage1_block1/bn1'), its channels, the layer whose
  output it reads directly (None: it reads anything else), and the last layer with a
  kernel that the forward pass called before it."""
  path: str
  channels: int
  feeder: str | None
  previous: str | None = None


def _params(variables: Mapping[str, Any]) -> dict[tuple, Any]:
  return traverse_util.flatten_dict(dict(variables["params"]))


def find(model: nn.Module | Callable, variables: Mapping[str, Any],
         image_shape: Sequence[int]) -> list[Norm]:
  """Every BatchNorm the forward pass calls, in call order, with its feeder and the
  last layer with a kernel called before it."""
  params = _params(variables)
  has_kernel = lambda path: tuple(path.split("/")) + ("kernel",) in params if path else False
  made_by: dict[int, str] = {}  # id of a module's output -> the module with a kernel
  found: list[Norm] = []
  last: list[str | None] = [None]  # the last module with a kernel to finish
  keep: list[Any] = []  # holds the traced arrays so that their ids stay unique

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name != "__call__":
      return out
    path = "/".join(context.module.scope.path)
    if isinstance(context.module, nn.BatchNorm):
      if all(n.path != path for n in found):
        x = args[0]
        keep.append(x)
        found.append(Norm(path, int(x.shape[-1]), made_by.get(id(x)), last[0]))
    elif has_kernel(path):
      last[0] = path
      if id(out) not in made_by:
        keep.append(out)
        made_by[id(out)] = path
    return out

  apply = features.as_apply_fn(model)
  with nn.intercept_methods(record):
    # a fresh function each call: eval_shape caches traces by function identity
    jax.eval_shape(lambda v, x: apply(v, x), variables,
                   jnp.zeros((1, *image_shape), jnp.uint8))
  return found


def _inputs(model, paths, variables, images):
  store: dict[str, jax.Array] = {}

  def record(next_fun, args, kwargs, context):
    if (context.method_name == "__call__" and isinstance(context.module, nn.BatchNorm)):
      path = "/".join(context.module.scope.path)
      if path in paths and path not in store:
        x = args[0].astype(jnp.float32)
        store[path] = jnp.max(x, axis=tuple(range(1, x.ndim - 1))) if x.ndim > 2 else x
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    features.as_apply_fn(model)(variables, images)
  return store


_inputs_jit = features.model_jit(_inputs, static_argnums=(1,))


def max_inputs(model: nn.Module | Callable, variables: Mapping[str, Any],
               images: np.ndarray, paths: Sequence[str], *, batch_size: int = 500,
               progress: bool = True) -> dict[str, np.ndarray]:
  """{BatchNorm path: (N, C)}: each image's per-channel spatial max of the BatchNorm's
  input (a 2-D input as it is), in eval mode, streamed in batches."""
  paths = tuple(paths)
  chunks: dict[str, list[np.ndarray]] = {p: [] for p in paths}
  n = len(images)
  for i in tqdm(range(0, n, batch_size), desc="BatchNorm inputs", disable=not progress,
                leave=False):
    x = images[i:i + batch_size]
    m = len(x)
    if m < batch_size and n > batch_size:  # pad: one compiled program for every batch
      x = np.concatenate([x, np.repeat(x[-1:], batch_size - m, 0)])
    out = jax.device_get(_inputs_jit(model, paths, variables, x))
    for p in paths:
      chunks[p].append(np.asarray(out[p])[:m])
  return {p: np.concatenate(v) for p, v in chunks.items()}


def get(variables: Mapping[str, Any], path: str, collection: str, name: str,
        default: Any = None) -> Any:
  """variables[collection][*path][name], or `default` where there is none."""
  flat = traverse_util.flatten_dict(dict(variables.get(collection, {})))
  return flat.get(tuple(path.split("/")) + (name,), default)


def zero_channels(variables: Mapping[str, Any], pruned: Mapping[str, Sequence[int]],
                  names: Sequence[str] = ("scale",)) -> dict[str, Any]:
  """New variables with params[path][name][channels] = 0 for each BatchNorm path in
  `pruned` and each name in `names` ('scale', 'bias') that the BatchNorm has."""
  flat = _params(variables)
  for path, channels in pruned.items():
    idx = np.asarray(list(channels), np.int64)
    if idx.size == 0:
      continue
    for name in names:
      key = tuple(path.split("/")) + (name,)
      if key in flat:
        flat[key] = jnp.asarray(flat[key]).at[idx].set(0)
  params = jax.tree_util.tree_map_with_path(
      lambda p, leaf: flat[tuple(getattr(k, "key", k) for k in p)], variables["params"])
  return {**variables, "params": params}
