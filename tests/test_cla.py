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
