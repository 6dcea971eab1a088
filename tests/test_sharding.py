"""Data parallelism (`drr_jax.sharding`): the same results on 8 devices as on one.

One script runs in two subprocesses, with 1 and with 8 virtual CPU devices
(--xla_force_host_platform_device_count, which must be set before JAX starts): batch
splitting and its padding, predictions, one data-parallel training step of a network with
BatchNorm, and `defend` with the defaults and with a setting that folds directions. The
8-device results must equal the 1-device ones to float tolerance (the partial sums are
added in another order), and the kept directions exactly.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from drr_jax import sharding
from tests import killing

CONFIGS = (("defaults", None),
           # folds without confirmation
           ("folding", {"mode": "one_pass", "confirm": False, "tau": 0.5}),
           # confirmed directions kept (the planted boundary is fragile: no collateral
           # gate)
           ("confirmed", {"max_collateral": 1.0, "max_class_collateral": 1.0}))

SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, optax
import flax.linen as nn
import drr_jax
from drr_jax import inference, sharding, stiefel, train
from tests.defend_dump import defend_all
from tests.tiny_net import TinyNet

out = {"devices": np.int64(jax.device_count())}
mesh = sharding.batch_mesh()

# shard_batch: 21 rows over the devices, padded with the last row
x = np.arange(21 * 3, dtype=np.float32).reshape(21, 3)
xs, n = sharding.shard_batch(x, mesh)
out["shard_n"] = np.int64(n)
out["shard_rows"] = np.asarray(xs)
out["shard_per_device"] = np.asarray([s.data.shape[0] for s in xs.addressable_shards]
                                     if isinstance(xs, jax.Array) else [len(xs)])
# batches: batch size 5 rounded up to whole device shares, the last batch padded
out["batches"] = np.asarray([(np.asarray(b).shape[0], m)
                             for b, m in sharding.batches(x, 5, mesh)])

rng = np.random.default_rng(0)
images = rng.integers(0, 256, (512, 32, 32, 3)).astype(np.uint8)
images[:51, -6:, -6:] = 255  # a 10 % group with a white corner patch
model = TinyNet(width=8)
variables = model.init(jax.random.key(0), images[:2])
# A planted backdoor, so that the confirmation sees real flips: the head sends images
# whose pooled features lie on the patch's side of a linear boundary to class 0.
h = np.asarray(drr_jax.features.capture(model, variables, images, train=False)[1]["head"])
patched = np.arange(len(images)) < 51
w = np.linalg.solve(np.cov(h.T) + 1e-6 * np.eye(h.shape[1]),
                    h[patched].mean(0) - h[~patched].mean(0))
lo, hi = np.median(h[~patched] @ w), np.median(h[patched] @ w)
kernel = np.asarray(variables["params"]["head"]["kernel"]).copy()
bias = np.asarray(variables["params"]["head"]["bias"]).copy()
kernel[:, 0], bias[0] = w * 20 / (hi - lo), -10 * (hi + lo) / (hi - lo)
head = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}
variables = {"params": {**variables["params"], "head": head}}
for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
  out["initial" + jax.tree_util.keystr(path)] = np.asarray(leaf)
out["predict"] = inference.predict(model, variables, images[:203], 100, progress=False)

# the moments over 203 rows: 5 padding rows on 8 devices, masked out of every sum
feats = rng.gamma(2.0, size=(2, 203, 6)).astype(np.float32)
for search in ("joint", "multistart"):
  res = stiefel.maximize(feats[0], 3, steps=50, lr=0.1, search=search)
  out["search " + search] = np.asarray(res.values)
  out["frame " + search] = np.asarray(res.frame)
stacked = stiefel.maximize_stacked(feats, 2, steps=50, lr=0.1, search="greedy")
out["search stacked"] = np.asarray(stacked.values)
out["frame stacked"] = np.asarray(stacked.frame)

class BNNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(jnp.float32) / 255.0
    x = nn.Conv(8, (3, 3), name="conv")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.5, name="bn")(x))
    return nn.Dense(10, name="head")(jnp.mean(x, axis=(1, 2)))

# one training step on a batch whose device shares differ: dark, then bright images
batch = np.concatenate([rng.integers(0, 40, (8, 32, 32, 3)),
                        rng.integers(215, 256, (8, 32, 32, 3))]).astype(np.uint8)
labels = rng.integers(0, 10, 16).astype(np.int32)
net, tx = BNNet(), optax.sgd(0.1, momentum=0.9)
state = train.init_state(net, tx, jax.random.key(1))
step = train.make_update_fn(net, tx, augment=True)
new, metrics = step(state, batch, labels, jax.random.key(2))
new = sharding.to_host(new)
for path, leaf in jax.tree_util.tree_leaves_with_path(
    {"params": new["params"], "batch_stats": new["batch_stats"]}):
  out["step" + jax.tree_util.keystr(path)] = np.asarray(leaf)
out["step loss"] = np.float64(metrics["loss"])
# what one device's share alone (2 of 16 images on 8 devices) would make of BatchNorm
if jax.device_count() == 1:
  alone, _ = train.make_update_fn(net, tx, augment=False)(state, batch[:2], labels[:2],
                                                          jax.random.key(2))
  out["alone mean"] = np.asarray(alone["batch_stats"]["bn"]["mean"])
  plain, _ = train.make_update_fn(net, tx, augment=False)(state, batch, labels,
                                                          jax.random.key(2))
  out["whole mean"] = np.asarray(plain["batch_stats"]["bn"]["mean"])

out.update(defend_all(model, variables, images, CONFIGS))
np.savez(OUT, **out)
print("devices", jax.device_count())
"""

