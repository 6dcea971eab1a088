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

from typing import Any, Callable, Mapping

import flax.linen as nn
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


# --- Mean-preserving removal -------------------------------------------------------------
# Zeroing a direction (x P) also moves the feature's mean, mu -> mu P, and every later
# BatchNorm then normalizes with stale statistics. Replacing the component by its mean,
# x -> x - (x - mu) V V^T = x P + mu V V^T, keeps the average activation. The extra term is
# a constant: it is folded into the layer's bias when it has one, and otherwise into the
# running means of the BatchNorms that it reaches unchanged (`absorb_shifts`).


def mean_shift(kernel: jax.Array, frame: jax.Array, mean: jax.Array, side: str = "input",
               coverage: jax.Array | None = None) -> jax.Array:
  """(C_out,) constant that mean replacement adds to the layer's output.

  side 'output': mu V V^T. side 'input': the (unprojected) kernel applied to mu V V^T,
  summed over a conv's taps, each tap weighted by `coverage` (`tap_coverage`: the share of
  output positions where it reads inside the zero-padded input) so that the constant is
  the exact one's average over positions; without it every tap counts fully (exact away
  from the border only). `mean` is the feature's mean over images and positions, (C,) on
  the projected side.
  """
  frame = _as_frame(frame).astype(jnp.float32)
  c = jnp.asarray(mean, jnp.float32) @ frame @ frame.T
  if side == "output":
    return c
  k = jnp.asarray(kernel, jnp.float32)
  per_tap = jnp.tensordot(c, k, axes=([0], [k.ndim - 2]),
                          precision=jax.lax.Precision.HIGHEST)
  if coverage is not None:
    cov = jnp.asarray(coverage, jnp.float32)
    if cov.shape != k.shape[:-2]:
      raise ValueError(f"coverage of shape {cov.shape} does not fit a kernel of shape "
                       f"{k.shape}")
    per_tap = per_tap * cov[..., None]
  return per_tap.reshape(-1, k.shape[-1]).sum(0)


def tap_coverage(model: nn.Module | Callable, variables: Mapping[str, Any], name: str,
                 probe: jax.Array) -> np.ndarray | None:
  """For conv layer `name`: the (kernel spatial shape) share of its output positions at
  which each tap reads inside the input rather than the zero padding, as the layer runs
  on `probe` (its strides, padding and dilation included); None for a dense layer (or a
  layer that is not a `nn.Conv`)."""
  found = {}

  def interceptor(next_fun, args, kwargs, context):
    if (context.method_name == "__call__" and not found
        and "/".join(context.module.scope.path) == name):
      found["module"] = context.module.clone(parent=None)
      found["shape"] = args[0].shape
    return next_fun(*args, **kwargs)

  apply = features.as_apply_fn(model)
  with nn.intercept_methods(interceptor):  # traced, not computed: only shapes are needed
    jax.eval_shape(lambda v, x: apply(v, x), variables, probe[:1])
  if not found:
    raise ValueError(f"layer {name!r} is not called by the model")
  module, shape = found["module"], found["shape"]
  if not isinstance(module, nn.Conv) or len(shape) < 3:
    return None
  kernel_shape = features.layer_kernels(variables["params"])[name].shape[:-2]
  taps = int(np.prod(kernel_shape))
  onehot = jnp.eye(taps, dtype=jnp.float32).reshape(*kernel_shape, 1, taps)
  probe_conv = module.clone(features=taps, use_bias=False, feature_group_count=1,
                            dtype=jnp.float32, param_dtype=jnp.float32)
  out = probe_conv.apply({"params": {"kernel": onehot}},
                         jnp.ones((1,) + tuple(shape[1:-1]) + (1,), jnp.float32))
  return np.asarray(out.reshape(-1, taps).mean(0).reshape(kernel_shape))


def _shifted_run(model, variables, images, shifts):
  """Logits and {(call index, kind, *module path): first input} for the BatchNorms
  ('bn') and layers ('layer'), keyed in call order, with shifts[layer] added to the named
  layers' outputs."""
  inputs: dict[tuple, jax.Array] = {}
  seen: set[tuple] = set()

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = tuple(context.module.scope.path)
    if path not in seen:
      kind = ("bn" if isinstance(context.module, nn.BatchNorm)
              else "layer" if features.is_layer(context.module) else None)
      if kind is not None:
        seen.add(path)
        inputs[(len(inputs), kind) + path] = args[0]
    out = next_fun(*args, **kwargs)
    name = "/".join(path)
    if name in shifts and features.is_layer(context.module):
      out = out + shifts[name]
    return out

  with nn.intercept_methods(interceptor):
    logits = features.as_apply_fn(model)(variables, images)
  return logits, inputs


