from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drr_jax import defend as _defend
from drr_jax import features
from drr_jax.defenses import DefenseError
from drr_jax.defenses.drr import DRRConfig, channel_link, format_report, same_input

# These tests check the layer-by-layer machinery (input side, the tau gate, confirmation
# in network order, carrying); they name those settings rather than rely on the defaults.
SEQUENTIAL = {"side": "input", "mode": "sequential", "tau": 2.0, "min_tail_flip": 0.75,
              "max_class_collateral": 1.0}


def defend(model, variables, batch, *, config=None, progress=True):
  if not isinstance(config, DRRConfig):
    config = {**SEQUENTIAL, **(config or {})}
  return _defend(model, variables, batch, config=config, progress=progress)


class MLP(nn.Module):
  """Flattens (N, H, W, C) 'images' -> Dense -> relu -> Dense."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(len(x), -1).astype(jnp.float32)
    x = nn.relu(nn.Dense(16, name="hidden")(x))
    return nn.Dense(4, name="head")(x)


class ConvBN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(jnp.float32) / 255.0
    x = nn.Conv(8, (3, 3), use_bias=False, name="conv")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))
    return nn.Dense(3, name="head")(jnp.mean(x, axis=(1, 2)))


class Residual(nn.Module):
  """A residual block without BatchNorm and a Dense head."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(6, (3, 3), name="stem")(x.astype(jnp.float32) / 255.0))
    y = nn.relu(nn.Conv(6, (3, 3), name="block_a")(x))
    y = nn.Conv(6, (3, 3), name="block_b")(y)
    x = nn.relu(x + y)
    return nn.Dense(5, name="head")(x.reshape(len(x), -1))


def _gaussian(n=4000, shape=(2, 2, 2), seed=0):
  return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def _init(model, x):
  return model.init(jax.random.key(0), jnp.asarray(x[:2]))


def _same(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda p, q: np.array_equal(p, q), a, b)))


def test_clean_gaussian_keeps_nothing_and_returns_params_unchanged():
  x = _gaussian()
  v = _init(MLP(), x)
  for mode in ("sequential", "one_pass"):
    new, report = defend(MLP(), v, x, config={"mode": mode}, progress=False)
    assert report["directions_kept"] == 0, report
    assert _same(new["params"], v["params"])
    # the classifier ('head') is skipped by default
    assert [e["layer"] for e in report["layers"]] == ["hidden"]


def test_a_skewed_cluster_is_found_and_projected_out():
  x = _gaussian(seed=1).reshape(4000, -1)
  d = np.random.default_rng(2).normal(size=x.shape[1])
  d /= np.linalg.norm(d)
  x[:400] += 12.0 * d  # a 10 % cluster 12 sigma away: skewness ~2.4 (ceiling 2.67)
  x = x.reshape(4000, 2, 2, 2)
  v = _init(MLP(), x)
  new, report = defend(MLP(), v, x, config={"layers": ["hidden"], "k": 1, "confirm": False},
                       progress=False)
  (entry,) = report["layers"]
  assert entry["kept"] == 1 and entry["criterion"][0] > 2.0, entry
  kernel = np.asarray(new["params"]["hidden"]["kernel"])
  old = np.asarray(v["params"]["hidden"]["kernel"])
  assert np.linalg.norm(d @ kernel) < 0.05 * np.linalg.norm(d @ old)  # d no longer passes
  # a direction orthogonal to d passes unchanged
  e = np.random.default_rng(3).normal(size=d.shape)
  e -= (e @ d) * d
  np.testing.assert_allclose(e @ kernel, e @ old, atol=0.05 * np.linalg.norm(e @ old))


@pytest.mark.parametrize("model", [ConvBN(), Residual()], ids=["conv_bn", "residual"])
@pytest.mark.parametrize("side", ["input", "output"])
def test_models_the_library_never_saw(model, side):
  x = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 3)).astype(np.uint8)
  v = _init(model, x)
  new, report = defend(model, v, x, config={"tau": 0.0, "side": side, "steps": 20,
                                            "batch_size": 16, "confirm": False,
                                            "skip_classifier": False}, progress=False)
  names = [e["layer"] for e in report["layers"]]
  assert names == features.layer_order(model, v, x.shape[1:])
  assert set(names) == set(features.layer_kernels(v["params"]))
  assert jax.tree.structure(new) == jax.tree.structure(v)
  assert report["directions_kept"] > 0 and not _same(new["params"], v["params"])
  assert np.all(np.isfinite(model.apply(new, x)))


