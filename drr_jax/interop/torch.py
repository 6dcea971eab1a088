"""PyTorch interop: state dicts of the common CIFAR ResNet layouts to and from drr_jax's
Flax models, and BackdoorBench's `attack_result.pt` read, defended and written back.

Layouts (`LAYOUTS`; docs/interop.md gives the sources):
  'preact_resnet18'  BackdoorBench's PreActResNet18 (models/preact_resnet.py): conv1,
                     layer{1-4}.{i}.{bn1,conv1,bn2,conv2,shortcut.0}, linear; no final BN.
                     drr_jax model: PreActResNet.
  'resnet18'         kuangliu/pytorch-cifar's ResNet18 (models/resnet.py), which
                     BackdoorBox's core.models.ResNet(18) and the EP code repeat key for
                     key: conv1, bn1, layer{1-4}.{i}.{conv1,bn1,conv2,bn2,shortcut.0,
                     shortcut.1}, linear. drr_jax model: ResNet.
  'resnet18_clp'     the same network as the CLP code names it: conv1.{0,1},
                     conv{2-5}_x.{i}.residual_function.{0,1,3,4}, shortcut.{0,1}, fc.
The networks are the same functions as drr_jax's: 3x3 stem of stride 1 and no max-pool,
3x3 convs with padding 1 on both sides also at stride 2 (drr_jax pads explicitly, not
'SAME'), 1x1 shortcut convs sampling even positions, BatchNorm with epsilon 1e-5 in
inference mode, global average pooling of the 4x4 map, a linear head. Kernels are
transposed (torch OIHW <-> Flax HWIO, Linear (out, in) <-> Dense (in, out)); BatchNorm's
weight/bias/running_mean/running_var are Flax's scale/bias and batch_stats mean/var;
`num_batches_tracked` has no Flax counterpart (`to_torch` takes it from `reference`, else
0). A state dict saved from nn.DataParallel ('module.' prefixes) is read as well.

Input normalization: drr_jax's models take pixels 0..255 and standardize them inside with
drr_jax's CIFAR-10 statistics (`models.common.normalize`); the PyTorch codes feed
torchvision's Normalize(mean, std) of ToTensor(images) (pixels / 255) from their data
transforms, each with its own mean and std (`NORMALIZATIONS`). `from_torch` therefore
takes the normalization the PyTorch model was trained with and returns a `TorchResNet` /
`TorchPreActResNet`: drr_jax's model, with identical parameter names, that first maps
the pixels p to mean_drr + std_drr * ((p / 255 - mean) / std), so that its own
normalization yields exactly the tensor the PyTorch model reads. Its logits on uint8
images are the PyTorch model's on the same images normalized its way. With
normalization='drr' it is the plain drr_jax model; that is the normalization a PyTorch
copy of a model trained in drr_jax needs (mean = CIFAR10_MEAN / 255, std =
CIFAR10_STD / 255).

PyTorch is imported only where needed (`pip install -e '.[torch]'`); `from_torch` also
takes numpy arrays.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from drr_jax import utils
from drr_jax.models.common import CIFAR10_MEAN, CIFAR10_STD
from drr_jax.models.preact_resnet import PreActResNet
from drr_jax.models.resnet import ResNet

INSTALL_HINT = "pip install -e '.[torch]'"


def _torch():
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"drr_jax.interop.torch needs PyTorch, which is not installed: "
                      f"{INSTALL_HINT}") from e
  return torch


class LayoutError(ValueError):
  """A state dict (or Flax variables) that does not fit a layout. `missing`,
  `unexpected` and `mismatched` (key, got shape, expected shape) list every offending
  key; the message lists the first of each."""

  def __init__(self, what: str, missing: Sequence[str] = (),
               unexpected: Sequence[str] = (),
               mismatched: Sequence[tuple[str, tuple, tuple]] = ()):
    self.missing, self.unexpected = list(missing), list(unexpected)
    self.mismatched = list(mismatched)
    parts = []
    for label, items in (("missing keys", self.missing),
                         ("unexpected keys", self.unexpected),
                         ("wrong shapes", [f"{k}: got {g}, expected {e}"
                                           for k, g, e in self.mismatched])):
      if items:
        more = f" ... and {len(items) - 20} more" if len(items) > 20 else ""
        parts.append(f"{label} ({len(items)}): {', '.join(map(str, items[:20]))}{more}")
    super().__init__(f"{what}: " + "; ".join(parts))


class AttackResultError(ValueError):
  """An attack_result.pt that cannot be read as BackdoorBench's."""


