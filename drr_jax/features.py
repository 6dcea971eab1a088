"""Which feature each conv/dense weight consumes, captured from any Flax Linen model.

Every `nn.Conv` / `nn.Dense` submodule is a *layer*, named by its module path joined with
'/' (e.g. 'stage2_block1/conv1'). The layer's weight lives at `params[*path]['kernel']`
and the feature it consumes is its input, captured under the same name; its output (for
a conv followed by BatchNorm: the pre-BN activation) is captured too. The mapping is
explicit both ways: `kernel_path(name)` and `layer_name(kernel_path)`.

Inputs are sown into Flax's 'intermediates' collection by a method interceptor (Flax's
`capture_intermediates` records outputs only); outputs come from `capture_intermediates`.
`extract` streams a data set through the model and returns the pooled features on the
host; with several devices each batch is split over them (`sharding`: the feature
functions are per image, so nothing else changes).
"""
from __future__ import annotations

import contextlib

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from drr_jax import sharding

LAYER_TYPES = (nn.Conv, nn.Dense)
_INPUT = "__input__"
_OUTPUT = "__call__"


class FeatureError(ValueError):
  """Features that cannot be used (NaN or Inf); the message names the layer."""


def as_apply_fn(model: nn.Module | Callable) -> Callable:
  """A Linen module becomes apply(variables, images) in eval mode; functions pass."""
  if isinstance(model, nn.Module):
    return lambda variables, x: model.apply(variables, x, train=False)
  return model


def model_jit(fn: Callable, static_argnums: tuple[int, ...] = ()) -> Callable:
  """fn(model, *args) compiled once per model (a static argument, with `static_argnums`)
  and argument shapes, so that repeated calls on one network reuse one program; a model
  that cannot be hashed runs eagerly instead."""
  jitted = jax.jit(fn, static_argnums=(0, *static_argnums))

  def call(model, *args):
    try:
      hash(model)
    except TypeError:
      return fn(model, *args)
    return jitted(model, *args)

  return call


def is_layer(module: nn.Module) -> bool:
  """A conv or dense layer whose kernel mixes channels: a grouped (depthwise) conv's
  kernel cannot take a projection on either side, so it is not a DRR layer."""
  if isinstance(module, nn.Conv) and int(module.feature_group_count) != 1:
    return False
  return isinstance(module, LAYER_TYPES)


def layer_name(kernel_path: tuple[str, ...]) -> str:
  """('stage1_block1', 'conv1', 'kernel') -> 'stage1_block1/conv1'."""
  if not kernel_path or kernel_path[-1] != "kernel":
    raise ValueError(f"{kernel_path} is not the path of a kernel")
  return "/".join(kernel_path[:-1])


def kernel_path(name: str) -> tuple[str, ...]:
  """'stage1_block1/conv1' -> ('stage1_block1', 'conv1', 'kernel')."""
  return tuple(name.split("/")) + ("kernel",)