def test_apply_function_and_iterable_batches():
  x = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 3)).astype(np.uint8)
  model = ConvBN()
  v = _init(model, x)
  apply = lambda variables, images: model.apply(variables, images, train=False)
  cfg = {"tau": 0.0, "steps": 10, "batch_size": 16, "confirm": False}
  a, ra = defend(model, v, x, config=cfg, progress=False)
  b, rb = defend(apply, v, [(x[:40], None), (x[40:], None)], config=cfg, progress=False)
  assert [e["layer"] for e in ra["layers"]] == [e["layer"] for e in rb["layers"]]
  jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-4, atol=1e-5), a, b)


def test_bad_inputs_name_the_problem():
  x = np.random.default_rng(0).integers(0, 256, (32, 8, 8, 3)).astype(np.uint8)
  model = ConvBN()
  v = _init(model, x)
  cases = [
      (np.zeros((0, 8, 8, 3), np.uint8), {}, "at least 2"),
      ([], {}, "empty"),
      (x[:, :, :, 0], {}, r"\(N, H, W, C\)"),
      (np.full((4, 8, 8, 3), np.nan, np.float32), {}, "NaN"),
      (x, {"k": 0}, "k must be"),
      (x, {"k": 9, "search": "joint"}, "exceeds"),
      (x, {"search": "sideways"}, "search"),
      (x, {"tau": -1.0}, "tau"),
      (x, {"side": "middle"}, "side"),
      (x, {"layers": ["nope"]}, "unknown layer"),
      (x, {"colour": 1}, "unknown DRR setting"),
  ]
  for batch, cfg, msg in cases:
    with pytest.raises(DefenseError, match=msg):
      defend(model, v, batch, config=cfg, progress=False)
  wrong = jax.tree.map(lambda a: a, v)
  wrong["params"]["conv"]["kernel"] = jnp.zeros((3, 3, 3, 5))
  with pytest.raises(DefenseError, match="do not fit the model"):
    defend(model, wrong, x, progress=False)


def test_nan_features_are_reported_with_their_layer():
  x = np.random.default_rng(0).integers(0, 256, (32, 8, 8, 3)).astype(np.uint8)
  model = ConvBN()
  v = _init(model, x)
  v = jax.tree.map(lambda a: a, v)
  v["params"]["conv"]["kernel"] = v["params"]["conv"]["kernel"].at[0, 0, 0, 0].set(jnp.nan)
  with pytest.raises(DefenseError, match="'conv' contain NaN"):
    defend(model, v, x, config={"side": "output"}, progress=False)


class Linear(nn.Module):
  """feat (identity) -> cls: class = argmax of the first 10 coordinates, plus a
  backdoor read from coordinate 10 (pushes to class 0); coordinate 11 is ignored."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(len(x), -1).astype(jnp.float32)
    return nn.Dense(10, name="cls")(nn.Dense(12, name="feat")(x))


def _linear_params():
  w = np.zeros((12, 10), np.float32)
  w[:10] = np.eye(10)
  w[10, 0] = 3.0
  return {"params": {"feat": {"kernel": jnp.eye(12), "bias": jnp.zeros(12)},
                     "cls": {"kernel": jnp.asarray(w), "bias": jnp.zeros(10)}}}


def test_confirmation_keeps_a_direction_that_decides_a_skewed_group():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4000, 12)).astype(np.float32)
  x[:, 10] *= 0.3
  x[:400, 10] += 12.0  # the poisoned 10 %: far along coordinate 10 -> class 0
  v = _linear_params()
  cfg = {"layers": ["feat"], "tau": 1.5, "confirm_samples": 2000}
  new, report = defend(Linear(), v, x.reshape(4000, 3, 2, 2), config=cfg, progress=False)
  (entry,) = report["layers"]
  assert entry["kept"] == 1 and entry["checks"][0]["tail_flip"] > 0.75, entry
  (direction,) = np.asarray(entry["directions"])  # the removed unit vector: coordinate 10
  assert abs(np.linalg.norm(direction) - 1) < 1e-6 and abs(direction[10]) > 0.95
  truth = np.argmax(x[:400, :10], -1)
  agree = lambda variables: np.mean(truth == np.argmax(np.asarray(
      Linear().apply(variables, x[:400].reshape(400, 3, 2, 2))), -1))
  assert agree(v) < 0.2 and agree(new) > 0.9  # the group's own classes are back


def test_confirmation_rejects_a_skewed_direction_the_model_ignores():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4000, 12)).astype(np.float32)
  x[:, 10] *= 0.3
  x[:, 11] = rng.exponential(size=4000)  # skewness 2, no weight in cls
  v = _linear_params()
  cfg = {"layers": ["feat"], "tau": 1.5, "confirm_samples": 2000}
  x = x.reshape(4000, 3, 2, 2)
  new, report = defend(Linear(), v, x, config=cfg, progress=False)
  (entry,) = report["layers"]
  assert entry["criterion"][0] > 1.5 and entry["kept"] == 0, entry
  assert entry["checks"][0]["tail_flip"] < 0.5
  _, plain = defend(Linear(), v, x, config={**cfg, "confirm": False}, progress=False)
  assert plain["layers"][0]["kept"] == 1  # the paper's rule alone would project it


class ClassReader(nn.Module):
  """feat (identity) -> cls: class 0 only while coordinate 10 is high (its tail), and
  the others tilted by coordinate 10 too, so that removing it moves many of them."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(len(x), -1).astype(jnp.float32)
    return nn.Dense(10, name="cls")(nn.Dense(12, name="feat")(x))