# ------------------------------------------------------------------ normalization

# torchvision Normalize(mean, std) on ToTensor() images (0..1), per RGB channel.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # BackdoorBench, cifar10 (utils/aggregate_block/dataset_and_transform_generate.py)
    "backdoorbench": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    # kuangliu/pytorch-cifar main.py; also the CLP code's data.py
    "kuangliu": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    # ToTensor() alone: BackdoorBox's CIFAR-10 examples, the EP code
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    # drr_jax's own statistics: the plain drr_jax model
    "drr": (tuple(m / 255.0 for m in CIFAR10_MEAN), tuple(s / 255.0 for s in CIFAR10_STD)),
}


def _normalization(spec: str | tuple) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
  """(mean, std) in ToTensor units, or None for drr_jax's own ('drr')."""
  if isinstance(spec, str):
    if spec not in NORMALIZATIONS:
      raise ValueError(f"unknown normalization {spec!r}; choose one of "
                       f"{tuple(NORMALIZATIONS)} or give (mean, std) in 0..1 units")
    if spec == "drr":
      return None
    spec = NORMALIZATIONS[spec]
  try:
    mean, std = (tuple(float(v) for v in part) for part in spec)
  except (TypeError, ValueError) as e:
    raise ValueError(f"normalization must be a name or (mean, std), got {spec!r}") from e
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise ValueError(f"normalization needs 3 means and 3 positive stds, got {spec!r}")
  return mean, std


def _drr_pixels(images, mean, std):
  """Pixels whose drr_jax normalization is torchvision's Normalize(mean, std)(p / 255)."""
  z = (images.astype(jnp.float32) / 255.0 - jnp.asarray(mean, jnp.float32)
       ) / jnp.asarray(std, jnp.float32)
  return jnp.asarray(CIFAR10_MEAN, jnp.float32) + jnp.asarray(CIFAR10_STD, jnp.float32) * z


class TorchResNet(ResNet):
  """drr_jax's ResNet (same parameters) reading pixels as a PyTorch model trained with
  Normalize(input_mean, input_std) on ToTensor() images reads them."""
  input_mean: tuple[float, float, float] = NORMALIZATIONS["kuangliu"][0]
  input_std: tuple[float, float, float] = NORMALIZATIONS["kuangliu"][1]

  def __call__(self, images, train: bool = False):
    return super().__call__(_drr_pixels(images, self.input_mean, self.input_std), train)


class TorchPreActResNet(PreActResNet):
  """drr_jax's PreActResNet (same parameters) reading pixels as a PyTorch model trained
  with Normalize(input_mean, input_std) on ToTensor() images reads them."""
  input_mean: tuple[float, float, float] = NORMALIZATIONS["backdoorbench"][0]
  input_std: tuple[float, float, float] = NORMALIZATIONS["backdoorbench"][1]

  def __call__(self, images, train: bool = False):
    return super().__call__(_drr_pixels(images, self.input_mean, self.input_std), train)


# ------------------------------------------------------------------ layouts

@dataclasses.dataclass(frozen=True)
class Layout:
  """How one PyTorch code names a ResNet that a drr_jax model computes.

  stem / block_parts / head: (Flax module name, torch module name, kind) in the order
  torch's state_dict lists them; kind is 'conv', 'bn' or 'dense'. block_prefix(stage,
  block), both 1-based as drr_jax's 'stage{s}_block{b}', is the torch module holding a
  block.
  """
  name: str
  drr_model: type
  torch_model: type
  stem: tuple[tuple[str, str, str], ...]
  block_prefix: Callable[[int, int], str]
  block_parts: tuple[tuple[str, str, str], ...]
  head: tuple[str, str, str]
  source: str


_RESNET_PARTS = (("conv1", "conv1", "conv"), ("bn1", "bn1", "bn"),
                 ("conv2", "conv2", "conv"), ("bn2", "bn2", "bn"),
                 ("shortcut_conv", "shortcut.0", "conv"), ("shortcut_bn", "shortcut.1", "bn"))

