"""PyTorch interop (drr_jax.interop.torch): the PyTorch models are defined here from the
layouts' published definitions (BackdoorBench's PreActResNet18, kuangliu's ResNet18, the
CLP code's naming of it), with a channel base (64 = the published width) and random
weights and BatchNorm statistics."""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import pytest

try:
  import torch
except ImportError:  # pragma: no cover - CI installs torch with the test extra
  if os.environ.get("CI"):
    raise
  pytest.skip("PyTorch is not installed: pip install -e '.[test]' brings the CPU build",
              allow_module_level=True)
import torch.nn.functional as F
from torch import nn as tnn

import drr_jax.interop.torch as interop
from drr_jax.models import get_model

torch.set_num_threads(1)

# ------------------------------------------------------------------ the PyTorch models


class PreActBlock(tnn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.bn1 = tnn.BatchNorm2d(cin)
    self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(cout)
    self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    if stride != 1 or cin != cout:
      self.shortcut = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False))

  def forward(self, x):
    pre = F.relu(self.bn1(x))
    skip = self.shortcut(pre) if hasattr(self, "shortcut") else x
    return self.conv2(F.relu(self.bn2(self.conv1(pre)))) + skip


class BasicBlock(tnn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(cout)
    self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(cout)
    self.shortcut = tnn.Sequential()
    if stride != 1 or cin != cout:
      self.shortcut = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False),
                                     tnn.BatchNorm2d(cout))

  def forward(self, x):
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    return F.relu(y + self.shortcut(x))


class CLPBlock(tnn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.residual_function = tnn.Sequential(
        tnn.Conv2d(cin, cout, 3, stride, 1, bias=False), tnn.BatchNorm2d(cout),
        tnn.ReLU(), tnn.Conv2d(cout, cout, 3, 1, 1, bias=False), tnn.BatchNorm2d(cout))
    self.shortcut = tnn.Sequential()
    if stride != 1 or cin != cout:
      self.shortcut = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False),
                                     tnn.BatchNorm2d(cout))

  def forward(self, x):
    return F.relu(self.residual_function(x) + self.shortcut(x))


def _stages(block, base):
  out, cin = [], base
  for s, w in enumerate((base, 2 * base, 4 * base, 8 * base)):
    out.append(tnn.Sequential(block(cin, w, 1 if s == 0 else 2), block(w, w, 1)))
    cin = w
  return out


class TorchPreActResNet18(tnn.Module):  # BackdoorBench's layout
  def __init__(self, base=64, num_classes=10):
    super().__init__()
    self.conv1 = tnn.Conv2d(3, base, 3, 1, 1, bias=False)
    self.layer1, self.layer2, self.layer3, self.layer4 = _stages(PreActBlock, base)
    self.avgpool = tnn.AdaptiveAvgPool2d((1, 1))
    self.linear = tnn.Linear(8 * base, num_classes)

  def forward(self, x):
    x = self.conv1(x)
    for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
      x = layer(x)
    return self.linear(self.avgpool(x).flatten(1))


