"""The paper's DRR (Algorithm 1 as written) as a preset of the same machinery."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drr_jax import defend
from drr_jax.defenses import DRRConfig, paper_config
from launch import defend as launch_defend
from tests.test_defend import MLP


def _skewed(n=4000, seed=1):
  x = np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)
  d = np.random.default_rng(2).normal(size=8)
  d /= np.linalg.norm(d)
  x[: n // 10] += 12.0 * d  # a 10 % cluster far along d: skewness ~2.4 > tau = 2
  return x.reshape(n, 2, 2, 2), d


def test_paper_config_is_algorithm_1_as_written():
  cfg = DRRConfig.from_overrides(paper_config())
  assert (cfg.search, cfg.k, cfg.tau, cfg.side) == ("joint", 1, 2.0, "input")
  assert not cfg.confirm and not cfg.keep_mean and not cfg.carry
  assert cfg.direction == "skew" and cfg.mode == "sequential"
  assert cfg.skip_classifier is False  # for l = 1 to L, the classifier included


def test_paper_mode_zeroes_the_skewed_direction_with_no_confirmation():
  x, d = _skewed()
  v = MLP().init(jax.random.key(0), jnp.asarray(x[:2]))
  new, report = defend(MLP(), v, x, config=paper_config(), progress=False)
  layers = [e["layer"] for e in report["layers"]]
  assert layers[:2] == ["hidden", "head"]  # every layer visited, the classifier too
  hidden = report["layers"][0]
  assert hidden["kept"] == 1 and hidden["criterion"][0] > 2.0
  assert hidden.get("checks", []) == []  # no confirmation
  v_kept = np.asarray(hidden["directions"][0])
  kernel = np.asarray(new["params"]["hidden"]["kernel"])
  old = np.asarray(v["params"]["hidden"]["kernel"])
  # W^ = P W: the kept direction is zeroed (not mean-replaced) and the bias is untouched
  np.testing.assert_allclose(v_kept @ kernel, 0.0, atol=1e-5)
  np.testing.assert_array_equal(new["params"]["hidden"]["bias"], v["params"]["hidden"]["bias"])
  np.testing.assert_allclose(kernel, old - np.outer(v_kept, v_kept @ old), atol=1e-5)
  assert abs(v_kept @ d) > 0.9  # the direction found is the cluster's


def test_defend_cli_checks_settings_before_loading_anything(tmp_path, capsys):
  missing = str(tmp_path / "no-such-checkpoint")
  with pytest.raises(SystemExit, match="tau"):
    launch_defend.main(["--checkpoint", missing, "--preset", "paper", "--set", "tau=-1",
                        "--out", str(tmp_path / "out")])
  with pytest.raises(SystemExit, match="unknown"):
    launch_defend.main(["--checkpoint", missing, "--set", "nonsense=1",
                        "--out", str(tmp_path / "out")])
  assert not (tmp_path / "out").exists()
