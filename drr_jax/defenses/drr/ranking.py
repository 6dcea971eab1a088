"""Ranked selection ('ranked' mode): confirm every unit's candidates on the original
network, then remove those that pass in order of least collateral.

The sequential loop keeps the first candidate that passes confirmation, in network order.
On a backdoored network several units carry the trigger, and the earliest is often the
costliest to remove (a stem conv: about 8-10 % of the other images change). Ranking all
units first (`landscape`) and removing the least damaging passing candidate (`select`)
takes the trigger out where the network reads it most narrowly. After the first removal
a further candidate is kept only if it changes most of what is left of its tail: the
tail images whose prediction is still the original one (`Confirmer.check_residual`).

With `ranked_rounds` > 1 the whole ranking is repeated on the network as modified so far, while
the last round kept something (`loop.ranked`). A later round's candidate is scored by what
it does to the tail images that still predict as the original network did, and must aim
at the images already removed (`tail_overlap`): it finishes a backdoor's removal, it does
not start a new one on a class surfacing once the poison direction is gone. With
`residual_tail`, a later round also tries at every unit the mean difference of the
residual tail (`residual_tail`, `residual_candidates`): the removed-tail images that the
network still predicts as the original did, i.e. what the first removal left.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
from tqdm.auto import tqdm

from drr_jax import stiefel
from drr_jax.defenses.drr import candidates
from drr_jax.defenses.drr.state import LoopState, Run

MIN_TAIL = 10      # tail images on the confirmation set, so that a flip is not a coin toss
DUPLICATE = 0.9    # |cos| above which two candidates of one unit are the same direction
MIN_RESIDUAL = 0.5  # share of the still-unflipped tail a further removal must change
IMPLANT_MAJORITY = 0.8  # share of a tail in one class for its implant to be measured
IMPLANT_LEFT = 0.1  # implant share below which the backdoor is taken as removed
MIN_CUT = 0.1       # least share of the implanted hits a further implant removal takes
CHASE = 0.5         # share of a candidate's tail inside the removed tails above which it
                    # chases what they left (`stop_left`), rather than another trigger


class Later(NamedTuple):
  """What the rounds before left, for scoring a later round's candidates."""
  original: np.ndarray       # the original network's predictions on the confirmation set
  removed_tails: np.ndarray  # (N,) bool: the tails removed so far
  images: np.ndarray | None = None  # the defense images this round reads (sorted
                                    # indices, the confirmation images among them;
                                    # `later_samples`), None: all N


def on_all(mask: np.ndarray, images: np.ndarray | None, n: int) -> np.ndarray:
  """A per-image mask over the images at indices `images` as one over all n defense
  images (False on the others); `mask` itself when images is None."""
  if images is None:
    return mask
  full = np.zeros(n, bool)
  full[images] = mask
  return full


class Scored(NamedTuple):
  """One candidate of one unit, confirmed on the original network."""
  unit: str
  column: int
  v: np.ndarray        # (C,) unit direction
  tail: np.ndarray     # (N,) bool: its skewed tail over the defense images
  benign: np.ndarray   # (C,) the mean feature outside the tail: the replacement value
  stats: dict[str, Any]


def tail_passes(run: Run, stats: Mapping[str, Any]) -> bool:
  """The part of `passes` that reads the tail alone: it changes most of its tail (or,
  with flip_on='majority', of the tail images in the tail's majority class). In a later
  round (stats carry 'residual'): most of the tail images still predicted as the original
  network did, at least MIN_TAIL of them, and a tail mostly inside those removed before."""
  cfg = run.cfg
  if "residual" in stats:
    overlap = stats.get("overlap")
    return bool(stats["residual"] >= MIN_TAIL
                and stats["residual_flip"] >= cfg.min_tail_flip
                and (cfg.tail_overlap is None
                     or (overlap is not None and overlap >= cfg.tail_overlap)))
  flip = (stats.get("majority_flip", 0.0) if cfg.flip_on == "majority"
          else stats["tail_flip"])
  return bool(flip >= cfg.min_tail_flip
              and stats["tail_frac"] * len(run.confirmer.idx) >= MIN_TAIL)


