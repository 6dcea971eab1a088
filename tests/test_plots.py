"""drr_jax.plots: the defense figure is written atomically, with or without each panel."""
from __future__ import annotations

import numpy as np
import pytest

from drr_jax import data, plots


def _report():
  return {"layers": [{"layer": f"l{i}", "criterion": [float(i), 0.1], "kept": int(i == 2)}
                     for i in range(5)]}


def test_defense_figure_writes_a_png_and_leaves_no_temporary(tmp_path):
  imgs = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
  out = tmp_path / "defense.png"
  plots.defense_figure(str(out), _report(), imgs, np.zeros(6, int), np.arange(6),
                       data.CLASSES, 0, "drr on x", labels=np.arange(6) + 1)
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert [p.name for p in tmp_path.iterdir()] == ["defense.png"]
  # either panel alone (a baseline's report has no criterion; no trigger: no images)
  plots.defense_figure(str(tmp_path / "a.png"), {"layers": []}, imgs[:2], [1, 1], [2, 2])
  plots.defense_figure(str(tmp_path / "b.png"), _report(), None, None, None)
  with pytest.raises(ValueError, match="nothing to plot"):
    plots.defense_figure(str(tmp_path / "c.png"), None, None, None, None)
  assert not (tmp_path / "c.png").exists()
