"""Other readers of a removed direction: layers that see the same channels.

A direction kept at one layer is often delivered to later layers too, through identity
shortcuts (the residual stream: `channel_link`), or the very same tensor is read by
another layer, such as a 1x1 shortcut conv beside a block's first conv, whatever the
order the model calls them in (`same_input`). `carry_on` removes a kept direction from
those readers where that flips at least half of the tail images whose prediction has not
changed yet (sequential mode, input side, with confirmation).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from drr_jax.defenses.drr.state import LoopState, Run


def channel_link(a: np.ndarray, b: np.ndarray) -> float:
  """How much two (N, C) features share their channels: the mean correlation over
  images of channel c in a with channel c in b, less the mean over unmatched pairs
  (c, c'). About 0 for layers whose channels are unrelated; large where an identity
  shortcut carries a's channels into b (the residual stream)."""
  a = (a - a.mean(0)) / (a.std(0) + 1e-12)
  b = (b - b.mean(0)) / (b.std(0) + 1e-12)
  corr = a.T @ b / len(a)
  c = len(corr)
  diag = np.trace(corr)
  off = (corr.sum() - diag) / max(c * c - c, 1)
  return float(diag / c - off)


def same_input(means: Mapping[str, np.ndarray]) -> dict[str, list[str]]:
  """{layer: the other layers whose input is the very same tensor}, from each layer's
  (N, C) per-image input means: equal arrays (to float32 rounding) mean one tensor read
  twice, such as a block's first conv and its 1x1 shortcut conv."""
  names = list(means)
  out: dict[str, list[str]] = {n: [] for n in names}
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      x, y = means[a], means[b]
      if x.shape == y.shape and np.allclose(x, y, rtol=1e-5, atol=1e-6):
        out[a].append(b)
        out[b].append(a)
  return out


def carry_on(run: Run, state: LoopState, name: str, v_kept: np.ndarray,
             tails: Sequence[np.ndarray], current: Mapping[str, Any],
             means: Mapping[str, np.ndarray]) -> tuple[Mapping[str, Any], LoopState]:
  """`current` with each direction kept at `name` (columns of v_kept, with their tails)
  also removed from the other readers of the same tensor and the later readers of the
  same channels (`channel_link` >= carry_link), where that flips at least half of the
  tail images whose prediction has not changed yet. `means`: the per-image input means
  of the latest feature pass. Returns the network and `state` with each try recorded in
  `carried` and each carried direction added to `lost`."""
  cfg, confirmer = run.cfg, run.confirmer
  lost = dict(state.lost)
  carried = list(state.carried)
  coverage = state.coverage
  same = state.siblings.get(name, [])
  readers = run.readers
  later = [r for r in readers[readers.index(name) + 1:] if r not in same]
  for v, tail in zip(np.asarray(v_kept, np.float64).T, tails):
    for r in [*same, *later]:
      if run.width[r] != run.width[name]:
        continue
      # A sibling called before `name` was not re-extracted, but its input is this one.
      mean_r = means[name] if r in same else means[r]
      link = channel_link(means[name], mean_r)
      if link < cfg.carry_link:
        continue
      u = v.copy()
      for w in lost.get(r, ()):
        u = u - (w @ u) * w
      if np.linalg.norm(u) < 0.5:
        continue
      u = u / np.linalg.norm(u)
      benign = mean_r[~tail].mean(0).astype(np.float64)
      trial, mean_kept, coverage = run.removal.project(
          current, r, u[:, None].astype(np.float32), benign, coverage)
      stats = confirmer.check_residual(run.original, current, trial, tail)
      ok = (stats["residual"] >= 10 and stats["tail_flip"] >= 0.5
            and stats["collateral"] <= cfg.max_collateral)
      carried.append({"from": name, "to": r, "link": link, "mean_kept": mean_kept,
                      **stats, "kept": bool(ok),
                      "direction": u.tolist() if ok else []})
      if stats["residual"] < 10:
        break  # nothing left for later readers to flip
      if ok:
        current = trial
        lost[r] = (*lost.get(r, ()), u)
  return current, state._replace(lost=lost, carried=tuple(carried), coverage=coverage)