# Compiled once per model and shapes: absorb_shifts passes a shift (zero where unused)
# for every layer, so that every call, whatever it shifts, reuses the same program.
_run_shifted = features.model_jit(_shifted_run)


def absorb_shifts(model: nn.Module | Callable, variables: Mapping[str, Any],
                  shifts: Mapping[str, jax.Array], probe: jax.Array, *,
                  tol: float = 1e-4, max_passes: int = 512) -> tuple[dict[str, Any], bool]:
  """Variables whose network equals this one with shifts[layer] added to each layer's
  output at every position; (variables, True), or (variables unchanged, False) where a
  shift cannot be folded exactly (e.g. it meets a nonlinearity first).

  A layer with a bias takes its own shift. Otherwise the shift travels (through residual
  additions, concatenations, poolings) to the modules that read it, found by running the
  network on `probe` images: the first BatchNorm or biased dense (or 1x1 conv) layer,
  in call order, whose input differs from the shifted network's by a per-channel
  constant delta takes it (running mean - delta; bias + delta W), and the search
  repeats until the logits agree.
  """
  variables = dict(variables)
  params = traverse_util.flatten_dict(dict(variables["params"]))
  pending = {}
  for name, s in shifts.items():
    bias_path = features.kernel_path(name)[:-1] + ("bias",)
    if bias_path in params:
      params[bias_path] = (params[bias_path] + s).astype(params[bias_path].dtype)
    else:
      # host arrays, like the zeros below: a committed device array in one slot and not
      # in another would make jit compile a new program for every layer that is shifted
      pending[name] = np.asarray(s, np.float32)
  stats = traverse_util.flatten_dict(dict(variables.get("batch_stats", {})))

  def build():
    out = {**variables, "params": _like(variables["params"], params)}
    if stats:
      out["batch_stats"] = _like(variables["batch_stats"], stats)
    return out

  if not pending:
    return build(), True
  none = {name: np.zeros(k.shape[-1:], np.float32)
          for name, k in features.layer_kernels(variables["params"]).items()}
  target, target_in = _run_shifted(model, variables, probe, {**none, **pending})
  scale = max(1.0, float(jnp.max(jnp.abs(target))))
  fixed = set()  # modules that took a constant: their input still differs, not their output
  for _ in range(max_passes):
    current = build()
    logits, inputs = _run_shifted(model, current, probe, none)
    if float(jnp.max(jnp.abs(logits - target))) <= tol * scale:
      return current, True
    for key in sorted(inputs):  # call order: fix the first one that differs
      kind, path, u = key[1], key[2:], inputs[key]
      if path in fixed:
        continue
      diff = target_in[key] - u
      size = max(1.0, float(jnp.max(jnp.abs(u))))
      if float(jnp.max(jnp.abs(diff))) <= tol * size:
        continue
      delta = jnp.mean(diff.reshape(-1, diff.shape[-1]), axis=0)
      if float(jnp.max(jnp.abs(diff - delta))) > tol * size:
        return variables, False
      mean_path, bias_path = path + ("mean",), path + ("bias",)
      kernel = params.get(path + ("kernel",))
      if kind == "bn" and mean_path in stats:
        stats[mean_path] = stats[mean_path] - delta.astype(stats[mean_path].dtype)
      elif (kind == "layer" and bias_path in params and kernel is not None
            and all(d == 1 for d in kernel.shape[:-2])):
        w = kernel.reshape(kernel.shape[-2:])
        params[bias_path] = (params[bias_path] + delta @ w).astype(params[bias_path].dtype)
      else:
        return variables, False
      fixed.add(path)
      break
    else:
      return variables, False
  return variables, False


def _like(tree: Any, flat: dict[tuple, Any]) -> Any:
  """`flat` (a flattened copy of tree, some leaves replaced) in tree's structure and kind."""
  return jax.tree_util.tree_map_with_path(lambda p, leaf: flat[_path_keys(p)], tree)
