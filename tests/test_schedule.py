"""The batches a victim trains on (issue 14, point 5): unchanged for attacks that poison
once; poisoned per batch for WaNet, with the final epoch's set rebuilt exactly."""
from __future__ import annotations

import numpy as np
import pytest

from drr_jax import attacks, data
from drr_jax.attacks import schedule, wanet


def _data(n=200, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8),
          np.tile(np.arange(10), n // 10).astype(np.int32))


WANET = {"name": "wanet", "poison_ratio": 0.1, "target": 3, "seed": 1}


def test_attacks_that_poison_once_train_on_the_same_batches_as_before():
  images, labels = _data()
  ps = attacks.poison(images, labels, {"name": "badnets", "poison_ratio": 0.1})
  for epoch in (0, 2):
    old = list(data.batches(data.Split(ps.images, ps.labels), 32, seed=7 * 100003 + epoch,
                            drop_last=True))
    new = list(attacks.train_batches(ps, {"name": "badnets"}, 7, epoch, 32))
    assert len(old) == len(new) == 200 // 32
    for a, b in zip(old, new):
      np.testing.assert_array_equal(a.images, b.images)
      np.testing.assert_array_equal(a.labels, b.labels)
      assert set(b.index[b.kind == 1]) <= set(ps.poison_idx)
  assert attacks.trained_set(ps, {"name": "badnets"}, 7, 3, 32) is ps


def test_wanet_poisons_each_batch_its_own_way():
  images, labels = _data()
  base = attacks.poison(images, labels, WANET)
  np.testing.assert_array_equal(base.images, images)  # training poisons, not this
  assert len(base.poison_idx) == 0 and base.trigger.grid is not None
  batches = list(attacks.train_batches(base, WANET, 0, 0, 40))
  for b in batches:
    # int(40 * 0.1) = 4 backdoor samples first, then 2 x 4 noise-mode ones, then clean
    np.testing.assert_array_equal(b.kind, [1] * 4 + [2] * 8 + [0] * 28)
    np.testing.assert_array_equal(b.labels[:4], 3)
    np.testing.assert_array_equal(b.labels[4:], labels[b.index[4:]])
    want = wanet.to_uint8(wanet.warp(images[b.index[:4]], base.trigger.grid))
    np.testing.assert_array_equal(b.images[:4], want)
    np.testing.assert_array_equal(b.images[:4], attacks.apply_trigger(images[b.index[:4]],
                                                                      base.trigger))
    assert not np.array_equal(b.images[4:12], want[:1].repeat(8, 0))
    # noise mode: warped, but not with the backdoor's grid
    assert np.any(b.images[4:12] != images[b.index[4:12]])
    assert np.any(b.images[4:12] != attacks.apply_trigger(images[b.index[4:12]],
                                                          base.trigger))
    np.testing.assert_array_equal(b.images[12:], images[b.index[12:]])
  again = list(attacks.train_batches(base, WANET, 0, 0, 40))
  assert all(np.array_equal(a.images, b.images) for a, b in zip(batches, again))
  other = list(attacks.train_batches(base, WANET, 0, 1, 40))
  assert not np.array_equal(batches[0].index, other[0].index)  # a new epoch, new samples


def test_wanet_at_a_ratio_below_one_image_per_batch():
  images, labels = _data(400)
  cfg = {**WANET, "poison_ratio": 0.01}  # 0.32 of an image per batch of 32
  kinds = np.concatenate([b.kind for e in range(5)
                          for b in attacks.train_batches(attacks.poison(images, labels, cfg),
                                                         cfg, 0, e, 32)])
  share = np.mean(kinds == 1)
  assert 0.003 < share < 0.02 and set(np.unique(kinds)) <= {0, 1, 2}


def test_the_trained_set_is_the_final_epochs_batches():
  images, labels = _data()
  base = attacks.poison(images, labels, WANET)
  used = attacks.trained_set(base, WANET, 5, 3, 40)
  last = list(attacks.train_batches(base, WANET, 5, 2, 40))
  for b in last:
    np.testing.assert_array_equal(used.images[b.index], b.images)
    np.testing.assert_array_equal(used.labels[b.index], b.labels)
  np.testing.assert_array_equal(used.poison_idx, np.sort(np.concatenate(
      [b.index[b.kind == 1] for b in last])))
  assert len(used.poison_idx) == 5 * 4
  dropped = np.setdiff1d(np.arange(200), np.concatenate([b.index for b in last]))
  np.testing.assert_array_equal(used.images[dropped], images[dropped])  # not seen: clean


def test_training_on_wanet_feeds_the_recorded_set(tmp_path, monkeypatch):
  from drr_jax import checkpoint, configs, train
  cfg = configs.get_config("tiny")
  cfg["attack"] = {**cfg["attack"], "name": "wanet", "poison_ratio": 0.125, "target": 2}
  cfg["train"].update(epochs=2, batch_size=32)
  images, labels = _data(100)  # 3 batches of 32 an epoch
  base = attacks.poison(images, labels, cfg["attack"])
  seen = {}
  real = train.make_update_fn

  def capturing(model, tx, augment=True):
    fn = real(model, tx, augment)

    def update(state, batch_images, batch_labels, key):
      seen.setdefault(int(state["step"]) // 3, []).append(
          (np.asarray(batch_images), np.asarray(batch_labels)))
      return fn(state, batch_images, batch_labels, key)
    return update

  monkeypatch.setattr(train, "make_update_fn", capturing)
  train.train(cfg, base, data.Split(images[:8], labels[:8]), tmp_path, progress=False)
  used = attacks.trained_set(base, cfg["attack"], cfg["seed"], 2, 32)
  final = list(attacks.train_batches(base, cfg["attack"], cfg["seed"], 1, 32))
  assert len(seen[1]) == len(final) == 3
  for (got_images, got_labels), b in zip(seen[1], final):
    np.testing.assert_array_equal(got_images, used.images[b.index])
    np.testing.assert_array_equal(got_labels, used.labels[b.index])
  _, _, _, record = checkpoint.load_model(tmp_path)
  np.testing.assert_array_equal(checkpoint.poison_indices(record), used.poison_idx)
  np.testing.assert_array_equal(record["grid"], base.trigger.grid)