FLAGS = "--xla_backend_optimization_level=0"  # as tests/conftest.py: faster compiles


def _start(path, devices: int) -> tuple[subprocess.Popen, str]:
  flags = FLAGS + (f" --xla_force_host_platform_device_count={devices}" if devices > 1
                   else "")
  env = {**os.environ, "PYTHONPATH": killing.ROOT, "XLA_FLAGS": flags,
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen([sys.executable, "-c",
                           f"OUT = {str(path)!r}\nCONFIGS = {CONFIGS!r}\n" + SCRIPT],
                          cwd=killing.ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  return proc, str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{1: results with one device, 8: with eight}, the two processes run side by side."""
  folder = tmp_path_factory.mktemp("sharding")
  started = {d: _start(folder / f"d{d}.npz", d) for d in (1, 8)}
  out = {}
  for d, (proc, path) in started.items():
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    assert f"devices {d}" in stdout, stdout
    out[d] = dict(np.load(path))
  return out


def test_one_device_is_the_identity():
  mesh = sharding.batch_mesh(jax.devices()[:1])
  x = np.arange(10).reshape(5, 2)
  y, n = sharding.shard_batch(x, mesh)
  assert y is x and n == 5
  tree = {"a": x}
  assert sharding.replicate(tree, mesh) is tree
  assert sharding.padded(7, mesh) == 7


def test_masked_moments_ignore_padding_rows():
  from drr_jax import stiefel
  x = np.random.default_rng(0).gamma(2.0, size=(203, 6)).astype(np.float32)
  padded = np.concatenate([x, np.repeat(x[-1:], 5, 0)])
  mask = np.arange(208) < 203
  frame = np.linalg.qr(np.random.default_rng(1).normal(size=(6, 3)))[0].astype(np.float32)
  want = np.asarray(stiefel.criterion(stiefel.center(x), frame, True))
  got = np.asarray(stiefel.criterion(stiefel.center(padded, mask), frame, True, mask))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  unmasked = np.asarray(stiefel.criterion(stiefel.center(padded), frame, True))
  assert np.max(np.abs(unmasked - want)) > 1e-3  # the padding rows would show


def test_shard_batch_pads_to_whole_device_shares(runs):
  r = runs[8]
  assert int(r["devices"]) == 8
  assert int(r["shard_n"]) == 21
  assert r["shard_rows"].shape == (24, 3)
  assert list(r["shard_per_device"]) == [3] * 8
  x = np.arange(21 * 3, dtype=np.float32).reshape(21, 3)
  np.testing.assert_array_equal(r["shard_rows"][:21], x)  # unpadded: the rows as given
  np.testing.assert_array_equal(r["shard_rows"][21:], np.repeat(x[-1:], 3, 0))
  assert int(runs[1]["shard_n"]) == 21 and runs[1]["shard_rows"].shape == (21, 3)
  assert r["batches"].tolist() == [[8, 8], [8, 8], [8, 5]]
  assert runs[1]["batches"].tolist() == [[5, 5]] * 4 + [[5, 1]]


def test_batches_have_one_size_pad_with_the_last_image_and_give_true_lengths():
  mesh = sharding.batch_mesh(jax.devices()[:1])
  x = np.arange(12)[:, None]
  got = list(sharding.batches(x, 5, mesh))
  assert [m for _, m in got] == [5, 5, 2]
  assert [len(b) for b, _ in got] == [5, 5, 5]  # one compiled program for all
  assert got[-1][0][:, 0].tolist() == [10, 11, 11, 11, 11]
  lone = list(sharding.batches(x[:3], 5, mesh))  # a lone short batch is not padded
  assert [(len(b), m) for b, m in lone] == [(3, 3)]


def test_predictions_on_8_devices_equal_one(runs):
  assert runs[8]["predict"].shape == (203,)
  np.testing.assert_array_equal(runs[8]["predict"], runs[1]["predict"])


def test_search_on_8_devices_equals_one_with_padding_rows_masked(runs):
  one, eight = runs[1], runs[8]
  for key in ("search joint", "search multistart", "search stacked", "frame joint",
              "frame multistart", "frame stacked"):
    np.testing.assert_allclose(eight[key], one[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_training_step_on_8_devices_equals_one_with_synchronized_batchnorm(runs):
  one, eight = runs[1], runs[8]
  keys = [k for k in one if k.startswith("step")]
  assert any("batch_stats" in k for k in keys)
  for k in keys:
    np.testing.assert_allclose(eight[k], one[k], rtol=1e-4, atol=1e-5, err_msg=k)
  # the test can tell: per-device BatchNorm statistics (one device's 2 dark images)
  # would be far from those of the whole batch
  assert np.max(np.abs(one["alone mean"] - one["whole mean"])) > 1e-2


STATS = ("tail_frac", "tail_flip", "collateral", "class_collateral")


@pytest.mark.parametrize("name", [name for name, _ in CONFIGS])
def test_defend_on_8_devices_equals_one(runs, name):
  one, eight = runs[1], runs[8]
  ra = json.loads(one[name + " report"].tobytes())
  rb = json.loads(eight[name + " report"].tobytes())
  assert rb["layers_projected"] == ra["layers_projected"]
  assert rb["directions_kept"] == ra["directions_kept"]
  assert [(e["layer"], e["kept"]) for e in rb["layers"]] == [
      (e["layer"], e["kept"]) for e in ra["layers"]]
  for ea, eb in zip(ra["layers"], rb["layers"]):
    np.testing.assert_allclose(eb["criterion"], ea["criterion"], rtol=1e-3, atol=1e-3,
                               err_msg=ea["layer"])  # moments reduced across devices
    np.testing.assert_allclose(np.asarray(eb["directions"]), np.asarray(ea["directions"]),
                               rtol=1e-4, atol=1e-5, err_msg=ea["layer"])
    # the confirmation's predictions of every trial network
    assert [[c.get(k) for k in STATS] for c in eb["checks"]] == [
        [c.get(k) for k in STATS] for c in ea["checks"]], ea["layer"]
  params = [k for k in one if k.startswith(name + "[")]
  assert params
  for k in params:
    np.testing.assert_allclose(eight[k], one[k], rtol=1e-4, atol=1e-5, err_msg=k)
  if name != "defaults":  # the equality covers real folds
    assert ra["directions_kept"] > 0, ra
    assert any(not np.array_equal(one[k], one["initial" + k[len(name):]]) for k in params)
  else:  # ... and the defaults' confirmation saw real flips
    assert any(c["tail_flip"] > 0.5 for e in ra["layers"] for c in e["checks"])


def test_defend_bench_runs_each_device_count_in_its_own_process(capsys):
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "_bench_defend", os.path.join(killing.ROOT, "benchmarks", "defend_bench.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  out = bench.main(["--synthetic", "--n", "16", "--modes", "floor", "--devices", "2",
                    "--models", f"random:{killing.ROOT}/tests/tiny_net.py:TinyNet"])
  (record,) = out["records"]
  assert record["environment"]["mesh_devices"] == 2
  assert record["results"][0]["runs"]["floor"]["seconds"] > 0
  assert "2 dev s" in capsys.readouterr().out
