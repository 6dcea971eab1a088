"""Writers killed midway (SIGKILL to a subprocess, at the worst moment: everything written
but the final rename): the earlier result survives, the next run ignores or cleans the
debris, and a killed training run resumes to the very params of an uninterrupted one."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from drr_jax import checkpoint, data, report
from tests import killing
from tests.conftest import make_fake_zips

# (writer, code that writes version `V` to `P`, text in the final rename's destination)
WRITERS = {
    "json record": "from drr_jax import utils\nutils.write_json_atomic(P, {'v': V})",
    "png figure": (
        "import numpy as np\nfrom drr_jax import plots\n"
        "plots.defense_figure(P, {'layers': [{'layer': 'a', 'criterion': [float(V)], "
        "'kept': 1}]}, None, None, None)"),
    "data cache": (
        "import numpy as np\nfrom drr_jax import data\n"
        "data.write_cached(P, data.Split(np.full((4, 32, 32, 3), V, np.uint8), "
        "np.zeros(4, np.int32)))"),
    "report table": ("from pathlib import Path\nfrom drr_jax import report\n"
                     "report._write_text(Path(P), f'table {V}')"),
    "torch file": ("from drr_jax.interop import torch as t\n"
                   "t._atomic_torch_save({'v': V}, P)"),
}
NAMES = {"json record": "r.json", "png figure": "defense.png", "data cache": "train.npz",
         "report table": "table.md", "torch file": "model.pt"}


def _write(writer, path, version, **kill):
  code = f"P, V = {str(path)!r}, {version}\n" + WRITERS[writer]
  return killing.run(code, **kill)


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_file_writer_killed_before_its_rename_keeps_the_old_file(writer, tmp_path):
  if writer == "torch file":
    pytest.importorskip("torch")
  path = tmp_path / NAMES[writer]
  first = _write(writer, path, 1)
  assert first.returncode == 0, first.stderr
  old = path.read_bytes()
  proc = _write(writer, path, 2, kill_on=path.name)
  assert killing.killed(proc), proc.stderr
  assert path.read_bytes() == old  # the earlier result is intact
  left = killing.debris(tmp_path)
  assert left and all(n.startswith(f".{path.name}.") for n in left), left  # hidden
  if writer == "json record":  # the record reader does not take debris for a record
    _, warnings = report.load_records(tmp_path)
    assert not any(".tmp" in w for w in warnings), warnings
  if writer == "data cache":
    assert data.read_cached(path).images[0, 0, 0, 0] == 1
  again = _write(writer, path, 3)
  assert again.returncode == 0, again.stderr
  assert path.read_bytes() != old


def _train_argv(work, data_dir, *extra):
  return (f"from launch import train\ntrain.main(['--preset', 'tiny', '--epochs', '2', "
          f"'--data_dir', {str(data_dir)!r}, '--workdir', {str(work)!r}"
          + "".join(f", {e!r}" for e in extra) + "])")


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
  """Fake CIFAR zips and an uninterrupted 2-epoch tiny run on them, in a subprocess."""
  root = tmp_path_factory.mktemp("killrun")
  make_fake_zips(root / "data", per_class=60)
  env = {"DRR_CACHE_DIR": str(root / "cache")}
  proc = killing.run(_train_argv(root / "full", root / "data"), env=env)
  assert proc.returncode == 0, proc.stderr
  _, variables, meta, _ = checkpoint.load_model(root / "full")
  return root, env, variables, meta


def _same(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(x, y), a, b)))


@pytest.mark.parametrize("where", ["mid-epoch", "while saving"])
def test_training_killed_then_resumed_ends_bit_identical(fake_run, where, tmp_path):
  root, env, full, meta = fake_run
  spe = meta["steps_per_epoch"]
  kill = ({"at_step": spe + spe // 2} if where == "mid-epoch"  # halfway through epoch 2
          else {"kill_on": f"checkpoints{os.sep}{2 * spe}", "skip": 2})  # saving epoch 2
  work = tmp_path / "run"
  proc = killing.run(_train_argv(work, root / "data"), env=env, **kill)
  assert killing.killed(proc), proc.stderr
  assert checkpoint.manager(work / "checkpoints", create=False).latest_step() == spe
  if where == "while saving":
    assert killing.debris(work)  # the half-written step is there, under a tmp name
  resumed = killing.run(_train_argv(work, root / "data", "--resume"), env=env)
  assert resumed.returncode == 0, resumed.stderr
  assert "at epoch 1" in resumed.stdout
  assert killing.debris(work) == []  # the resumed run cleaned it
  _, variables, meta2, _ = checkpoint.load_model(work)
  assert [h["epoch"] for h in meta2["history"]] == [1, 2]
  assert _same(variables, full)


def test_defend_killed_while_writing_leaves_no_output_folder(fake_run, tmp_path):
  root, env, _, _ = fake_run
  out = tmp_path / "defended"
  code = (f"from launch import defend\ndefend.main(['--checkpoint', {str(root / 'full')!r}, "
          f"'--data_dir', {str(root / 'data')!r}, '--out', {str(out)!r}, '--no_test', "
          "'--set', 'mode=one_pass', '--set', 'confirm=False', '--set', 'k=1', "
          "'--set', 'steps=5', '--set', 'tau=0.0'])")
  proc = killing.run(code, kill_on="result.json", env=env)
  assert killing.killed(proc), proc.stderr
  assert not out.exists()  # nothing half-written under the promised name
  assert all(n.startswith(".defended.") for n in killing.debris(tmp_path))
  checkpoint.load_model(root / "full")  # the model it read is untouched
  again = killing.run(code, env=env)
  assert again.returncode == 0, again.stderr
  assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "defense.png",
                                                    "result.json"]
  assert json.loads((out / "result.json").read_text())["method"] == "drr"
  checkpoint.load_model(out)


def test_a_killed_seal_leaves_the_checkpoint_as_it_was(fake_run, tmp_path):
  root, _, full, _ = fake_run
  import shutil
  ckpt = tmp_path / "ckpt"
  shutil.copytree(root / "full", ckpt)
  for step in (ckpt / "checkpoints").iterdir():
    shutil.rmtree(step / checkpoint.DIGEST)  # as written before digests existed
  with pytest.raises(checkpoint.CheckpointError, match="seal"):
    checkpoint.load_model(ckpt)
  proc = killing.run(f"from drr_jax import checkpoint\ncheckpoint.seal({str(ckpt)!r})",
                     kill_on=checkpoint.DIGEST)
  assert killing.killed(proc), proc.stderr
  with pytest.raises(checkpoint.CheckpointError, match="seal"):  # unchanged: unsealed
    checkpoint.load_model(ckpt)
  checkpoint.seal(ckpt)
  _, variables, _, _ = checkpoint.load_model(ckpt)
  assert _same(variables, full)


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path):
  """Files and folders that the atomic writers leave are as readable as open() and
  mkdir() would have made them (mkstemp alone gives 0600, private to the writer)."""
  from drr_jax import utils
  old = os.umask(0o022)
  try:
    utils.write_json_atomic(tmp_path / "r.json", {"v": 1})
    with utils.atomic_dir(tmp_path / "d") as d:
      (d / "f").write_text("x")
    os.umask(0o077)
    utils.write_json_atomic(tmp_path / "private.json", {"v": 1})
  finally:
    os.umask(old)
  assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
  assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
  assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
