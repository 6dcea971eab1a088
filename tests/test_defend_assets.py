"""`launch.defend` on a user's own assets (issue 16, point 2; drr_jax/assets.py), end to
end through `launch.defend.main` on a tiny Flax model (tests/tiny_net.py, loaded by
import path), 16x16 images and a DRR run of a few steps; and on a BackdoorBench
attack_result.pt (`--torch_checkpoint`, point 3)."""
from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import serialization
from PIL import Image

from drr_jax import assets
from launch import defend as launch_defend

HERE = Path(__file__).parent
NET = f"{HERE / 'tiny_net.py'}:TinyNet"
ARGS = '{"num_classes": 4}'
# One layer, one direction, 5 ascent steps, no confirmation: a direction is removed.
FAST = ["--set", "mode=sequential", "--set", "side=input", "--set", "confirm=False",
        "--set", "k=1", "--set", "steps=5", "--set", "batch_size=64"]


def _png_folder(root: Path, images, labels=None) -> Path:
  root.mkdir(parents=True)
  for i, img in enumerate(images):
    sub = root if labels is None else root / f"class{labels[i]}"
    sub.mkdir(exist_ok=True)
    Image.fromarray(img).save(sub / f"{i:03d}.png")
  return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  import sys
  sys.path.insert(0, str(HERE))
  from tiny_net import TinyNet
  sys.path.remove(str(HERE))
  root = tmp_path_factory.mktemp("assets")
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (48, 16, 16, 3), dtype=np.uint8)
  labels = np.arange(48) % 4
  triggered = images.copy()
  triggered[:, -4:-1, -4:-1] = 255
  images[::6, -4:-1, -4:-1] = 255  # 8 poisoned images: a skewed feature to remove
  model = TinyNet(num_classes=4)
  variables = jax.device_get(model.init(jax.random.key(0), images[:1], train=False))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save((root / "orbax").absolute(), variables)
  ckptr.wait_until_finished()
  (root / "net.msgpack").write_bytes(serialization.to_bytes(variables))
  (root / "params.msgpack").write_bytes(serialization.to_bytes(variables["params"]))
  np.savez(root / "train.npz", images=images, labels=labels)
  np.savez(root / "triggered.npz", x=triggered, y=labels)
  return {"root": root, "model": model, "variables": variables, "images": images,
          "labels": labels,
          "imagefolder": _png_folder(root / "imagefolder", images, labels),
          "flat": _png_folder(root / "flat", triggered[:24])}