LAYOUTS: dict[str, Layout] = {
    "preact_resnet18": Layout(
        "preact_resnet18", PreActResNet, TorchPreActResNet,
        (("stem_conv", "conv1", "conv"),),
        lambda s, b: f"layer{s}.{b - 1}",
        (("bn1", "bn1", "bn"), ("conv1", "conv1", "conv"), ("bn2", "bn2", "bn"),
         ("conv2", "conv2", "conv"), ("shortcut_conv", "shortcut.0", "conv")),
        ("head", "linear", "dense"),
        "BackdoorBench models/preact_resnet.py PreActResNet18"),
    "resnet18": Layout(
        "resnet18", ResNet, TorchResNet,
        (("stem_conv", "conv1", "conv"), ("stem_bn", "bn1", "bn")),
        lambda s, b: f"layer{s}.{b - 1}",
        _RESNET_PARTS,
        ("head", "linear", "dense"),
        "kuangliu/pytorch-cifar models/resnet.py ResNet18 (= BackdoorBox "
        "core.models.ResNet(18), EP's resnet18)"),
    "resnet18_clp": Layout(
        "resnet18_clp", ResNet, TorchResNet,
        (("stem_conv", "conv1.0", "conv"), ("stem_bn", "conv1.1", "bn")),
        lambda s, b: f"conv{s + 1}_x.{b - 1}",
        (("conv1", "residual_function.0", "conv"), ("bn1", "residual_function.1", "bn"),
         ("conv2", "residual_function.3", "conv"), ("bn2", "residual_function.4", "bn"),
         ("shortcut_conv", "shortcut.0", "conv"), ("shortcut_bn", "shortcut.1", "bn")),
        ("head", "fc", "dense"),
        "the CLP code's models/resnet.py resnet18"),
}

# BackdoorBench's `model_name` -> layout. Its 'resnet18' is torchvision's ImageNet
# ResNet-18 (7x7 stride-2 stem, max-pool), which no drr_jax model computes.
BACKDOORBENCH_MODELS = {"preactresnet18": "preact_resnet18"}

_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _layout(layout: str | Layout) -> Layout:
  if isinstance(layout, Layout):
    return layout
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; choose one of {tuple(LAYOUTS)}")
  return LAYOUTS[layout]


def layout_of_model_name(model_name: str) -> str:
  """The layout of a BackdoorBench `model_name`."""
  if model_name in BACKDOORBENCH_MODELS:
    return BACKDOORBENCH_MODELS[model_name]
  extra = (" (BackdoorBench's 'resnet18' is torchvision's ImageNet ResNet-18, 7x7 stem "
           "and max-pool, not the CIFAR layout drr_jax's ResNet-18 computes)"
           if model_name == "resnet18" else "")
  raise ValueError(f"BackdoorBench model {model_name!r} is not supported; supported: "
                   f"{sorted(BACKDOORBENCH_MODELS)}{extra}")


def _modules(layout: Layout, params: Mapping[str, Any]) -> list[tuple[str, str, tuple]]:
  """(kind, torch module name, Flax module path) in torch's state_dict order, for the
  modules present in `params` (a block's shortcut exists only where it changes shape)."""
  out = [(kind, t, (f,)) for f, t, kind in layout.stem if f in params]
  s = 1
  while f"stage{s}_block1" in params:
    b = 1
    while f"stage{s}_block{b}" in params:
      name = f"stage{s}_block{b}"
      out += [(kind, f"{layout.block_prefix(s, b)}.{t}", (name, f))
              for f, t, kind in layout.block_parts if f in params[name]]
      b += 1
    s += 1
  f, t, kind = layout.head
  if f in params:
    out.append((kind, t, (f,)))
  return out


def _get(tree: Mapping[str, Any], path: tuple) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def _leaves(tree: Mapping[str, Any], prefix: tuple = ()) -> list[tuple]:
  out = []
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out += _leaves(v, prefix + (k,))
    else:
      out.append(prefix + (k,))
  return out


def _torch_shapes(kind: str, flax_params: Mapping[str, Any]) -> dict[str, tuple]:
  """torch parameter name -> shape of one module, from its Flax params (or shapes)."""
  if kind == "conv":
    h, w, i, o = flax_params["kernel"].shape
    return {"weight": (o, i, h, w)}
  if kind == "dense":
    i, o = flax_params["kernel"].shape
    return {"weight": (o, i), "bias": (o,)}
  c = tuple(flax_params["scale"].shape)
  return {"weight": c, "bias": c, "running_mean": c, "running_var": c,
          "num_batches_tracked": ()}