def implant_passes(run: Run, stats: Mapping[str, Any]) -> bool:
  """Whether a first-round candidate passes by its implant (`Confirmer.implant`): with
  `min_implant` set, adding the tail's mean input difference to the other images moves
  at least that share of them into the tail's majority class. How much of that its
  removal takes away is judged in `select`."""
  return bool(run.cfg.min_implant is not None and "residual" not in stats
              and stats.get("implant") is not None
              and stats["implant"] >= run.cfg.min_implant)


def passes(run: Run, stats: Mapping[str, Any]) -> bool:
  """Whether a candidate's removal passes confirmation: `tail_passes` (or
  `implant_passes`), and it changes few other images, and few of the other images in the
  tail's majority class (collateral None: not measured, because the tail failed)."""
  cfg = run.cfg
  return bool((tail_passes(run, stats) or implant_passes(run, stats))
              and stats["collateral"] is not None
              and stats["collateral"] <= cfg.max_collateral
              and stats["class_collateral"] <= cfg.max_class_collateral)


def landscape(run: Run, variables: Mapping[str, Any], unit: str, x: np.ndarray,
              means: np.ndarray, res: stiefel.FrameResult, coverage,
              prior: Sequence[np.ndarray] = (), later: Later | None = None
              ) -> tuple[list[Scored], Any]:
  """Every candidate of `unit` (columns with criterion > tau, duplicates dropped), each
  removed alone from the network `variables` and confirmed there. `prior`: unit
  directions the unit already lost (candidates are made orthogonal to them); `later`:
  in a round after the first, what the first rounds left (see `passes`); x and means
  are then over its images (`later.images`), the tails it finds over all N."""
  values, frame = np.asarray(res.values), np.asarray(res.frame)
  images = None if later is None else later.images
  n = run.n if images is None else len(images)
  scored: list[Scored] = []
  xc = candidates.centered(x) if np.any(values > run.cfg.tau) else None
  for j in np.argsort(-values):
    if not values[j] > run.cfg.tau:
      break
    found = candidates.candidate(x, frame[:, j], n, direction=run.cfg.direction,
                                 tail_z=run.cfg.tail_z, against=prior, xc=xc)
    if found is None:
      continue
    v, tail = found
    if any(abs(float(v @ s.v)) > DUPLICATE for s in scored):
      continue
    benign = means[~tail].mean(0).astype(np.float64)
    tail = on_all(tail, images, run.n)
    trial, mean_kept, coverage = run.removal.project(
        variables, unit, v[:, None].astype(np.float32), benign, coverage)
    extra = ({} if later is None else
             {"overlap": candidates.tail_overlap(later.removed_tails, tail)})
    # the collateral is measured only for a candidate whose tail passes
    stats = run.confirmer.check(variables, trial, tail,
                                None if later is None else later.original,
                                gate=lambda st: tail_passes(run, {**st, **extra}))
    stats.update(column=int(j), mean_kept=mean_kept, **extra)
    # a tail that its removal cannot flip: does it carry a trigger anyway?
    if (run.cfg.min_implant is not None and later is None
        and stats["collateral"] is None and stats.get("majority_share", 0.0)
        >= IMPLANT_MAJORITY and stats["tail_frac"] * len(run.confirmer.idx) >= MIN_TAIL):
      stats.update(run.confirmer.implant(variables, tail))
      if implant_passes(run, stats):
        v, trial, coverage = _trigger_direction(run, variables, unit, x, v, tail, benign,
                                                prior, stats, coverage)
        stats.update(run.confirmer.implant(variables, tail, trial))
        stats["collateral"], stats["class_collateral"] = run.confirmer.collateral(
            variables, trial, tail)
    scored.append(Scored(unit, int(j), v, tail, benign, stats))
  return scored, coverage