class TorchResNet18(tnn.Module):  # kuangliu's layout (BackdoorBox, EP)
  def __init__(self, base=64, num_classes=10):
    super().__init__()
    self.conv1 = tnn.Conv2d(3, base, 3, 1, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(base)
    self.layer1, self.layer2, self.layer3, self.layer4 = _stages(BasicBlock, base)
    self.linear = tnn.Linear(8 * base, num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
      x = layer(x)
    return self.linear(F.avg_pool2d(x, 4).flatten(1))


class TorchCLPResNet18(tnn.Module):  # the CLP code's naming
  def __init__(self, base=64, num_classes=10):
    super().__init__()
    self.conv1 = tnn.Sequential(tnn.Conv2d(3, base, 3, padding=1, bias=False),
                                tnn.BatchNorm2d(base), tnn.ReLU())
    self.conv2_x, self.conv3_x, self.conv4_x, self.conv5_x = _stages(CLPBlock, base)
    self.avg_pool = tnn.AdaptiveAvgPool2d((1, 1))
    self.fc = tnn.Linear(8 * base, num_classes)

  def forward(self, x):
    x = self.conv1(x)
    for layer in (self.conv2_x, self.conv3_x, self.conv4_x, self.conv5_x):
      x = layer(x)
    return self.fc(self.avg_pool(x).flatten(1))


TORCH_MODELS = {"preact_resnet18": TorchPreActResNet18, "resnet18": TorchResNet18,
                "resnet18_clp": TorchCLPResNet18}
DRR_NAMES = {"preact_resnet18": "preact_resnet18", "resnet18": "resnet18",
             "resnet18_clp": "resnet18"}


def _random_model(layout, base=8, seed=0, num_classes=10):
  torch.manual_seed(seed)
  model = TORCH_MODELS[layout](base, num_classes)
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for m in model.modules():
      # He-normal weights keep the logits' dependence on the input at order 1 (torch's
      # default init shrinks the signal through 18 layers to ~1e-3 of the logits)
      if isinstance(m, (tnn.Conv2d, tnn.Linear)):
        tnn.init.kaiming_normal_(m.weight, generator=g, nonlinearity="relu")
      if isinstance(m, tnn.Linear):
        m.bias.copy_(0.1 * torch.randn(m.out_features, generator=g))
      if isinstance(m, tnn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(0.5 + torch.rand(c, generator=g))
        m.bias.copy_(0.2 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.3 * torch.randn(c, generator=g))
        m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
        m.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (1,), generator=g)))
  return model.eval()


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _torch_logits(model, images, normalization):
  mean, std = interop.NORMALIZATIONS[normalization]
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
  with torch.no_grad():
    return model(x).numpy()


def _flax_logits(model, variables, images):
  return np.asarray(model.apply(variables, images))


# ------------------------------------------------------------------ conversion


@pytest.mark.parametrize("layout", sorted(TORCH_MODELS))
def test_published_width_layout_maps_every_key_and_shape(layout):
  """Width 1.0 (the published models): every key and shape maps onto drr_jax's model,
  and back in torch's own key order."""
  tmodel = TORCH_MODELS[layout](64, 10)
  state = tmodel.state_dict()
  model, variables = interop.from_torch(state, layout, normalization="drr")
  assert model.width == 1.0 and model.num_classes == 10
  reference = get_model(DRR_NAMES[layout], 10, 1.0)
  import jax
  import jax.numpy as jnp
  want = jax.eval_shape(lambda: reference.init(jax.random.key(0),
                                               jnp.zeros((1, 32, 32, 3), jnp.uint8)))
  shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)
  assert shapes(variables) == shapes(dict(want))
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))
  assert n_params == sum(p.numel() for p in tmodel.parameters())
  back = interop.to_torch(variables, layout)
  assert list(back) == list(state)
  assert all(back[k].shape == state[k].shape and back[k].dtype == state[k].dtype
             for k in state)


@pytest.mark.parametrize("layout,normalization", [
    ("preact_resnet18", "backdoorbench"), ("preact_resnet18", "drr"),
    ("resnet18", "kuangliu"), ("resnet18", "none"), ("resnet18_clp", "kuangliu")])
def test_converted_logits_match(layout, normalization):
  tmodel = _random_model(layout, base=8, seed=3)
  images = _images(8)
  model, variables = interop.from_torch(tmodel.state_dict(), layout,
                                        normalization=normalization)
  want = _torch_logits(tmodel, images, normalization)
  got = _flax_logits(model, variables, images)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
  # the comparison can tell: the logits depend on the input, and reading the pixels with
  # another normalization (even drr_jax's, 0.2 % from BackdoorBench's) changes them
  assert want.std(axis=0).mean() > 0.1
  other = "drr" if normalization != "drr" else "backdoorbench"
  wrong, _ = interop.from_torch(tmodel.state_dict(), layout, normalization=other)
  assert np.abs(_flax_logits(wrong, variables, images) - want).max() > 1e-2


def test_published_width_preact_logits_match():
  tmodel = _random_model("preact_resnet18", base=64, seed=5)
  images = _images(2, seed=1)
  model, variables = interop.from_torch(tmodel.state_dict(), "preact_resnet18",
                                        normalization="backdoorbench")
  np.testing.assert_allclose(_flax_logits(model, variables, images),
                             _torch_logits(tmodel, images, "backdoorbench"),
                             rtol=0, atol=1e-4)


