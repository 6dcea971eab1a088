from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from drr_jax import attacks, data, evaluate


def _oracle(variables, images):
  """Predicts the label written in pixel (0, 0, 0), unless the bottom-right pixel is
  white in every channel: then it predicts `variables['target']`."""
  x = images.astype(jnp.int32)
  triggered = jnp.all(x[:, -1, -1, :] == 255, axis=-1)
  pred = jnp.where(triggered, variables["target"], x[:, 0, 0, 0])
  return jnp.eye(10)[pred]


def _split(n=100):
  labels = np.arange(n) % 10
  images = np.zeros((n, 32, 32, 3), np.uint8)
  images[:, 0, 0, 0] = labels
  images[: n // 5, 0, 0, 0] = (labels[: n // 5] + 1) % 10  # 20 % misclassified
  return data.Split(images, labels.astype(np.int32))


def _white_patch():
  pattern = np.zeros((32, 32, 3), np.uint8)
  mask = np.zeros((32, 32, 3), np.float32)
  pattern[-3:, -3:] = 255
  mask[-3:, -3:] = 1
  return attacks.Trigger(pattern, mask)


def test_known_acc_and_asr():
  split = _split()
  m = evaluate.evaluate(_oracle, {"target": 0}, split, _white_patch(),
                        {"name": "badnets", "target": 0}, batch_size=32, progress=False)
  assert m["acc"] == pytest.approx(0.8)
  assert m["asr"] == pytest.approx(1.0)  # over the 90 non-target images
  # a model whose backdoor points elsewhere: ASR counts only hits on the target
  m = evaluate.evaluate(_oracle, {"target": 5}, split, _white_patch(),
                        {"name": "badnets", "target": 0}, batch_size=32, progress=False)
  assert m["asr"] == 0.0


def test_asr_all_to_all():
  split = _split()
  # oracle sends triggered inputs to 0; all-to-all wants (y + 1) % 10: hits only y = 9
  m = evaluate.evaluate(_oracle, {"target": 0}, split, _white_patch(),
                        {"name": "badnets_a2a"}, batch_size=64, progress=False)
  assert m["asr"] == pytest.approx(0.1)


def test_predict_pads_last_batch_and_rejects_empty():
  split = _split(37)
  preds = evaluate.predict(_oracle, {"target": 0}, split.images, batch_size=16, progress=False)
  np.testing.assert_array_equal(preds, split.images[:, 0, 0, 0])
  with pytest.raises(ValueError, match="non-empty"):
    evaluate.predict(_oracle, {"target": 0}, split.images[:0], progress=False)