def _flax_leaves_of(kind: str) -> dict[str, tuple[str, ...]]:
  """Flax collection -> leaf names one module of this kind holds."""
  if kind == "conv":
    return {"params": ("kernel",)}
  if kind == "dense":
    return {"params": ("kernel", "bias")}
  return {"params": ("scale", "bias"), "batch_stats": ("mean", "var")}


# ------------------------------------------------------------------ conversion

def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _strip_module(state: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
  keys = list(state)
  if keys and all(k.startswith("module.") for k in keys):
    return {k[len("module."):]: v for k, v in state.items()}, "module."
  return dict(state), ""


def build_model(layout: str | Layout, *, normalization: str | tuple,
                width: float = 1.0, num_classes: int = 10,
                stage_sizes: Sequence[int] = (2, 2, 2, 2)) -> nn.Module:
  """The Flax model of a layout, reading pixels with the given normalization
  (module docstring)."""
  lay = _layout(layout)
  if not (isinstance(width, (int, float)) and 0 < width <= 8):
    raise ValueError(f"width must be a number in (0, 8], got {width!r}")
  norm = _normalization(normalization)
  if norm is None:
    return lay.drr_model(tuple(stage_sizes), float(width), int(num_classes))
  return lay.torch_model(tuple(stage_sizes), float(width), int(num_classes),
                         input_mean=norm[0], input_std=norm[1])


def from_torch(state_dict: Mapping[str, Any], layout: str | Layout, *,
               normalization: str | tuple, num_classes: int | None = None,
               width: float | None = None,
               stage_sizes: Sequence[int] = (2, 2, 2, 2)) -> tuple[nn.Module, dict]:
  """(Flax model, variables) computing the PyTorch model of `state_dict`.

  layout: a name of `LAYOUTS`. normalization: what the PyTorch model was trained with, a
  name of `NORMALIZATIONS` or (mean, std) in ToTensor units; required, since the same
  layout is trained with different ones. width and num_classes default to what the stem
  conv and the head hold (width = stem channels / 64). stage_sizes (2, 2, 2, 2) is
  ResNet-18; (3, 4, 6, 3) reads a ResNet-34 of the same layout.
  Raises LayoutError listing every missing, unexpected and wrongly shaped key.
  """
  lay = _layout(layout)
  state, _ = _strip_module(state_dict)
  stem_key = f"{lay.stem[0][1]}.weight"
  head_key = f"{lay.head[1]}.weight"
  if width is None:
    width = (np.shape(state[stem_key])[0] / 64.0
             if stem_key in state and len(np.shape(state[stem_key])) == 4 else 1.0)
  if num_classes is None:
    num_classes = (np.shape(state[head_key])[0]
                   if head_key in state and len(np.shape(state[head_key])) == 2 else 10)
  model = build_model(lay, normalization=normalization, width=width,
                      num_classes=num_classes, stage_sizes=stage_sizes)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((1, 32, 32, 3), jnp.uint8)))
  params_shapes = abstract["params"]
  stats_shapes = abstract.get("batch_stats", {})
  expected: dict[str, tuple] = {}
  modules = _modules(lay, params_shapes)
  for kind, tname, fpath in modules:
    for leaf, shape in _torch_shapes(kind, _get(params_shapes, fpath)).items():
      expected[f"{tname}.{leaf}"] = shape
  missing = [k for k in expected if k not in state
             and not k.endswith(".num_batches_tracked")]
  unexpected = [k for k in state if k not in expected]
  mismatched = [(k, tuple(np.shape(state[k])), expected[k]) for k in expected
                if k in state and tuple(np.shape(state[k])) != expected[k]]
  if missing or unexpected or mismatched:
    raise LayoutError(f"the state dict does not fit layout {lay.name!r} (width {width:g}, "
                      f"{num_classes} classes, stages {tuple(stage_sizes)})",
                      missing, unexpected, mismatched)
  params: dict[str, Any] = {}
  stats: dict[str, Any] = {}

  def put(tree, path, leaves):
    for p in path[:-1]:
      tree = tree.setdefault(p, {})
    tree[path[-1]] = {k: jnp.asarray(np.ascontiguousarray(v, dtype=np.float32))
                      for k, v in leaves.items()}

  for kind, tname, fpath in modules:
    w = _to_numpy(state[f"{tname}.weight"])
    if kind == "conv":
      put(params, fpath, {"kernel": w.transpose(2, 3, 1, 0)})
    elif kind == "dense":
      put(params, fpath, {"kernel": w.T, "bias": _to_numpy(state[f"{tname}.bias"])})
    else:
      put(params, fpath, {"scale": w, "bias": _to_numpy(state[f"{tname}.bias"])})
      put(stats, fpath, {"mean": _to_numpy(state[f"{tname}.running_mean"]),
                         "var": _to_numpy(state[f"{tname}.running_var"])})
  variables = {"params": params, "batch_stats": stats}
  # the layout must have covered every variable the model declares
  left = ({("params",) + p for p in _leaves(params_shapes)}
          | {("batch_stats",) + p for p in _leaves(stats_shapes)}) - (
              {("params",) + p for p in _leaves(params)}
              | {("batch_stats",) + p for p in _leaves(stats)})
  assert not left, f"layout {lay.name} leaves Flax variables unset: {sorted(left)}"
  return model, variables


