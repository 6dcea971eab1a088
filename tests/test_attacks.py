from __future__ import annotations

import numpy as np
import pytest

from drr_jax import attacks


def _data(n=200, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8),
          np.tile(np.arange(10), n // 10).astype(np.int32))


def test_badnets_pixels_exactly_bottom_right():
  images, labels = _data()
  ps = attacks.poison(images, labels, {"name": "badnets", "poison_ratio": 0.1, "seed": 4})
  for i in ps.poison_idx:
    changed = np.any(ps.images[i] != images[i], axis=-1)
    assert not changed[:29, :].any() and not changed[:, :29].any()
    np.testing.assert_array_equal(ps.images[i, 29:, 29:], ps.trigger.pattern[29:, 29:])
  assert set(np.unique(ps.trigger.pattern[29:, 29:])) <= {0, 255}
  clean = np.setdiff1d(np.arange(len(labels)), ps.poison_idx)
  np.testing.assert_array_equal(ps.images[clean], images[clean])


def test_all_to_one_labels_and_counts():
  images, labels = _data(1000)
  ps = attacks.poison(images, labels, {"name": "badnets", "poison_ratio": 0.1, "target": 3})
  assert len(ps.poison_idx) == 100 and len(np.unique(ps.poison_idx)) == 100
  assert np.all(labels[ps.poison_idx] != 3)  # only samples whose label changes
  assert np.all(ps.labels[ps.poison_idx] == 3)
  clean = np.setdiff1d(np.arange(1000), ps.poison_idx)
  np.testing.assert_array_equal(ps.labels[clean], labels[clean])


def test_all_to_all_labels():
  images, labels = _data(1000)
  ps = attacks.poison(images, labels, {"name": "badnets_a2a", "poison_ratio": 0.05})
  assert len(ps.poison_idx) == 50
  np.testing.assert_array_equal(ps.labels[ps.poison_idx], (labels[ps.poison_idx] + 1) % 10)
  np.testing.assert_array_equal(attacks.target_labels(np.arange(10), {"label_mode": "all2all"}),
                                [1, 2, 3, 4, 5, 6, 7, 8, 9, 0])


def test_blended_formula():
  images, labels = _data()
  ps = attacks.poison(images, labels, {"name": "blended", "alpha": 0.2, "poison_ratio": 0.1})
  i = ps.poison_idx[0]
  want = np.clip(np.rint(0.8 * images[i] + 0.2 * ps.trigger.pattern), 0, 255)
  np.testing.assert_array_equal(ps.images[i], want.astype(np.uint8))
  assert np.all(ps.trigger.mask == np.float32(0.2))


def test_seeds_make_it_deterministic_and_distinct():
  images, labels = _data()
  a = attacks.poison(images, labels, {"name": "badnets", "seed": 1})
  b = attacks.poison(images, labels, {"name": "badnets", "seed": 1})
  c = attacks.poison(images, labels, {"name": "badnets", "seed": 2})
  np.testing.assert_array_equal(a.images, b.images)
  assert not np.array_equal(a.poison_idx, c.poison_idx) or not np.array_equal(
      a.trigger.pattern, c.trigger.pattern)


def test_no_attack_and_bad_configs():
  images, labels = _data()
  ps = attacks.poison(images, labels, {"name": "none"})
  assert len(ps.poison_idx) == 0 and np.array_equal(ps.images, images)
  with pytest.raises(ValueError, match="unknown attack"):
    attacks.poison(images, labels, {"name": "sleeper"})
  with pytest.raises(ValueError, match="poison_ratio"):
    attacks.poison(images, labels, {"name": "badnets", "poison_ratio": 1.5})
  with pytest.raises(ValueError, match="do not fit"):
    attacks.apply_trigger(images[:, :16], attacks.make_trigger({"name": "badnets"}))


def test_sig_adds_the_exact_signal_to_target_class_images_and_keeps_labels():
  images, labels = _data(1000)
  ps = attacks.poison(images, labels, {"name": "sig", "poison_ratio": 0.08, "target": 2})
  # a share of the whole set, drawn from the target class only, labels unchanged
  assert len(ps.poison_idx) == 80 and np.all(labels[ps.poison_idx] == 2)
  np.testing.assert_array_equal(ps.labels, labels)
  j = np.arange(32)
  want = 40 * np.sin(2 * np.pi * j * 6 / 32)  # Barni et al.: delta sin(2 pi j f / m)
  np.testing.assert_allclose(ps.trigger.offset, np.broadcast_to(want[None, :, None],
                                                                (32, 32, 3)), atol=1e-4)
  for i in ps.poison_idx[:5]:
    expect = np.clip(np.rint(images[i].astype(np.float64) + want[None, :, None]), 0, 255)
    np.testing.assert_array_equal(ps.images[i], expect.astype(np.uint8))
  clean = np.setdiff1d(np.arange(1000), ps.poison_idx)
  np.testing.assert_array_equal(ps.images[clean], images[clean])
  # the signal is horizontal: constant down every column, the same in every channel
  assert np.all(ps.trigger.offset == ps.trigger.offset[:1, :, :1])
  # at test time it is added to the other classes, whose ASR target is the target class
  assert np.all(attacks.target_labels(labels, attacks.resolve({"name": "sig",
                                                               "target": 2})) == 2)


def test_sig_settings_ratio_and_record():
  images, labels = _data(1000)
  small = attacks.make_trigger({"name": "sig", "sig_delta": 20, "sig_f": 3})
  row = small.offset[0, :, 0]
  assert 19.0 < row.max() <= 20.0 and -20.0 <= row.min() < -19.0
  assert np.sum((row[:-1] < 0) & (row[1:] >= 0)) == 2  # 3 periods: 2 upward crossings inside
  with pytest.raises(ValueError, match="target class"):  # 10 % of the set > one class
    attacks.poison(images, labels, {"name": "sig", "poison_ratio": 0.2})
  with pytest.raises(ValueError, match="sig_delta"):
    attacks.make_trigger({"name": "sig", "sig_delta": 0})
  ps = attacks.poison(images, labels, {"name": "sig", "poison_ratio": 0.05})
  from drr_jax import train
  back = attacks.trigger_from_record(train.attack_record(ps))
  np.testing.assert_array_equal(back.offset, ps.trigger.offset)
  np.testing.assert_array_equal(attacks.apply_trigger(images[:4], back),
                                attacks.apply_trigger(images[:4], ps.trigger))
  # a record without an offset (every trigger before SIG) reads as before
  old = {"pattern": ps.trigger.pattern, "mask": ps.trigger.mask}
  assert attacks.trigger_from_record(old).offset is None


def test_a_checkpoint_config_written_before_an_attack_setting_existed_still_matches():
  """SIG's settings became config keys after some SIG models were trained: their
  checkpoints lack the keys and used the defaults, so they must still be found (and a
  different value must not)."""
  import copy

  from drr_jax import grid
  from drr_jax.attacks import same_training_config
  cell = next(c for c in grid.NEW_ATTACKS if c.attack == "sig")
  wanted = grid.cell_config(cell)
  old = copy.deepcopy(wanted)
  for key in ("sig_f", "sig_delta"):
    del old["attack"][key]
  assert same_training_config(old, wanted) and same_training_config(wanted, wanted)
  other = copy.deepcopy(wanted)
  other["attack"]["sig_f"] = wanted["attack"]["sig_f"] + 1
  assert not same_training_config(other, wanted)
  del other["attack"]["sig_delta"]
  assert not same_training_config(other, wanted)
  moved = copy.deepcopy(old)
  moved["seed"] += 1
  assert not same_training_config(moved, wanted)


def test_a_checkpoint_from_before_patch_positions_reads_as_the_default_patch():
  """The committed WRN-28-1 checkpoints predate the patch/blend settings (2026-12-03):
  their configs lack the keys, made the default triggers, and must match the `cpu` grid's
  cells; a config that names another patch or blend must not."""
  import copy

  from drr_jax import grid
  from drr_jax.attacks import badnets, blended, same_training_config
  for cell in grid.get_grid("cpu"):
    wanted = grid.cell_config(cell)
    old = copy.deepcopy(wanted)
    for key in ("position", "pattern", "blend_pattern"):
      del old["attack"][key]
    assert same_training_config(old, wanted), cell
    for key, value in (("position", "tl"), ("pattern", "white"), ("blend_pattern", "smooth")):
      other = copy.deepcopy(old)
      other["attack"][key] = value
      assert not same_training_config(other, wanted), (cell, key)
  # and those defaults are the triggers the old code made: its 3x3 random patch at the
  # bottom-right from the attack seed, and its uniform noise image
  rng = np.random.default_rng(0)
  t = badnets.make_trigger(0, {})
  assert (t.pattern[29:, 29:] == 255 * rng.integers(0, 2, (3, 3, 3))).all()
  assert t.mask[29:, 29:].all() and t.mask.sum() == 27
  b = blended.make_trigger(0, {})
  assert (b.pattern == np.random.default_rng(0).integers(0, 256, (32, 32, 3))).all()
