"""IAB, the input-aware dynamic attack (Nguyen & Tran, NeurIPS 2020, "Input-Aware Dynamic
Backdoor Attack").

A pattern generator G and a mask network M, both image-to-image, make a trigger for each
input: x' = x + (G(x) - x) * M(x), in pixel space. The classifier and G are trained
jointly; M is pre-trained alone first and then frozen. In each batch of B images:

- the first k = int(B * poison_ratio) images are stamped with their own trigger and take
  the target label (backdoor samples);
- the next k are stamped with the trigger of another image (a row of an independently
  shuffled second pass over the set) and keep their labels (cross samples): so a trigger
  only works on the image it was made for;
- the rest are clean. The loss is CE over the batch + lambda_div * the diversity loss,
  mean over pairs of  d(x1, x2) / (d(G(x1), G(x2)) + 1e-7)  with d the root mean square
  difference of the normalized tensors: two inputs far apart must get patterns far apart.

M is pre-trained alone on lambda_norm * mean(relu(M(x1) - density)) + lambda_div *
d(x1, x2) / d(M(x1), M(x2)) (sparse masks that differ across inputs). G's raw output is
squashed as tanh(y) / (2 + 1e-7) + 0.5 into (0, 1), M's is then thresholded again as
tanh(20 m - 10) / (2 + 1e-7) + 0.5.

Where each fact comes from (read from the code, never copied):
- original code, VinAIResearch/input-aware-backdoor-attack-release at 1750e4f:
  `networks/models.py` (Generator: channel_init 32, 3 steps for CIFAR-10; the down path
  is two conv blocks then a downsample per step, channels doubling after every step but
  the last: 3-32-32, 32-64-64, 64-128-128; a middle block 128-128; the up path an upsample
  then two conv blocks per step: 128-128-64, 64-64-32, 32-32-out, the last block without
  ReLU; the output squash and `threshold`), `networks/blocks.py` (a conv block is a 3x3
  conv with bias, padding 1, BatchNorm with momentum 0.05 and eps 1e-5, ReLU; the
  downsample a 2x2 max-pool of stride 2; the upsample bilinear x2), `config.py` (lr_G =
  lr_M = 0.01, lambda_div 1, lambda_norm 100, mask_density 0.032, p_attack = p_cross =
  0.1, G's milestones 200/300/400/500 and M's 10/20, factor 0.1, 600 epochs), `train.py`
  (Adam with betas (0.5, 0.9) for G and M; the classifier SGD lr 0.01, momentum 0.9,
  weight decay 5e-4; 25 epochs of mask pre-training; then M in eval mode with no
  gradients; the batch layout and losses above; the loss order CE + diversity, one
  backward pass, the classifier and G stepped together);
- BackdoorBench, SCLBD/BackdoorBench at f02e353, `attack/inputaware.py` and
  `config/attack/inputaware/default.yaml`: the same settings; num_cross = num_bd; the
  rule for ratios below one image per batch (`schedule.per_batch_count`); its `bd_train`
  is made after training with the final networks, not recorded during training.

Choices here (docs/attacks.md lists them with the CPU schedule):
- The classifier trains with the project's preset (SGD, cosine) like every other attack,
  so that its ACC compares with the clean model of the same preset.
- Triggered images are rounded to uint8 pixels like every poisoned image here, in the
  forward pass; G's gradient passes the rounding unchanged (straight-through).
- Poisoning comes before the project's augmentation (crop with 4-pixel padding, flip),
  as for WaNet; the original poisons after its loader's crop, 10-degree rotation and flip.
- The cross samples are as many as the backdoor samples (num_cross = num_bd, as
  BackdoorBench; the original's diversity loss pairs them one to one).
- The learning-rate milestones of G and M are kept as fractions of their phase (G: 1/3,
  1/2, 2/3, 5/6 of training; M: 0.4 and 0.8 of pre-training), so a shortened schedule
  decays as the original.
- The defender gets the final epoch's poisoned samples as training made them
  (`record`, `trained_set`), with the generator of the step that trained on each.
- G's gradients accumulate, as in both codes (`iab_accumulate_g`, on by default): their
  `train_step` zeroes the classifier's gradients before each step (`optimizerC.zero_grad()`)
  but never G's, so each Adam step of G reads the sum of every gradient G got since the
  joint training began (`running_sum`). Off, each step reads its own gradient, as the
  models trained here before 2026-12-07 did.

config keys (defaults per preset in `PRESETS`): iab_channels, iab_mask_epochs,
iab_lambda_div, iab_lambda_norm, iab_mask_density, iab_lr_g, iab_lr_m, iab_accumulate_g.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from drr_jax import data
from drr_jax.attacks.core import PoisonedSet, Trigger
from drr_jax.attacks.schedule import epoch_order, per_batch_count
from drr_jax.models.common import normalize

EPSILON = 1e-7
# The original's settings (config.py and train.py there; BackdoorBench's default.yaml).
PAPER = {"iab_channels": 32, "iab_mask_epochs": 25, "iab_lambda_div": 1.0,
         "iab_lambda_norm": 100.0, "iab_mask_density": 0.032, "iab_lr_g": 0.01,
         "iab_lr_m": 0.01, "iab_accumulate_g": True}
# Per preset (drr_jax/configs.py). On the CPU the mask pre-training is one epoch, not 25,
# and the two networks are half as wide (16 channels at the first step, not 32): about a
# quarter of the cost. See docs/attacks.md for the time this buys.
PRESETS = {"paper": PAPER,
           "cpu": {**PAPER, "iab_channels": 16, "iab_mask_epochs": 1},
           "tiny": {**PAPER, "iab_channels": 4, "iab_mask_epochs": 1}}
G_MILESTONES = (1 / 3, 1 / 2, 2 / 3, 5 / 6)  # epochs 200, 300, 400, 500 of 600
M_MILESTONES = (0.4, 0.8)                     # epochs 10, 20 of 25
LR_FACTOR = 0.1
ADAM_BETAS = (0.5, 0.9)
BN_MOMENTUM = 0.95  # Flax's form of PyTorch's BatchNorm momentum 0.05
# seeds of the random streams that are IAB's own (the batch order is every attack's)
PARTNER_STREAM, MASK_STREAM, INIT_STREAM = 0x1AB, 0x1AC, 0x1AD


class Settings(NamedTuple):
  channels: int
  mask_epochs: int
  lambda_div: float
  lambda_norm: float
  mask_density: float
  lr_g: float
  lr_m: float
  accumulate_g: bool = True


def defaults(preset: str) -> dict[str, Any]:
  """The IAB settings a preset's config starts from."""
  if preset not in PRESETS:
    raise ValueError(f"IAB has no settings for preset {preset!r}; choose one of "
                     f"{tuple(PRESETS)}")
  return dict(PRESETS[preset])