def test_confirmation_rejects_a_direction_whose_removal_moves_other_images():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4000, 12)).astype(np.float32)
  x[:, 10] *= 0.3
  x[:400, 10] += 12.0  # a skewed group that coordinate 10 sends to class 0
  v = _linear_params()
  w = np.asarray(v["params"]["cls"]["kernel"]).copy()
  w[10, 1:] = np.linspace(-0.6, 0.6, 9)  # every other class reads coordinate 10 as well
  v["params"]["cls"]["kernel"] = jnp.asarray(w)
  v["params"]["cls"]["bias"] = jnp.asarray([0.0] + [0.0] * 9)
  cfg = {"layers": ["feat"], "tau": 1.5, "confirm_samples": 2000, "keep_mean": False}
  images = x.reshape(4000, 3, 2, 2)
  _, loose = defend(ClassReader(), v, images, config={**cfg, "max_collateral": 1.0},
                    progress=False)
  check = loose["layers"][0]["checks"][0]
  assert loose["layers"][0]["kept"] == 1 and check["tail_flip"] > 0.75
  assert 0.15 < check["collateral"] < 1.0  # zeroing coordinate 10 moves the others too
  _, strict = defend(ClassReader(), v, images, config=cfg, progress=False)
  assert strict["layers"][0]["kept"] == 0
  assert strict["layers"][0]["checks"][0]["collateral"] == check["collateral"]
  with pytest.raises(DefenseError, match="max_collateral"):
    defend(ClassReader(), v, images, config={"max_collateral": 2.0}, progress=False)


def test_rounds_revisit_a_layer_only_while_directions_are_kept():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4000, 12)).astype(np.float32)
  x[:, 10] *= 0.3
  x[:400, 10] += 12.0
  v = _linear_params()
  cfg = {"layers": ["feat"], "tau": 1.5, "confirm_samples": 2000, "rounds": 3}
  new, report = defend(Linear(), v, x.reshape(4000, 3, 2, 2), config=cfg, progress=False)
  # round 1 removes the backdoor direction, round 2 finds nothing to confirm and stops
  assert [e["kept"] for e in report["layers"]] == [1, 0]
  assert report["feature_passes"] == 2
  with pytest.raises(DefenseError, match="rounds"):
    defend(Linear(), v, x.reshape(4000, 3, 2, 2), config={"rounds": 0}, progress=False)