def _trigger_direction(run: Run, variables: Mapping[str, Any], unit: str, x: np.ndarray,
                       v: np.ndarray, tail: np.ndarray, benign: np.ndarray,
                       prior: Sequence[np.ndarray], stats: dict[str, Any], coverage):
  """For a tail confirmed by its implant: the mean difference of the tail and the other
  images of its class (`candidates.contrast`), which leaves the class's own features
  where they are (a clean-label tail is its target class, so its mean difference with
  all the rest holds the class too); v where too few such images are left (MIN_TAIL).
  -> (direction, its removal from `variables`, the coverage cache)."""
  same = run.confirmer.same_class(variables, tail)
  u = candidates.contrast(x, tail, same, run.n) if same.sum() >= MIN_TAIL else None
  u = None if u is None else candidates.orthonormal(u, prior)
  stats["within_class"] = u is not None
  if u is not None:
    v = u
  trial, stats["mean_kept"], coverage = run.removal.project(
      variables, unit, v[:, None].astype(np.float32), benign, coverage)
  return v, trial, coverage


def residual_tail(run: Run, variables: Mapping[str, Any], later: Later) -> np.ndarray:
  """(N,) bool: the confirmation images in the tails removed so far whose prediction is
  still the original network's: what a first removal left of the backdoor."""
  idx = run.confirmer.idx
  still = later.removed_tails[idx] & (run.confirmer.base(variables) == later.original)
  mask = np.zeros(run.n, bool)
  mask[idx[still]] = True
  return mask


def residual_candidates(run: Run, variables: Mapping[str, Any], unit: str,
                        x: np.ndarray, means: np.ndarray, residual: np.ndarray,
                        coverage, prior: Sequence[np.ndarray] = (),
                        images: np.ndarray | None = None) -> tuple[list[Scored], Any]:
  """A later round's candidate of `unit` that needs no search: the mean difference of
  the residual tail's features and the rest's (Theorem 1's d for the poison that is
  left), removed from the network `variables` and confirmed on those images. x and
  means: over the defense images at `images` (None: all), which hold the residual
  tail (a mask over all N)."""
  if residual.sum() < MIN_TAIL:
    return [], coverage
  here = residual if images is None else residual[images]
  v = candidates.tail_mean(x, here, len(here))
  v = None if v is None else candidates.orthonormal(v, prior)
  if v is None:
    return [], coverage
  benign = means[~here].mean(0).astype(np.float64)
  trial, mean_kept, coverage = run.removal.project(
      variables, unit, v[:, None].astype(np.float32), benign, coverage)
  stats = run.confirmer.check(variables, trial, residual,
                              gate=lambda st: st["tail_flip"] >= run.cfg.min_tail_flip)
  stats.update(column=-1, mean_kept=mean_kept, residual=int(residual.sum()),
               residual_flip=stats["tail_flip"], overlap=1.0, source="residual_tail")
  return [Scored(unit, -1, v, residual, benign, stats)], coverage


def left_share(run: Run, variables: Mapping[str, Any], original: np.ndarray,
               removed_tails: np.ndarray) -> float | None:
  """The share of the removed tails' confirmation images that the network `variables`
  still predicts as the original network did (`original`: its predictions on the
  confirmation images): what the removals so far left of their backdoor, as the defense
  set shows it. None while no confirmation image was in a removed tail."""
  inside = removed_tails[run.confirmer.idx]
  if not inside.any():
    return None
  still = inside & (run.confirmer.base(variables) == original)
  return float(still.sum() / inside.sum())


def removed_enough(run: Run, left: float | None) -> bool:
  """Whether `stop_left` is set and what is left (`left_share`) is at most that."""
  return (run.cfg.stop_left is not None and left is not None
          and left <= float(run.cfg.stop_left))


def chases(removed_tails: np.ndarray, tail: np.ndarray) -> bool:
  """Whether a candidate's tail lies mostly (CHASE) inside the tails removed so far: it
  would finish their removal, not remove another trigger."""
  overlap = candidates.tail_overlap(removed_tails, tail)
  return overlap is not None and overlap >= CHASE