def settings(config: dict[str, Any], preset: str = "cpu") -> Settings:
  """The attack config's IAB settings (the preset's defaults where unset), checked."""
  values = {**defaults(preset), **{k: config[k] for k in PAPER if k in config}}
  s = Settings(int(values["iab_channels"]), int(values["iab_mask_epochs"]),
               float(values["iab_lambda_div"]), float(values["iab_lambda_norm"]),
               float(values["iab_mask_density"]), float(values["iab_lr_g"]),
               float(values["iab_lr_m"]), values["iab_accumulate_g"])
  if s.channels < 1 or s.mask_epochs < 0:
    raise ValueError(f"iab_channels must be >= 1 and iab_mask_epochs >= 0; got {s}")
  if not 0 < s.mask_density < 1 or s.lambda_div < 0 or s.lambda_norm < 0:
    raise ValueError(f"IAB needs 0 < iab_mask_density < 1 and lambdas >= 0; got {s}")
  if not s.lr_g > 0 or not s.lr_m > 0:
    raise ValueError(f"IAB's learning rates must be positive; got {s}")
  if not isinstance(s.accumulate_g, (bool, np.bool_)):
    raise ValueError(f"iab_accumulate_g must be true or false; got {s.accumulate_g!r}")
  return s


def make_trigger(seed: int, config: dict[str, Any], image_shape=(32, 32, 3)) -> Trigger:
  """No trigger exists before training: the generated one comes from the trained networks
  (`trigger_from_record`). This placeholder stamps nothing."""
  del seed, config
  return Trigger(np.zeros(image_shape, np.uint8), np.zeros(image_shape, np.float32))