def to_torch(variables: Mapping[str, Any], layout: str | Layout, *,
             reference: Mapping[str, Any] | None = None) -> "collections.OrderedDict":
  """PyTorch state dict (torch tensors, torch's key order) of drr_jax variables.

  reference: the state dict the variables came from (optional). Its key order, dtypes,
  'module.' prefix, `num_batches_tracked` counters and `_metadata` are kept, and its
  keys and shapes must match; without it, float32 tensors, counters 0.
  Raises LayoutError listing Flax variables the layout has no key for, required modules
  that are absent, or keys that differ from the reference's.
  """
  torch = _torch()
  lay = _layout(layout)
  params = variables["params"]
  stats = variables.get("batch_stats", {})
  modules = _modules(lay, params)
  used = set()
  missing = []
  out: dict[str, Any] = {}
  ref_state, prefix = _strip_module(reference) if reference is not None else ({}, "")
  for f, _, _ in lay.stem + (lay.head,):
    if f not in params:
      missing.append(f"params/{f}")
  for kind, tname, fpath in modules:
    need = _flax_leaves_of(kind)
    leaves = {}
    for coll, names in need.items():
      tree = params if coll == "params" else stats
      for name in names:
        path = fpath + (name,)
        try:
          leaves[name if coll == "params" else f"stat_{name}"] = np.asarray(_get(tree, path))
          used.add((coll,) + path)
        except (KeyError, TypeError):
          missing.append("/".join((coll,) + path))
    if len(leaves) != sum(len(v) for v in need.values()):
      continue
    if kind == "conv":
      tensors = {"weight": leaves["kernel"].transpose(3, 2, 0, 1)}
    elif kind == "dense":
      tensors = {"weight": leaves["kernel"].T, "bias": leaves["bias"]}
    else:
      tensors = {"weight": leaves["scale"], "bias": leaves["bias"],
                 "running_mean": leaves["stat_mean"], "running_var": leaves["stat_var"]}
    for leaf in (_BN_KEYS if kind == "bn" else tensors):
      key = f"{tname}.{leaf}"
      if leaf == "num_batches_tracked":
        ref = ref_state.get(key)
        out[key] = (ref.clone() if hasattr(ref, "clone") else
                    torch.tensor(0 if ref is None else int(np.asarray(ref)),
                                 dtype=torch.long))
        continue
      dtype = ref_state[key].dtype if hasattr(ref_state.get(key), "dtype") else None
      t = torch.from_numpy(np.array(tensors[leaf], dtype=np.float32, order="C"))
      out[key] = t.to(dtype) if isinstance(dtype, torch.dtype) else t
  unexpected = sorted("/".join(p) for p in
                      ({("params",) + p for p in _leaves(params)}
                       | {("batch_stats",) + p for p in _leaves(stats)}) - used)
  if missing or unexpected:
    raise LayoutError(f"the variables do not fit layout {lay.name!r}", missing, unexpected)
  if reference is not None:
    missing_ref = [k for k in ref_state if k not in out]
    extra = [k for k in out if k not in ref_state]
    mismatched = [(k, tuple(out[k].shape), tuple(np.shape(ref_state[k])))
                  for k in out if k in ref_state
                  and tuple(out[k].shape) != tuple(np.shape(ref_state[k]))]
    if missing_ref or extra or mismatched:
      raise LayoutError(f"the variables, as layout {lay.name!r}, do not match the "
                        "reference state dict", missing_ref, extra, mismatched)
    order = list(ref_state)
  else:
    order = list(out)
  result = collections.OrderedDict((prefix + k, out[k]) for k in order)
  metadata = getattr(reference, "_metadata", None)
  if metadata is not None:
    result._metadata = metadata  # BatchNorm's state dict version, as torch keeps it
  return result