def test_keep_mean_restores_the_benign_value_where_zeroing_breaks_a_class():
  # coordinate 10 has a benign mean of 5 that class 0 relies on (its bias cancels 3 * 5):
  # zeroing the backdoor direction takes class 0 away; replacing it by the benign mean
  # (the mean outside the skewed tail) keeps every clean prediction.
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4000, 12)).astype(np.float32)
  x[:, 10] = 5.0 + 0.05 * x[:, 10]
  x[:400, 10] += 12.0
  v = _linear_params()
  v["params"]["cls"]["bias"] = jnp.asarray([-15.0] + [0.0] * 9)
  cfg = {"layers": ["feat"], "tau": 1.5, "confirm_samples": 2000}
  images = x.reshape(4000, 3, 2, 2)
  truth = np.argmax(x[:, :10], -1)
  acc = lambda variables, rows: np.mean(truth[rows] == np.argmax(np.asarray(
      Linear().apply(variables, images[rows])), -1))
  clean = slice(400, 4000)
  assert acc(v, clean) > 0.97 and acc(v, slice(0, 400)) < 0.2
  kept, report = defend(Linear(), v, images, config=cfg, progress=False)
  zeroed, _ = defend(Linear(), v, images, config={**cfg, "keep_mean": False},
                     progress=False)
  assert report["layers"][0]["kept"] == 1 and report["layers"][0]["checks"][0]["mean_kept"]
  assert acc(kept, clean) > 0.97 and acc(kept, slice(0, 400)) > 0.9
  assert acc(zeroed, clean) < 0.93  # class 0 is gone
  with pytest.raises(DefenseError, match="direction"):
    defend(Linear(), v, images, config={"direction": "mean"}, progress=False)


class LocalTrigger(nn.Module):
  """A 1x1 conv 'feat' (identity) over 3x3 maps of 12 channels, then the Linear head on
  each channel's spatial max: class = argmax of channels 0-9, plus 3 x channel 10."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(12, (1, 1), name="feat")(x.astype(jnp.float32))
    return nn.Dense(10, name="cls")(jnp.max(x, axis=(1, 2)))


def _local_trigger_data(n=4000, poison=400, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 3, 3, 12)).astype(np.float32)
  x[..., 10] *= 0.05  # quiet in clean images, so its removal moves only the poisoned
  where = rng.integers(0, 9, poison)
  x.reshape(n, 9, 12)[np.arange(poison), where, 10] += 12.0  # a local trigger
  return x, where


def _local_trigger_params():
  p = _linear_params()
  p["params"]["feat"]["kernel"] = jnp.eye(12).reshape(1, 1, 12, 12)
  return p


def test_located_fn_returns_each_images_feature_where_the_direction_fires():
  x, where = _local_trigger_data(n=64, poison=64)
  v = jnp.zeros(12).at[10].set(1.0)
  rows = features.located_fn(LocalTrigger(), "feat")(_local_trigger_params(), x, v)
  np.testing.assert_array_equal(np.asarray(rows), x.reshape(64, 9, 12)[np.arange(64), where])
  dense = features.located_fn(Linear(), "cls")(_linear_params(), x[:4, :1, :1], v)
  assert dense.shape == (4, 12)  # a dense layer's feature is returned as it is


def test_locate_keeps_the_better_of_the_pooled_and_located_estimates():
  x, _ = _local_trigger_data()
  v = _local_trigger_params()
  cfg = {"layers": ["feat"], "tau": 1.5, "confirm_samples": 2000}
  new, report = defend(LocalTrigger(), v, x, config=cfg, progress=False)
  (entry,) = report["layers"]
  check = entry["checks"][0]
  assert entry["kept"] == 1
  assert check["tail_flip"] == max(check["pooled_flip"], check["located_flip"]) > 0.75
  truth = np.argmax(x[:400].reshape(400, 9, 12)[..., :10].max(1), -1)
  pred = lambda variables: np.argmax(np.asarray(LocalTrigger().apply(variables, x[:400])), -1)
  assert np.mean(pred(v) == truth) < 0.2 and np.mean(pred(new) == truth) > 0.9
  _, plain = defend(LocalTrigger(), v, x, config={**cfg, "locate": False}, progress=False)
  assert "located_flip" not in plain["layers"][0]["checks"][0]
  for bad, match in (({"locate": 1}, "locate"), ({"mean_fit": "border"}, "mean_fit")):
    with pytest.raises(DefenseError, match=match):
      defend(LocalTrigger(), v, x, config=bad, progress=False)


def test_tail_overlap_keeps_later_directions_only_for_the_same_images():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(4000, 12)).astype(np.float32)
  x[:, 10:] *= 0.3
  x[:400, 10] += 12.0     # group A: coordinate 10 -> class 0
  x[400:800, 11] += 12.0  # group B, other images: coordinate 11 -> class 1
  v = _linear_params()
  w = np.asarray(v["params"]["cls"]["kernel"]).copy()
  w[11, 1] = 3.0
  v["params"]["cls"]["kernel"] = jnp.asarray(w)
  cfg = {"layers": ["feat"], "tau": 1.5, "confirm_samples": 2000, "max_collateral": 1.0}
  images = x.reshape(4000, 3, 2, 2)
  _, both = defend(Linear(), v, images, config={**cfg, "tail_overlap": None},
                   progress=False)
  assert both["layers"][0]["kept"] == 2
  _, one = defend(Linear(), v, images, config={**cfg, "tail_overlap": 0.5}, progress=False)
  (entry,) = one["layers"]
  assert entry["kept"] == 1
  skipped = [c for c in entry["checks"] if "overlap" in c]
  assert skipped and all(c["overlap"] < 0.05 for c in skipped)
  with pytest.raises(DefenseError, match="tail_overlap"):
    defend(Linear(), v, images, config={"tail_overlap": 1.5}, progress=False)


class Stream(nn.Module):
  """stem (identity) -> stream s; branch reads s; cls reads s + branch(s): the identity
  shortcut carries the stream's channels past the branch to the classifier."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    s = nn.Dense(12, name="stem")(x.reshape(len(x), -1).astype(jnp.float32))
    return nn.Dense(10, name="cls")(s + nn.Dense(12, name="branch")(s))


