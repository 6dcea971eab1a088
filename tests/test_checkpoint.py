from __future__ import annotations

import os
import shutil

import jax
import numpy as np
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
