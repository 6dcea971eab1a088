"""benchmarks/defend_bench.py and benchmarks/train_bench.py run end to end on tiny
settings and report every figure (keys present, values positive). No timing is asserted:
the figures themselves are taken by hand (benchmarks/README.md)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
  spec = importlib.util.spec_from_file_location(f"_bench_{name}",
                                                ROOT / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_defend_bench_reports_every_phase_and_restores_the_library(tmp_path, capsys):
  bench = _script("defend_bench")
  from drr_jax import inference, stiefel
  from drr_jax.defenses.drr.confirmation import Confirmer
  from drr_jax.defenses.drr.removal import Removal
  from drr_jax.defenses.drr.state import Run
  before = (Run.extract, stiefel.maximize, stiefel.maximize_stacked, Confirmer.check,
            Confirmer.base, Removal.project, inference.predict)
  out_json = tmp_path / "defend.json"
  out = bench.main(["--synthetic", "--n", "64", "--models",
                    f"random:{ROOT / 'tests' / 'tiny_net.py'}:TinyNet",
                    "--set", "steps=10", "--json", str(out_json)])
  after = (Run.extract, stiefel.maximize, stiefel.maximize_stacked, Confirmer.check,
           Confirmer.base, Removal.project, inference.predict)
  assert all(a is b for a, b in zip(before, after)), "a timing wrapper was left in place"
  assert json.loads(out_json.read_text())["results"][0]["n"] == 64
  (res,) = out["results"]
  assert res["n"] == 64 and set(res["runs"]) == {"floor", "default", "paper"}
  for mode, run in res["runs"].items():
    assert run["seconds"] > 0 and run["images_per_s"] > 0 and run["x_floor"] > 0, mode
    if bench.psutil is not None:
      assert run["peak_rss_mb"] > 0
  for mode in ("default", "paper"):
    run = res["runs"][mode]
    assert set(run["phases"]) == {*bench.PHASES, "other"}
    assert all(s >= 0 for s in run["phases"].values())
    assert sum(run["phases"].values()) == pytest.approx(run["seconds"], rel=1e-6)
    assert run["phases"]["features"] > 0 and run["phases"]["search"] > 0
    assert run["feature_passes"] >= 1 and run["features_mb"] > 0
  # the defaults confirm candidates; the paper's Algorithm 1 does not
  assert res["runs"]["default"]["phases"]["confirmation"] > 0
  assert res["runs"]["default"]["predicted_images"] > 0
  assert res["runs"]["paper"]["phases"]["confirmation"] == 0
  assert out["peak_rss_mb_process"] > 0 and out["environment"]["machine"]
  printed = capsys.readouterr().out
  assert "x floor" in printed and "TinyNet" in printed and "machine:" in printed


def test_same_decisions_tells_equal_runs_from_different_ones(tmp_path, capsys):
  """defend_bench --save twice on the same input gives 'same'; a changed variable or a
  different kept layer gives 'DIFFERENT' and exit status 1."""
  bench, same = _script("defend_bench"), _script("same_decisions")
  args = ["--synthetic", "--n", "64", "--modes", "default", "--models",
          f"random:{ROOT / 'tests' / 'tiny_net.py'}:TinyNet", "--set", "steps=10",
          "--set", "tau=0.0", "--set", "min_tail_flip=0.0"]
  for side in ("a", "b"):
    bench.main(args + ["--save", str(tmp_path / side)])
  (saved,) = sorted((tmp_path / "a").glob("*.npz"))
  assert same.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
  assert "same" in capsys.readouterr().out
  data = dict(np.load(saved))
  leaf = next(k for k in data if k != "__kept__")
  data[leaf] = data[leaf] + 1.0
  np.savez(tmp_path / "b" / saved.name, **data)
  assert same.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
  assert "DIFFERENT" in capsys.readouterr().out
  data = dict(np.load(saved))
  data["__kept__"] = json.dumps([{"layer": "elsewhere", "directions": []}])
  np.savez(tmp_path / "b" / saved.name, **data)
  assert same.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1


def test_train_bench_reports_both_frameworks(tmp_path):
  torch = pytest.importorskip("torch")
  bench = _script("train_bench")
  out_json = tmp_path / "train.json"
  threads = torch.get_num_threads()
  try:
    out = bench.main(["--models", "resnet18@0.125", "--batch", "8", "--steps", "2",
                      "--warmup", "1", "--repeats", "1", "--loop-images", "16",
                      "--inference-images", "16", "--torch-threads", "1",
                      "--json", str(out_json)])
  finally:
    torch.set_num_threads(threads)  # the script sets it for the whole process
  assert json.loads(out_json.read_text())["batch"] == 8
  (res,) = out["results"]
  assert set(res["runs"]) == {"jax step", "torch step", "jax grad", "torch grad",
                              "jax loop", "jax inference", "torch inference"}
  assert all(r["images_per_s"] > 0 for r in res["runs"].values())
  assert set(res["ratios"]) == {"step jax/torch", "loop/step jax", "loop jax/torch step",
                                "inference jax/torch", "grad jax/torch", "step/grad jax",
                                "step/grad torch"}
  assert all(v > 0 for v in res["ratios"].values())
  # the same network: as many parameters on both sides
  assert res["params"]["jax step"] == res["params"]["torch step"]
  assert out["environment"]["torch_threads"] == 1


@pytest.mark.parametrize("spec", ["resnet18@0.125", "wrn28_1@0.25"])
def test_torch_networks_compute_what_drr_jax_models_compute(spec):
  torch = pytest.importorskip("torch")
  from torch import nn

  from drr_jax.models import get_model
  bench = _script("train_bench")
  name, _, width = spec.partition("@")
  model = get_model(name, width=float(width))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.uint8))
  rng = np.random.default_rng(0)
  # non-trivial BatchNorm statistics, so that a swapped BN would show
  variables = jax.tree_util.tree_map(
      lambda x: x + 0.1 * jnp.asarray(rng.random(x.shape), x.dtype), variables)
  net = bench.torch_model(name, float(width)).eval()
  # the modules each framework creates, in call order
  order: list[str] = []
  model.apply(variables, jnp.zeros((1, 32, 32, 3), jnp.uint8),
              capture_intermediates=lambda m, _: bool(
                  order.append("/".join(m.path)) or False))
  jax_modules = [p for p in order if p and p.split("/")[-1].endswith(
      ("conv", "conv1", "conv2", "bn", "bn1", "bn2", "head"))]
  calls: list[nn.Module] = []
  hooks = [m.register_forward_hook(lambda m, i, o: calls.append(m))
           for m in net.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
  net(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
  for h in hooks:
    h.remove()
  assert len(calls) == len(jax_modules)
  params = variables["params"]
  stats = variables["batch_stats"]

  def at(tree, path):
    for k in path.split("/"):
      tree = tree[k]
    return tree

  with torch.no_grad():
    for m, path in zip(calls, jax_modules):
      p = at(params, path)
      if isinstance(m, nn.Conv2d):
        m.weight.copy_(torch.from_numpy(np.array(p["kernel"]).transpose(3, 2, 0, 1)))
      elif isinstance(m, nn.BatchNorm2d):
        s = at(stats, path)
        m.weight.copy_(torch.from_numpy(np.array(p["scale"])))
        m.bias.copy_(torch.from_numpy(np.array(p["bias"])))
        m.running_mean.copy_(torch.from_numpy(np.array(s["mean"])))
        m.running_var.copy_(torch.from_numpy(np.array(s["var"])))
      else:
        m.weight.copy_(torch.from_numpy(np.array(p["kernel"]).T))
        m.bias.copy_(torch.from_numpy(np.array(p["bias"])))
  images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  want = np.asarray(model.apply(variables, images))
  got = net(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).detach().numpy()
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


def test_conv_bench_reads_every_conv_of_the_model_and_times_both_frameworks(tmp_path):
  torch = pytest.importorskip("torch")
  bench = _script("conv_bench")
  from drr_jax.models import get_model
  convs = bench.model_convs(get_model("resnet18", width=0.125))
  # stem + 16 3x3 convs in 8 blocks + 3 strided 1x1 shortcuts (matrix products)
  assert sum(convs.values()) == 20
  assert sum(n for s, n in convs.items() if s.first) == 1
  assert sum(n for s, n in convs.items() if s.matmul) == 3
  assert {s.stride for s in convs} == {(1, 1), (2, 2)}
  threads = torch.get_num_threads()
  try:
    out = bench.main(["--models", "resnet18@0.125", "--batch", "2", "--steps", "1",
                      "--repeats", "1", "--torch-threads", "1", "--json",
                      str(tmp_path / "conv.json")])
  finally:
    torch.set_num_threads(threads)
  (res,) = out["results"]
  assert sum(r["count"] for r in res["rows"]) == 20
  for r in res["rows"]:
    want = {"fwd", "dk"} | (set() if r["shape"]["first"] else {"dx"})
    assert set(r["ms"]["jax"]) == set(r["ms"]["torch"]) == want
  assert res["total_ms"]["jax"]["all"] > 0 and res["total_ms"]["torch"]["all"] > 0
  assert json.loads((tmp_path / "conv.json").read_text())["batch"] == 2


@pytest.mark.parametrize("matmul,stride", [(False, 1), (False, 2), (True, 2)])
def test_conv_bench_times_the_same_convolution_in_both_frameworks(matmul, stride):
  torch = pytest.importorskip("torch")
  bench = _script("conv_bench")
  k = 1 if matmul else 3
  s = bench.ConvShape((8, 8), 4, 6, (k, k), (stride, stride), ((k // 2, k // 2),) * 2, 1,
                      matmul, False)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 4), np.float32)
  w = rng.standard_normal((k, k, 4, 6), np.float32)
  jf, tf = bench._jax_fns(s), bench._torch_fns(s, torch)
  ours = np.asarray(jf["fwd"](jnp.asarray(x), jnp.asarray(w), None))
  g = rng.standard_normal(ours.shape, np.float32)
  nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())
  targs = (nchw(x), torch.from_numpy(w.transpose(3, 2, 0, 1).copy()), nchw(g))
  jargs = (jnp.asarray(x), jnp.asarray(w), jnp.asarray(g))
  theirs = tf["fwd"](*targs).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(jf["dk"](*jargs)),
                             tf["dk"](*targs).numpy().transpose(2, 3, 1, 0),
                             rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(np.asarray(jf["dx"](*jargs)),
                             tf["dx"](*targs).numpy().transpose(0, 2, 3, 1),
                             rtol=1e-4, atol=1e-3)


def test_record_costs_reads_each_timed_record_and_skips_the_rest(tmp_path, capsys):
  bench = _script("record_costs")
  rec = {"schema": 1, "status": "done", "cell_id": "cell-a", "git": {"commit": "abcdef0123"},
         "times": {"plain_pass_seconds": 10.0, "defense_seconds": 35.0,
                   "paper_defense_seconds": 20.0},
         "drr": {"num_images": 1000, "directions_kept": 2, "feature_passes": 2},
         "paper": {"drr": {"feature_passes": 5}}}
  (tmp_path / "a.json").write_text(json.dumps(rec))
  (tmp_path / "b.json").write_text(json.dumps({**rec, "cell_id": "cell-b",
                                               "times": {"defense_seconds": 3.0}}))
  (tmp_path / "c.json").write_text("{not json")
  rows = bench.main([str(tmp_path)])
  assert [r["cell"] for r in rows] == ["cell-a"]
  assert rows[0]["drr_x"] == pytest.approx(3.5) and rows[0]["paper_x"] == pytest.approx(2.0)
  assert rows[0]["passes"] == 2 and rows[0]["paper_passes"] == 5
  out = capsys.readouterr().out
  assert "| `cell-a` | abcdef0 | 1,000 | 10.0 | 35.0 | 3.50 |" in out
  assert "median DRR x floor 3.50" in out
  with pytest.raises(SystemExit):
    bench.main([str(tmp_path / "absent")])


def test_compare_runs_tells_kept_units_directions_and_figures_apart(tmp_path, capsys):
  compare_runs = _script("compare_runs")
  v = [1.0, 0.0, 0.0]
  w = [0.6, 0.8, 0.0]
  layer = lambda name, dirs: {"layer": name, "kept": len(dirs), "directions": dirs}
  record = lambda dirs, acc, asr: {
      "drr": {"layers": [layer("a", dirs), layer("b", [])], "seconds": 10.0},
      "after": {"val": {"acc": acc, "asr": asr}}}
  (tmp_path / "records").mkdir()
  (tmp_path / "records" / "same.json").write_text(json.dumps(record([v], 0.8, 0.02)))
  (tmp_path / "records" / "moved.json").write_text(json.dumps(record([v], 0.8, 0.02)))
  for name, dirs, asr in (("same", [v], 0.02), ("moved", [w], 0.05)):
    (tmp_path / "runs" / name).mkdir(parents=True)
    (tmp_path / "runs" / name / "result.json").write_text(json.dumps(
        {"drr": record(dirs, 0.8, asr)["drr"], "after": {"val": {"acc": 0.8, "asr": asr}}}))
  compare_runs.main(["--runs", str(tmp_path / "runs"), "--records", str(tmp_path / "records")])
  rows = {line.split("`")[1]: line for line in capsys.readouterr().out.splitlines()
          if line.startswith("| `")}
  assert "| yes | 1.0000 | 80.00/2.00 | 80.00/2.00 |" in rows["same"]
  assert "| yes | 0.6000 | 80.00/2.00 | 80.00/5.00 |" in rows["moved"]  # same unit, cos 0.6