def order(run: Run, scored: list[Scored]) -> list[Scored]:
  """The passing candidates: those confirmed by their tail flip, least collateral first
  (then most tail flip); then those confirmed by their implant alone, the ones whose
  removal alone cuts most of it first."""
  ok = [s for s in scored if passes(run, s.stats)]
  flips = [s for s in ok if tail_passes(run, s.stats)]
  implants = [s for s in ok if not tail_passes(run, s.stats)]
  return (sorted(flips, key=lambda s: (s.stats["collateral"], -s.stats["tail_flip"]))
          + sorted(implants, key=lambda s: (-s.stats.get("implant_cut", 0.0),
                                            s.stats["collateral"])))


def select(run: Run, variables: dict[str, Any], ranked: list[Scored], state: LoopState,
           original: np.ndarray, first_round: bool = True,
           prior: Mapping[str, Sequence[np.ndarray]] | None = None
           ) -> tuple[dict[str, Any], list[Scored], LoopState]:
  """Removes the ranked candidates in turn: the first as it stands; each later one only
  if, on the network as modified so far, it changes at least MIN_RESIDUAL of its tail
  images still predicted as the original network did (at least MIN_TAIL of them) and at
  most max_collateral of the others. `original`: the original network's predictions on
  the confirmation images. In a later round (`first_round` False) the first one is
  checked the same way. A candidate confirmed by its implant alone is kept while the
  network still obeys the implant and its removal cuts some of it (see below).
  `prior`: the directions each unit lost in earlier rounds.
  -> (network, the kept candidates, state)."""
  kept: list[Scored] = []
  removed: dict[str, list[np.ndarray]] = {u: list(v) for u, v in (prior or {}).items()}
  coverage, removed_tails = state.coverage, state.removed_tails
  for s in tqdm(ranked, desc="remove", disable=not run.progress, leave=False):
    v = candidates.orthonormal(s.v, removed.get(s.unit, []))
    if v is None:
      continue
    trial, mean_kept, coverage = run.removal.project(
        variables, s.unit, v[:, None].astype(np.float32), s.benign, coverage)
    if not tail_passes(run, s.stats):
      # confirmed by its implant: kept while the network as modified so far still obeys
      # the implant (IMPLANT_LEFT) and this removal takes at least MIN_CUT of it away,
      # changing few other images; several such removals can take a backdoor apart
      check = run.confirmer.implant(variables, s.tail, trial)
      collateral, _ = run.confirmer.collateral(variables, trial, s.tail)
      s.stats.update(residual_implant=check["implant"],
                     residual_implant_cut=check.get("implant_cut", 0.0),
                     residual_collateral=collateral)
      if not (check["implant"] >= IMPLANT_LEFT
              and check.get("implant_cut", 0.0) >= MIN_CUT
              and collateral <= run.cfg.max_collateral):
        continue
    elif kept or not first_round:
      if run.cfg.stop_left is not None and chases(removed_tails, s.tail):
        left = left_share(run, variables, original, removed_tails)
        if removed_enough(run, left):
          s.stats.update(skipped="stop_left", left_before=left)
          continue
      check = run.confirmer.check_residual(original, variables, trial, s.tail)
      s.stats.update(residual=check["residual"], residual_flip=check["tail_flip"],
                     residual_collateral=check["collateral"])
      if not (check["residual"] >= MIN_TAIL and check["tail_flip"] >= MIN_RESIDUAL
              and check["collateral"] <= run.cfg.max_collateral):
        continue
    s.stats.update(kept=True, mean_kept=mean_kept)
    variables = trial
    kept.append(s._replace(v=v))
    removed.setdefault(s.unit, []).append(v)
    removed_tails = removed_tails | s.tail
    if run.cfg.stop_left is not None:  # recorded for the report; read by the next one
      s.stats["left"] = left_share(run, variables, original, removed_tails)
  return variables, kept, state._replace(coverage=coverage, removed_tails=removed_tails)
