from __future__ import annotations

import os
import shutil

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from drr_jax import checkpoint, train
from tests.test_train import _setup


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("run")
  cfg, ps, val = _setup()
  train.train(cfg, ps, val, path, progress=False)
  return path


def test_missing_checkpoint(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
    checkpoint.load_model(tmp_path / "nothing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint"):
    checkpoint.load_model(tmp_path / "empty")


def test_damaged_checkpoint(run_dir, tmp_path):
  broken = tmp_path / "broken"
  shutil.copytree(run_dir, broken)
  step_dir = next((broken / "checkpoints").iterdir())
  for root, _, files in os.walk(step_dir / "model"):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "r+b") as fh:
        fh.write(b"\x00garbage" * 8)
  with pytest.raises(checkpoint.CheckpointError, match="broken"):
    checkpoint.load_model(broken)


def test_params_that_do_not_fit_the_model(run_dir):
  model, variables, meta, _ = checkpoint.load_model(run_dir)
  wrong = jax.tree.map(lambda x: x, variables)
  wrong["params"]["head"]["kernel"] = np.zeros((3, 10), np.float32)
  with pytest.raises(checkpoint.CheckpointError, match="head"):
    checkpoint.check_fits(wrong, variables, "these params")
  del wrong["params"]["stem_conv"]
  with pytest.raises(checkpoint.CheckpointError, match="missing"):
    checkpoint.check_fits(wrong, variables, "these params")


def test_meta_naming_another_model_is_refused(run_dir, tmp_path):
  other = tmp_path / "other"
  shutil.copytree(run_dir, other)
  meta_dir = next((other / "checkpoints").iterdir()) / "meta"
  meta_file = meta_dir / "metadata"  # orbax's JSON item file
  text = meta_file.read_text().replace('"resnet18"', '"wrn28_1"')
  meta_file.write_text(text)
  with pytest.raises(checkpoint.CheckpointError, match="does not fit|cannot restore"):
    checkpoint.load_model(other)


def _largest_file(folder):
  files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
  return max(files, key=os.path.getsize)


def test_random_bytes_in_the_model_data_are_refused(run_dir, tmp_path):
  """Orbax reads such a checkpoint without complaint; the saved digests do not."""
  bad = tmp_path / "bad"
  shutil.copytree(run_dir, bad)
  step_dir = max((bad / "checkpoints").iterdir(), key=lambda p: p.name)
  data_file = _largest_file(step_dir / "model")
  size = os.path.getsize(data_file)
  with open(data_file, "r+b") as fh:
    fh.seek(size // 2)
    fh.write(np.random.default_rng(0).integers(0, 256, 64, np.uint8).tobytes())
  with pytest.raises(checkpoint.CheckpointError, match="is damaged: item .model. does not match"):
    checkpoint.load_model(bad)
  checkpoint.load_model(run_dir)  # the original still loads


def test_nan_params_are_refused(run_dir, tmp_path):
  model, variables, meta, record = checkpoint.load_model(run_dir)
  variables = jax.tree.map(np.asarray, variables)
  variables["params"]["head"]["kernel"] = variables["params"]["head"]["kernel"].copy()
  variables["params"]["head"]["kernel"][0, 0] = np.nan
  checkpoint.save(checkpoint.manager(tmp_path / "nan" / "checkpoints", keep=1), 1,
                  {"model": variables, "attack": record, "meta": meta})
  with pytest.raises(checkpoint.CheckpointError, match="NaN or Inf.*head/kernel"):
    checkpoint.load_model(tmp_path / "nan")


def test_a_checkpoint_without_digest_is_refused_until_sealed(run_dir, tmp_path):
  model, variables, meta, record = checkpoint.load_model(run_dir)
  old = tmp_path / "old" / "checkpoints"
  mngr = checkpoint.manager(old, keep=1)
  args = {"model": ocp.args.StandardSave(variables), "meta": ocp.args.JsonSave(meta),
          "attack": ocp.args.StandardSave(record)}
  mngr.save(3, args=ocp.args.Composite(**args))  # as checkpoints were written before
  mngr.wait_until_finished()
  with pytest.raises(checkpoint.CheckpointError, match="no array digest.*seal"):
    checkpoint.load_model(old.parent)
  checkpoint.seal(old.parent)
  _, again, _, _ = checkpoint.load_model(old.parent)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, again),
                              jax.tree.map(np.asarray, variables))
  assert sorted(p.name for p in old.iterdir()) == ["3"]  # no debris left beside it