def _changed(a, b) -> bool:
  return any(not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_orbax_in_orbax_out_with_an_imagefolder_and_evaluation(tiny, tmp_path, capsys):
  out = tmp_path / "defended"
  res = launch_defend.main([
      "--model", NET, "--model_args", ARGS, "--variables", str(tiny["root"] / "orbax"),
      "--images", str(tiny["imagefolder"]), "--clean_eval", str(tiny["root"] / "train.npz"),
      "--triggered_eval", str(tiny["flat"]), "--target", "0", "--out", str(out), *FAST])
  assert res["report"]["directions_kept"] > 0 and res["format"] == "orbax"
  assert set(res["before"]) == set(res["after"]) == {"acc", "asr"}
  text = capsys.readouterr().out
  assert "ACC (%)" in text and "ASR (%)" in text and "before" in text
  loaded = assets.load_variables(out, tiny["model"], (16, 16, 3))
  assert loaded.format == "orbax" and not loaded.params_only
  assert _changed(loaded.variables, tiny["variables"])
  # the PNGs were read as written: the same predictions as on the arrays
  from drr_jax import evaluate
  ours = evaluate.predict(tiny["model"], loaded.variables, tiny["images"], progress=False)
  acc = float(np.mean(ours == tiny["labels"]))
  assert res["after"]["acc"] == pytest.approx(acc)


def test_msgpack_in_msgpack_out_with_an_npz_and_a_module_path(tiny, tmp_path,
                                                              monkeypatch):
  import shutil
  monkeypatch.syspath_prepend(str(HERE))
  src = tmp_path / "net.msgpack"
  shutil.copy(tiny["root"] / "net.msgpack", src)
  res = launch_defend.main(["--model", "tiny_net:tiny_net", "--model_args", ARGS,
                            "--variables", str(src), "--images",
                            str(tiny["root"] / "train.npz"), *FAST])
  out = tmp_path / "net-drr.msgpack"  # the default name, next to the input
  assert res["out"] == str(out) and res["before"] == {}
  back = serialization.msgpack_restore(out.read_bytes())
  assert set(back) == set(tiny["variables"])
  assert _changed(back, tiny["variables"])
  # the params alone in, the params alone out
  out2 = tmp_path / "p.msgpack"
  launch_defend.main(["--model", "tiny_net:TinyNet", "--model_args", ARGS, "--variables",
                      str(tiny["root"] / "params.msgpack"), "--images", str(tiny["flat"]),
                      "--out", str(out2), *FAST])
  back2 = serialization.msgpack_restore(out2.read_bytes())
  assert set(back2) == set(tiny["variables"]["params"])


def test_torch_checkpoint_is_defended_and_written_back(tmp_path, monkeypatch):
  import sys
  sys.path.insert(0, str(HERE))
  try:
    import test_interop_torch as t  # skips here (not under CI) where torch is missing
  finally:
    sys.path.remove(str(HERE))
  from drr_jax.interop import torch as interop
  tmodel = t._random_model("preact_resnet18", base=4, seed=17)
  clean = t._images(64, seed=6)
  path, record = t._write_attack_result(tmp_path, tmodel, clean, np.arange(0, 64, 8), 0,
                                        on_disk=False)
  np.savez(tmp_path / "clean.npz", images=clean, labels=np.arange(64) % 10)
  out = tmp_path / "defended.pt"
  res = launch_defend.main([
      "--torch_checkpoint", str(path), "--images", str(tmp_path / "clean.npz"),
      "--aligned", "--clean_eval", str(tmp_path / "clean.npz"), "--out", str(out), *FAST,
      "--set", "layers=['stage1_block1/conv1']"])
  assert res["report"]["directions_kept"] > 0 and set(res["after"]) == {"acc"}
  written = interop.load_record(out)
  assert list(written) == list(record) and list(written["model"]) == list(record["model"])
  assert any(not t.torch.equal(written["model"][k], record["model"][k])
             for k in record["model"])
  # without --images the clean images are drr_jax's CIFAR-10, which must be found
  monkeypatch.delenv("DRR_DATA_DIR", raising=False)
  with pytest.raises(SystemExit, match="needs clean training images: give --images"):
    launch_defend.main(["--torch_checkpoint", str(path), "--out", str(tmp_path / "o.pt"),
                        "--data_dir", str(tmp_path / "no-data"), *FAST])
  assert not (tmp_path / "o.pt").exists()


def _bad_cases(tiny, tmp_path):
  r = tiny["root"]
  own = ["--model", NET, "--model_args", ARGS, "--variables", str(r / "net.msgpack"),
         "--images", str(r / "train.npz")]
  empty = tmp_path / "empty"
  empty.mkdir()
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "a.png").write_bytes(b"not a png")
  (tmp_path / "exists").mkdir()
  bad_json = own[:2] + ["--model_args", "{num_classes: 4}"] + own[4:]
  return [
      (["--model", NET, "--model_args", ARGS, "--variables", str(tmp_path / "none.msgpack"),
        "--images", str(r / "train.npz")], "none.msgpack: does not exist"),
      (["--model", "no_such_pkg.nets:Net", *own[2:]], "cannot import module 'no_such_pkg"),
      (["--model", f"{HERE / 'tiny_net.py'}:Nope", *own[2:]], "has no attribute 'Nope'"),
      (bad_json, "--model_args is not JSON"),
      (["--model", NET, "--model_args", '{"num_classes": 4, "width": 16}', *own[4:]],
       "does not fit the model"),
      (["--model", NET, "--model_args", '{"num_classes": 5}', *own[4:]],
       "does not fit the model"),
      ([*own[:-1], str(empty)], "holds no PNG/JPEG"),
      ([*own[:-1], str(broken)], "cannot read image"),
      ([*own[:-1], str(tmp_path / "missing.npz")], "missing.npz: does not exist"),
      ([*own[:-1], "tfds:cifar10"], "expected 'tfds:name/split'"),
      ([*own, "--triggered_eval", str(tiny["flat"])], "needs --target"),
      ([*own, "--clean_eval", str(tiny["flat"])], "has no labels"),
      ([*own, "--method", "fp"], "needs clean labelled images"),
      (own[:6], "--model needs --images"),
      ([*own, "--torch_checkpoint", "x.pt"], "give one of"),
      ([*own, "--out", str(tmp_path / "exists")], "already exists"),
      ([*own, "--set", "k=0"], "k"),
  ]