def layer_kernels(params: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Every conv (4-D) and dense (2-D) kernel in a params tree, by layer name, in order."""
  flat = traverse_util.flatten_dict(dict(params))
  return {layer_name(k): v for k, v in flat.items()
          if k[-1] == "kernel" and jnp.ndim(v) in (2, 4)}


def _sow_input(next_fun, args, kwargs, context):
  if context.method_name == "__call__" and is_layer(context.module):
    context.module.sow("intermediates", _INPUT, args[0])
  return next_fun(*args, **kwargs)


def _joined(calls: list) -> jax.Array:
  return calls[0] if len(calls) == 1 else jnp.concatenate(calls)


def capture_sides(model: nn.Module, variables: Any, images: jax.Array, *,
                  inputs: bool = True, outputs: bool = True, **apply_kwargs
                  ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
  """Runs `model` once and returns (logits, {layer: input feature}, {layer: output
  feature}); a side not asked for is an empty dict (and not recorded).

  A layer called more than once (shared weights) gets its calls concatenated along the
  batch axis. Extra keyword arguments go to `model.apply` (e.g. train=False).
  """
  with nn.intercept_methods(_sow_input) if inputs else contextlib.nullcontext():
    logits, state = model.apply(
        variables, images, capture_intermediates=(lambda m, _: is_layer(m)) if outputs
        else False, mutable=["intermediates"], **apply_kwargs)
  flat = traverse_util.flatten_dict(state.get("intermediates", {}))
  found = [{"/".join(k[:-1]): _joined(v) for k, v in flat.items() if k[-1] == key}
           for key in (_INPUT, _OUTPUT)]
  return logits, found[0], found[1]


def capture(model: nn.Module, variables: Any, images: jax.Array, *,
            outputs: bool = False, **apply_kwargs) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Runs `model` and returns (logits, {layer name: input feature}) (or outputs)."""
  logits, ins, outs = capture_sides(model, variables, images, inputs=not outputs,
                                    outputs=outputs, **apply_kwargs)
  return logits, outs if outputs else ins


def capture_fn_sides(apply_fn: Callable[..., jax.Array], variables: Any, images: jax.Array
                     ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
  """Like `capture_sides`, for a plain apply function that calls a Linen model inside."""
  store: tuple[dict[str, list], dict[str, list]] = ({}, {})

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and is_layer(context.module):
      name = "/".join(context.module.scope.path)
      store[0].setdefault(name, []).append(args[0])
      store[1].setdefault(name, []).append(out)
    return out

  with nn.intercept_methods(record):
    logits = apply_fn(variables, images)
  ins, outs = ({k: _joined(v) for k, v in side.items()} for side in store)
  return logits, ins, outs


def capture_fn(apply_fn: Callable[..., jax.Array], variables: Any, images: jax.Array, *,
               outputs: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Like `capture`, for a plain apply function that calls a Linen model inside."""
  logits, ins, outs = capture_fn_sides(apply_fn, variables, images)
  return logits, outs if outputs else ins


def _captured_sides(model: nn.Module | Callable, variables: Any, images: jax.Array,
                    inputs: bool, outputs: bool
                    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """({layer: input feature}, {layer: output feature}) from one pass of a Linen module
  (eval mode) or an apply function."""
  if isinstance(model, nn.Module):
    return capture_sides(model, variables, images, inputs=inputs, outputs=outputs,
                         train=False)[1:]
  return capture_fn_sides(model, variables, images)[1:]


def _captured(model: nn.Module | Callable, variables: Any, images: jax.Array,
              outputs: bool) -> dict[str, jax.Array]:
  """{layer: feature} from a Linen module (eval mode) or an apply function."""
  return _captured_sides(model, variables, images, not outputs, outputs)[int(outputs)]


POOLINGS = ("max", "mean", "positions")


def pool(feature: jax.Array, pooling: str) -> jax.Array:
  """A captured feature -> an (samples, C) matrix.

  Dense features (N, C) pass through. Conv features (N, H, W, C) become one row per image
  holding each channel's spatial 'max' or 'mean', or with 'positions' one row per
  spatial position (N*H*W rows).
  """
  if feature.ndim == 2:
    return feature
  if feature.ndim != 4:
    raise ValueError(f"cannot pool a feature of shape {feature.shape}")
  if pooling == "max":
    return jnp.max(feature, axis=(1, 2))
  if pooling == "mean":
    return jnp.mean(feature, axis=(1, 2))
  if pooling == "positions":
    return feature.reshape(-1, feature.shape[-1])
  raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")


def _pooled(model, outputs, pooling, layers, with_means, variables, images):
  found = _captured(model, variables, images, outputs)
  keep = found if layers is None else {k: found[k] for k in layers}
  pooled = {k: pool(v, pooling).astype(jnp.float32) for k, v in keep.items()}
  if not with_means:
    return pooled
  means = {k: pool(v, "mean").astype(jnp.float32) for k, v in keep.items()}
  return pooled, means


_pooled_jit = model_jit(_pooled, static_argnums=(1, 2, 3, 4))


def _pooled_sides(model, pooling, in_layers, out_layers, variables, images):
  """((pooled, means) of the inputs of `in_layers`, the same of the outputs of
  `out_layers`), from one pass."""
  found = _captured_sides(model, variables, images, bool(in_layers), bool(out_layers))
  return tuple(({k: pool(side[k], pooling).astype(jnp.float32) for k in layers},
                {k: pool(side[k], "mean").astype(jnp.float32) for k in layers})
               for side, layers in zip(found, (in_layers, out_layers)))


_pooled_sides_jit = model_jit(_pooled_sides, static_argnums=(1, 2, 3))


def pooled_fn(model: nn.Module | Callable, *, outputs: bool, pooling: str,
              layers: tuple[str, ...] | None = None, with_means: bool = False
              ) -> Callable:
  """A jitted f(variables, images) -> {layer: (rows, C) float32} for the chosen layers
  (compiled once per model, layers and shapes).

  With `with_means`, f returns (pooled, means): means[layer] is each image's (N, C)
  spatial mean, whose average over a data set is the feature's mean at every position.
  """
  if pooling not in POOLINGS:
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
  key = None if layers is None else tuple(layers)
  return lambda variables, images: _pooled_jit(model, bool(outputs), pooling, key,
                                               bool(with_means), variables, images)


def _located(model, layer, outputs, variables, images, v):
  found = _captured(model, variables, images, outputs)
  x = found[layer].astype(jnp.float32)
  if x.ndim == 2:
    return x
  rows = x.reshape(x.shape[0], -1, x.shape[-1])
  at = jnp.argmax(rows @ v.astype(jnp.float32), axis=1)
  return jnp.take_along_axis(rows, at[:, None, None], axis=1)[:, 0]


_located_jit = model_jit(_located, static_argnums=(1, 2))


def located_fn(model: nn.Module | Callable, layer: str, *, outputs: bool = False
               ) -> Callable:
  """A jitted f(variables, images, v) -> (N, C) float32: for each image, the feature of
  `layer` at the spatial position where its projection on v (C,) is largest (a dense
  layer's feature as it is). Where the max over positions mixes channels from different
  places, this is the feature of one place: the one a local trigger lights up."""
  return lambda variables, images, v: _located_jit(model, layer, bool(outputs),
                                                   variables, images, v)


def layer_order(model: nn.Module | Callable, variables: Any, image_shape) -> list[str]:
  """Layer names in the order the forward pass calls them (traced, not computed)."""
  order: list[str] = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and is_layer(context.module):
      name = "/".join(context.module.scope.path)
      if name not in order:
        order.append(name)
    return next_fun(*args, **kwargs)

  apply = as_apply_fn(model)
  with nn.intercept_methods(record):
    # A fresh function each call: eval_shape caches traces by function identity, and a
    # cached trace would not run the interceptor.
    jax.eval_shape(lambda v, x: apply(v, x), variables,
                   jnp.zeros((1, *image_shape), jnp.uint8))
  return order


def extract_sides(model: nn.Module | Callable, variables: Any, images: np.ndarray, *,
                  inputs: tuple[str, ...] = (), outputs: tuple[str, ...] = (),
                  pooling: str, batch_size: int, progress: bool = True,
                  desc: str = "features"
                  ) -> tuple[tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
                             tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
  """Streams the images through the model once, reading the input features of the layers
  `inputs` and the output features of the layers `outputs`. Returns, for each side,
  ({layer: (rows, C)}, {layer: (N, C)} each image's mean of the feature over positions)
  on the host. Raises FeatureError when a layer's features hold NaN or Inf."""
  if pooling not in POOLINGS:
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
  sides = (tuple(inputs), tuple(outputs))
  chunks = [({k: [] for k in layers}, {k: [] for k in layers}) for layers in sides]
  mesh = sharding.batch_mesh()
  variables = sharding.replicate(variables, mesh)
  for x, m in sharding.batches(images, batch_size, mesh, progress=progress, desc=desc):
    found = sharding.to_host(_pooled_sides_jit(model, pooling, *sides, variables, x))
    for (out, means), (rows_out, means_out) in zip(found, chunks):
      for k, v in out.items():
        rows_out[k].append(v[:v.shape[0] // x.shape[0] * m])
        means_out[k].append(means[k][:m])
  result = []
  for rows, means in chunks:
    feats = {k: np.concatenate(v) for k, v in rows.items()}
    for k, v in feats.items():
      if not np.all(np.isfinite(v)):
        raise FeatureError(f"the features of layer {k!r} contain NaN or Inf")
    result.append((feats, {k: np.concatenate(v) for k, v in means.items()}))
  return result[0], result[1]


def extract(model: nn.Module | Callable, variables: Any, images: np.ndarray,
            layers: tuple[str, ...], *, outputs: bool, pooling: str, batch_size: int,
            progress: bool = True, desc: str = "features", with_means: bool = False
            ) -> dict[str, np.ndarray] | tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Streams the images through the model; returns {layer: (rows, C)} on the host (the
  layers' outputs or inputs), and with `with_means` also {layer: (N, C)} each image's
  mean of the feature over positions. Raises FeatureError when a layer's features hold
  NaN or Inf."""
  side = {"outputs" if outputs else "inputs": tuple(layers)}
  found = extract_sides(model, variables, images, pooling=pooling, batch_size=batch_size,
                        progress=progress, desc=desc, **side)[int(bool(outputs))]
  return found if with_means else found[0]
