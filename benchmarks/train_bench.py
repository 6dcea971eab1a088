"""Training-step throughput: drr_jax's jitted step against the same network in PyTorch
on the same CPU, side by side in one run (issue 18, point 4).

For each model (default: ResNet-18 x0.25 and WRN-28-1, the `cpu` models):
  jax step    drr_jax's own update step (`train.make_update_fn`, the `cpu` preset's
              optimizer from `train.make_optimizer`: SGD, momentum 0.9, weight decay
              5e-4 coupled as PyTorch's, cosine decay), random crop and flip inside it;
  torch step  the same network written below in plain PyTorch (ResNet-18 in the
              kuangliu/pytorch-cifar layout, WRN-28-1 per Zagoruyko & Komodakis with the
              pre-activation blocks drr_jax uses), same batch, torch.optim.SGD with the
              same momentum, weight decay and cosine schedule, and the same augmentation
              (zero padding by 4, random crop, random horizontal flip) on the batch tensor;
  jax loop    (--loop) drr_jax's training loop as `train.train` runs it, less the
              progress bar and checkpoints: `attacks.train_batches` (shuffled fancy
              indexing of the uint8 training array on the host) into the same step, with
              the metrics fetched every 20 steps;
  grad        (--grad) the forward and backward pass alone, each side (jitted
              jax.grad of the same loss; PyTorch's loss.backward()), without
              augmentation or optimizer: the step less these is what they cost;
  inference   (--inference) images/s of a jitted eval-mode prediction (`inference.predict`
              at batch 500) and of the PyTorch model's eval forward under no_grad.
Both steps take uint8 pixels and normalize them inside the model, as drr_jax's models do.
Each is warmed up (--warmup steps: the JAX compile), then timed over --steps steps,
--repeats times, the implementations interleaved so that a load from other processes
hits both alike; the median repeat is reported. Images are random uint8 (the speed of a
step does not depend on the pixels).

  .venv/bin/python benchmarks/train_bench.py
  .venv/bin/python benchmarks/train_bench.py --models resnet18@0.25 --steps 50 \
      --json /tmp/train_bench.json

Needs PyTorch (`pip install -e '.[torch]'`); --no-torch times the JAX side alone.
Timings taken while other jobs run are not the machine's figures: take the full table
on a quiet machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
  sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import optax  # noqa: E402

from drr_jax import attacks, configs, inference, train, utils  # noqa: E402
from drr_jax.models import get_model  # noqa: E402
from drr_jax.models.common import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402

DEFAULT_MODELS = ("resnet18@0.25", "wrn28_1@1.0")
TORCH_MODELS = ("resnet18", "wrn28_1")


# ------------------------------------------------------------------ PyTorch networks


def torch_model(name: str, width: float, num_classes: int = 10):
  """The PyTorch network of drr_jax model `name` at `width` (channels rounded alike)."""
  import torch
  from torch import nn
  import torch.nn.functional as F

  def channels(c: int) -> int:
    return max(1, int(round(c * width)))

  class Pixels(nn.Module):
    """uint8 NCHW pixels -> standardized float32, with drr_jax's CIFAR-10 statistics."""

    def __init__(self):
      super().__init__()
      self.register_buffer("mean", torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1))
      self.register_buffer("std", torch.tensor(CIFAR10_STD).view(1, 3, 1, 1))

    def forward(self, x):
      return (x.float() - self.mean) / self.std

  def conv3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)

  class Basic(nn.Module):
    """ResNet basic block: conv-bn-relu-conv-bn, plus the shortcut (1x1 conv + bn where
    the shape changes), then relu."""

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1, self.bn1 = conv3(cin, cout, stride), nn.BatchNorm2d(cout)
      self.conv2, self.bn2 = conv3(cout, cout), nn.BatchNorm2d(cout)
      self.shortcut = nn.Sequential()
      if stride != 1 or cin != cout:
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      return F.relu(y + self.shortcut(x))

  class ResNet18(nn.Module):
    def __init__(self):
      super().__init__()
      widths = [channels(c) for c in (64, 128, 256, 512)]
      self.pixels = Pixels()
      self.conv1, self.bn1 = conv3(3, widths[0]), nn.BatchNorm2d(widths[0])
      blocks, cin = [], widths[0]
      for stage, w in enumerate(widths):
        for b in range(2):
          blocks.append(Basic(cin, w, 2 if stage > 0 and b == 0 else 1))
          cin = w
      self.blocks = nn.Sequential(*blocks)
      self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
      x = F.relu(self.bn1(self.conv1(self.pixels(x))))
      x = self.blocks(x)
      return self.linear(x.mean((2, 3)))

  class PreAct(nn.Module):
    """WRN block: bn-relu, then conv3x3-bn-relu-conv3x3, added to the input or, where
    the width or stride changes, to a 1x1 conv of the pre-activated input."""

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv3(cin, cout, stride)
      self.bn2, self.conv2 = nn.BatchNorm2d(cout), conv3(cout, cout)
      self.proj = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                   if stride != 1 or cin != cout else None)

    def forward(self, x):
      o = F.relu(self.bn1(x))
      shortcut = x if self.proj is None else self.proj(o)
      y = F.relu(self.bn2(self.conv1(o)))
      return self.conv2(y) + shortcut

  class WRN28(nn.Module):
    def __init__(self, depth: int = 28):
      super().__init__()
      n = (depth - 4) // 6
      self.pixels = Pixels()
      self.conv1 = conv3(3, 16)
      blocks, cin = [], 16
      for stage, c in enumerate((16, 32, 64)):
        w = channels(c)
        for b in range(n):
          blocks.append(PreAct(cin, w, 2 if stage > 0 and b == 0 else 1))
          cin = w
      self.blocks = nn.Sequential(*blocks)
      self.bn, self.linear = nn.BatchNorm2d(cin), nn.Linear(cin, num_classes)

    def forward(self, x):
      x = self.blocks(self.conv1(self.pixels(x)))
      x = F.relu(self.bn(x))
      return self.linear(x.mean((2, 3)))

  if name == "resnet18":
    net = ResNet18()
  elif name == "wrn28_1":
    net = WRN28()
  else:
    raise ValueError(f"no PyTorch version of {name!r}; choose one of {TORCH_MODELS}")
  for m in net.modules():  # He (fan-out) initialization, as drr_jax's convs
    if isinstance(m, nn.Conv2d):
      nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
  return net