# ------------------------------------------------------------------ BackdoorBench

REQUIRED_FIELDS = ("model_name", "num_classes", "model", "data_path", "img_size",
                   "clean_data", "bd_train", "bd_test")


def _safe_globals() -> list:
  """What a BackdoorBench attack_result.pt pickles besides tensors: numpy arrays and
  scalars (under numpy 1's and 2's module names), dtypes, and PIL images."""
  from PIL import Image
  core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
  safe: list = [np.ndarray, np.dtype, Image.Image]
  for fn in ("_reconstruct", "scalar"):
    obj = getattr(core, fn)
    safe += [(obj, f"numpy.core.multiarray.{fn}"), (obj, f"numpy._core.multiarray.{fn}")]
  dtypes = getattr(np, "dtypes", None)
  if dtypes is not None:
    safe += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
  return safe


def load_record(path: str | os.PathLike, *, trusted: bool = False) -> dict[str, Any]:
  """The dict an attack_result.pt holds. By default unpickled with torch's weights_only
  loader, allowing only tensors, numpy arrays/scalars and PIL images (`_safe_globals`);
  trusted=True unpickles anything (runs the file's code: only for files you trust)."""
  torch = _torch()
  path = Path(path)
  if not path.is_file():
    raise AttackResultError(f"{path} does not exist")
  if trusted:
    return torch.load(path, map_location="cpu", weights_only=False)
  try:
    with torch.serialization.safe_globals(_safe_globals()):
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    try:
      unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - only for the message
      unsafe = "unknown"
    raise AttackResultError(
        f"{path} pickles objects outside the allowed types (tensors, numpy arrays, PIL "
        f"images): {unsafe}. If you trust the file, load it with trusted=True.") from e


def _image_array(img: Any) -> np.ndarray:
  if hasattr(img, "convert"):  # PIL
    return np.asarray(img.convert("RGB"), dtype=np.uint8)
  arr = _to_numpy(img)
  if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
    arr = arr.transpose(1, 2, 0)  # CHW
  if arr.dtype != np.uint8:
    arr = np.clip(np.rint(arr * 255 if arr.max() <= 1.0 else arr), 0, 255).astype(np.uint8)
  return np.broadcast_to(arr, arr.shape[:2] + (3,)) if arr.shape[-1] == 1 else arr


def _resolve_png(path: str, folder: str, base_dir: Path | None) -> Path:
  """A saved image's file: under the record folder (where the attack_result.pt lies)
  when the whole record folder was moved, else the path as stored."""
  p = Path(path)
  candidates = []
  if base_dir is not None and folder:
    try:
      candidates.append(base_dir / Path(folder).name / p.relative_to(folder))
    except ValueError:
      pass
  candidates.append(p)
  if base_dir is not None and not p.is_absolute():
    candidates.append(base_dir / p)
  for c in candidates:
    if c.is_file():
      return c
  raise AttackResultError(f"poisoned image {path} not found (looked at "
                          f"{', '.join(map(str, candidates))})")


