"""Sites: the features of a network from which DRR can remove a direction exactly.

A direction must be removed from a feature wherever the network reads it, or a path that
still carries it (an identity shortcut, a concatenation, a parallel conv) keeps the
backdoor alive. Params-only folding can do that at two kinds of place:

- an *output site*: a conv/dense layer's output (before its BatchNorm). Every path that
  uses this tensor reads it through the layer, so folding P = I - V V^T into the kernel's
  output axis (kernel P, bias P) removes V from the feature in every path, exactly.
- an *input site*: the tensor a layer reads, folded as P kernel into that layer and into
  every other layer that reads the very same tensor. This is exact only where layers are
  the tensor's only readers (e.g. the ReLU'd input of a pre-activation block, read by
  conv1 and the 1x1 shortcut conv); where an identity shortcut or a concatenation also
  reads it (the input of a post-activation ResNet block, a DenseNet feature), the fold
  would leave that path untouched, so such a tensor is not offered as an input site. Which
  case holds is not guessed from names: `find_sites` folds a random direction and compares
  the network with one that projects the tensor explicitly -- at the output of the module
  that made it, or else in front of every module that receives it -- on probe images.
  (A tensor made by a plain function and also read by a plain function, outside any
  module, is out of sight of this check.)

Grouped (depthwise) convs mix no channels, so P cannot be folded into their kernels on
either side; they are not sites, and their neighbours' sites (the 1x1 expansion conv's
output, the 1x1 projection conv's input) are used instead.

Removal either zeros the component (x P) or replaces it by a given mean mu
(x - (x - mu) V V^T, "mean replacement"); the constant mu V V^T is folded into biases or
BatchNorm running means by `projection.absorb_shifts`, or the removal falls back to
zeroing where it cannot be folded exactly.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from drr_jax import features, projection

SIDES = ("input", "output")


class Site(NamedTuple):
  """Where a direction can be removed. `layer` is the layer whose input (side 'input') or
  output (side 'output') is the feature; `folds` the layers whose kernels take the fold
  (for an input site, every layer that reads the same tensor); `receivers` the module
  paths that receive the tensor as their first argument, and `origin` the module whose
  output it is (None where a plain function such as a ReLU made it): where the explicit
  projection happens."""
  layer: str
  side: str
  folds: tuple[str, ...]
  receivers: tuple[str, ...]
  origin: str | None = None

  @property
  def name(self) -> str:
    return f"{self.layer}:{'in' if self.side == 'input' else 'out'}"


class _Call(NamedTuple):
  path: str
  module: nn.Module
  arg: Any
  out: Any


def _trace_calls(model: nn.Module | Callable, variables: Mapping[str, Any],
                 probe: jax.Array) -> list[_Call]:
  """Every module call of one forward pass, in call order, with its first argument and
  output. The pass is traced, not computed (the abstract arrays are kept only for their
  identities, which stay unique, and shapes)."""
  calls: list[_Call] = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
      calls.append(_Call("/".join(context.module.scope.path), context.module,
                         args[0] if args else None, out))
    return out

  apply = features.as_apply_fn(model)
  with nn.intercept_methods(record):
    # A fresh function each call: eval_shape caches traces by function identity, and a
    # cached trace would not run the interceptor.
    jax.eval_shape(lambda v, x: apply(v, x), variables, probe)
  return calls


def is_foldable(module: nn.Module) -> bool:
  """A conv or dense layer whose kernel mixes channels (not a grouped/depthwise conv)."""
  return features.is_layer(module)


def _project(x: jax.Array, frame: jax.Array, mean: jax.Array | None) -> jax.Array:
  """x with its component along the (C, k) frame removed (zeroed, or set to `mean`'s)."""
  centered = x if mean is None else x - mean
  return x - (centered @ frame) @ frame.T


def _cast_like(x: jax.Array, like: jax.Array) -> jax.Array:
  return x.astype(like.dtype if jnp.issubdtype(like.dtype, jnp.floating) else jnp.float32)


def _projecting_apply(model, variables, images, at_inputs, at_outputs):
  """The network's logits with x -> x - ((x - mean) F) F^T applied to the first argument
  of each module in `at_inputs` and to the output of each module in `at_outputs`
  ({module path: (frame F (C, k), mean (C,))}; a zero frame changes nothing)."""
  def hook(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = "/".join(context.module.scope.path)
    if path in at_inputs:
      # idempotent, so a receiver nested in another receiver is harmless
      args = (_cast_like(_project(args[0].astype(jnp.float32), *at_inputs[path]),
                         args[0]), *args[1:])
    out = next_fun(*args, **kwargs)
    if path in at_outputs:
      out = _cast_like(_project(out.astype(jnp.float32), *at_outputs[path]), out)
    return out

  with nn.intercept_methods(hook):
    return features.as_apply_fn(model)(variables, images)


def _where_projected(site: Site, frame: jax.Array, mean: jax.Array
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(at_inputs, at_outputs) of `_projecting_apply` that project the site's feature."""
  if site.side == "input" and site.origin is None:
    return {r: (frame, mean) for r in site.receivers}, {}
  return {}, {site.origin if site.side == "input" else site.layer: (frame, mean)}


def explicit_apply(model: nn.Module | Callable, site: Site, frame: Any,
                   mean: Any | None = None) -> Callable:
  """apply(variables, images) of the network with the site's feature projected at run
  time (no change to the weights): the reference a fold must equal."""
  frame = jnp.asarray(frame, jnp.float32)
  mean_ = (jnp.zeros(frame.shape[0], jnp.float32) if mean is None
           else jnp.asarray(mean, jnp.float32))
  at_inputs, at_outputs = _where_projected(site, frame, mean_)
  return lambda variables, images: _projecting_apply(model, variables, images, at_inputs,
                                                     at_outputs)


_projecting_apply_jit = features.model_jit(_projecting_apply)
_apply_jit = features.model_jit(lambda model, v, x: features.as_apply_fn(model)(v, x))


def _site_width(site: Site, kernels: Mapping[str, Any]) -> int:
  kernel = kernels[site.layer]
  return int(kernel.shape[-2] if site.side == "input" else kernel.shape[-1])


def explicit_applier(model: nn.Module | Callable, variables: Mapping[str, Any],
                     sites: Sequence[Site], k: int = 1) -> Callable:
  """f(variables, images, site, frame, mean=None): `explicit_apply(model, site, frame,
  mean)(variables, images)` for any of `sites` and frames of at most k columns, compiled
  once for all of them: every place where one of the sites is projected takes a frame
  (zero, which changes nothing, where another site is under test; frames are padded with
  zero columns to k). A site outside `sites`, or one whose places see another width,
  gets its own program. `variables` give the widths (any variables of the same shapes
  can be passed to f)."""
  kernels = features.layer_kernels(variables["params"])
  zero_in: dict[str, Any] = {}
  zero_out: dict[str, Any] = {}
  for site in sites:
    c = _site_width(site, kernels)
    at_in, at_out = _where_projected(site, jnp.zeros((c, k), jnp.float32),
                                     jnp.zeros(c, jnp.float32))
    zero_in.update(at_in)
    zero_out.update(at_out)

  def f(variables, images, site, frame, mean=None):
    frame = jnp.asarray(frame, jnp.float32)
    if frame.ndim == 1:
      frame = frame[:, None]
    mean_ = (jnp.zeros(frame.shape[0], jnp.float32) if mean is None
             else jnp.asarray(mean, jnp.float32))
    if frame.shape[1] <= k:
      frame = jnp.pad(frame, ((0, 0), (0, k - frame.shape[1])))
    at_in, at_out = _where_projected(site, frame, mean_)
    if all(p in zero_in and zero_in[p][0].shape == a[0].shape for p, a in at_in.items()
           ) and all(p in zero_out and zero_out[p][0].shape == a[0].shape
                     for p, a in at_out.items()):
      at_in, at_out = {**zero_in, **at_in}, {**zero_out, **at_out}
    return _projecting_apply_jit(model, variables, images, at_in, at_out)

  return f


def fold(variables: Mapping[str, Any], site: Site, frame: Any) -> dict[str, Any]:
  """Variables with the frame (C, k) zeroed out of the site's feature, folded into the
  kernels of `site.folds` (input side: P kernel; output side: kernel P, bias P)."""
  frame = jnp.asarray(frame, jnp.float32)
  params = projection.fold(variables["params"], {name: frame for name in site.folds},
                           site.side)
  return {**variables, "params": params}


def fold_with_mean(model: nn.Module | Callable, variables: Mapping[str, Any], site: Site,
                   frame: Any, mean: Any, probe: jax.Array,
                   coverage: Mapping[str, Any] | None = None
                   ) -> tuple[dict[str, Any], bool]:
  """(variables, True) with the frame's component of the site's feature replaced by that
  of `mean` (C,), the constant folded exactly (biases, BatchNorm running means); or the
  zeroing fold and False where the constant cannot be folded. `coverage`: per input-side
  fold layer, its `projection.tap_coverage` (computed here when missing)."""
  frame = jnp.asarray(frame, jnp.float32)
  folded = fold(variables, site, frame)
  kernels = features.layer_kernels(variables["params"])
  shifts = {}
  for name in site.folds:
    cov = None
    if site.side == "input":
      cov = (coverage or {}).get(name)
      if cov is None:
        cov = projection.tap_coverage(model, variables, name, probe)
    shifts[name] = projection.mean_shift(kernels[name], frame, mean, site.side, cov)
  return projection.absorb_shifts(model, folded, shifts, probe)


def _receivers(calls: Sequence[_Call], arg: Any) -> tuple[str, ...]:
  return tuple(dict.fromkeys(c.path for c in calls if c.arg is arg))


def find_sites(model: nn.Module | Callable, variables: Mapping[str, Any],
               probe: jax.Array, *, sides: Sequence[str] = SIDES, seed: int = 0,
               rtol: float = 1e-4) -> list[Site]:
  """The sites of a network, in call order (for each layer: input site, then output site).

  Input sites are checked for exactness on `probe` images: a random unit direction folded
  into the readers must give the logits of its explicit projection (relative tolerance
  `rtol`); a tensor that a non-layer path also reads fails and is left out. The
  classifier's output (the logits) is not a site.
  """
  for s in sides:
    if s not in SIDES:
      raise ValueError(f"unknown side {s!r}; choose from {SIDES}")
  calls = _trace_calls(model, variables, probe)
  layers = [c for c in calls if isinstance(c.module, features.LAYER_TYPES)]
  seen: set[str] = set()
  order = []
  for c in layers:
    if c.path not in seen:
      seen.add(c.path)
      order.append(c)
  classifier = order[-1].path if order else None
  kernels = features.layer_kernels(variables["params"])
  rng = np.random.default_rng(seed)
  # (site, random unit frame, whether it must pass the exactness check), in call order
  found: list[tuple[Site, Any, bool]] = []
  done_inputs: set[str] = set()
  for c in order:
    if not is_foldable(c.module) or c.path not in kernels:
      continue
    if "input" in sides and c.path not in done_inputs:
      readers = tuple(dict.fromkeys(
          d.path for d in layers if d.arg is c.arg))
      done_inputs.update(readers)
      if all(is_foldable(d.module) for d in layers if d.arg is c.arg):
        origin = next((d.path for d in calls if d.out is c.arg), None)
        v = rng.standard_normal((kernels[c.path].shape[-2], 1))
        found.append((Site(c.path, "input", readers, _receivers(calls, c.arg), origin),
                      jnp.asarray(v / np.linalg.norm(v), jnp.float32), True))
    if "output" in sides and c.path != classifier:
      found.append((Site(c.path, "output", (c.path,), (c.path,)), None, False))
  checks = [(s, v) for s, v, check in found if check]
  if not checks:
    return [s for s, _, _ in found]
  explicit = explicit_applier(model, variables, [s for s, _ in checks])
  scale = max(1.0, float(jnp.max(jnp.abs(_apply_jit(model, variables, probe)))))
  exact = set()
  for s, v in checks:
    want = explicit(variables, probe, s, v)
    got = _apply_jit(model, fold(variables, s, v), probe)
    if float(jnp.max(jnp.abs(want - got))) <= rtol * scale:
      exact.add(s)
  return [s for s, _, check in found if not check or s in exact]