def _stream_case(n=4000, poison=400, seed=3):
  """Images whose first 10 coordinates give the class, and a poisoned 10 % pushed to
  class 0 along coordinate 10, read both by the branch (4 parts) and, through the
  shortcut, by the classifier directly (1 part)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 12)).astype(np.float32)
  x[:, 10:] *= 0.1
  x[:poison, 10] += rng.uniform(1.5, 5.0, poison)
  branch = np.zeros((12, 12), np.float32)
  branch[10, 10] = 4.0
  cls = np.zeros((12, 10), np.float32)
  cls[:10] = np.eye(10)
  cls[10, 0] = 0.4
  dense = lambda k: {"kernel": jnp.asarray(k), "bias": jnp.zeros(k.shape[1])}
  v = {"params": {"stem": dense(np.eye(12, dtype=np.float32)), "branch": dense(branch),
                  "cls": dense(cls)}}
  return x.reshape(n, 3, 2, 2), v, np.argmax(x[:poison, :10], -1)


class Widening(nn.Module):
  """stem (identity) -> s; a 1x1-style shortcut, called first, and the branch both read s
  and widen it to 16; cls reads their sum: the WRN first-block layout, where the
  shortcut's input is the branch's input but the model calls the shortcut earlier."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    s = nn.Dense(12, name="stem")(x.reshape(len(x), -1).astype(jnp.float32))
    shortcut = nn.Dense(16, name="shortcut")(s)
    return nn.Dense(10, name="cls")(shortcut + nn.Dense(16, name="branch")(s))


def _widening_case():
  images, v, truth = _stream_case()
  dense = lambda k: {"kernel": jnp.asarray(k), "bias": jnp.zeros(k.shape[1])}
  shortcut, branch = np.eye(12, 16, dtype=np.float32), np.zeros((12, 16), np.float32)
  branch[10, 10] = 4.0
  cls = np.zeros((16, 10), np.float32)
  cls[:10] = np.eye(10)
  cls[10, 0] = 0.4
  v = {"params": {"stem": v["params"]["stem"], "shortcut": dense(shortcut),
                  "branch": dense(branch), "cls": dense(cls)}}
  return images, v, truth


def test_same_input_finds_the_readers_of_one_tensor():
  a = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
  got = same_input({"x": a, "y": a.copy(), "z": a + 0.01, "w": a[:, :4]})
  assert got == {"x": ["y"], "y": ["x"], "z": [], "w": []}


