"""`defend` with the same inputs and seed gives bit-identical params and reports on CPU in
two separate processes (fresh compilation, fresh PRNG state): the defaults, and a setting
that folds directions (so the equality covers the search, the confirmation and the fold).
"""
from __future__ import annotations

import json

import numpy as np

from tests import killing

SCRIPT = """
import jax, numpy as np
from tests.defend_dump import defend_all, flat
from tests.tiny_net import TinyNet

rng = np.random.default_rng(0)
images = rng.integers(0, 256, (512, 32, 32, 3)).astype(np.uint8)
images[:51, -4:, -4:] = 255  # a 10 % group with a white corner patch
model = TinyNet(width=8)
variables = model.init(jax.random.key(0), images[:2])
out = flat("initial", variables)
out.update(defend_all(model, variables, images, [
    ("defaults", None), ("folding", {"mode": "one_pass", "confirm": False, "tau": 0.5})]))
np.savez(OUT, **out)
"""


def _run(path):
  proc = killing.run(f"OUT = {str(path)!r}\n" + SCRIPT)
  assert proc.returncode == 0, proc.stderr
  return dict(np.load(path))


def test_defend_is_bit_identical_across_processes(tmp_path):
  first, second = _run(tmp_path / "a.npz"), _run(tmp_path / "b.npz")
  assert sorted(first) == sorted(second)
  for name in first:
    np.testing.assert_array_equal(first[name], second[name], err_msg=name)
  report = json.loads(first["folding report"].tobytes())
  assert report["directions_kept"] > 0, report  # the equality covers a real fold
  changed = [k for k in first if k.startswith("folding[") and not np.array_equal(
      first[k], first["initial" + k[len("folding"):]])]
  assert changed, "the folding setting changed no parameter"


def test_records_name_the_cpu_whose_kernels_rounded_them(tmp_path):
  """Bit-identity holds on one machine only; XLA picks CPU kernels by vector extension, so
  the machine string of every record names the CPU model and its widest extension."""
  from drr_jax import utils
  block = ("processor\t: {n}\nmodel name\t: Zen CPU {n}\n"
           "flags\t\t: fpu sse4_2 avx {extra}\n")
  info = tmp_path / "cpuinfo"
  info.write_text(block.format(n=0, extra="avx2") + "\n" + block.format(n=1, extra="avx512f"))
  assert utils.cpu_description(info) == "Zen CPU 0, avx2"  # the first processor's block
  info.write_text(block.format(n=0, extra="avx2 avx512f"))
  assert utils.cpu_description(info) == "Zen CPU 0, avx512f"
  assert utils.cpu_description(tmp_path / "missing") == utils.platform.processor()
  cpu = utils.cpu_description()
  assert (f"({cpu})" in utils.machine_description()) == bool(cpu)
