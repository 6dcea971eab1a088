"""CLA (issue 14): labels unchanged and the perturbation within eps; the trigger in all
four corners."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from drr_jax.attacks import cla
from drr_jax.models.common import normalize


class Tiny(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), strides=(2, 2))(normalize(x))
    return nn.Dense(10)(jnp.mean(nn.relu(x), axis=(1, 2)))


def test_the_trigger_is_a_checkerboard_in_each_corner():
  t = cla.make_trigger(0, {})
  assert t.mask.sum() == 4 * 9 * 3
  for r, c in ((0, 0), (0, 29), (29, 0), (29, 29)):
    np.testing.assert_array_equal(t.pattern[r:r + 3, c:c + 3, 0],
                                  [[255, 0, 255], [0, 255, 0], [255, 0, 255]])
    assert np.all(t.mask[r:r + 3, c:c + 3] == 1)
  assert t.mask[3:29, 3:29].sum() == 0
  with pytest.raises(ValueError, match="cla_patch"):
    cla.make_trigger(0, {"cla_patch": 17})


def test_pgd_stays_within_eps_keeps_pixels_valid_and_raises_the_loss():
  model = Tiny()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (24, 32, 32, 3)).astype(np.uint8)
  images[:4] = 0  # pixels at the bottom of the range stay valid
  labels = rng.integers(0, 10, 24).astype(np.int32)
  variables = model.init(jax.random.key(0), images[:1])
  apply_fn = lambda v, x: model.apply(v, x)
  eps, step, steps = cla.settings({})
  assert (eps, step, steps) == (12.0, 2.0, 7)
  adv = cla.pgd(apply_fn, variables, images, labels, eps=eps, step=step, steps=steps,
                batch_size=10)
  assert adv.dtype == np.uint8 and adv.shape == images.shape
  diff = adv.astype(int) - images.astype(int)
  assert np.abs(diff).max() <= 12 and np.abs(diff).max() >= 10  # it uses its budget
  ce = lambda x: float(optax.softmax_cross_entropy_with_integer_labels(
      apply_fn(variables, x), labels).mean())
  assert ce(adv) > ce(images) + 0.05
  with pytest.raises(ValueError, match="PGD"):
    cla.settings({"cla_eps": 0})


def test_cla_end_to_end_poisons_the_target_class_within_eps_and_caches(tmp_path,
                                                                      monkeypatch):
  from drr_jax import attacks, configs, data, datasets
  from drr_jax import train as train_lib
  from tests.conftest import make_fake_zips
  make_fake_zips(tmp_path / "zips", per_class=30)
  cfg = configs.get_config("tiny")
  cfg["attack"] = {**cfg["attack"], "name": "cla", "poison_ratio": 0.08, "target": 4}
  with pytest.raises(ValueError, match="clean model"):
    attacks.poison(np.zeros((10, 32, 32, 3), np.uint8), np.arange(10), cfg["attack"])
  ds = datasets.load(cfg, tmp_path / "zips", tmp_path / "cache", test=False)
  full = data.load_split("train", tmp_path / "zips", tmp_path / "cache")
  train, _ = data.holdout_split(full, cfg["data"]["val_fraction"], cfg["data"]["split_seed"])
  ps = ds.train
  np.testing.assert_array_equal(ps.labels, train.labels)  # labels unchanged
  assert len(ps.poison_idx) == round(0.08 * len(train.labels))
  assert np.all(train.labels[ps.poison_idx] == 4)  # the target class only
  outside = ps.trigger.mask == 0
  diff = ps.images[ps.poison_idx].astype(int) - train.images[ps.poison_idx].astype(int)
  assert np.abs(diff[:, outside]).max() <= 12  # within eps where the trigger is not
  assert np.abs(diff[:, outside]).max() > 0
  corners = ps.images[ps.poison_idx][:, ps.trigger.mask == 1]
  np.testing.assert_array_equal(corners, np.broadcast_to(ps.trigger.pattern[ps.trigger.mask
                                                                            == 1],
                                                         corners.shape))
  clean = np.setdiff1d(np.arange(len(train.labels)), ps.poison_idx)
  np.testing.assert_array_equal(ps.images[clean], train.images[clean])
  # a second load trains nothing and recomputes nothing: the artefacts are cached
  monkeypatch.setattr(train_lib, "train", lambda *a, **k: (_ for _ in ()).throw(
      AssertionError("the attacker's model must come from the cache")))
  monkeypatch.setattr(attacks.cla, "pgd", lambda *a, **k: (_ for _ in ()).throw(
      AssertionError("the perturbed images must come from the cache")))
  again = datasets.load(cfg, tmp_path / "zips", tmp_path / "cache", test=False)
  np.testing.assert_array_equal(again.train.images, ps.images)
  # a fresh machine with the attacker's model exported beside the victim's (the committed
  # form): the model is read from there, not trained; only the PGD images are recomputed
  from drr_jax import adversary, checkpoint
  cache = tmp_path / "cache" / "adversary"
  (trained,) = cache.glob("clean-*")
  victim = tmp_path / "export" / "victim"
  checkpoint.export_variables(trained, adversary.beside(victim))
  for p in cache.glob("cla-*.npz"):
    p.unlink()
  import shutil
  shutil.rmtree(trained)
  monkeypatch.undo()
  monkeypatch.setattr(train_lib, "train", lambda *a, **k: (_ for _ in ()).throw(
      AssertionError("the attacker's model must come from the export")))
  fresh = datasets.load(cfg, tmp_path / "zips", tmp_path / "cache", test=False,
                        attacker_model=adversary.beside(victim))
  np.testing.assert_array_equal(fresh.train.images, ps.images)
  assert not list(cache.glob("clean-*"))  # nothing trained into the cache either