def test_carry_reaches_a_reader_of_the_same_tensor_called_earlier():
  images, v, truth = _widening_case()
  cfg = {"layers": ["shortcut", "branch"], "tau": 1.5, "confirm_samples": 2000,
         "min_tail_flip": 0.3}
  agree = lambda variables: np.mean(truth == np.argmax(np.asarray(
      Widening().apply(variables, images[:len(truth)])), -1))
  alone, rep_alone = defend(Widening(), v, images, config={**cfg, "carry": False},
                            progress=False)
  new, report = defend(Widening(), v, images, config=cfg, progress=False)
  # The shortcut alone carries too little of the trigger for its own candidate to flip
  # the tail; the branch's is kept, and the rest goes through the shortcut.
  assert rep_alone["layers_projected"] == ["branch"]
  assert _same(alone["params"]["shortcut"], v["params"]["shortcut"])
  kept = [c for c in report["carried"] if c["kept"]]
  assert [(c["from"], c["to"]) for c in kept] == [("branch", "shortcut")], report["carried"]
  assert kept[0]["link"] > 0.99 and kept[0]["tail_flip"] >= 0.5
  assert report["layers_projected"] == ["branch", "shortcut"]
  assert agree(v) < 0.2 and agree(alone) < 0.8 and agree(new) > 0.85, (
      agree(v), agree(alone), agree(new))


def test_channel_link_tells_shared_channels_from_unrelated_ones():
  a = np.random.default_rng(0).normal(size=(2000, 16))
  assert channel_link(a, 2.0 * a + 0.3 * np.random.default_rng(1).normal(size=a.shape)) > 0.9
  assert abs(channel_link(a, a[:, ::-1])) < 0.1  # the same values, other channels


def test_carry_removes_a_kept_direction_where_a_shortcut_delivers_it_too():
  images, v, truth = _stream_case()
  cfg = {"layers": ["branch"], "tau": 1.5, "confirm_samples": 2000, "min_tail_flip": 0.3}
  agree = lambda variables: np.mean(truth == np.argmax(np.asarray(
      Stream().apply(variables, images[:len(truth)])), -1))
  alone, rep_alone = defend(Stream(), v, images, config={**cfg, "carry": False},
                            progress=False)
  new, report = defend(Stream(), v, images, config=cfg, progress=False)
  assert rep_alone["carried"] == [] and rep_alone["layers_projected"] == ["branch"]
  assert _same(alone["params"]["cls"], v["params"]["cls"])
  (c,) = report["carried"]
  assert (c["from"], c["to"], c["kept"]) == ("branch", "cls", True), c
  assert c["link"] > 0.9 and c["tail_flip"] >= 0.5
  assert report["layers_projected"] == ["branch", "cls"]
  assert "carried branch -> cls" in format_report(report)
  assert abs(np.asarray(c["direction"])[10]) > 0.95  # the stream's coordinate 10
  assert agree(v) < 0.2 and agree(alone) < 0.8 and agree(new) > 0.85, (
      agree(v), agree(alone), agree(new))
  _, one_pass = defend(Stream(), v, images, config={**cfg, "mode": "one_pass"},
                       progress=False)
  assert one_pass["carried"] == [] and one_pass["layers_projected"] == ["branch"]
  with pytest.raises(DefenseError, match="carry_link"):
    defend(Stream(), v, images, config={"carry_link": 2.0}, progress=False)


def test_sites_remove_a_stream_direction_in_every_path_without_carrying():
  """side='sites': the stream s is read by the branch and by the identity shortcut, so it
  is no input site of the branch; its producer's output site (or the stem's input) is,
  and removing the direction there reaches both paths at once."""
  images, v, truth = _stream_case()
  cfg = {"side": "sites", "tau": 1.5, "confirm_samples": 2000, "min_tail_flip": 0.3}
  agree = lambda variables: np.mean(truth == np.argmax(np.asarray(
      Stream().apply(variables, images[:len(truth)])), -1))
  new, report = defend(Stream(), v, images, config=cfg, progress=False)
  visited = [e["layer"] for e in report["layers"]]
  assert "branch:in" not in visited and "stem:out" in visited + report["layers_projected"]
  assert report["carried"] == []
  assert report["layers_projected"] and report["layers_projected"][0] in ("stem:in",
                                                                            "stem:out")
  assert agree(v) < 0.2 and agree(new) > 0.85, (agree(v), agree(new))
  _, one_pass = defend(Stream(), v, images, config={**cfg, "mode": "one_pass"},
                       progress=False)
  assert one_pass["layers_projected"]
  with pytest.raises(DefenseError, match="unknown layer"):
    defend(Stream(), v, images, config={**cfg, "layers": ["nope"]}, progress=False)


