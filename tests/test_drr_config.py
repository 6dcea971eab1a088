from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from drr_jax.defenses import drr
from drr_jax.defenses.drr import DefenseError, DRRConfig, default_config, make_config


def test_defaults_round_trip():
  assert DRRConfig().to_dict() == default_config()
  assert list(DRRConfig().to_dict()) == list(default_config())
  assert json.loads(json.dumps(default_config())) == default_config()  # JSON-able
  assert DRRConfig.from_overrides(None) == DRRConfig() == make_config({})
  cfg = make_config({"tau": 1.5, "layers": ["a", "b"]})
  assert cfg.tau == 1.5 and cfg.layers == ("a", "b")
  assert cfg.to_dict() == {**default_config(), "tau": 1.5, "layers": ["a", "b"]}
  assert make_config(cfg) is cfg
  assert DRRConfig.from_overrides(cfg.to_dict()) == cfg


def test_unknown_key_is_named():
  with pytest.raises(DefenseError, match=r"unknown DRR setting\(s\) \['colour'\]"):
    make_config({"colour": 1, "tau": 2.0})


@pytest.mark.parametrize("overrides, setting", [
    ({"tau": -1.0}, "tau"),
    ({"tau": float("nan")}, "tau"),
    ({"tau": "2"}, "tau"),
    ({"steps": "200"}, "steps"),
    ({"steps": -1}, "steps"),
    ({"lr": "0.1"}, "lr"),
    ({"batch_size": 0.5}, "batch_size"),
    ({"k": 0}, "k"),
    ({"k": "4"}, "k"),
    ({"side": "middle"}, "side"),
    ({"mode": "twice"}, "mode"),
    ({"search": "sideways"}, "search"),
    ({"search": ["joint"]}, "search"),
    ({"pooling": "median"}, "pooling"),
    ({"direction": "mean"}, "direction"),
    ({"mean_fit": "border"}, "mean_fit"),
    ({"locate": 1}, "locate"),
    ({"confirm": "yes"}, "confirm"),
    ({"rounds": 0}, "rounds"),
    ({"confirm_samples": "5000"}, "confirm_samples"),
    ({"min_tail_flip": 2.0}, "min_tail_flip"),
    ({"tail_z": float("inf")}, "tail_z"),
    ({"tail_overlap": 1.5}, "tail_overlap"),
    ({"tail_overlap": "half"}, "tail_overlap"),
    ({"carry_link": 2.0}, "carry_link"),
    ({"max_collateral": 2.0}, "max_collateral"),
    ({"seed": -1}, "seed"),
    ({"seed": 0.5}, "seed"),
    ({"layers": "conv"}, "layers"),
    ({"layers": ["conv", 3]}, "layers"),
])
def test_bad_values_name_the_setting(overrides, setting):
  with pytest.raises(DefenseError, match=setting):
    make_config(overrides)
  with pytest.raises(DefenseError, match=setting):
    DRRConfig(**overrides)


def test_a_bad_config_fails_before_the_data_is_looked_at():
  # the batch is not even an array: the config is checked first
  with pytest.raises(DefenseError, match="tau"):
    drr.defend(None, {}, object(), config={"tau": "high"}, progress=False)


def test_the_config_is_frozen():
  cfg = DRRConfig()
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.tau = 1.0  # type: ignore[misc]
  with pytest.raises(TypeError):
    DRRConfig(2.0)  # keyword-only: no positional settings
  assert hash(make_config({"layers": ["a"]})) == hash(make_config({"layers": ("a",)}))


def test_inference_and_the_defense_do_not_import_the_attacks():
  code = ("import importlib, json, sys; importlib.import_module(sys.argv[1]); "
          "print(json.dumps(sorted(m for m in sys.modules if m.startswith('drr_jax'))))")
  for module in ("drr_jax.inference", "drr_jax.defenses"):
    out = subprocess.run([sys.executable, "-c", code, module], capture_output=True,
                         text=True, check=True).stdout
    loaded = json.loads(out)
    assert module in loaded
    assert not any(m == "drr_jax.attacks" or m.startswith("drr_jax.attacks.")
                   for m in loaded), loaded
    assert "drr_jax.evaluate" not in loaded, loaded


@pytest.mark.parametrize("raw, value", [
    ("one_pass", "one_pass"),            # a string needs no quotes
    ("'one_pass'", "one_pass"),          # and may have them
    ("1.5", 1.5), ("2", 2), ("True", True), ("None", None),
    ("[conv1,conv2]", ["conv1", "conv2"]),  # bare words in a list
    ("[stage1/conv1, 'head']", ["stage1/conv1", "head"]),
    ("[]", []),
    ("nan", "nan"),                      # not a literal: left for the checks to refuse
])
def test_command_line_values_are_read_without_quoting(raw, value):
  from drr_jax import configs
  got = configs.override(default_config(), [f"layers={raw}"])["layers"]
  assert got == value and type(got) is type(value)


def test_settings_read_drop_what_the_mode_does_not_read():
  """A paper-mode record made before a ranked-only setting existed reads as the same
  run; in mode 'ranked' every setting counts."""
  from drr_jax.defenses.drr.config import RANKED_ONLY, settings_read
  from drr_jax.defenses.paper import paper_config
  from drr_jax.defenses import drr
  paper = {**drr.default_config(), **paper_config()}
  old = {k: v for k, v in paper.items() if k not in ("ranked_rounds", "later_samples")}
  assert settings_read(old) == settings_read(paper)
  assert settings_read({**paper, "ranked_rounds": 3}) == settings_read(paper)
  assert settings_read({**paper, "tau": 3.0}) != settings_read(paper)
  ranked = drr.default_config()
  assert ranked["mode"] == "ranked"
  assert settings_read({**ranked, "ranked_rounds": 3}) != settings_read(ranked)
  assert set(RANKED_ONLY) <= set(settings_read(ranked))
