"""Removing directions from the classifier's input until clean accuracy drops, then
fine-tuning with them held out: the machinery of fine-pruning (FP) and of its
rank-reduction version (RR-FP).

FP prunes "the last convolutional layer" (Liu et al. 2018). In every model here the
classifier is a dense layer that reads the global average of the last feature map, one
input per channel, so pruning a channel of that map is zeroing the classifier's input
row, as BackdoorBench does (a mask on the first nn.Linear's input columns,
defense/fp.py). A removal of any directions V (C, r), orthonormal, is the fold P kernel
with P = I - V V^T; for V = neuron axes it is that same zeroing.

Since the classifier reads the features linearly and last, the clean logits with V
removed are (X - X V V^T) W + b for the clean features X, captured once: each further
direction v is a rank-1 update, logits -= (X v)(v^T W), so the whole pruning schedule
costs one forward pass over the clean data.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from drr_jax import features, projection
from drr_jax.defenses import finetune as finetune_lib
from drr_jax.defenses.drr.errors import DefenseError
from drr_jax.defenses.drr.inputs import extract


class Head(NamedTuple):
  """The classifier layer's name, its clean input features X (N, C), kernel W (C, K) and
  bias b (K,) (zeros where it has none)."""
  name: str
  x: np.ndarray
  kernel: np.ndarray
  bias: np.ndarray


def read(model: nn.Module | Callable, variables: Mapping[str, Any], images: np.ndarray,
         *, batch_size: int, progress: bool = True) -> Head:
  """The classifier (the last conv/dense layer the model calls) and its clean input.
  Raises DefenseError unless it is a dense layer whose output is the model's output."""
  order = features.layer_order(model, variables, images.shape[1:])
  if not order:
    raise DefenseError("the model has no conv or dense layer")
  name = order[-1]
  kernel = np.asarray(features.layer_kernels(variables["params"])[name], np.float64)
  if kernel.ndim != 2:
    raise DefenseError(f"the classifier {name!r} is not a dense layer: FP prunes the "
                       "channels that a dense classifier reads")
  x = extract(model, variables, images, (name,), outputs=False, pooling="mean",
              batch_size=batch_size, progress=progress, desc="classifier input")[name]
  x = np.asarray(x, np.float64)
  path = features.kernel_path(name)[:-1]
  node = variables["params"]
  for k in path:
    node = node[k]
  bias = np.asarray(node["bias"], np.float64) if "bias" in node else np.zeros(kernel.shape[1])
  head = Head(name, x, kernel, bias)
  probe = images[:min(len(images), 8)]
  logits = np.asarray(features.as_apply_fn(model)(variables, probe), np.float64)
  if logits.shape != (len(probe), kernel.shape[1]) or not np.allclose(
      logits, x[:len(probe)] @ kernel + bias, rtol=1e-3,
      atol=1e-3 * max(1.0, float(np.abs(logits).max()))):
    raise DefenseError(f"the output of the classifier {name!r} is not the model's output, "
                       "so its input cannot be pruned by this method")
  return head


class Schedule(NamedTuple):
  """How many directions were removed, the clean accuracy after each count (0, 1, ...,
  up to the first count past the margin or all of them), and the accuracy kept."""
  removed: int
  accuracies: list[float]
  accuracy: float


def prune_until_drop(head: Head, labels: np.ndarray, frame: np.ndarray,
                     max_acc_drop: float) -> Schedule:
  """Removes frame[:, 0], frame[:, 1], ... in turn, as long as the clean accuracy stays
  within a relative drop of `max_acc_drop` of the unpruned one (BackdoorBench's rule,
  |acc - acc0| / acc0 < acc_ratio); keeps the last count within it."""
  logits = head.x @ head.kernel + head.bias
  acc0 = float(np.mean(np.argmax(logits, 1) == labels))
  accs, kept = [acc0], 0
  for r in range(frame.shape[1]):
    v = frame[:, r]
    logits = logits - np.outer(head.x @ v, v @ head.kernel)
    acc = float(np.mean(np.argmax(logits, 1) == labels))
    accs.append(acc)
    if acc0 > 0 and abs(acc - acc0) / acc0 >= max_acc_drop:
      break
    kept = r + 1
  return Schedule(kept, accs, accs[kept])


def remove(variables: Mapping[str, Any], name: str, frame: np.ndarray) -> dict[str, Any]:
  """variables with the frame's directions removed from the classifier's input."""
  return {**variables, "params": projection.fold(variables["params"],
                                                 {name: jnp.asarray(frame, jnp.float32)},
                                                 "input")}


def holder(name: str, frame: np.ndarray) -> Callable[[Any], Any]:
  """params -> params with the frame's directions removed again (for fine-tuning)."""
  v = jnp.asarray(frame, jnp.float32)
  return lambda params: projection.fold(params, {name: v}, "input")


def finetune(model: nn.Module | Callable, variables: Mapping[str, Any], head_name: str,
             frame: np.ndarray, images: np.ndarray, labels: np.ndarray,
             cfg: Mapping[str, Any], progress: bool) -> tuple[dict[str, Any], list[float]]:
  """`finetune.finetune` with cfg's settings, the removed directions held out."""
  if cfg["finetune_epochs"] == 0:
    return dict(variables), []
  return finetune_lib.finetune(
      model, variables, images, labels, epochs=int(cfg["finetune_epochs"]),
      batch_size=int(cfg["finetune_batch_size"]), lr=float(cfg["finetune_lr"]),
      momentum=float(cfg["finetune_momentum"]),
      weight_decay=float(cfg["finetune_weight_decay"]), augment=bool(cfg["augment"]),
      seed=int(cfg["seed"]), hold=holder(head_name, frame), progress=progress)


def require_module(model: Any, cfg: Mapping[str, Any], method: str) -> None:
  """Fine-tuning runs the model in training mode: it needs a Linen module."""
  if cfg["finetune_epochs"] > 0 and not isinstance(model, nn.Module):
    raise DefenseError(f"{method} fine-tunes the network, which needs a Linen module "
                       "(train=True), not an apply function; or set finetune_epochs=0")


def accuracy(model: nn.Module | Callable, variables: Mapping[str, Any],
             images: np.ndarray, labels: np.ndarray, batch_size: int) -> float:
  """Clean accuracy of the network (a full forward pass, not the cached features)."""
  from drr_jax.inference import predict
  return float(np.mean(predict(model, variables, images, batch_size, False) == labels))