def _class_direction_case(seed=0):
  """Class 3 is told apart by coordinate 10 (how high it is varies within the class), so
  its most extreme members form a skewed tail, and removing the coordinate moves the
  rest of the class too: a class direction, not a trigger."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(4000, 12)).astype(np.float32)
  x[:, 10] *= 0.3
  x[:600, 10] += rng.uniform(1.5, 8.0, 600)
  v = _linear_params()
  w = np.asarray(v["params"]["cls"]["kernel"]).copy()
  w[10] = 0.0
  w[10, 3] = 3.0
  v["params"]["cls"]["kernel"] = jnp.asarray(w)
  return x.reshape(4000, 3, 2, 2), v


def test_class_collateral_tells_a_class_direction_from_a_trigger():
  cfg = {"layers": ["feat"], "tau": 1.5, "confirm_samples": 2000, "keep_mean": False,
         "max_collateral": 1.0}
  images, v = _class_direction_case()
  _, off = defend(Linear(), v, images, config=cfg, progress=False)
  check = off["layers"][0]["checks"][0]
  assert off["layers"][0]["kept"] == 1 and check["tail_flip"] > 0.75  # looks like a trigger
  assert check["class_collateral"] > 0.5  # but the rest of its class moves too
  _, on = defend(Linear(), v, images, config={**cfg, "max_class_collateral": 0.5},
                 progress=False)
  assert on["layers"][0]["kept"] == 0
  # a trigger's removal leaves the clean images of its target class alone (the trigger
  # channel is quiet on clean images)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4000, 12)).astype(np.float32)
  x[:, 10] *= 0.05
  x[:400, 10] += 12.0
  _, trig = defend(Linear(), _linear_params(), x.reshape(4000, 3, 2, 2),
                   config={**cfg, "max_class_collateral": 0.5}, progress=False)
  assert trig["layers"][0]["kept"] == 1
  assert trig["layers"][0]["checks"][0]["class_collateral"] < 0.2


def test_images_on_the_wrong_scale_are_refused_for_pixel_models():
  """drr_jax's models read pixels 0..255: [0, 1] floats, out-of-range or bool images,
  and grey images would all run and defend a meaningless input."""
  from drr_jax.models import get_model
  model = get_model("vgg11", width=0.125)
  x = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3)).astype(np.uint8)
  v = model.init(jax.random.key(0), x[:1], train=False)
  cases = [
      (x.astype(np.float32) / 255.0, r"scaled to \[0, 1\]"),
      (x.astype(np.int32) * 2 - 100, "0..255"),
      (x > 128, "dtype bool"),
      ((x.astype(np.float32) - 128) / 64, "0..255"),
      (x[..., :1], "1 channel.*np.repeat"),
  ]
  for batch, msg in cases:
    with pytest.raises(DefenseError, match=msg):
      defend(model, v, batch, progress=False)
  # floats on the pixel scale are accepted (checked up to the point where work starts)
  from drr_jax.defenses.drr.inputs import as_images
  assert as_images(x.astype(np.float32), model).dtype == np.float32


def test_k_above_a_units_width_is_said_for_multistart():
  """multistart's k counts starts: a narrower unit gets one per channel, and the report
  says where; a frame search cannot, and fails."""
  from drr_jax.defenses.drr.inputs import LayerPlan, _check_k, capped_k
  plan = LayerPlan(["conv:in", "head:in"], "head", {"conv:in": 3, "head:in": 16})
  assert capped_k(DRRConfig(k=4), plan) == {"conv:in": 3}
  assert capped_k(DRRConfig(k=2), plan) == {}
  report = {"layers": [], "config": {"k": 4, "tau": 0.0, "confirm": True, "tail_z": 2.0,
                                     "min_tail_flip": 0.6}, "capped_k": {"conv:in": 3},
            "directions_kept": 0, "layers_projected": [], "feature_passes": 1,
            "seconds": 1.0}
  assert "k = 4 starts capped at the width of conv:in (3)" in format_report(report)
  with pytest.raises(DefenseError, match="exceeds the 5 channels"):
    _check_k(DRRConfig(k=8, search="joint", mode="sequential"), {"conv": 5}, "layer")