def poisoned_samples(record: Mapping[str, Any], split: str = "bd_train",
                     base_dir: str | os.PathLike | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(indices, images uint8 NHWC, labels, original labels, poison indicator) of the
  poisoned samples a BackdoorBench record holds for `split` ('bd_train' or 'bd_test'),
  in index order.

  BackdoorBench (utils/bd_dataset_v2.py) stores a prepro_cls_DatasetBD_v2 state: a
  'poison_indicator' over the whole clean split (1: poisoned) and a
  'bd_data_container' whose 'data_dict' maps each poisoned index to (PIL image, backdoor
  label, original label) in memory, or, when its 'save_folder_path' is set, to
  {'path': PNG file, 'other_info': [backdoor label, original label]}. Clean samples are
  not stored: they are the clean split's. base_dir: the folder of the attack_result.pt,
  where saved PNGs are looked for first.
  """
  state = record.get(split)
  if state is None:
    raise AttackResultError(f"the record's {split!r} is None: the attack saved no "
                            "poisoned data for it")
  if not isinstance(state, Mapping) or "bd_data_container" not in state:
    keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
    raise AttackResultError(f"{split!r} is not BackdoorBench's prepro_cls_DatasetBD_v2 "
                            f"state (keys {keys}; expected 'bd_data_container', "
                            "'poison_indicator', 'original_index_array')")
  container = state["bd_data_container"]
  data_dict = container["data_dict"]
  folder = container.get("save_folder_path")
  indicator = np.asarray(_to_numpy(state["poison_indicator"])).reshape(-1)
  items = sorted(((int(k), v) for k, v in data_dict.items()), key=lambda kv: kv[0])
  indices = np.asarray([k for k, _ in items], np.int64)
  flagged = np.flatnonzero(indicator == 1)
  if not np.array_equal(np.sort(flagged), indices):
    diff = sorted(set(flagged.tolist()) ^ set(indices.tolist()))
    raise AttackResultError(f"{split!r}: the poison indicator and the stored samples "
                            f"disagree at {len(diff)} indices, e.g. {diff[:10]}")
  base = None if base_dir is None else Path(base_dir)
  images, labels, originals = [], [], []
  for _, value in items:
    if folder is None:
      img, label, original = value[0], value[1], value[2]
    else:
      from PIL import Image
      label, original = value["other_info"][:2]
      with Image.open(_resolve_png(value["path"], folder, base)) as im:
        img = im.convert("RGB")
    images.append(_image_array(img))
    labels.append(int(_to_numpy(label)))
    originals.append(int(_to_numpy(original)))
  shapes = {a.shape for a in images}
  if len(shapes) > 1:
    raise AttackResultError(f"{split!r}: poisoned images of several shapes {shapes}")
  stacked = (np.stack(images) if images else np.zeros((0, 32, 32, 3), np.uint8))
  return (indices, stacked, np.asarray(labels, np.int64), np.asarray(originals, np.int64),
          indicator)


class AttackResult(NamedTuple):
  model: nn.Module         # the Flax model, reading uint8 pixels as BackdoorBench does
  variables: dict          # its params and batch_stats
  images: np.ndarray       # poisoned training images, uint8 (N, H, W, 3), index order
  info: dict               # indices, labels, original_labels, poison_indicator,
                           # train_size, layout, normalization and the record's fields


def load_attack_result(path: str | os.PathLike, *, normalization: str | tuple | None = None,
                       trusted: bool = False) -> AttackResult:
  """Reads BackdoorBench's attack_result.pt (utils/save_load_attack.py
  save_attack_result): the model (its 'model' state dict, 'model_name', 'num_classes')
  as a Flax model and variables, and the poisoned training samples of 'bd_train'.

  normalization: by default BackdoorBench's for 'clean_data' == 'cifar10' (the only
  dataset read without one given). info also holds 'model_name', 'num_classes',
  'clean_data', 'data_path', 'img_size', 'train_size' (the clean training set's size:
  the poison indicator's length) and 'path'.
  """
  record = load_record(path, trusted=trusted)
  if not isinstance(record, Mapping):
    raise AttackResultError(f"{path} holds a {type(record).__name__}, not a dict")
  absent = [k for k in REQUIRED_FIELDS if k not in record]
  if absent:
    raise AttackResultError(f"{path} is not a BackdoorBench attack result: fields "
                            f"{absent} are missing (it has {sorted(record)})")
  layout = layout_of_model_name(record["model_name"])
  if normalization is None:
    if record["clean_data"] != "cifar10":
      raise AttackResultError(f"clean_data {record['clean_data']!r}: only cifar10's "
                              "normalization is known here; pass normalization=")
    normalization = "backdoorbench"
  model, variables = from_torch(record["model"], layout, normalization=normalization,
                                num_classes=int(record["num_classes"]))
  indices, images, labels, originals, indicator = poisoned_samples(
      record, "bd_train", Path(path).parent)
  info = {"indices": indices, "labels": labels, "original_labels": originals,
          "poison_indicator": indicator, "train_size": int(len(indicator)),
          "layout": layout, "normalization": normalization, "path": str(path),
          **{k: record[k] for k in ("model_name", "num_classes", "clean_data",
                                    "data_path", "img_size")}}
  return AttackResult(model, variables, images, info)


def _atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
  torch = _torch()
  with utils.atomic_path(path) as tmp, open(tmp, "wb") as f:
    torch.save(obj, f)
    f.flush()
    os.fsync(f.fileno())


def save_attack_result_model(path_in: str | os.PathLike, path_out: str | os.PathLike,
                             variables: Mapping[str, Any], *, trusted: bool = False
                             ) -> Path:
  """Writes the attack_result.pt at `path_in` to `path_out` with its 'model' replaced
  by `variables` (same keys, order, dtypes) and every other field as it was, so that
  BackdoorBench's own loaders read the defended model as they read the attacked one.
  The file is written to a temporary name and renamed (never half-written)."""
  record = dict(load_record(path_in, trusted=trusted))
  layout = layout_of_model_name(record["model_name"])
  record["model"] = to_torch(variables, layout, reference=record["model"])
  _atomic_torch_save(record, path_out)
  return Path(path_out)


def save_defense_result(path_out: str | os.PathLike, variables: Mapping[str, Any], *,
                        model_name: str, num_classes: int,
                        reference: Mapping[str, Any] | None = None) -> Path:
  """Writes BackdoorBench's defense_result.pt (utils/save_load_attack.py
  save_defense_result): {'model_name', 'num_classes', 'model' (state dict)}."""
  state = to_torch(variables, layout_of_model_name(model_name), reference=reference)
  _atomic_torch_save({"model_name": model_name, "num_classes": int(num_classes),
                      "model": state}, path_out)
  return Path(path_out)


def defender_images(result: AttackResult, clean_images: np.ndarray, *,
                    aligned: bool = False, max_images: int | None = None,
                    seed: int = 0) -> np.ndarray:
  """The poisoned training set a defender holds, from the record's poisoned samples and
  the clean training images (uint8 NHWC).

  aligned=True: `clean_images` is the clean split in BackdoorBench's order (torchvision's
  CIFAR10, train=True), as many as the poison indicator: the poisoned images replace
  theirs, giving exactly the attack's training set. aligned=False (e.g. drr_jax's own
  CIFAR-10 copy, in another order): the poisoned images plus a random sample of
  train_size - n_poisoned clean images (all of them, if fewer, with the poisoned images
  subsampled to keep the attack's poisoning ratio), shuffled. max_images: a random
  subset of that size.
  """
  rng = np.random.default_rng(seed)
  clean = np.asarray(clean_images)
  poisoned = result.images
  if poisoned.shape[1:] != clean.shape[1:]:
    raise ValueError(f"clean images {clean.shape[1:]} and poisoned images "
                     f"{poisoned.shape[1:]} differ in shape")
  n_train = result.info["train_size"]
  if aligned:
    if len(clean) != n_train:
      raise ValueError(f"aligned clean images must be the whole clean split "
                       f"({n_train}), got {len(clean)}")
    images = clean.copy()
    images[result.info["indices"]] = poisoned
  else:
    n_clean = n_train - len(poisoned)
    if len(clean) >= n_clean:
      clean = clean[rng.choice(len(clean), n_clean, replace=False)]
    elif n_clean > 0:
      keep = int(round(len(clean) * len(poisoned) / n_clean))
      poisoned = poisoned[rng.choice(len(poisoned), keep, replace=False)]
    images = np.concatenate([clean, poisoned])
    images = images[rng.permutation(len(images))]
  if max_images is not None and max_images < len(images):
    images = images[np.sort(rng.choice(len(images), max_images, replace=False))]
  return images


def defend_attack_result(path_in: str | os.PathLike, path_out: str | os.PathLike,
                         clean_images: np.ndarray, *, aligned: bool = False,
                         max_images: int | None = None, seed: int = 0,
                         config: Mapping[str, Any] | None = None,
                         normalization: str | tuple | None = None,
                         trusted: bool = False, progress: bool = False
                         ) -> tuple[dict, dict, AttackResult]:
  """BackdoorBench attack_result.pt -> DRR -> the same file format at `path_out`.

  Reads the model and poisoned samples (`load_attack_result`), forms the defender's
  images (`defender_images`: clean_images, aligned, max_images, seed), runs
  `drr_jax.defend` with `config`, and writes the record with the defended model
  (`save_attack_result_model`). Returns (defended variables, DRR report, the loaded
  AttackResult).
  """
  from drr_jax.defenses import defend

  result = load_attack_result(path_in, normalization=normalization, trusted=trusted)
  images = defender_images(result, clean_images, aligned=aligned, max_images=max_images,
                           seed=seed)
  variables, report = defend(result.model, result.variables, images, config=config,
                             progress=progress)
  save_attack_result_model(path_in, path_out, variables, trusted=trusted)
  return variables, report, result