def torch_augment(images, generator):
  """Zero padding by 4, a random 32x32 crop and a random horizontal flip per image, on a
  uint8 NCHW batch (what `drr_jax.data.augment` does inside the JAX step)."""
  import torch
  import torch.nn.functional as F
  n, _, h, w = images.shape
  padded = F.pad(images, (4, 4, 4, 4))
  dy, dx = torch.randint(0, 9, (2, n, 1), generator=generator)
  rows = (dy + torch.arange(h)).view(n, 1, h, 1).expand(n, 3, h, w)
  cols = (dx + torch.arange(w)).view(n, 1, 1, w).expand(n, 3, h, w)
  out = _crop(padded, rows, cols)
  flip = torch.rand(n, generator=generator) < 0.5
  return torch.where(flip.view(n, 1, 1, 1), out.flip(3), out)


def _crop(padded, rows, cols):
  """padded[i, c, rows[i, c, y, x], cols[i, c, y, x]] for every i, c, y, x."""
  n, c, hp, wp = padded.shape
  flat = padded.reshape(n, c, hp * wp)
  index = (rows * wp + cols).reshape(n, c, -1)
  return flat.gather(2, index).reshape(rows.shape)


# ------------------------------------------------------------------ the steps


def param_count(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


class JaxStep:
  """drr_jax's jitted update step on a pool of uint8 batches."""

  def __init__(self, name: str, width: float, batches, labels, augment: bool, seed: int):
    config = configs.get_config("cpu")
    config["model"] = {"name": name, "width": width}
    self.model = get_model(name, width=width)
    self.tx = train.make_optimizer(config, total_steps=10**6)
    self.state = train.init_state(self.model, self.tx, jax.random.key(seed))
    self.update = train.make_update_fn(self.model, self.tx, augment=augment)
    self.key = jax.random.key(seed + 1)
    self.batches, self.labels, self.i = batches, labels, 0
    self.params = param_count(self.state["params"])

  def run(self, steps: int) -> None:
    for _ in range(steps):
      j = self.i % len(self.batches)
      self.state, self.metrics = self.update(self.state, self.batches[j], self.labels[j],
                                             self.key)
      self.i += 1
    jax.block_until_ready(self.state)


class JaxGrad(JaxStep):
  """The step's forward and backward pass alone (train-mode BatchNorm, the same loss),
  jitted: no augmentation, no optimizer update. Step minus this: what the optimizer and
  augmentation cost."""

  def __init__(self, name, width, batches, labels, seed):
    super().__init__(name, width, batches, labels, False, seed)
    model = self.model

    def loss(params, batch_stats, images, labels):
      logits, new = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                train=True, mutable=["batch_stats"])
      return (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(),
              new["batch_stats"])
    self.grad = jax.jit(jax.grad(loss, has_aux=True))

  def run(self, steps: int) -> None:
    for _ in range(steps):
      j = self.i % len(self.batches)
      out = self.grad(self.state["params"], self.state["batch_stats"], self.batches[j],
                      self.labels[j])
      self.i += 1
    jax.block_until_ready(out)