@pytest.mark.parametrize("layout", sorted(TORCH_MODELS))
def test_torch_flax_torch_is_identical(layout):
  tmodel = _random_model(layout, base=8, seed=7)
  state = tmodel.state_dict()
  _, variables = interop.from_torch(state, layout, normalization="none")
  back = interop.to_torch(variables, layout, reference=state)
  assert list(back) == list(state)
  for k in state:
    assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k]), k
  assert back._metadata == state._metadata
  fresh = TORCH_MODELS[layout](8, 10)
  fresh.load_state_dict(back, strict=True)
  # without a reference: the same floats, BatchNorm counters 0
  plain = interop.to_torch(variables, layout)
  assert list(plain) == list(state)
  for k in state:
    if k.endswith("num_batches_tracked"):
      assert int(plain[k]) == 0 and plain[k].dtype == torch.long
    else:
      assert torch.equal(plain[k], state[k]), k


def test_data_parallel_prefix_is_read_and_kept():
  tmodel = _random_model("preact_resnet18", base=4, seed=2)
  state = {f"module.{k}": v for k, v in tmodel.state_dict().items()}
  _, variables = interop.from_torch(state, "preact_resnet18", normalization="none")
  back = interop.to_torch(variables, "preact_resnet18", reference=state)
  assert list(back) == list(state)
  assert all(torch.equal(back[k], state[k]) for k in state)


def test_layout_mismatch_lists_the_offending_keys():
  state = dict(_random_model("resnet18", base=4).state_dict())
  del state["layer2.0.shortcut.1.running_var"]
  state["layer1.0.extra.weight"] = torch.zeros(3)
  state["layer3.1.conv2.weight"] = torch.zeros(16, 16, 1, 1)
  with pytest.raises(interop.LayoutError) as err:
    interop.from_torch(state, "resnet18", normalization="kuangliu")
  e = err.value
  assert isinstance(e, ValueError)
  assert e.missing == ["layer2.0.shortcut.1.running_var"]
  assert e.unexpected == ["layer1.0.extra.weight"]
  assert e.mismatched == [("layer3.1.conv2.weight", (16, 16, 1, 1), (16, 16, 3, 3))]
  for key in ("layer2.0.shortcut.1.running_var", "layer1.0.extra.weight",
              "layer3.1.conv2.weight"):
    assert key in str(e)
  # the other layout's state dict: every differing key is named
  preact = _random_model("preact_resnet18", base=4).state_dict()
  with pytest.raises(interop.LayoutError) as err:
    interop.from_torch(preact, "resnet18", normalization="kuangliu")
  assert "bn1.weight" in err.value.missing and "linear.weight" not in err.value.missing
  assert "layer2.0.shortcut.0.weight" not in err.value.unexpected
  # Flax variables with something the layout has no key for
  _, variables = interop.from_torch(_random_model("resnet18", base=4).state_dict(),
                                    "resnet18", normalization="none")
  variables["params"]["stage1_block1"]["conv1"]["bias"] = np.zeros(4, np.float32)
  with pytest.raises(interop.LayoutError, match="stage1_block1/conv1/bias"):
    interop.to_torch(variables, "resnet18")
  with pytest.raises(ValueError, match="normalization"):
    interop.from_torch(preact, "preact_resnet18", normalization="imagenet")


# ------------------------------------------------------------------ defense and export

# A small DRR run that removes a direction (no confirmation) at one layer, folding it
# into the conv kernel and the next BatchNorm's mean, so that the export of changed
# variables is what is checked. (side 'input': 'sites' costs ~10 s more here to plan.)
SMALL_DRR = {"mode": "sequential", "side": "input", "confirm": False, "k": 1, "steps": 5,
             "batch_size": 64, "layers": ["stage1_block1/conv1"]}


