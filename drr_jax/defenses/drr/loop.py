"""The layer loop, in its two modes; the run's accumulated state is a `LoopState` passed
into and returned from each stage (`decide`, `carry_on`), never shared by closures.

'sequential' (Algorithm 1): layers first to last; a layer's features come from the network
as modified so far, re-extracted only after a layer was actually projected (before that,
the original network's features are exact). With `rounds` > 1 a layer is revisited, with
re-extracted features, while directions are still kept there; with carrying, each kept
direction is also tried at the other readers of the same channels (`readers.carry_on`).
'one_pass': every layer's features come from the original network, all frames of equal
shape are optimized together in one vmapped program, and the kept directions are
projected at the end.
'ranked': every unit's candidates are confirmed on the original network's features, then
removed least collateral first (`ranking`); with `ranked_rounds` > 1 the ranking is repeated on
the network as modified so far, while the last round kept something.
"""
from __future__ import annotations

import time
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from drr_jax import stiefel
from drr_jax.defenses.drr import ranking
from drr_jax.defenses.drr.decision import decide
from drr_jax.defenses.drr.readers import carry_on, same_input
from drr_jax.defenses.drr.report import layer_entry
from drr_jax.defenses.drr.state import LoopState, Run


class LoopResult(NamedTuple):
  variables: dict[str, Any]       # the defended network
  entries: list[dict[str, Any]]   # one report entry per layer visit
  passes: int                     # feature passes over the images
  state: LoopState                # the final state (carried tries among it)


def run_layers(run: Run, variables: dict[str, Any], state: LoopState) -> LoopResult:
  """The layer loop of `run.cfg.mode` from `variables` and `state`."""
  if run.cfg.mode == "one_pass":
    return one_pass(run, variables, state)
  if run.cfg.mode == "ranked":
    return ranked(run, variables, state)
  return sequential(run, variables, state)


def _on_all_rows(run: Run, x: np.ndarray, res: stiefel.FrameResult
                 ) -> stiefel.FrameResult:
  """`res` of an ascent on a subset of x's rows, its criterion values taken on all of
  them (what the candidates' gate and the report read)."""
  values = stiefel.criterion(stiefel.center(x), jnp.asarray(res.frame),
                             bool(run.cfg.standardize))
  return res._replace(values=np.asarray(jax.device_get(values)))


def search(run: Run, x: np.ndarray, k: int) -> stiefel.FrameResult:
  """One unit's optimized frame on its features x (rows, C): the ascent on the rows of
  `run.search_rows` (all rows by default), the criterion on all rows."""
  rows = run.search_rows(len(x))
  res = jax.device_get(stiefel.maximize(x if rows is None else x[rows], k,
                                        **run.search_options()))
  return res if rows is None else _on_all_rows(run, x, res)


def _frames(run: Run, feats: dict[str, np.ndarray], images: int | None = None
            ) -> dict[str, tuple[stiefel.FrameResult, float]]:
  """Every unit's optimized frame, frames of equal shape in one vmapped program (each
  on the rows of `run.search_rows`; feats over `images` images, by default all N);
  -> unit: (result, seconds spent per unit)."""
  by_shape: dict[tuple[int, int], list[str]] = {}
  for name in run.order:
    by_shape.setdefault(feats[name].shape, []).append(name)
  results = {}
  for shape, names in tqdm(by_shape.items(), desc="directions", disable=not run.progress,
                           leave=False):
    t0 = time.time()
    rows = run.search_rows(shape[0], images)
    res = jax.device_get(stiefel.maximize_stacked(
        np.stack([feats[n] if rows is None else feats[n][rows] for n in names]),
        run.k(names[0]), **run.search_options()))
    for i, name in enumerate(names):
      one = stiefel.FrameResult(res.frame[i], res.values[i], res.history[i])
      results[name] = (one if rows is None else _on_all_rows(run, feats[name], one),
                       (time.time() - t0) / len(names))
  return results


def one_pass(run: Run, variables: dict[str, Any], state: LoopState) -> LoopResult:
  """Every layer decided on the original network's features; kept frames projected last."""
  order, progress = run.order, run.progress
  entries: list[dict[str, Any]] = []
  feats, means = run.extract(variables, tuple(order))
  results = _frames(run, feats)
  frames = {}
  for name in tqdm(order, desc="confirm", disable=not progress, leave=False):
    res, dt = results[name]
    t0 = time.time()
    d, state = decide(run, state, name, feats[name], res, variables, means[name])
    if d.keep.any():
      frames[name] = (d.v_kept, d.anchor)
    entries.append(layer_entry(name, feats[name], res, d.keep, d.checks,
                               dt + time.time() - t0, d.v_kept))
  coverage = state.coverage
  for name, (v, anchor) in frames.items():  # all from the original network's features
    variables, _, coverage = run.removal.project(variables, name, v, anchor, coverage)
  return LoopResult(variables, entries, 1, state._replace(coverage=coverage))