class JaxLoop(JaxStep):
  """The step fed as `train.train` feeds it: `attacks.train_batches` over the whole
  uint8 training array, metrics fetched every 20 steps."""

  def __init__(self, name, width, images, labels, batch_size, augment, seed):
    super().__init__(name, width, [images[:batch_size]], [labels[:batch_size]], augment,
                     seed)
    self.set = attacks.PoisonedSet(images, labels, np.zeros(0, np.int64), None)
    self.batch_size, self.epoch = batch_size, 0
    self._iter = iter(())

  def _next(self):
    try:
      return next(self._iter)
    except StopIteration:
      self._iter = attacks.train_batches(self.set, {"name": "none"}, 0, self.epoch,
                                         self.batch_size)
      self.epoch += 1
      return next(self._iter)

  def run(self, steps: int) -> None:
    for _ in range(steps):
      batch = self._next()
      self.state, m = self.update(self.state, batch.images, batch.labels, self.key)
      if self.i % 20 == 0:
        jax.device_get(m)
      self.i += 1
    jax.block_until_ready(self.state)


class TorchStep:
  """The same network, optimizer and augmentation in PyTorch."""

  def __init__(self, name: str, width: float, batches, labels, augment: bool, seed: int,
               channels_last: bool):
    import torch
    import torch.nn.functional as F
    torch.manual_seed(seed)
    self.torch, self.F = torch, F
    self.net = torch_model(name, width)
    self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
    self.net = self.net.to(memory_format=self.memory_format).train()
    t = configs.get_config("cpu")["train"]
    self.opt = torch.optim.SGD(self.net.parameters(), lr=t["lr"], momentum=t["momentum"],
                               weight_decay=t["weight_decay"])
    self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=10**6)
    self.batches = [torch.from_numpy(np.ascontiguousarray(b.transpose(0, 3, 1, 2)))
                    for b in batches]
    self.labels = [torch.from_numpy(l.astype(np.int64)) for l in labels]
    self.augment, self.i = augment, 0
    self.gen = torch.Generator().manual_seed(seed + 1)
    self.params = sum(p.numel() for p in self.net.parameters())

  def run(self, steps: int) -> None:
    for _ in range(steps):
      j = self.i % len(self.batches)
      x, y = self.batches[j], self.labels[j]
      if self.augment:
        x = torch_augment(x, self.gen)
      x = x.contiguous(memory_format=self.memory_format)
      loss = self.F.cross_entropy(self.net(x), y)
      self.opt.zero_grad(set_to_none=True)
      loss.backward()
      self.opt.step()
      self.sched.step()
      self.i += 1


class TorchGrad(TorchStep):
  """The PyTorch network's forward and backward pass alone (train mode): no
  augmentation, no optimizer step."""

  def __init__(self, name, width, batches, labels, seed, channels_last):
    super().__init__(name, width, batches, labels, False, seed, channels_last)

  def run(self, steps: int) -> None:
    for _ in range(steps):
      j = self.i % len(self.batches)
      x = self.batches[j].contiguous(memory_format=self.memory_format)
      loss = self.F.cross_entropy(self.net(x), self.labels[j])
      self.net.zero_grad(set_to_none=True)
      loss.backward()
      self.i += 1


# ------------------------------------------------------------------ inference


def jax_inference(step: JaxStep, images: np.ndarray, batch_size: int) -> Callable[[], None]:
  variables = {"params": step.state["params"], "batch_stats": step.state["batch_stats"]}
  return lambda: inference.predict(step.model, variables, images, batch_size,
                                   progress=False)


