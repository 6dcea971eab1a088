"""Folding the DRR projection P = I - V V^T into a layer's weights.

DRR removes, at a layer, the k orthonormal directions V (a (C, k) *frame*) by projecting a
feature onto their orthogonal complement. Folding P into the conv/dense kernel makes the
network itself change, with no run-time hook, and is exact on either side of the layer:

- input side: the feature the layer consumes, x -> x P (per spatial position for a conv),
  gives kernel' = P kernel along the input-channel axis (-2); the bias is unchanged, and
  zero padding stays exact since P 0 = 0.
- output side: the layer's output (pre-BN for a conv followed by BatchNorm), y -> y P,
  gives kernel' = kernel P along the output axis (-1) and bias' = bias P.

Layers are named as in `drr_jax.features` ('stage2_block1/conv1').
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from drr_jax import features

SIDES = ("input", "output")


def _as_frame(frame: Any) -> jax.Array:
  frame = jnp.asarray(frame)
  if frame.ndim != 2:
    raise ValueError(f"a frame must be 2-D (C, k), got shape {frame.shape}")
  if not jnp.issubdtype(frame.dtype, jnp.floating):
    frame = frame.astype(jnp.float32)
  return frame


def projector(frame: jax.Array) -> jax.Array:
  """(C, C) I - V V^T for a (C, k) frame V with orthonormal columns; (C, 0) gives I."""
  v = _as_frame(frame)
  return jnp.eye(v.shape[0], dtype=v.dtype) - jnp.matmul(
      v, v.T, precision=jax.lax.Precision.HIGHEST)


def _compute_dtype(dtype) -> jnp.dtype:
  return jnp.promote_types(dtype, jnp.float32)


def _check_rows(frame: jax.Array, channels: int, what: str) -> None:
  if frame.shape[0] != channels:
    raise ValueError(f"frame has {frame.shape[0]} rows but the kernel's {what} has "
                     f"{channels} channels")
  if frame.shape[1] > channels:
    raise ValueError(f"frame has {frame.shape[1]} columns, more than its {channels} rows, "
                     "so they cannot be orthonormal")


def fold_input(kernel: jax.Array, frame: jax.Array) -> jax.Array:
  """kernel' = P kernel along the input-channel axis (-2): the layer then sees x P."""
  frame = _as_frame(frame)
  _check_rows(frame, kernel.shape[-2], "input side (axis -2)")
  if frame.shape[1] == 0:
    return kernel
  dtype = _compute_dtype(kernel.dtype)
  p = projector(frame.astype(dtype))
  out = jnp.matmul(p, kernel.astype(dtype), precision=jax.lax.Precision.HIGHEST)
  return out.astype(kernel.dtype)


def fold_output(kernel: jax.Array, bias: jax.Array | None, frame: jax.Array
                ) -> tuple[jax.Array, jax.Array | None]:
  """(kernel P, bias P) along the output axis (-1): the layer then outputs y P."""
  frame = _as_frame(frame)
  _check_rows(frame, kernel.shape[-1], "output side (axis -1)")
  if bias is not None and bias.shape != (kernel.shape[-1],):
    raise ValueError(f"bias shape {bias.shape} does not match kernel shape {kernel.shape}")
  if frame.shape[1] == 0:
    return kernel, bias
  dtype = _compute_dtype(kernel.dtype)
  p = projector(frame.astype(dtype))
  hi = jax.lax.Precision.HIGHEST
  new_kernel = jnp.matmul(kernel.astype(dtype), p, precision=hi).astype(kernel.dtype)
  new_bias = None if bias is None else jnp.matmul(
      bias.astype(dtype), p, precision=hi).astype(bias.dtype)
  return new_kernel, new_bias


def _path_keys(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def _checked(name: str, frame: Any, kernel: jax.Array, side: str) -> jax.Array:
  try:
    frame = _as_frame(frame)
    if not isinstance(frame, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(frame))):
      raise ValueError("frame has non-finite values")
    if side == "input":
      _check_rows(frame, kernel.shape[-2], "input side (axis -2)")
    else:
      _check_rows(frame, kernel.shape[-1], "output side (axis -1)")
  except ValueError as e:
    raise ValueError(f"layer {name!r} ({side} side): {e}") from None
  return frame


def fold(params: Any, frames: Mapping[str, jax.Array], side: str = "input") -> Any:
  """New params with each layer in `frames` projected on `side` ('input' or 'output').

  Layers not in `frames`, and zero-column frames, keep their arrays as they are; the
  input tree is not mutated and the result has its kind (dict or FrozenDict). Every frame
  is checked first, and a problem raises ValueError naming the layer.
  """
  if side not in SIDES:
    raise ValueError(f"side must be one of {SIDES}, got {side!r}")
  kernels = features.layer_kernels(params)
  checked = {}
  for name, frame in frames.items():
    if name not in kernels:
      raise ValueError(f"unknown layer {name!r}: no conv/dense kernel at "
                       f"{features.kernel_path(name)} in params")
    checked[name] = _checked(name, frame, kernels[name], side)
  flat = traverse_util.flatten_dict(dict(params))
  updates: dict[tuple, jax.Array] = {}
  for name, frame in checked.items():
    if frame.shape[1] == 0:
      continue
    path = features.kernel_path(name)
    if side == "input":
      updates[path] = fold_input(kernels[name], frame)
    else:
      bias_path = path[:-1] + ("bias",)
      bias = flat.get(bias_path)
      updates[path], new_bias = fold_output(kernels[name], bias, frame)
      if bias is not None:
        updates[bias_path] = new_bias
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: updates.get(_path_keys(path), leaf), params)
