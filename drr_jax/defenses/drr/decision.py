"""One layer's decision: which of its optimized directions to remove.

Candidates are the columns with criterion > tau, by decreasing criterion
(`candidates.candidate`). With confirmation, a candidate is kept only if removing it, on
top of the directions kept before it, flips most of its tail and few other images; at a
conv layer its located estimate (`candidates.located`) replaces it when that flips more
of the tail. Once directions were kept anywhere, a candidate whose tail lies mostly
outside the tails removed so far is not tried (`tail_overlap`).
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from drr_jax import features, stiefel
from drr_jax.defenses.drr import candidates
from drr_jax.defenses.drr.state import LoopState, Run


class LayerDecision(NamedTuple):
  """What `decide` kept at one layer."""
  v_kept: np.ndarray       # (C, m) float32 orthonormal frame of the removed directions
  keep: np.ndarray         # (k,) bool: which optimized columns were kept
  checks: list[dict[str, Any]]  # the statistics of every candidate tried
  variables: dict[str, Any]     # the network with the kept directions removed
  anchor: np.ndarray       # sum over kept v of (benign mean . v) v: their values
  tails: list[np.ndarray]  # the per-image tail mask of each kept direction


def decide(run: Run, state: LoopState, name: str, x: np.ndarray,
           res: stiefel.FrameResult, base: Mapping[str, Any], image_means: np.ndarray,
           prior: Sequence[np.ndarray] = ()) -> tuple[LayerDecision, LoopState]:
  """The directions of layer `name` to project, as an orthonormal (C, m) frame, and the
  network `base` with them removed; `prior`: unit directions the layer already lost.
  Returns the decision and `state` with the kept tails and any new coverage added."""
  cfg, confirmer = run.cfg, run.confirmer
  removed_tails, coverage = state.removed_tails, state.coverage
  values, frame = np.asarray(res.values), np.asarray(res.frame)
  conv_layer = features.layer_kernels(base["params"])[run.layer_of(name)].ndim > 2
  keep = np.zeros(len(values), bool)
  kept: list[np.ndarray] = []
  tails: list[np.ndarray] = []
  checks: list[dict[str, Any]] = []
  current = base
  anchor = np.zeros(len(frame))
  for j in np.argsort(-values):
    if not values[j] > cfg.tau:
      break
    found = candidates.candidate(x, frame[:, j], run.n, direction=cfg.direction,
                                 tail_z=cfg.tail_z, against=list(prior) + kept)
    if found is None:
      continue
    v, tail = found
    if cfg.tail_overlap is not None:
      overlap = candidates.tail_overlap(removed_tails, tail)
      if overlap is not None and overlap < cfg.tail_overlap:
        checks.append({"column": int(j), "tail_frac": float(np.mean(tail)),
                       "tail_flip": 0.0, "collateral": 0.0, "overlap": overlap})
        continue
    # the benign value: the mean over images outside the tail (the suspected poison)
    benign = image_means[~tail].mean(0).astype(np.float64)
    trial, mean_kept, coverage = run.removal.project(
        current, name, v[:, None].astype(np.float32), benign, coverage)
    if confirmer is not None:
      stats = confirmer.check(current, trial, tail)
      stats["column"] = int(j)
      stats["mean_kept"] = mean_kept
      checks.append(stats)
      # at least 10 tail images, so that a flip rate is more than a coin toss
      if not (stats["tail_flip"] >= cfg.min_tail_flip
              and stats["tail_frac"] * len(confirmer.idx) >= 10):
        continue
      if cfg.locate and cfg.direction == "tail_mean" and conv_layer:
        rows = confirmer.rows(base, run.layer_of(name), v, run.unit_outputs(name))
        alt = candidates.located(rows, tail[confirmer.idx], list(prior) + kept)
        if alt is not None:
          alt_trial, alt_kept, coverage = run.removal.project(
              current, name, alt[:, None].astype(np.float32), benign, coverage)
          alt_stats = confirmer.check(current, alt_trial, tail)
          alt_flip = alt_stats["tail_flip"]
          stats["pooled_flip"], stats["located_flip"] = stats["tail_flip"], alt_flip
          if (alt_flip > stats["tail_flip"] and alt_stats["collateral"] <= cfg.max_collateral
              and alt_stats["class_collateral"] <= cfg.max_class_collateral):
            v, trial, mean_kept = alt, alt_trial, alt_kept
            stats.update(tail_flip=alt_flip, collateral=alt_stats["collateral"],
                         class_collateral=alt_stats["class_collateral"],
                         located=True, mean_kept=alt_kept)
      if (stats["collateral"] > cfg.max_collateral
          or stats["class_collateral"] > cfg.max_class_collateral):
        continue
    current = trial
    keep[j] = True
    kept.append(v)
    tails.append(tail)
    removed_tails = removed_tails | tail
    anchor = anchor + (benign @ v) * v
  v_kept = (np.stack(kept, 1).astype(np.float32) if kept
            else np.zeros((len(frame), 0), np.float32))
  decision = LayerDecision(v_kept, keep, checks, current, anchor, tails)
  return decision, state._replace(removed_tails=removed_tails, coverage=coverage)