# ---------------------------------------------------------------- the two networks


def _torch_uniform(fan_in: int) -> Callable:
  """PyTorch's default initialization of conv weights and biases, U(+-1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype,
                                                                  -bound, bound)


class ConvBlock(nn.Module):
  """3x3 conv (bias, padding 1), BatchNorm (PyTorch momentum 0.05, eps 1e-5), ReLU."""
  features: int
  relu: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    init = _torch_uniform(9 * x.shape[-1])
    x = nn.Conv(self.features, (3, 3), padding=1, kernel_init=init, bias_init=init,
                name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=1e-5,
                     name="bn")(x)
    return nn.relu(x) if self.relu else x


class Generator(nn.Module):
  """The original's generator: pixel images (N, H, W, 3), H and W divisible by
  2**steps, in; (N, H, W, out_channels) in (0, 1) out."""
  out_channels: int = 3
  channels: int = 32
  steps: int = 3

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = normalize(images)  # the original's generator reads normalized tensors
    c = self.channels
    for s in range(self.steps):
      x = ConvBlock(c, name=f"down_{2 * s}")(x, train)
      x = ConvBlock(c, name=f"down_{2 * s + 1}")(x, train)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
      if s < self.steps - 1:
        c *= 2
    x = ConvBlock(c, name="middle")(x, train)
    for s in range(self.steps):
      n, h, w, _ = x.shape
      # half-pixel bilinear, as nn.Upsample(mode="bilinear") (align_corners=False)
      x = jax.image.resize(x, (n, 2 * h, 2 * w, c), "bilinear")
      x = ConvBlock(c, name=f"up_{2 * s}")(x, train)
      last = s == self.steps - 1
      c = self.out_channels if last else c // 2
      x = ConvBlock(c, relu=not last, name=f"up_{2 * s + 1}")(x, train)
    return jnp.tanh(x) / (2 + EPSILON) + 0.5


def networks(channels: int) -> tuple[Generator, Generator]:
  """(pattern generator G with 3 output channels, mask network M with 1)."""
  return Generator(3, channels), Generator(1, channels)


def threshold(m: jax.Array) -> jax.Array:
  """The original's sharpening of M's output into an almost binary mask."""
  return jnp.tanh(m * 20 - 10) / (2 + EPSILON) + 0.5


def stamp(images: jax.Array, patterns: jax.Array, masks: jax.Array) -> jax.Array:
  """x + (255 G(x) - x) M(x) in pixels (float): the original's blend of normalized
  tensors, which normalization (affine per channel) maps to this one."""
  return images + (255.0 * patterns - images) * masks


def to_pixels(x: jax.Array) -> jax.Array:
  """Rounded to whole pixel values in [0, 255] in the forward pass; the gradient passes
  as if nothing were rounded (straight-through)."""
  q = jnp.clip(jnp.round(x), 0.0, 255.0)
  return x + jax.lax.stop_gradient(q - x)


def _rms(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per-sample sqrt(mean((a - b)^2)) (the original's MSELoss, mean, sqrt); a floor of
  1e-12 under the root keeps the gradient finite where a == b."""
  return jnp.sqrt(jnp.maximum(jnp.mean((a - b) ** 2, axis=(1, 2, 3)), 1e-12))


