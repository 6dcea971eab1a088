"""The defense figure that `launch.defend` writes (`defense.png`).

Top: DRR's criterion (the skewness of the best direction) per layer, the layers where a
direction was kept marked. Bottom: a few triggered images with the model's predictions
before and after the defense. Matplotlib with the Agg backend (no display needed); the
file is written atomically (`utils.atomic_path`).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from drr_jax import utils


def _name(classes: Sequence[str] | None, c: int) -> str:
  return classes[c] if classes is not None and 0 <= c < len(classes) else str(c)


def defense_figure(path: str, report: dict[str, Any] | None, images: np.ndarray | None,
                   before: np.ndarray | None, after: np.ndarray | None,
                   classes: Sequence[str] | None = None, target: int | None = None,
                   title: str = "", labels: np.ndarray | None = None) -> str:
  """Write the figure to `path` (PNG) and return the path.

  report: DRR's report (`report["layers"][i]["criterion"][0]`, `["kept"]`); None or a
  report without layers (a baseline) leaves the criterion panel out. images: (n, H, W, C)
  uint8 triggered images, `before`/`after` the predicted classes (n,), `labels` their true
  classes (optional); None leaves the image row out. A prediction still equal to
  `target` after the defense is drawn in red."""
  import matplotlib
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt

  layers = list((report or {}).get("layers") or [])
  layers = [e for e in layers if e.get("criterion")]
  n_img = 0 if images is None else len(images)
  rows = (1 if layers else 0) + (1 if n_img else 0)
  if rows == 0:
    raise ValueError("nothing to plot: no per-layer criterion and no images")
  cols = max(n_img, 1)
  fig = plt.figure(figsize=(max(8.0, 1.6 * cols), 3.4 * rows), dpi=100)
  grid = fig.add_gridspec(rows, cols, height_ratios=[1.4] * (1 if layers else 0)
                          + [1.0] * (1 if n_img else 0))
  r = 0
  if layers:
    ax = fig.add_subplot(grid[0, :])
    crit = np.array([e["criterion"][0] for e in layers], float)
    kept = np.array([bool(e.get("kept")) for e in layers])
    x = np.arange(len(layers))
    ax.bar(x[~kept], crit[~kept], color="0.7", label="no direction kept")
    ax.bar(x[kept], crit[kept], color="tab:red", label="direction kept (removed)")
    ax.set_xticks(x)
    ax.set_xticklabels([e["layer"] for e in layers], rotation=90, fontsize=6)
    rounds = [e.get("round", 1) for e in layers]
    for i in range(1, len(layers)):  # a later ranking round re-reads the modified network
      if rounds[i] != rounds[i - 1]:
        ax.axvline(i - 0.5, color="0.3", lw=0.8, ls="--")
        ax.text(i - 0.3, 0.98, f"round {rounds[i]} (network after round {rounds[i - 1]})",
                transform=ax.get_xaxis_transform(), fontsize=7, va="top")
    ax.set_ylabel("criterion (skewness)")
    ax.set_title("DRR criterion per layer (best direction)")
    ax.legend(fontsize=7, loc="upper left")
    r = 1
  if n_img:
    for i in range(n_img):
      ax = fig.add_subplot(grid[r, i])
      img = np.asarray(images[i])
      ax.imshow(img.squeeze() if img.shape[-1] == 1 else img,
                cmap="gray" if img.shape[-1] == 1 else None, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      b, a = int(before[i]), int(after[i])
      colour = "tab:red" if target is not None and a == target else "black"
      head = "" if labels is None else f"true: {_name(classes, int(labels[i]))}\n"
      ax.set_title(f"{head}before: {_name(classes, b)}\nafter: {_name(classes, a)}",
                   fontsize=8, color=colour)
    fig.text(0.5, 0.01 if layers else 0.02,
             "triggered validation images" + (f" (target: {_name(classes, target)})"
                                              if target is not None else ""),
             ha="center", fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  try:
    with utils.atomic_path(path) as tmp:
      fig.savefig(tmp, format="png")
  finally:
    plt.close(fig)
  return path