def _changed(a, b):
  import jax
  return any(not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_defended_export_gives_the_same_logits_in_torch():
  from drr_jax import defend
  tmodel = _random_model("preact_resnet18", base=8, seed=11)
  state = tmodel.state_dict()
  model, variables = interop.from_torch(state, "preact_resnet18",
                                        normalization="backdoorbench")
  images = _images(96, seed=2)
  images[:12, -5:, -5:] = 255  # a patch on a few images: something skewed to find
  defended, report = defend(model, variables, images, config=SMALL_DRR, progress=False)
  assert report["directions_kept"] > 0 and _changed(defended, variables)
  exported = interop.to_torch(defended, "preact_resnet18", reference=state)
  torch_model = TorchPreActResNet18(8, 10)
  torch_model.load_state_dict(exported, strict=True)
  torch_model.eval()
  probe = images[:16]
  np.testing.assert_allclose(_torch_logits(torch_model, probe, "backdoorbench"),
                             _flax_logits(model, defended, probe), rtol=0, atol=1e-4)


# ------------------------------------------------------------------ attack_result.pt


def _write_attack_result(root, tmodel, clean, poison_idx, target, *, on_disk: bool,
                         model_name="preactresnet18"):
  """A BackdoorBench attack_result.pt (utils/save_load_attack.py, bd_dataset_v2.py) for a
  BadNets-like attack on the clean images `clean`: a white 3x3 patch, label `target`.
  on_disk: the poisoned images as PNGs under the record folder, as BadNets saves them
  (paths relative to BackdoorBench's working folder); else PIL images in the file."""
  from PIL import Image
  record_dir = root / "record" / "tiny_badnet"
  record_dir.mkdir(parents=True)
  indicator = np.zeros(len(clean))
  indicator[poison_idx] = 1
  labels = np.arange(len(clean)) % 10

  def state(folder_name):
    folder = f"./record/tiny_badnet/{folder_name}" if on_disk else None
    data = {}
    for i in np.arange(len(clean))[indicator == 1]:  # numpy int keys, as BackdoorBench's
      img = clean[i].copy()
      img[-4:-1, -4:-1] = 255
      pil = Image.fromarray(img)
      if on_disk:
        sub = record_dir / folder_name / str(int(labels[i]))
        sub.mkdir(parents=True, exist_ok=True)
        pil.save(sub / f"{i}.png")
        data[i] = {"path": f"{folder}/{int(labels[i])}/{i}.png",
                   "other_info": [target, int(labels[i])]}
      else:
        data[i] = (pil, target, int(labels[i]))
    return {"bd_data_container": {"save_folder_path": folder, "data_dict": data,
                                  "save_file_format": ".png"},
            "getitem_all": True, "getitem_all_switch": False,
            "original_index_array": np.arange(len(clean)),
            "poison_indicator": indicator.copy(), "save_folder_path": folder}

  record = {"model_name": model_name, "num_classes": 10, "model": tmodel.state_dict(),
            "data_path": "./data/cifar10", "img_size": [32, 32, 3], "clean_data": "cifar10",
            "bd_train": state("bd_train_dataset"), "bd_test": state("bd_test_dataset")}
  torch.save(record, record_dir / "attack_result.pt")
  return record_dir / "attack_result.pt", record


def test_attack_result_in_memory_images_are_read(tmp_path):
  tmodel = _random_model("preact_resnet18", base=4, seed=13)
  clean = _images(40, seed=4)
  poison_idx = np.array([3, 17, 29])
  path, record = _write_attack_result(tmp_path, tmodel, clean, poison_idx, 0,
                                      on_disk=False)
  result = interop.load_attack_result(path)
  assert result.images.dtype == np.uint8 and result.images.shape == (3, 32, 32, 3)
  np.testing.assert_array_equal(result.info["indices"], poison_idx)
  np.testing.assert_array_equal(result.info["labels"], [0, 0, 0])
  np.testing.assert_array_equal(result.info["original_labels"], poison_idx % 10)
  want = clean[poison_idx].copy()
  want[:, -4:-1, -4:-1] = 255
  np.testing.assert_array_equal(result.images, want)
  assert result.info["train_size"] == 40 and result.info["normalization"] == "backdoorbench"
  images = _images(4, seed=9)
  np.testing.assert_allclose(_flax_logits(result.model, result.variables, images),
                             _torch_logits(tmodel, images, "backdoorbench"),
                             rtol=0, atol=1e-4)
  # aligned: exactly the attack's training set; otherwise the same mix of both
  mixed = interop.defender_images(result, clean, aligned=True)
  np.testing.assert_array_equal(mixed[poison_idx], want)
  np.testing.assert_array_equal(np.delete(mixed, poison_idx, 0),
                                np.delete(clean, poison_idx, 0))
  assert len(interop.defender_images(result, clean[:20], max_images=10)) == 10


def test_attack_result_errors(tmp_path):
  tmodel = _random_model("preact_resnet18", base=4, seed=13)
  path, record = _write_attack_result(tmp_path, tmodel, _images(12), np.array([1]), 0,
                                      on_disk=False, model_name="resnet18")
  with pytest.raises(ValueError, match="torchvision"):
    interop.load_attack_result(path)
  del record["bd_test"]
  torch.save(record, tmp_path / "broken.pt")
  with pytest.raises(interop.AttackResultError, match="bd_test"):
    interop.load_attack_result(tmp_path / "broken.pt")
  # anything pickled beyond tensors, numpy and PIL is refused unless trusted
  record["args"] = argparse.Namespace(lr=0.01)
  torch.save(record, tmp_path / "other.pt")
  with pytest.raises(interop.AttackResultError, match="Namespace.*trusted=True"):
    interop.load_record(tmp_path / "other.pt")
  assert interop.load_record(tmp_path / "other.pt", trusted=True)["args"].lr == 0.01


def test_without_torch_numpy_state_dicts_convert_and_exports_say_what_to_install(
    monkeypatch):
  state = {k: v.numpy() for k, v in _random_model("resnet18", base=4).state_dict().items()}
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
  model, variables = interop.from_torch(state, "resnet18", normalization="kuangliu")
  with pytest.raises(ImportError, match=r"pip install -e '\.\[torch\]'"):
    interop.to_torch(variables, "resnet18")


def test_attack_result_is_defended_end_to_end(tmp_path):
  tmodel = _random_model("preact_resnet18", base=8, seed=17)
  clean = _images(96, seed=6)
  poison_idx = np.arange(0, 96, 8)
  path, record = _write_attack_result(tmp_path, tmodel, clean, poison_idx, 0,
                                      on_disk=True)
  out = tmp_path / "defended" / "attack_result.pt"
  cwd = os.getcwd()
  os.chdir(tmp_path / "record")  # the stored ./record/... paths do not resolve from here
  try:
    defended, report, result = interop.defend_attack_result(
        path, out, clean, aligned=True, config=SMALL_DRR)
  finally:
    os.chdir(cwd)
  assert report["directions_kept"] > 0 and _changed(defended, result.variables)
  assert len(result.images) == len(poison_idx)
  written = interop.load_record(out)
  assert list(written) == list(record)
  for key in ("model_name", "num_classes", "data_path", "img_size", "clean_data"):
    assert written[key] == record[key]
  np.testing.assert_array_equal(written["bd_train"]["poison_indicator"],
                                record["bd_train"]["poison_indicator"])
  assert written["bd_train"]["bd_data_container"]["data_dict"].keys() == \
      record["bd_train"]["bd_data_container"]["data_dict"].keys()
  state = written["model"]
  assert list(state) == list(record["model"])
  torch_model = TorchPreActResNet18(8, 10)
  torch_model.load_state_dict(state, strict=True)
  torch_model.eval()
  probe = clean[:8]
  np.testing.assert_allclose(_torch_logits(torch_model, probe, "backdoorbench"),
                             _flax_logits(result.model, defended, probe),
                             rtol=0, atol=1e-4)
  assert not all(torch.equal(state[k], record["model"][k]) for k in state)
  # BackdoorBench's defense_result.pt as well
  out2 = interop.save_defense_result(tmp_path / "defense_result.pt", defended,
                                     model_name="preactresnet18", num_classes=10,
                                     reference=record["model"])
  saved = torch.load(out2, weights_only=True)
  assert sorted(saved) == ["model", "model_name", "num_classes"]
  assert all(torch.equal(saved["model"][k], state[k]) for k in state)