def test_bad_inputs_are_one_line_errors_before_any_work(tiny, tmp_path, monkeypatch):
  def no_defense(*a, **k):
    raise AssertionError("the defense ran on a bad input")
  real = launch_defend.get_defense
  monkeypatch.setattr(launch_defend, "get_defense",
                      lambda name: real(name)._replace(defend=no_defense))
  out = tmp_path / "out.msgpack"
  for argv, match in _bad_cases(tiny, tmp_path):
    if "--out" not in argv:
      argv = [*argv, "--out", str(out)]
    with pytest.raises(SystemExit) as e:
      launch_defend.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    assert match in msg, (match, msg)
    assert not out.exists()
  if os.geteuid() != 0:  # root writes anywhere
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
      with pytest.raises(SystemExit, match="not writable"):
        launch_defend.main(["--model", NET, "--model_args", ARGS, "--variables",
                            str(tiny["root"] / "net.msgpack"), "--images",
                            str(tiny["root"] / "train.npz"), "--out", str(ro / "o.msgpack")])
    finally:
      ro.chmod(0o700)


def test_tfds_spec_is_parsed_and_its_absence_named(monkeypatch):
  import sys
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
  with pytest.raises(assets.AssetError, match="tensorflow_datasets is not installed"):
    assets.load_images("tfds:cifar10/train")
  with pytest.raises(assets.AssetError, match="tfds:name/split"):
    assets.load_images("tfds:cifar10")


def test_tfds_load_failure_says_it_needs_to_download(monkeypatch):
  import sys
  import types
  fake = types.ModuleType("tensorflow_datasets")

  def load(name, split, **kw):
    assert (name, split) == ("cifar10", "train[:10]")
    raise ConnectionError("no network")
  fake.load = load
  fake.as_numpy = lambda x: x
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  with pytest.raises(assets.AssetError, match="download.*no network"):
    assets.load_images("tfds:cifar10/train[:10]")
  fake.load = lambda name, split, **kw: (np.zeros((3, 8, 8, 1), np.uint8), np.arange(3))
  got = assets.load_images("tfds:mnist/test")
  assert got.images.shape == (3, 8, 8, 3) and list(got.labels) == [0, 1, 2]



def test_orbax_forms_round_trip_and_mismatches_are_named(tiny, tmp_path):
  """The params alone (StandardCheckpointer) and a drr_jax run folder, read and written
  back in the same form; a model they do not fit is named with the offending shape."""
  from drr_jax import checkpoint
  model, v = tiny["model"], tiny["variables"]
  ckptr = ocp.StandardCheckpointer()
  ckptr.save((tmp_path / "p").absolute(), v["params"])
  ckptr.wait_until_finished()
  checkpoint.save(checkpoint.manager(tmp_path / "run" / "checkpoints"), 3, {"model": v})
  for src, fmt, params_only in [("p", "orbax", True), ("run", "orbax-run", False)]:
    got = assets.load_variables(tmp_path / src, model, (16, 16, 3))
    assert (got.format, got.params_only) == (fmt, params_only)
    assert not _changed(got.variables, v)
    assets.save_variables(got.variables, got, tmp_path / f"{src}-out")
    back = assets.load_variables(tmp_path / f"{src}-out", model, (16, 16, 3))
    assert (back.format, back.params_only) == (fmt, params_only)
    assert not _changed(back.variables, v)
    with pytest.raises(assets.AssetError, match="shape"):
      assets.load_variables(tmp_path / src, type(model)(num_classes=5), (16, 16, 3))
  with pytest.raises(assets.AssetError, match="already exists"):
    assets.save_variables(v, got, tmp_path / "p")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["p", "p-out", "run", "run-out"]
