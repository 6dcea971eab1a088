"""Where a training step's time goes: every convolution of a model, forward and both
gradients, in JAX (XLA:CPU) and in PyTorch on the same CPU (issue 18, point 4: why is
the JAX step slower?).

The convs are read from the drr_jax model itself (a Flax method interceptor records each
`nn.Conv` call: input shape, kernel, stride, padding, groups), grouped by shape, and each
shape is timed alone at the training batch:
  fwd  the convolution;
  dx   the gradient with respect to its input, given the output's gradient (absent for
       the first conv, whose input is the image);
  dk   the gradient with respect to its kernel, given the output's gradient.
JAX runs `lax.conv_general_dilated` in drr_jax's layout (NHWC, HWIO) under jit; PyTorch
runs `torch.nn.functional.conv2d` and the backward kernels of `torch.nn.grad` in NCHW.
1x1 convs that drr_jax computes as matrix products (`PointwiseConv`) are timed as such.
The two are
interleaved per shape (--repeats), the median is reported. The totals, weighted by how
often each shape occurs, are the convolutions' share of one step; `train_bench.py` gives
the whole step.

  .venv/bin/python benchmarks/conv_bench.py
  .venv/bin/python benchmarks/conv_bench.py --models resnet18@0.25 --batch 128 --json /tmp/conv.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from drr_jax import utils  # noqa: E402
from drr_jax.models import get_model  # noqa: E402
from drr_jax.models.common import PointwiseConv  # noqa: E402


class ConvShape(NamedTuple):
  """One conv call at batch 1: input (H, W, Cin), kernel, stride, padding, groups."""
  hw: tuple[int, int]
  cin: int
  cout: int
  kernel: tuple[int, int]
  stride: tuple[int, int]
  padding: tuple[tuple[int, int], ...]
  groups: int
  matmul: bool   # a 1x1 conv that drr_jax computes as a matrix product
  first: bool    # reads the image: no input gradient in training


def model_convs(model: nn.Module, image_shape=(32, 32, 3)) -> Counter:
  """Counter of the ConvShapes of one forward pass of `model` (train mode)."""
  seen: list[ConvShape] = []

  def record(next_fun, args, kwargs, context):
    mod = context.module
    if isinstance(mod, nn.Conv) and context.method_name == "__call__":
      x = args[0]
      pad = mod.padding
      if isinstance(pad, str):
        pad = tuple((k // 2, k // 2) for k in mod.kernel_size) if pad == "SAME" else (
            (0, 0),) * len(mod.kernel_size)
      seen.append(ConvShape(tuple(x.shape[1:3]), int(x.shape[-1]), int(mod.features),
                            tuple(mod.kernel_size), tuple(mod.strides or (1, 1)),
                            tuple(tuple(p) for p in pad), int(mod.feature_group_count),
                            isinstance(mod, PointwiseConv), not seen))
    return next_fun(*args, **kwargs)

  x = jnp.zeros((1, *image_shape), jnp.uint8)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]),
                   variables)
  return Counter(seen)


def _jax_fns(s: ConvShape) -> dict[str, Callable]:
  def conv(x, k):
    if s.matmul:
      x = x[:, ::s.stride[0], ::s.stride[1], :]
      return jnp.einsum("nhwc,cd->nhwd", x, k[0, 0])
    return jax.lax.conv_general_dilated(x, k, s.stride, s.padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=s.groups)
  # the gradients alone, given the output's cotangent g (the forward, which a linear
  # op's transpose does not read, is dead code under jit)
  fns = {"fwd": jax.jit(lambda x, k, g: conv(x, k)),
         "dk": jax.jit(lambda x, k, g: jax.vjp(conv, x, k)[1](g)[1])}
  if not s.first:
    fns["dx"] = jax.jit(lambda x, k, g: jax.vjp(conv, x, k)[1](g)[0])
  return fns


def _torch_fns(s: ConvShape, torch) -> dict[str, Callable]:
  """PyTorch's forward and its two backward kernels alone (`torch.nn.grad`, which
  calls the same `convolution_backward` as autograd), given the output's gradient g."""
  import torch.nn.functional as F
  from torch.nn import grad as G
  pad = tuple(p[0] for p in s.padding)
  kw = dict(stride=s.stride, padding=pad, groups=s.groups)
  fns = {"fwd": lambda x, k, g: F.conv2d(x, k, **kw),
         "dk": lambda x, k, g: G.conv2d_weight(x, k.shape, g, **kw)}
  if not s.first:
    fns["dx"] = lambda x, k, g: G.conv2d_input(x.shape, k, g, **kw)
  return fns


def _time(fn: Callable, args, steps: int, sync: Callable) -> float:
  """Seconds per call of fn(*args), the mean over `steps` calls after one warm-up."""
  sync(fn(*args))
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  sync(out)
  return (time.perf_counter() - t0) / steps