def diversity_loss(x1: jax.Array, x2: jax.Array, out1: jax.Array, out2: jax.Array
                   ) -> jax.Array:
  """mean(d(x1, x2) / (d(out1, out2) + 1e-7)): pixel images x, and the networks' outputs
  as compared in the original (normalized patterns or masks) in out."""
  return jnp.mean(_rms(normalize(x1), normalize(x2)) / (_rms(out1, out2) + EPSILON))


def mask_norm_loss(masks: jax.Array, density: float) -> jax.Array:
  """mean(relu(mask - density)): pushes the mask below the target density."""
  return jnp.mean(jax.nn.relu(masks - density))


# ---------------------------------------------------------------- batches


class Batch(NamedTuple):
  index: np.ndarray     # (B,) rows: [:k] backdoor, [k:2k] cross, the rest clean
  partners: np.ndarray  # (k,) rows whose trigger the cross rows get (and diversity pairs)
  n_bd: int             # k


def batches(n: int, ratio: float, train_seed: int, epoch: int, batch_size: int
            ) -> Iterator[Batch]:
  """An epoch's full batches: the rows in every attack's batch order
  (`schedule.epoch_order`), and the partner rows from a second, independent shuffle (the
  original's second data loader)."""
  order = epoch_order(n, train_seed, epoch)
  second = np.random.default_rng([train_seed, epoch, PARTNER_STREAM]).permutation(n)
  for i, start in enumerate(range(0, n - n % batch_size, batch_size)):
    k = per_batch_count(batch_size, ratio, np.random.default_rng([train_seed, epoch, i]))
    k = min(k, batch_size // 2)
    yield Batch(order[start:start + batch_size],
                second[start:start + batch_size][k:2 * k], k)


def mask_batches(n: int, train_seed: int, epoch: int, batch_size: int
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Pre-training batches of M: pairs of row batches from two independent shuffles."""
  rng = np.random.default_rng([train_seed, epoch, MASK_STREAM])
  a, b = rng.permutation(n), rng.permutation(n)
  for start in range(0, n - n % batch_size, batch_size):
    yield a[start:start + batch_size], b[start:start + batch_size]


# ---------------------------------------------------------------- training


def _milestones(lr: float, total_steps: int, fractions: tuple[float, ...]) -> Callable:
  """lr times 0.1 for every milestone (a fraction of total_steps) passed."""
  bounds = jnp.asarray([round(f * total_steps) for f in fractions], jnp.int32)
  return lambda step: lr * LR_FACTOR ** jnp.sum(step >= bounds).astype(jnp.float32)


class RunningSumState(NamedTuple):
  total: Any  # the sum of every gradient so far, shaped as the params


def running_sum() -> optax.GradientTransformation:
  """Replaces each gradient by the sum of all gradients so far: PyTorch's `.grad` when
  `zero_grad()` is never called, as for the original's G."""

  def init(params):
    return RunningSumState(jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    del params
    total = jax.tree.map(jnp.add, state.total, updates)
    return total, RunningSumState(total)

  return optax.GradientTransformation(init, update)


def generator_optimizer(s: Settings, total_steps: int) -> optax.GradientTransformation:
  """G's Adam (betas 0.5, 0.9, its lr decayed at the milestones), fed the running sum of
  G's gradients when `s.accumulate_g`, as the original's."""
  adam = optax.adam(_milestones(s.lr_g, total_steps, G_MILESTONES), *ADAM_BETAS)
  return optax.chain(running_sum(), adam) if s.accumulate_g else adam


def mask_optimizer(s: Settings, total_steps: int) -> optax.GradientTransformation:
  return optax.adam(_milestones(s.lr_m, total_steps, M_MILESTONES), *ADAM_BETAS)


def init_net(net: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
             image_shape=(32, 32, 3)) -> dict[str, Any]:
  """{'params', 'batch_stats', 'opt_state'} of a fresh network."""
  variables = net.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  return {"params": variables["params"], "batch_stats": variables["batch_stats"],
          "opt_state": tx.init(variables["params"])}


def variables(net_state: dict[str, Any]) -> dict[str, Any]:
  return {"params": net_state["params"], "batch_stats": net_state["batch_stats"]}


def make_mask_update_fn(mask_net: nn.Module, tx_m: optax.GradientTransformation,
                        s: Settings) -> Callable:
  """update(mask_state, images1, images2, key) -> (mask_state, metrics), jitted: one step
  of M's pre-training on two batches (augmented as the training batches are)."""

  def loss_fn(params, stats, x1, x2):
    # the original calls M on images1 twice (once unused) and on images2 once; the unused
    # call only adds one running-average update, left out here
    o1, new = mask_net.apply({"params": params, "batch_stats": stats}, x1, train=True,
                             mutable=["batch_stats"])
    o2, new = mask_net.apply({"params": params, "batch_stats": new["batch_stats"]}, x2,
                             train=True, mutable=["batch_stats"])
    stats = new["batch_stats"]
    m1, m2 = threshold(o1), threshold(o2)
    div = diversity_loss(x1, x2, m1, m2)
    norm = mask_norm_loss(m1, s.mask_density)
    loss = s.lambda_norm * norm + s.lambda_div * div
    return loss, (stats, {"loss": loss, "norm": norm, "diversity": div,
                                       "density": jnp.mean(m1)})

  @jax.jit
  def update(state, images1, images2, key):
    k1, k2 = jax.random.split(key)
    x1 = data.augment(k1, images1.astype(jnp.float32))
    x2 = data.augment(k2, images2.astype(jnp.float32))
    (_, (stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["batch_stats"], x1, x2)
    updates, opt_state = tx_m.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "batch_stats": stats,
            "opt_state": opt_state}, metrics

  return update


def make_update_fn(model: nn.Module, tx: optax.GradientTransformation, gen: nn.Module,
                   mask_net: nn.Module, tx_g: optax.GradientTransformation, s: Settings,
                   augment: bool = True) -> Callable:
  """update(state, mask_vars, images, labels, partner_images, key) -> (state, metrics,
  inputs), jitted: one joint step of the classifier and G; M (its variables `mask_vars`)
  is frozen, in eval mode.

  images (B, H, W, C) uint8 in batch order, labels (B,) with the first k already the
  target's, partner_images (k, H, W, C) uint8 with k = the batch's backdoor count. The
  first k images are stamped with their own trigger, the next k with their partners'; the
  classifier trains on CE over the whole batch (after augmentation), G on CE +
  lambda_div * diversity. `inputs` is the batch the classifier trained on, before
  augmentation, as uint8 pixels. state: train.py's classifier state plus 'gen'
  ({'params', 'batch_stats', 'opt_state'})."""

  def loss_fn(params, g_params, batch_stats, g_stats, m_vars, images, labels, partners,
              key):
    k = partners.shape[0]
    x = images.astype(jnp.float32)
    div = jnp.zeros((), jnp.float32)
    if k:
      bd, cross, partners = x[:k], x[k:2 * k], partners.astype(jnp.float32)
      # two training-mode calls, as the original: each batch normalized by its own
      # statistics, the running averages updated by the first, then by the second
      p1, new = gen.apply({"params": g_params, "batch_stats": g_stats}, bd, train=True,
                          mutable=["batch_stats"])
      p2, new = gen.apply({"params": g_params, "batch_stats": new["batch_stats"]},
                          partners, train=True, mutable=["batch_stats"])
      g_stats = new["batch_stats"]
      # M is frozen in eval mode, where each image's mask is its own: one call for both
      m1, m2 = jnp.split(threshold(mask_net.apply(
          m_vars, jnp.concatenate([bd, partners]), train=False)), 2)
      x = jnp.concatenate([to_pixels(stamp(bd, p1, m1)), to_pixels(stamp(cross, p2, m2)),
                           x[2 * k:]])
      div = s.lambda_div * diversity_loss(bd, partners, normalize(255.0 * p1),
                                          normalize(255.0 * p2))
    seen = data.augment(key, x) if augment else x
    logits, new_vars = model.apply({"params": params, "batch_stats": batch_stats}, seen,
                                   train=True, mutable=["batch_stats"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return ce + div, (logits, new_vars["batch_stats"], g_stats, x, ce, div)

  @jax.jit
  def update(state, mask_vars, images, labels, partners, key):
    k = partners.shape[0]
    if images.ndim != 4 or labels.shape != images.shape[:1] or 2 * k > images.shape[0]:
      raise ValueError(f"IAB batch of images {images.shape}, labels {labels.shape} and "
                       f"{k} partners does not fit")
    key = jax.random.fold_in(key, state["step"])
    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    (_, (logits, stats, g_stats, inputs, ce, div)), (grads, g_grads) = grad_fn(
        state["params"], state["gen"]["params"], state["batch_stats"],
        state["gen"]["batch_stats"], mask_vars, images, labels, partners, key)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new = {**state, "params": optax.apply_updates(state["params"], updates),
           "batch_stats": stats, "opt_state": opt_state, "step": state["step"] + 1}
    # A batch without poisoned images gives G no gradient: PyTorch's Adam then skips G,
    # unless G's gradient accumulates, when it steps again on the sum so far.
    if k or s.accumulate_g:
      g_updates, g_opt = tx_g.update(g_grads, state["gen"]["opt_state"],
                                     state["gen"]["params"])
      new["gen"] = {"params": optax.apply_updates(state["gen"]["params"], g_updates),
                    "batch_stats": g_stats, "opt_state": g_opt}
    metrics = {"loss": ce, "diversity": div,
               "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
    return new, metrics, inputs.astype(jnp.uint8)

  return update


# ---------------------------------------------------------------- the trigger


@functools.partial(jax.jit, static_argnums=(0, 1))
def _patterns_and_masks(gen, mask_net, gen_vars, mask_vars, images):
  x = images.astype(jnp.float32)
  return (gen.apply(gen_vars, x, train=False),
          threshold(mask_net.apply(mask_vars, x, train=False)))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _triggered(gen, mask_net, gen_vars, mask_vars, images):
  x = images.astype(jnp.float32)
  patterns, masks = _patterns_and_masks(gen, mask_net, gen_vars, mask_vars, images)
  return jnp.clip(jnp.round(stamp(x, patterns, masks)), 0, 255).astype(jnp.uint8)


def channels_of(gen_vars: dict[str, Any]) -> int:
  """The first step's width of a saved generator."""
  return int(np.shape(gen_vars["params"]["down_0"]["conv"]["kernel"])[-1])


class GeneratedTrigger:
  """IAB's test-time trigger: each image stamped with its own G and M (both in eval mode,
  BatchNorm on running statistics), rounded to uint8. A `Trigger.fn`."""

  def __init__(self, gen_vars: dict[str, Any], mask_vars: dict[str, Any],
               batch_size: int = 500):
    self.gen_vars, self.mask_vars, self.batch_size = gen_vars, mask_vars, batch_size
    self.gen, self.mask_net = networks(channels_of(gen_vars))

  def patterns_and_masks(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(G(x) in [0, 1] (N, H, W, 3), thresholded M(x) (N, H, W, 1)), for analysis."""
    p, m = _patterns_and_masks(self.gen, self.mask_net, self.gen_vars, self.mask_vars,
                               np.asarray(images))
    return np.asarray(p), np.asarray(m)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    n, bs = len(images), self.batch_size
    out = []
    for i in range(0, n, bs):  # the last batch padded: one compiled program for all
      x = images[i:i + bs]
      m = len(x)
      if m < bs and n > bs:
        x = np.concatenate([x, np.zeros((bs - m, *x.shape[1:]), x.dtype)])
      out.append(np.asarray(_triggered(self.gen, self.mask_net, self.gen_vars,
                                       self.mask_vars, x))[:m])
    return np.concatenate(out) if out else np.zeros_like(images, np.uint8)


# ---------------------------------------------------------------- the record


def record(num_train: int, image_shape, gen_vars, mask_vars, rows: np.ndarray,
           images: np.ndarray, labels: np.ndarray, kind: np.ndarray, *,
           base: np.ndarray | None = None) -> dict[str, Any]:
  """The attack record a checkpoint keeps: both networks' variables, and the poisoned
  samples of the epoch it ends: training rows, their images as trained on (uint8, before
  augmentation), labels, and kind (1 backdoor, 2 cross). 'poison_mask' marks the backdoor
  rows like every record; 'pattern' and 'mask' are zeros that older readers can load.

  With `base` (the clean training images), the images are stored as their difference
  from the clean ones (`iab_delta`, int16): zero outside each generated mask (about 3 %
  of the pixels), which the checkpoint's compression shrinks about tenfold, from some
  27 MB to a few for a CPU-preset run; `trained_set` adds the clean images back."""
  rows = np.asarray(rows, np.int64)
  kind = np.asarray(kind, np.int8)
  poison_mask = np.zeros(num_train, np.uint8)
  poison_mask[rows[kind == 1]] = 1
  rec = {"poison_mask": poison_mask, "pattern": np.zeros(image_shape, np.uint8),
         "mask": np.zeros(image_shape, np.float32), "iab_generator": gen_vars,
         "iab_mask_net": mask_vars}
  if len(rows):  # orbax cannot save empty arrays: an epoch with nothing poisoned has none
    # int32: restored arrays are JAX's, 32-bit unless x64 is on, and the digest of an
    # int64 array would not match them
    rec.update(iab_rows=rows.astype(np.int32), iab_labels=np.asarray(labels, np.int32),
               iab_kind=kind)
    if base is None:
      rec["iab_images"] = np.asarray(images, np.uint8)
    else:
      rec["iab_delta"] = (np.asarray(images, np.int16)
                          - np.asarray(base, np.int16)[rows]).astype(np.int16)
  return rec


def trigger_from_record(rec: dict[str, Any]) -> Trigger:
  shape = np.shape(rec["pattern"])
  return Trigger(np.zeros(shape, np.uint8), np.zeros(shape, np.float32),
                 fn=GeneratedTrigger(rec["iab_generator"], rec["iab_mask_net"]))


def trained_set(base: PoisonedSet, rec: dict[str, Any]) -> PoisonedSet:
  """The training set as the epoch that wrote `rec` (the final one, in a finished run)
  trained on it: the clean base with that epoch's backdoor and cross samples in place,
  `poison_idx` the backdoor rows, and the trained networks' trigger."""
  n = len(base.labels)
  if len(rec["poison_mask"]) != n:
    raise ValueError(f"the IAB record is of a training set of {len(rec['poison_mask'])} "
                     f"images, not {n}")
  if "iab_rows" not in rec and np.any(rec["poison_mask"]):
    raise ValueError("this IAB record holds no recorded samples (a checkpoint exported "
                     "without them, `checkpoint.export_variables(samples=False)`): the "
                     "training set it trained on cannot be rebuilt from it; use the "
                     "training checkpoint")
  images, labels = np.array(base.images, copy=True), np.array(base.labels, np.int32)
  idx = np.zeros(0, np.int64)
  if "iab_rows" in rec:
    rows = np.asarray(rec["iab_rows"], np.int64)
    if "iab_delta" in rec:
      images[rows] = (images[rows].astype(np.int16)
                      + np.asarray(rec["iab_delta"], np.int16)).astype(np.uint8)
    else:
      images[rows] = np.asarray(rec["iab_images"], np.uint8)
    labels[rows] = np.asarray(rec["iab_labels"], np.int32)
    idx = np.sort(rows[np.asarray(rec["iab_kind"]) == 1])
  return PoisonedSet(images, labels, idx, trigger_from_record(rec))
