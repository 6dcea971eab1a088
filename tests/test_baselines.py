"""The baseline defenses (FP, ANP, CLP, EP) and this project's rank-reduction versions
(RR-FP, RR-EP), each on a tiny model with a planted backdoor unit that it must find; the
paper's Figure 1 case; the registry and the command line."""
from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import drr_jax
from drr_jax.defenses import METHODS, DefenseError, get_defense, paper_config
from drr_jax.defenses import anp, clp, ep, fp, norms, rr_ep, rr_fp
from launch import defend as launch_defend

TARGET = 0


# --- data and models ---------------------------------------------------------------------

def _images(n: int, poisoned: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """8x8 RGB 'natural' images (a random brightness per image, pixel noise) and which of
  them carry the trigger (`_trigger`)."""
  rng = np.random.default_rng(seed)
  x = np.clip(rng.uniform(60, 190, (n, 1, 1, 1)) + rng.normal(0, 30, (n, 8, 8, 3)), 0, 255)
  hot = np.zeros(n, bool)
  hot[rng.permutation(n)[:int(round(poisoned * n))]] = True
  x = x.astype(np.uint8)
  x[hot] = _trigger(x[hot])
  return x, hot


def _pattern() -> np.ndarray:
  """(3, 3, 3) checkerboard of +-1."""
  return np.repeat((2 * (np.indices((3, 3)).sum(0) % 2 == 0) - 1.0)[:, :, None], 3, 2)


def _trigger(images: np.ndarray) -> np.ndarray:
  """The trigger: a +-60 checkerboard added to the top-left 3x3 corner."""
  out = images.astype(np.float64)
  out[:, :3, :3, :] += 60.0 * _pattern()[None]
  return np.clip(out, 0, 255).astype(np.uint8)


def _detector() -> np.ndarray:
  """A zero-sum 3x3 kernel (3, 3, 3) that answers the trigger: about 6 on it, N(0, 0.6)
  on the images' noise."""
  t = _pattern()
  return t - t.mean()


def _random_kernels(rng, channels: int, scale: float = 0.3) -> np.ndarray:
  """(3, 3, 3, channels) random kernels blind to brightness alone and to the trigger
  where it lies fully under them (zero-sum, orthogonal to the detector)."""
  k = rng.normal(0, scale, (27, channels))
  t = _detector().reshape(27, 1)
  k -= k.mean(0, keepdims=True)
  k -= t @ (t.T @ k) / float(np.sum(t * t))
  return k.reshape(3, 3, 3, channels)


class ConvBN(nn.Module):
  """conv (no bias) -> BatchNorm -> relu -> spatial mean -> dense head."""
  channels: int = 16
  classes: int = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(jnp.float32) / 255.0
    x = nn.Conv(self.channels, (3, 3), use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
    return nn.Dense(self.classes, name="head")(jnp.mean(nn.relu(x), axis=(1, 2)))


class ConvReLU(nn.Module):
  """conv (with bias) -> relu -> spatial mean -> dense head: no BatchNorm."""
  channels: int = 8

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(self.channels, (3, 3), name="conv")(x.astype(jnp.float32) / 255.0))
    return nn.Dense(4, name="head")(jnp.mean(x, axis=(1, 2)))


class Linear(nn.Module):
  """Flattens the 'image', a linear hidden layer, a dense head."""
  hidden: int = 8
  classes: int = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(len(x), -1).astype(jnp.float32)
    return nn.Dense(self.classes, name="head")(nn.Dense(self.hidden, name="hidden")(x))


class PreActish(nn.Module):
  """A BatchNorm fed by a conv and one fed by a residual sum."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(16, (3, 3), use_bias=False, name="stem")(x.astype(jnp.float32) / 255.0)
    y = nn.Conv(16, (3, 3), use_bias=False, name="conv1")(
        nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(x)))
    z = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn2")(x + y))
    return nn.Dense(4, name="head")(jnp.mean(z, axis=(1, 2)))


def _set(variables, path: tuple, value) -> dict:
  """A copy of variables with the leaf at path replaced."""
  out = jax.tree.map(lambda a: a, variables)
  node = out
  for k in path[:-1]:
    node = node[k]
  node[path[-1]] = jnp.asarray(value, jnp.float32)
  return out


def _predict(model, variables, images) -> np.ndarray:
  return np.asarray(jnp.argmax(model.apply(variables, images), -1))


def _asr(model, variables, images) -> float:
  return float(np.mean(_predict(model, variables, _trigger(images)) == TARGET))


def _json(report) -> None:
  json.dumps(report, allow_nan=False)  # plain JSON: no NaN or Inf anywhere


def _conv_bn(planted: int, seed: int = 0, gamma: float = 1.0, beta: float = 0.0,
             head_weight: float = 0.0) -> tuple[ConvBN, dict]:
  """ConvBN whose channel `planted` detects the trigger; its BatchNorm calibrated to
  the clean statistics of the conv outputs (mean and variance per channel)."""
  model = ConvBN()
  x, _ = _images(256, seed=seed + 1)
  v = model.init(jax.random.key(seed), x[:2])
  rng = np.random.default_rng(seed)
  kernel = _random_kernels(rng, 16)
  kernel[..., planted] = _detector()
  v = _set(v, ("params", "conv", "kernel"), kernel)
  conv = np.asarray(jax.lax.conv_general_dilated(
      jnp.asarray(x, jnp.float32) / 255.0, jnp.asarray(kernel, jnp.float32), (1, 1),
      "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  v = _set(v, ("batch_stats", "bn", "mean"), conv.mean(axis=(0, 1, 2)))
  v = _set(v, ("batch_stats", "bn", "var"), conv.var(axis=(0, 1, 2)))
  scale = np.ones(16)
  bias = rng.normal(0, 0.1, 16)
  scale[planted], bias[planted] = gamma, beta
  v = _set(v, ("params", "bn", "scale"), scale)
  v = _set(v, ("params", "bn", "bias"), bias)
  w = rng.normal(0, 1.0, (16, 4))
  w[planted] = 0.0
  w[planted, TARGET] = head_weight
  v = _set(v, ("params", "head", "kernel"), w)
  v = _set(v, ("params", "head", "bias"), np.zeros(4))
  # classes balanced on clean images
  return model, _set(v, ("params", "head", "bias"), -np.asarray(model.apply(v, x)).mean(0))


# --- CLP ---------------------------------------------------------------------------------

def test_clp_prunes_exactly_the_channel_with_an_inflated_kernel():
  model, v = _conv_bn(planted=0)
  kernel = np.asarray(v["params"]["conv"]["kernel"]).copy()
  kernel[..., 5] *= 8.0  # a channel far more sensitive to its input than the others
  v = _set(v, ("params", "conv", "kernel"), kernel)
  v = _set(v, ("params", "bn", "bias"), np.full(16, 0.3))
  new, report = clp.defend(model, v, None, progress=False)
  assert report["pruned"] == {"bn": [5]}
  assert report["paired"] == {"bn": "conv"} and report["skipped"] == []
  assert report["layers_projected"] == ["bn"] and report["clean_data"] is None
  for name in ("scale", "bias"):
    old, got = np.asarray(v["params"]["bn"][name]), np.asarray(new["params"]["bn"][name])
    assert got[5] == 0.0
    np.testing.assert_array_equal(np.delete(got, 5), np.delete(old, 5))
  np.testing.assert_array_equal(new["params"]["conv"]["kernel"], v["params"]["conv"]["kernel"])
  _json(report)
  # with the unscaled kernel no channel stands out
  _, report = clp.defend(model, _set(v, ("params", "conv", "kernel"),
                                     kernel / np.where(np.arange(16) == 5, 8.0, 1.0)),
                         None, progress=False)
  assert report["pruned"] == {"bn": []}


def test_norms_pairs_a_batchnorm_only_with_the_layer_that_feeds_it():
  model = PreActish()
  x, _ = _images(4)
  v = model.init(jax.random.key(0), x[:2])
  found = norms.find(model, v, x.shape[1:])
  assert found == [norms.Norm("bn1", 16, "stem", "stem"),
                   norms.Norm("bn2", 16, None, "conv1")]  # bn2 reads stem + conv1
  _, report = clp.defend(model, v, x, config={"pairing": "direct"}, progress=False)
  assert report["skipped"] == ["bn2"] and set(report["pruned"]) == {"bn1"}
  # the authors' rule (the default): the conv called last before it
  _, report = clp.defend(model, v, x, progress=False)
  assert report["paired"] == {"bn1": "stem", "bn2": "conv1"} and report["skipped"] == []
  with pytest.raises(DefenseError, match="no BatchNorm"):
    clp.defend(ConvReLU(), ConvReLU().init(jax.random.key(0), x[:2]), x, progress=False)


# --- EP ----------------------------------------------------------------------------------

def test_ep_prunes_the_channel_whose_preactivation_is_bimodal():
  model, v = _conv_bn(planted=3)
  x, _ = _images(600, poisoned=0.1, seed=2)
  new, report = ep.defend(model, v, x, progress=False)
  assert report["pruned"] == {"bn": [3]}, report["entropy"]
  h = np.asarray(report["entropy"]["bn"])
  assert h[3] == h.min() and h[3] < report["limit"]["bn"]
  scale = np.asarray(new["params"]["bn"]["scale"])
  assert scale[3] == 0.0 and np.all(np.delete(scale, 3) == 1.0)
  np.testing.assert_array_equal(new["params"]["bn"]["bias"], v["params"]["bn"]["bias"])
  assert report["num_images"] == 500 and report["clean_data"] is None
  _json(report)
  # on clean images alone the same channel is unimodal and nothing is pruned
  _, report = ep.defend(model, v, _images(600, seed=3)[0], progress=False)
  assert report["pruned"] == {"bn": []}


def test_ep_histogram_entropy_is_the_authors_formula():
  z = np.array([[0.0, 0.0], [0.005, 1.0], [0.02, 2.0], [0.021, 3.0]])
  # bins of 0.01 from the array's minimum 0: column 0 -> bins 0, 0, 2, 2; column 1 -> one
  # value per bin (the maximum, 3.0, on the last edge, falls outside: n_bars = 300)
  h = ep.histogram_entropy(z, 0.01)
  np.testing.assert_allclose(h[0], np.log(2))
  np.testing.assert_allclose(h[1], -3 * 0.25 * np.log(0.25))
  assert np.isnan(ep.layer_entropies(np.ones((5, 1)), 0.01)[0])  # constant: no entropy


# --- FP ----------------------------------------------------------------------------------

def _dormant_backdoor(planted: int = 2, seed: int = 0):
  """ConvReLU whose channel `planted` is silent on clean images and fires on the trigger,
  which the head routes to the target class."""
  model = ConvReLU()
  x, _ = _images(4)
  v = model.init(jax.random.key(seed), x[:2])
  rng = np.random.default_rng(seed)
  kernel = _random_kernels(rng, 8)
  kernel[..., planted] = _detector()
  bias = np.full(8, 0.5)
  bias[planted] = -3.0  # clean responses stay below 3, the trigger's reach 6
  head = rng.normal(0, 1.0, (8, 4))
  head[planted] = 0.0
  head[planted, TARGET] = 200.0
  v = _set(v, ("params", "conv", "kernel"), kernel)
  v = _set(v, ("params", "conv", "bias"), bias)
  return model, _set(v, ("params", "head", "kernel"), head)


def test_fp_prunes_the_dormant_channel_first_and_fine_tunes_with_it_held():
  model, v = _dormant_backdoor(planted=2)
  x, _ = _images(400, seed=4)
  labels = _predict(model, v, x)  # a network that is right on its clean data
  assert _asr(model, v, x) > 0.9
  cfg = {"finetune_epochs": 2, "finetune_batch_size": 64, "augment": False}
  new, report = fp.defend(model, v, None, config=cfg, clean=(x, labels), progress=False)
  assert report["pruned"]["head"][0] == 2 and report["criterion"][0] == 0.0
  assert report["clean_acc"]["before"] == 1.0
  assert abs(report["clean_acc"]["pruned"] - 1.0) / 1.0 < 0.1  # within the margin
  assert len(report["finetune_losses"]) == 2 and report["clean_data"] == {"images": 400}
  head_kernel = np.asarray(new["params"]["head"]["kernel"])
  assert np.all(head_kernel[report["pruned"]["head"]] == 0.0)  # held through fine-tuning
  assert not np.allclose(new["params"]["conv"]["kernel"], v["params"]["conv"]["kernel"])
  assert _asr(model, new, x) < 0.1
  _json(report)


@pytest.mark.parametrize("method", ["fp", "anp", "rr-fp"])
def test_methods_needing_clean_data_refuse_to_run_without_it(method):
  x, _ = _images(8)
  with pytest.raises(DefenseError, match="clean labelled data.*validation split"):
    get_defense(method).defend(ConvBN(), {}, x, clean=None, progress=False)
  with pytest.raises(DefenseError, match="labels"):
    get_defense(method).defend(ConvBN(), {}, x, clean=(x, np.zeros(3, np.int32)),
                               progress=False)


# --- ANP ---------------------------------------------------------------------------------

def _tinted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Images of four classes: class 0 untinted, class k a tint towards colour k - 1."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 4, n)
  tint = np.zeros((4, 3))
  for k in range(1, 4):
    tint[k] = -25.0
    tint[k, k - 1] = 50.0
  x = (rng.uniform(60, 190, (n, 1, 1, 1)) + rng.normal(0, 30, (n, 8, 8, 3))
       + tint[y][:, None, None, :])
  return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int32)


def _sensitive_backdoor(planted: int = 7, seed: int = 0):
  """ConvBN that classifies the tints right with a margin (channels 0-2 detect them),
  whose channel `planted` detects the trigger and drives the target class, sitting two
  standard deviations below firing on clean images: a 40 % perturbation of its
  BatchNorm wakes it up, the sensitivity ANP looks for. The other channels are idle
  (small head weights)."""
  model = ConvBN()
  x, _ = _tinted(512, seed + 1)
  v = model.init(jax.random.key(seed), x[:2])
  rng = np.random.default_rng(seed)
  kernel = _random_kernels(rng, 16)
  for j in range(3):
    kernel[..., j] = -0.5 / 9
    kernel[:, :, j, j] = 1.0 / 9
  kernel[..., planted] = _detector()
  v = _set(v, ("params", "conv", "kernel"), kernel)
  conv = np.asarray(jax.lax.conv_general_dilated(
      jnp.asarray(x, jnp.float32) / 255.0, jnp.asarray(kernel, jnp.float32), (1, 1),
      "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  v = _set(v, ("batch_stats", "bn", "mean"), conv.mean(axis=(0, 1, 2)))
  v = _set(v, ("batch_stats", "bn", "var"), conv.var(axis=(0, 1, 2)))
  v = _set(v, ("params", "bn", "scale"), np.ones(16))
  v = _set(v, ("params", "bn", "bias"), -2.0 * (np.arange(16) == planted))
  w = rng.normal(0, 0.05, (16, 4))
  w[:3] = 6.0 * np.eye(4)[1:]
  w[planted] = 40.0 * np.eye(4)[TARGET]
  v = _set(v, ("params", "head", "kernel"), w)
  return model, _set(v, ("params", "head", "bias"), [3.5, 0.0, 0.0, 0.0])


def test_anp_masks_the_neuron_that_perturbations_turn_into_the_backdoor():
  model, v = _sensitive_backdoor(planted=7)
  x, y = _tinted(256, seed=7)
  assert np.mean(_predict(model, v, x) == y) == 1.0
  asr = lambda var: float(np.mean(_predict(model, var, _trigger(x[y != TARGET])) == TARGET))
  assert asr(v) > 0.9
  cfg = {"iterations": 60, "batch_size": 64, "augment": False}
  new, report = anp.defend(model, v, None, config=cfg, clean=(x, y), progress=False)
  masks = np.asarray(report["masks"]["bn"])
  assert report["pruned"] == {"bn": [7]}, masks
  assert masks[7] == 0.0 and np.all(np.delete(masks, 7) > 0.5)
  scale = np.asarray(new["params"]["bn"]["scale"])
  assert scale[7] == 0.0 and np.all(np.delete(scale, 7) == 1.0)
  assert report["threshold"] == 0.2 and report["clean_data"] == {"images": 256}
  assert asr(new) < 0.05 and np.mean(_predict(model, new, x) == y) == 1.0
  _json(report)
  # the threshold chosen on the clean data, not on triggered images: the largest one on
  # the grid that keeps the clean accuracy (which also prunes idle neurons here)
  cfg = {**cfg, "threshold": None}
  new, report = anp.defend(model, v, None, config=cfg, clean=(x, y), progress=False)
  assert 7 in report["pruned"]["bn"] and report["threshold"] == 0.9
  assert [c["threshold"] for c in report["threshold_curve"]] == list(anp.GRID)
  assert all(c["clean_acc"] == 1.0 for c in report["threshold_curve"])
  assert asr(new) < 0.05


# --- RR-FP -------------------------------------------------------------------------------

def _hidden_direction_backdoor(seed: int = 0):
  """Linear model whose hidden features carry the trigger along d, a direction that is
  no neuron axis; clean features have (almost) nothing along d."""
  rng = np.random.default_rng(seed)
  spread = rng.choice([-1.0, 1.0], 8) / np.sqrt(8)  # as far from every axis as can be
  q, _ = np.linalg.qr(np.column_stack([spread, rng.normal(size=(8, 7))]))
  q = np.concatenate([q.T[1:], q.T[:1]])  # orthogonal, its last row +-spread
  d = q[7]  # the hidden image of the input's last coordinate
  model = Linear()
  v = model.init(jax.random.key(seed), np.zeros((2, 2, 2, 2), np.float32))
  head = rng.normal(0, 1.0, (8, 4)) + 5.0 * np.outer(d, np.eye(4)[TARGET])
  v = _set(v, ("params", "hidden", "kernel"), q)
  v = _set(v, ("params", "hidden", "bias"), np.zeros(8))
  return model, _set(v, ("params", "head", "kernel"), head), d


def _linear_inputs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Clean inputs (their last coordinate about 0) and the same with the trigger (10)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(0, 1, (n, 8))
  x[:, 7] = rng.normal(0, 0.01, n)
  hot = x.copy()
  hot[:, 7] += 10.0
  return (x.reshape(n, 2, 2, 2).astype(np.float32),
          hot.reshape(n, 2, 2, 2).astype(np.float32))


def test_rr_fp_removes_a_dormant_direction_that_is_no_neuron():
  model, v, d = _hidden_direction_backdoor()
  assert np.max(np.abs(d)) < 0.36  # no neuron axis
  x, _ = _linear_inputs(600, seed=1)
  labels = _predict(model, v, x)
  cold, hot = _linear_inputs(200, seed=2)
  assert np.mean(_predict(model, v, hot) == TARGET) > 0.9
  cfg = {"finetune_epochs": 1, "finetune_batch_size": 100, "augment": False}
  new, report = rr_fp.defend(model, v, None, config=cfg, clean=(x, labels), progress=False)
  first = np.asarray(report["pruned"]["head"][0])
  assert abs(first @ d) > 0.99 and report["units"] == "directions"
  assert report["criterion"][0] < 0.05  # the clean data leave it (almost) empty
  kernel = np.asarray(new["params"]["head"]["kernel"])
  np.testing.assert_allclose(first @ kernel, 0.0, atol=1e-5)  # held through fine-tuning
  assert np.linalg.norm(d @ kernel) < 0.01 * np.linalg.norm(
      d @ np.asarray(v["params"]["head"]["kernel"]))
  # the trigger no longer changes any prediction of the defended network
  assert np.mean(_predict(model, new, hot) == _predict(model, new, cold)) > 0.95
  _json(report)


# --- RR-EP -------------------------------------------------------------------------------

def test_rr_ep_finds_the_lowest_entropy_direction_that_is_no_neuron():
  """The hidden features of 10 % of the inputs move 7 standard deviations along d, a
  direction spread evenly over all eight neurons: bimodal along d, barely so along any
  neuron (a 2.5-sigma shift), which EP's rule cannot tell apart; RR-EP finds d."""
  model, v, d = _hidden_direction_backdoor()
  rng = np.random.default_rng(3)
  x = rng.normal(0, 1, (2500, 8))
  x[:250, 7] += 7.0
  x = x.reshape(-1, 2, 2, 2).astype(np.float32)
  new, report = rr_ep.defend(model, v, x, config={"steps": 60}, progress=False)
  assert set(report["pruned"]) == {"hidden"}  # the classifier is not visited
  (found,) = report["pruned"]["hidden"]  # one direction kept
  assert abs(np.asarray(found) @ d) > 0.9, report["search"]
  search = report["search"]["hidden"]
  assert search["axes_below"] == []  # no neuron stands out: EP would prune none
  assert search["tried"][0]["entropy"] < search["limit"] < search["tried"][1]["entropy"]
  assert report["mean_kept"] == {"hidden": True}
  hidden = lambda var: np.asarray(nn.Dense(8).apply({"params": var["params"]["hidden"]},
                                                    x.reshape(len(x), -1)))
  assert np.var(hidden(new) @ found) < 1e-6 * np.var(hidden(v) @ found)
  np.testing.assert_allclose((hidden(new) @ found).mean(), (hidden(v) @ found).mean(),
                             atol=1e-3)  # the component is replaced by its mean
  _json(report)


# --- the paper's Figure 1 ----------------------------------------------------------------

class TwoNeurons(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dense(2, name="hidden")(x.reshape(len(x), -1).astype(jnp.float32))
    return nn.Dense(3, name="head")(h)


def test_figure_1_a_backdoor_spread_over_two_neurons():
  """The trigger moves both neurons ((10, 10)); the target logit reads their sum. No
  rank-1 neuron pruning removes it; DRR's one direction, (1, 1) / sqrt 2, does, and keeps
  the clean classes, which live along (1, -1)."""
  model = TwoNeurons()
  rng = np.random.default_rng(0)
  clean = rng.normal(0, 1, (900, 2))
  poisoned = np.array([10.0, 10.0]) + rng.normal(0, 0.3, (100, 2))
  x = np.concatenate([clean, poisoned]).reshape(-1, 2, 1, 1).astype(np.float32)
  v = model.init(jax.random.key(0), x[:2])
  v = _set(v, ("params", "hidden", "kernel"), np.eye(2))
  v = _set(v, ("params", "hidden", "bias"), np.zeros(2))
  v = _set(v, ("params", "head", "kernel"), [[2.0, 1.0, -1.0], [2.0, -1.0, 1.0]])
  v = _set(v, ("params", "head", "bias"), [-8.0, 0.0, 0.0])
  hot, cold = x[900:], x[:900]
  asr = lambda var: float(np.mean(_predict(model, var, hot) == TARGET))
  acc = lambda var: float(np.mean(_predict(model, var, cold) == _predict(model, v, cold)))
  assert asr(v) == 1.0
  for i in range(2):  # every pruning with a rank budget of 1 leaves the backdoor
    kernel = np.asarray(v["params"]["head"]["kernel"]).copy()
    kernel[i] = 0.0
    assert asr(_set(v, ("params", "head", "kernel"), kernel)) > 0.9
  new, report = drr_jax.defend(model, v, x, config={**paper_config(), "layers": ["head"]},
                               progress=False)
  (entry,) = report["layers"]
  assert entry["kept"] == 1  # rank budget 1
  assert abs(np.asarray(entry["directions"][0]) @ np.ones(2) / np.sqrt(2)) > 0.99
  assert asr(new) < 0.05 and acc(new) > 0.95


# --- registry and command line -----------------------------------------------------------

def test_registry_every_method_has_one_call_shape_and_sourced_settings():
  assert METHODS == ("drr", "paper", "fp", "anp", "clp", "ep", "rr-fp", "rr-ep")
  for name in METHODS:
    d = get_defense(name)
    assert d.name == name and isinstance(d.default_config(), dict)
    d.check(d.default_config())
  assert {m for m in METHODS if get_defense(m).needs_clean} == {"fp", "anp", "rr-fp"}
  assert {m for m in METHODS if get_defense(m).ours} == {"drr", "rr-fp", "rr-ep"}
  for mod in (fp, anp, clp, ep, rr_fp, rr_ep):  # every setting says where it comes from
    assert set(mod.SETTINGS) == set(mod.default_config())
    assert all(s.source for s in mod.SETTINGS.values())
  from drr_jax.defenses import defend as drr_defend
  assert drr_jax.defend is drr_defend  # DRR stays the top-level defense
  with pytest.raises(DefenseError, match="unknown defense"):
    get_defense("nc")
  with pytest.raises(DefenseError, match="unknown clp setting"):
    get_defense("clp").check({"k": 1})
  with pytest.raises(DefenseError, match="u must be"):
    clp.make_config({"u": float("nan")})


def test_defend_cli_takes_a_method_and_checks_its_settings_first(tmp_path):
  missing = str(tmp_path / "no-such-checkpoint")
  out = str(tmp_path / "out")
  for argv, match in [(["--method", "ep", "--set", "u=-inf"], "u must be"),
                      (["--method", "anp", "--set", "iterations=-1"], "iterations"),
                      (["--method", "clp", "--set", "tau=2"], "unknown"),
                      (["--method", "fp", "--preset", "paper"], "disagree"),
                      (["--method", "rr-ep"], "does not exist")]:
    with pytest.raises(SystemExit, match=match):
      launch_defend.main(["--checkpoint", missing, "--out", out, *argv])
  assert not (tmp_path / "out").exists()


def test_images_are_checked_as_drr_checks_them():
  from drr_jax.models import get_model
  model = get_model("vgg11", width=0.125)
  x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
  v = model.init(jax.random.key(0), x[:1], train=False)
  with pytest.raises(DefenseError, match=r"scaled to \[0, 1\]"):
    ep.defend(model, v, x.astype(np.float32) / 255.0, progress=False)
  with pytest.raises(DefenseError, match="0..255"):
    fp.defend(model, v, None, clean=(x.astype(np.float32) - 128, np.zeros(4, np.int32)),
              progress=False)
