"""WaNet's warp (issue 14): a smooth field with the given k and s, invertible to first
order, and the same sampling as grid_sample(align_corners=True)."""
from __future__ import annotations

import numpy as np
import pytest

from drr_jax.attacks import wanet


def _smooth_images(n=4, size=32, seed=0):
  rng = np.random.default_rng(seed)
  y, x = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  imgs = []
  for _ in range(n):
    fx, fy, ph = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.uniform(0, 6)
    base = 127 + 100 * np.sin(2 * np.pi * (fx * x + fy * y) / size + ph)
    imgs.append(np.stack([base, base[::-1], base[:, ::-1]], -1))
  return np.asarray(imgs, np.float32)


def test_bicubic_upsampling_is_pytorchs_cubic_convolution_with_aligned_corners():
  # Keys' kernel with a = -0.75: halfway between samples the weights are these
  np.testing.assert_allclose(wanet._cubic_weights(np.array([0.5])),
                             [[-0.09375, 0.59375, 0.59375, -0.09375]], atol=1e-12)
  t = np.random.default_rng(0).uniform(0, 1, 50)
  np.testing.assert_allclose(wanet._cubic_weights(t).sum(-1), 1.0, atol=1e-12)
  rng = np.random.default_rng(1)
  ctrl = rng.uniform(-1, 1, (4, 4, 2))
  up = wanet.upsample_bicubic(ctrl, 31)  # (31 - 1) / (4 - 1) = 10: control points at 0, 10, ..
  np.testing.assert_allclose(up[::10, ::10], ctrl, atol=1e-6)
  np.testing.assert_allclose(wanet.upsample_bicubic(np.full((4, 4, 2), 0.3), 32), 0.3,
                             atol=1e-6)


def test_the_field_is_smooth_with_mean_magnitude_one_on_its_k_grid():
  for k in (3, 4, 8):
    f = wanet.make_field(seed=7, k=k, size=32)
    assert f.shape == (32, 32, 2)
    ctrl = f[np.round(np.linspace(0, 31, k)).astype(int)][:, np.round(
        np.linspace(0, 31, k)).astype(int)]
    if k in (3, 4):  # (32 - 1) / (k - 1) is whole only for k = 2, 32; close enough below
      assert np.mean(np.abs(ctrl)) == pytest.approx(1.0, abs=0.25)
    # smooth: neighbouring pixels differ by far less than the field's range
    step = np.max(np.abs(np.diff(f, axis=0))), np.max(np.abs(np.diff(f, axis=1)))
    assert max(step) < 0.25 * k * np.ptp(f) / 4
  assert not np.allclose(wanet.make_field(1), wanet.make_field(2))
  np.testing.assert_array_equal(wanet.make_field(3), wanet.make_field(3))
  with pytest.raises(ValueError, match="wanet_k"):
    wanet.make_field(0, k=1)


def test_the_warp_moves_each_pixel_by_s_field_over_h_and_is_invertible_to_first_order():
  field = wanet.make_field(seed=3, k=4, size=32)
  s = 0.5
  grid = wanet.warp_grid(field, s)
  ident = wanet.identity_grid(32, 32)
  # displacement in pixels: (s field / H) in [-1, 1] coordinates = s field (W - 1) / (2 H)
  disp = (grid - ident) * 31 / 2
  inside = np.all(np.abs(ident + s * field / 32) < 1, -1)
  np.testing.assert_allclose(disp[inside], (s * field * 31 / 64)[inside], atol=1e-5)
  images = _smooth_images()
  warped = wanet.warp(images, grid)
  assert np.abs(warped - images).mean() > 1.0  # the warp changes the image
  # the identity grid samples every pixel exactly
  np.testing.assert_allclose(wanet.warp(images, ident), images, atol=1e-3)
  # the map p -> p + d(p) has p -> p - d(p) as its inverse to first order: composed, the
  # two leave a remainder of order |d| |grad d|, far below the displacement itself
  inverse = np.clip(ident - s * field / 32, -1, 1)
  composed = wanet.warp(grid[None], inverse)[0]  # the forward map read at the inverse
  inner = (slice(3, -3), slice(3, -3))
  moved = np.abs(grid - ident)[inner].max()
  remainder = np.abs(composed - ident)[inner].max()
  assert remainder < 0.2 * moved, (remainder, moved)


def test_bilinear_sampling_between_pixels():
  img = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)  # value = 4 y + x
  # a point halfway between pixel columns 1 and 2 of row 2: x = -1 + 2 * 1.5 / 3
  grid = np.zeros((4, 4, 2), np.float32)
  grid[...] = [-1 + 2 * 1.5 / 3, -1 + 2 * 2 / 3]
  np.testing.assert_allclose(wanet.warp(img, grid), np.full((1, 4, 4, 1), 9.5), atol=1e-5)


def test_noise_grids_stay_within_one_pixel_of_the_warp():
  grid = wanet.warp_grid(wanet.make_field(0))
  noisy = wanet.noise_grids(grid, 5, np.random.default_rng(0))
  assert noisy.shape == (5, 32, 32, 2)
  assert np.max(np.abs(noisy - grid)) <= 1 / 32 + 1e-6
  assert not np.allclose(noisy[0], noisy[1])
  with pytest.raises(ValueError, match="wanet_s"):
    wanet.settings({"wanet_s": 0})
  assert wanet.settings({}) == (4, 0.5, 1.0, 2.0)


def test_the_test_time_trigger_is_the_fixed_warp_and_survives_a_record():
  from drr_jax import attacks, train
  trig = wanet.make_trigger(5, {"wanet_k": 4, "wanet_s": 0.5})
  images = _smooth_images(3).round().astype(np.uint8)
  stamped = attacks.apply_trigger(images, trig)
  want = wanet.to_uint8(wanet.warp(images, wanet.warp_grid(wanet.make_field(5, 4, 32), 0.5)))
  np.testing.assert_array_equal(stamped, want)
  assert np.abs(stamped.astype(int) - images).mean() > 0.5  # it does change the images
  record = train.attack_record(attacks.PoisonedSet(images, np.zeros(3, np.int32),
                                                   np.zeros(0, np.int64), trig))
  back = attacks.trigger_from_record(record)
  np.testing.assert_array_equal(back.grid, trig.grid)
  np.testing.assert_array_equal(attacks.apply_trigger(images, back), stamped)