def bench_shape(s: ConvShape, batch: int, steps: int, repeats: int, torch=None
                ) -> dict[str, dict[str, float]]:
  """{'jax' | 'torch': {'fwd' | 'dx' | 'dk': milliseconds}} of one conv shape."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, *s.hw, s.cin), np.float32)
  k = rng.standard_normal((*s.kernel, s.cin // s.groups, s.cout), np.float32)
  fns = _jax_fns(s)
  g = rng.standard_normal(fns["fwd"](x, k, None).shape, np.float32)
  impls = {"jax": (fns, (jnp.asarray(x), jnp.asarray(k), jnp.asarray(g)),
                   jax.block_until_ready)}
  if torch is not None:
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
    tk = torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1)))
    impls["torch"] = (_torch_fns(s, torch), (nchw(x), tk, nchw(g)), lambda out: None)
  times: dict[str, dict[str, list[float]]] = {n: {} for n in impls}
  for _ in range(repeats):
    for name, (fns, args, sync) in impls.items():
      for what, fn in fns.items():
        times[name].setdefault(what, []).append(_time(fn, args, steps, sync))
  return {n: {w: 1e3 * statistics.median(v) for w, v in t.items()}
          for n, t in times.items()}


def _label(s: ConvShape) -> str:
  kind = "matmul" if s.matmul else ("dw" if s.groups > 1 else "conv")
  return (f"{s.hw[0]}x{s.hw[1]}x{s.cin}->{s.cout} {s.kernel[0]}x{s.kernel[1]}"
          f"/{s.stride[0]} {kind}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", nargs="+", default=["resnet18@0.25", "wrn28_1@1.0"],
                 help="NAME@WIDTH of drr_jax.models")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=10, help="timed calls per repeat")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--torch-threads", type=int, default=None)
  p.add_argument("--json", help="write every figure here")
  args = p.parse_args(argv)
  torch = None
  if not args.no_torch:
    import torch
    if args.torch_threads:
      torch.set_num_threads(args.torch_threads)
  env = {"machine": utils.machine_description(), "devices": [str(d) for d in jax.devices()],
         "load_average_start": os.getloadavg()[0],
         "torch": None if torch is None else {"version": torch.__version__,
                                              "threads": torch.get_num_threads()}}
  print(f"machine: {env['machine']}; batch {args.batch}; load average "
        f"{env['load_average_start']:.2f}" + ("" if torch is None else
        f"; torch {torch.__version__}, {torch.get_num_threads()} threads"))
  results = []
  for spec in args.models:
    name, _, width = spec.partition("@")
    convs = model_convs(get_model(name, width=float(width or 1.0)))
    rows, totals = [], {"jax": Counter(), "torch": Counter()}
    print(f"\n{spec}: {sum(convs.values())} conv calls, {len(convs)} shapes")
    print(f"{'shape':32s} {'n':>3s}  " + "  ".join(
        f"{f'{i} {w}':>11s}" for i in (("jax", "torch") if torch else ("jax",))
        for w in ("fwd", "dx", "dk")) + ("  jax/torch" if torch else ""))
    for s, n in sorted(convs.items(), key=lambda kv: (-kv[0].hw[0], kv[0].cin)):
      ms = bench_shape(s, args.batch, args.steps, args.repeats, torch)
      for impl, t in ms.items():
        for w, v in t.items():
          totals[impl][w] += n * v
      rows.append({"shape": s._asdict(), "count": n, "ms": ms})
      cells = [f"{ms[i].get(w, 0.0):11.2f}" for i in ms for w in ("fwd", "dx", "dk")]
      ratio = (f"  {sum(ms['jax'].values()) / sum(ms['torch'].values()):9.2f}"
               if torch else "")
      print(f"{_label(s):32s} {n:3d}  " + "  ".join(cells) + ratio)
    total = {i: {**dict(t), "all": sum(t.values())} for i, t in totals.items() if t}
    line = "  ".join(f"{i}: fwd {t['fwd']:.1f} dx {t['dx']:.1f} dk {t['dk']:.1f} = "
                     f"{t['all']:.1f} ms" for i, t in total.items())
    print(f"per step (sum over the convs): {line}")
    if torch:
      print(f"conv time jax/torch: {total['jax']['all'] / total['torch']['all']:.2f} "
            f"(above 1: JAX slower); images/s if a step were its convs only: jax "
            f"{1e3 * args.batch / total['jax']['all']:.0f}, torch "
            f"{1e3 * args.batch / total['torch']['all']:.0f}")
    results.append({"model": spec, "rows": rows, "total_ms": total})
  env["load_average_end"] = os.getloadavg()[0]
  out = {"environment": env, "batch": args.batch, "results": results}
  if args.json:
    Path(args.json).write_text(json.dumps(out, indent=1, default=str))
  return out


if __name__ == "__main__":
  main()