def torch_inference(step: TorchStep, images: np.ndarray, batch_size: int
                    ) -> Callable[[], None]:
  torch = step.torch
  x_all = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))

  def run():
    step.net.eval()
    with torch.no_grad():
      for i in range(0, len(x_all), batch_size):
        x = x_all[i:i + batch_size].contiguous(memory_format=step.memory_format)
        step.net(x).argmax(1)
    step.net.train()
  return run


# ------------------------------------------------------------------ driver


def timed(fn: Callable[[], None]) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def environment(torch_ok: bool) -> dict[str, Any]:
  env = {"machine": utils.machine_description(), "platform": platform.platform(),
         "python": platform.python_version(), "jax": jax.__version__,
         "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
         "xla_flags": os.environ.get("XLA_FLAGS", ""),
         "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
         "git": utils.git_commit(ROOT)}
  if torch_ok:
    import torch
    env.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
               torch_interop_threads=torch.get_num_interop_threads(),
               torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
               torch_mkldnn=torch.backends.mkldnn.is_available())
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    if os.environ.get(var):
      env[var.lower()] = os.environ[var]
  return env


def bench_model(spec: str, args, torch_ok: bool) -> dict[str, Any]:
  name, _, width = spec.partition("@")
  width = float(width or 1.0)
  rng = np.random.default_rng(0)
  b = args.batch
  batches = [rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8) for _ in range(4)]
  labels = [rng.integers(0, 10, b).astype(np.int32) for _ in range(4)]
  print(f"{name} x{width:g}: building ...", file=sys.stderr, flush=True)
  impls: dict[str, Any] = {"jax step": JaxStep(name, width, batches, labels,
                                               args.augment, 0)}
  if torch_ok:
    impls["torch step"] = TorchStep(name, width, batches, labels, args.augment, 0,
                                    args.channels_last)
  if args.grad:
    impls["jax grad"] = JaxGrad(name, width, batches, labels, 0)
    if torch_ok:
      impls["torch grad"] = TorchGrad(name, width, batches, labels, 0, args.channels_last)
  if args.loop:
    n = args.loop_images
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    impls["jax loop"] = JaxLoop(name, width, images, rng.integers(0, 10, n).astype(np.int32),
                                b, args.augment, 0)
  out: dict[str, Any] = {"model": f"{name} x{width:g}", "batch": b, "steps": args.steps,
                         "repeats": args.repeats,
                         "params": {k: v.params for k, v in impls.items()}, "runs": {}}
  warm = {}
  for label, impl in impls.items():
    print(f"  {label}: warm-up ({args.warmup} steps)", file=sys.stderr, flush=True)
    warm[label] = timed(lambda: impl.run(args.warmup))
  seconds: dict[str, list[float]] = {k: [] for k in impls}
  for r in range(args.repeats):
    for label, impl in impls.items():
      print(f"  {label}: repeat {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
      seconds[label].append(timed(lambda: impl.run(args.steps)))
  for label, s in seconds.items():
    med = statistics.median(s)
    out["runs"][label] = {"images_per_s": b * args.steps / med, "seconds_median": med,
                          "seconds": s, "warmup_s": warm[label],
                          "images_per_s_all": [b * args.steps / x for x in s]}
  if args.inference:
    n = args.inference_images
    imgs = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    fns = {"jax inference": jax_inference(impls["jax step"], imgs, 500)}
    if torch_ok:
      fns["torch inference"] = torch_inference(impls["torch step"], imgs, 500)
    for label, fn in fns.items():
      fn()  # warm-up (compile)
    inf = {k: [] for k in fns}
    for r in range(args.repeats):
      for label, fn in fns.items():
        print(f"  {label}: repeat {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
        inf[label].append(timed(fn))
    for label, s in inf.items():
      med = statistics.median(s)
      out["runs"][label] = {"images_per_s": n / med, "seconds_median": med, "seconds": s,
                            "images_per_s_all": [n / x for x in s]}
  runs = out["runs"]
  ratio = lambda a, b: (runs[a]["images_per_s"] / runs[b]["images_per_s"]
                        if a in runs and b in runs else None)
  out["ratios"] = {"step jax/torch": ratio("jax step", "torch step"),
                   "loop/step jax": ratio("jax loop", "jax step"),
                   "loop jax/torch step": ratio("jax loop", "torch step"),
                   "inference jax/torch": ratio("jax inference", "torch inference"),
                   "grad jax/torch": ratio("jax grad", "torch grad"),
                   "step/grad jax": ratio("jax step", "jax grad"),
                   "step/grad torch": ratio("torch step", "torch grad")}
  out["ratios"] = {k: v for k, v in out["ratios"].items() if v is not None}
  return out


def table(results: list[dict[str, Any]]) -> str:
  head = f"{'model':16s} {'run':16s} {'img/s':>8s} {'min':>8s} {'max':>8s} {'params':>9s}"
  lines = [head, "-" * len(head)]
  for res in results:
    for i, (label, r) in enumerate(res["runs"].items()):
      params = res["params"].get(label.replace("inference", "step"), "")
      lines.append(f"{res['model'] if i == 0 else '':16s} {label:16s} "
                   f"{r['images_per_s']:8.0f} {min(r['images_per_s_all']):8.0f} "
                   f"{max(r['images_per_s_all']):8.0f} {params!s:>9s}")
    for k, v in res["ratios"].items():
      lines.append(f"{'':16s} {k:25s} {v:5.2f}x")
  return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                 help="NAME@WIDTH, NAME one of %s (default: %%(default)s)"
                 % (TORCH_MODELS,))
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile)")
  p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; median")
  p.add_argument("--no-augment", dest="augment", action="store_false",
                 help="no random crop and flip in either step")
  p.add_argument("--channels-last", action="store_true",
                 help="PyTorch in channels_last memory format (NHWC, as XLA's)")
  p.add_argument("--torch-threads", type=int, default=None,
                 help="torch.set_num_threads (default: PyTorch's own, one per core); on "
                 "a machine shared with other jobs, PyTorch's OpenMP threads wait on "
                 "each other at every barrier and a step can be ten times slower than "
                 "with fewer threads")
  p.add_argument("--no-torch", dest="torch", action="store_false")
  p.add_argument("--loop", action=argparse.BooleanOptionalAction, default=True,
                 help="also time drr_jax's training loop with its input pipeline")
  p.add_argument("--loop-images", type=int, default=47500,
                 help="size of the training array the loop draws from")
  p.add_argument("--grad", action=argparse.BooleanOptionalAction, default=True,
                 help="also time the forward and backward pass alone (no optimizer, no "
                      "augmentation) on both sides")
  p.add_argument("--inference", action=argparse.BooleanOptionalAction, default=True,
                 help="also time eval-mode inference (batch 500)")
  p.add_argument("--inference-images", type=int, default=2000)
  p.add_argument("--json", help="also write the figures here")
  args = p.parse_args(argv)
  for spec in args.models:
    if spec.partition("@")[0] not in TORCH_MODELS:
      p.error(f"--models {spec!r}: NAME must be one of {TORCH_MODELS}")
  if args.torch_threads is not None and args.torch_threads < 1:
    p.error("--torch-threads must be at least 1")
  if min(args.batch, args.steps, args.repeats) < 1 or args.warmup < 1:
    p.error("--batch, --steps, --repeats and --warmup must be at least 1")
  if args.loop and args.loop_images < args.batch:
    p.error("--loop-images must hold at least one batch")
  return args


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  torch_ok = args.torch
  if torch_ok:
    try:
      import torch
      if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    except ImportError:
      print("PyTorch is not installed (pip install -e '.[torch]'): JAX side only",
            file=sys.stderr)
      torch_ok = False
  env = environment(torch_ok)
  results = [bench_model(spec, args, torch_ok) for spec in args.models]
  env["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
  out = {"benchmark": "train", "batch": args.batch, "steps": args.steps,
         "repeats": args.repeats, "augment": args.augment,
         "channels_last": args.channels_last, "environment": env, "results": results}
  print(f"machine: {env['machine']}; devices: {', '.join(env['devices'])}")
  print(f"XLA_FLAGS: {env['xla_flags'] or '(none)'}; torch: "
        + (f"{env['torch']}, {env['torch_threads']} threads "
           f"({env['torch_interop_threads']} inter-op), {env['torch_cpu_capability']}"
           if torch_ok else "not run")
        + f"; load average at start {env['load_avg'][0]:.2f}, at end "
        f"{env['load_avg_end'][0]:.2f}")
  print(f"batch {args.batch}, {args.steps} steps x {args.repeats} interleaved repeats "
        f"(median), augmentation {'on' if args.augment else 'off'}")
  print(table(results))
  if args.json:
    utils.write_json_atomic(args.json, utils.jsonable(out))
  return out


if __name__ == "__main__":
  main()