def sequential(run: Run, variables: dict[str, Any], state: LoopState) -> LoopResult:
  """Layers first to last, each decided on the network as modified so far."""
  order, readers, carry = run.order, run.readers, run.carry
  entries: list[dict[str, Any]] = []
  passes = 0
  feats, means, stale = None, None, True
  bar = tqdm(order, desc="DRR layers", disable=not run.progress)
  for li, name in enumerate(bar):
    # directions already projected out of this layer's input
    removed = [np.stack(state.lost[name], 1)] if name in state.lost else []
    for _ in range(int(run.cfg.rounds)):
      t0 = time.time()
      if stale:  # features of this and later layers, from the network as modified so far
        later = readers[readers.index(name):] if carry else order[li:]
        feats, means = run.extract(variables, tuple(later), desc=f"features from {name}")
        if carry and passes == 0:  # every reader is in the first pass
          state = state._replace(siblings=same_input(means))
        passes += 1
        stale = False
      x = feats[name]
      if removed and not run.unit_outputs(name):
        # Input-side folding changes the kernel, not its input: look at the input as
        # the kernel now sees it, with the removed directions projected out.
        v = np.concatenate(removed, axis=1)
        x = x - (x @ v) @ v.T
      res = search(run, x, run.k(name))
      prior = [u for v in removed for u in np.asarray(v, np.float64).T]
      d, state = decide(run, state, name, x, res, variables, means[name], prior)
      variables = d.variables
      if d.keep.any():
        removed.append(d.v_kept)
        stale = True
        if carry:
          variables, state = carry_on(run, state, name, d.v_kept, d.tails, variables, means)
      entries.append(layer_entry(name, x, res, d.keep, d.checks, time.time() - t0,
                                 d.v_kept))
      bar.set_postfix(kept=sum(e["kept"] for e in entries) + len(state.carried_kept()))
      if not d.keep.any():  # nothing more to remove here: next layer
        break
  return LoopResult(variables, entries, passes, state)


def ranked(run: Run, variables: dict[str, Any], state: LoopState) -> LoopResult:
  """Every unit's candidates confirmed alone on the network; those that pass, removed
  least collateral first (`ranking.select`). With `ranked_rounds` > 1, repeated on the network
  as modified so far while the last round kept something."""
  entries: list[dict[str, Any]] = []
  original = run.confirmer.base(variables)
  lost: dict[str, list[np.ndarray]] = {}
  passes = 0
  for r in range(int(run.cfg.ranked_rounds)):
    later = (None if r == 0 else
             ranking.Later(original, state.removed_tails, run.later_images()))
    variables, kept, state, round_entries = _ranked_round(run, variables, state, lost,
                                                          later)
    passes += 1
    for e in round_entries:
      e["round"] = r + 1
    entries += round_entries
    for s in kept:
      lost.setdefault(s.unit, []).append(s.v)
    if not kept or _finished(run, kept):
      break
  return LoopResult(variables, entries, passes, state)


def _finished(run: Run, kept: list[ranking.Scored]) -> bool:
  """Whether a later ranking could only chase what the removals left while `stop_left`
  says enough was removed: its candidates must lie mostly inside the removed tails
  (`tail_overlap`), and what is left is at most `stop_left` (the last kept candidate's
  'left', measured after its removal)."""
  if run.cfg.stop_left is None or run.cfg.tail_overlap is None:
    return False
  if float(run.cfg.tail_overlap) < ranking.CHASE:
    return False
  return ranking.removed_enough(run, kept[-1].stats.get("left"))


def _ranked_round(run: Run, variables: dict[str, Any], state: LoopState,
                  lost: Mapping[str, list[np.ndarray]], later: ranking.Later | None):
  """One round of `ranked` on the network `variables`; `lost`: the unit directions
  removed in earlier rounds. -> (network, kept candidates, state, layer entries)."""
  entries: list[dict[str, Any]] = []
  images = None if later is None else later.images
  feats, means = run.extract(variables, tuple(run.order), images=images)
  for name, vs in lost.items():
    if not run.unit_outputs(name):
      # folded into the readers, not the tensor: look at it as the readers now see it
      v = np.stack(vs, 1)
      feats[name] = feats[name] - (feats[name] @ v) @ v.T
  results = _frames(run, feats, None if images is None else len(images))
  scored: dict[str, list[ranking.Scored]] = {}
  seconds: dict[str, float] = {}
  coverage = state.coverage
  residual = (ranking.residual_tail(run, variables, later)
              if later is not None and run.cfg.residual_tail else None)
  for name in tqdm(run.order, desc="landscape", disable=not run.progress, leave=False):
    res, dt = results[name]
    t0 = time.time()
    scored[name], coverage = ranking.landscape(run, variables, name, feats[name],
                                               means[name], res, coverage,
                                               prior=lost.get(name, ()), later=later)
    if residual is not None:
      extra, coverage = ranking.residual_candidates(
          run, variables, name, feats[name], means[name], residual, coverage,
          prior=lost.get(name, ()), images=images)
      scored[name] += extra
    seconds[name] = dt + time.time() - t0
  every = [s for name in run.order for s in scored[name]]
  queue = ranking.order(run, every)
  original = later.original if later is not None else run.confirmer.base(variables)
  variables, kept, state = ranking.select(run, variables, queue,
                                          state._replace(coverage=coverage), original,
                                          first_round=later is None, prior=lost)
  for name in run.order:
    mine = [s for s in kept if s.unit == name]
    keep = np.zeros(len(np.asarray(results[name][0].values)), bool)
    keep[[s.column for s in mine if s.column >= 0]] = True
    v_kept = (np.stack([s.v for s in mine], 1).astype(np.float32) if mine
              else np.zeros((feats[name].shape[1], 0), np.float32))
    entry = layer_entry(name, feats[name], results[name][0], keep,
                        [s.stats for s in scored[name]], seconds[name], v_kept)
    entries.append({**entry, "kept": len(mine)})  # residual-tail ones have no column
  return variables, kept, state, entries
