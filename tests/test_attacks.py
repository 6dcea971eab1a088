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
