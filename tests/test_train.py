from __future__ import annotations

import jax
import numpy as np
import pytest

from drr_jax import attacks, checkpoint, configs, data, train


def _setup(n=64, epochs=1):
  cfg = configs.get_config("tiny")
  cfg["train"].update(epochs=epochs, batch_size=32)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)
  labels = np.tile(np.arange(10), n)[:n].astype(np.int32)
  ps = attacks.poison(images, labels, cfg["attack"])
  val = data.Split(images[:8], labels[:8])
  return cfg, ps, val


def _same(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(x, y), a, b)))


def test_two_steps_change_params_and_checkpoint_restores_bitwise(tmp_path):
  cfg, ps, val = _setup()
  model = train.build_model(cfg)
  tx = train.make_optimizer(cfg, 2)
  init = train.init_state(model, tx, jax.random.split(jax.random.key(cfg["seed"]))[0])
  state, meta = train.train(cfg, ps, val, tmp_path, progress=False)
  assert int(state["step"]) == 2 and len(meta["history"]) == 1
  assert not _same(init["params"], state["params"])
  assert not _same(init["batch_stats"], state["batch_stats"])
  model2, variables, meta2, record = checkpoint.load_model(tmp_path)
  assert model2 == model
  assert _same(variables["params"], state["params"])
  assert _same(variables["batch_stats"], state["batch_stats"])
  np.testing.assert_array_equal(checkpoint.poison_indices(record), ps.poison_idx)
  np.testing.assert_array_equal(record["pattern"], ps.trigger.pattern)
  assert meta2["config"] == cfg


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, monkeypatch):
  cfg, ps, val = _setup(epochs=2)
  full, _ = train.train(cfg, ps, val, tmp_path / "a", progress=False)

  real_save = checkpoint.save
  def save_then_die(*args, **kwargs):
    real_save(*args, **kwargs)
    raise KeyboardInterrupt("killed after the first epoch")
  monkeypatch.setattr(checkpoint, "save", save_then_die)
  with pytest.raises(KeyboardInterrupt):
    train.train(cfg, ps, val, tmp_path / "b", progress=False)
  monkeypatch.setattr(checkpoint, "save", real_save)
  resumed, meta = train.train(cfg, ps, val, tmp_path / "b", resume=True, progress=False)
  assert int(resumed["step"]) == int(full["step"]) == 4
  assert [h["epoch"] for h in meta["history"]] == [1, 2]
  assert _same(resumed["params"], full["params"])


def test_resume_refuses_another_config(tmp_path):
  cfg, ps, val = _setup()
  train.train(cfg, ps, val, tmp_path, progress=False)
  cfg["train"]["lr"] = 0.01
  with pytest.raises(checkpoint.CheckpointError, match="another config"):
    train.train(cfg, ps, val, tmp_path, resume=True, progress=False)


def test_too_small_training_set(tmp_path):
  cfg, ps, val = _setup(n=16)
  with pytest.raises(ValueError, match="smaller than one batch"):
    train.train(cfg, ps, val, tmp_path, progress=False)


def test_update_fn_rejects_mismatched_batches():
  cfg, ps, _ = _setup()
  model = train.build_model(cfg)
  tx = train.make_optimizer(cfg, 2)
  state = train.init_state(model, tx, jax.random.key(0))
  update = train.make_update_fn(model, tx)
  with pytest.raises(AssertionError):
    update(state, ps.images[:8], ps.labels[:7], jax.random.key(1))
  with pytest.raises(AssertionError):
    update(state, ps.images[:8, :, :, 0], ps.labels[:8], jax.random.key(1))
