"""Analyses behind the paper's figures, from one feature pass of the backdoored model.

- `separation_constant`: the C of Assumption 2, ||mu1 - mu2||^2 = C max(lambda_max(S1),
  lambda_max(S2)), of the benign (1) and poisoned (2) features of a layer. It needs the
  poison indices, so it is an analysis of the attack, never an input of the defense.
- `tau_sweep`: the paper's plain threshold rule (no confirmation) for a list of tau, each
  layer's directions found once; ACC/ASR measured on the validation split, because tau
  is a hyperparameter and the test set must not be looked at while choosing it.
"""
from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from drr_jax import attacks, data, evaluate, projection, stiefel

TAUS = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)


def _top_eigenvalue(x: np.ndarray) -> float:
  """lambda_max of the (biased) covariance of rows x (n, C), in float64."""
  if len(x) < 2:
    return float("nan")
  xc = x - x.mean(0)
  cov = xc.T @ xc / len(x)
  return float(np.linalg.eigvalsh(cov)[-1])


def separation_stats(benign: np.ndarray, poisoned: np.ndarray) -> dict[str, float]:
  """{'dist2': ||mu1 - mu2||^2, 'lambda_benign', 'lambda_poisoned', 'C'} of two sets of
  feature rows (n1, C) and (n2, C); C is NaN when a set has fewer than 2 rows, inf when
  both covariances vanish."""
  b = np.asarray(benign, np.float64)
  p = np.asarray(poisoned, np.float64)
  if b.ndim != 2 or p.ndim != 2 or b.shape[1] != p.shape[1]:
    raise ValueError(f"expected (n1, C) and (n2, C) features, got {b.shape} and {p.shape}")
  if len(b) < 2 or len(p) < 2:
    nan = float("nan")
    return {"dist2": nan, "lambda_benign": nan, "lambda_poisoned": nan, "C": nan}
  dist2 = float(np.sum((b.mean(0) - p.mean(0)) ** 2))
  l1, l2 = _top_eigenvalue(b), _top_eigenvalue(p)
  lam = max(l1, l2)
  c = dist2 / lam if lam > 0 else (float("inf") if dist2 > 0 else float("nan"))
  return {"dist2": dist2, "lambda_benign": l1, "lambda_poisoned": l2, "C": c}


def separation_constant(benign: np.ndarray, poisoned: np.ndarray) -> float:
  """C of Assumption 2: ||mu1 - mu2||^2 / max(lambda_max(Sigma1), lambda_max(Sigma2))."""
  return separation_stats(benign, poisoned)["C"]


def layer_directions(feats: Mapping[str, np.ndarray], layers: Sequence[str], *, k: int,
                     steps: int = 200, lr: float = 0.1, standardize: bool = True,
                     search: str = "multistart", progress: bool = True
                     ) -> dict[str, dict[str, np.ndarray]]:
  """Each layer's candidate directions, found once: {layer: {'frame' (C, k'), 'values'
  (k',)}} with k' = min(k, C), as `stiefel.maximize` returns them."""
  out = {}
  for name in tqdm(layers, desc="directions", disable=not progress, leave=False):
    x = feats[name]
    res = jax.device_get(stiefel.maximize(x, min(int(k), x.shape[1]), steps=steps, lr=lr,
                                          standardize=standardize, search=search))
    out[name] = {"frame": np.asarray(res.frame), "values": np.asarray(res.values)}
  return out


def frames_above(directions: Mapping[str, Mapping[str, np.ndarray]], tau: float
                 ) -> dict[str, np.ndarray]:
  """{layer: orthonormal (C, m) frame} of the directions with criterion > tau.

  Columns are taken by decreasing criterion and made orthogonal to those taken before
  (multistart columns need not be orthogonal); a column mostly inside their span (its
  remainder shorter than 0.5) is a duplicate and dropped, as DRR's own selection does.
  Layers with nothing above tau are left out.
  """
  frames = {}
  for name, d in directions.items():
    values, frame = np.asarray(d["values"]), np.asarray(d["frame"], np.float64)
    kept: list[np.ndarray] = []
    for j in np.argsort(-values, kind="stable"):
      if not values[j] > tau:
        break
      v = frame[:, j].copy()
      for u in kept:
        v = v - (u @ v) * u
      if np.linalg.norm(v) < 0.5:
        continue
      kept.append(v / np.linalg.norm(v))
    if kept:
      frames[name] = np.stack(kept, 1).astype(np.float32)
  return frames


def tau_sweep(model, variables: Mapping[str, Any],
              directions: Mapping[str, Mapping[str, np.ndarray]], val: data.Split,
              trigger: attacks.Trigger | None, attack_config: dict[str, Any], *,
              taus: Sequence[float] = TAUS, side: str = "input", batch_size: int = 500,
              progress: bool = True) -> list[dict[str, Any]]:
  """For each tau: fold every direction above it (all layers at once) and measure ACC/ASR
  on `val`. Returns [{'tau', 'kept', 'layers' {layer: m}, 'acc', 'asr'}] in tau order;
  a tau that keeps the same frames as the previous one reuses its measurement."""
  rows, last = [], None
  for tau in tqdm(sorted(taus), desc="tau sweep", disable=not progress, leave=False):
    frames = frames_above(directions, tau)
    key = {n: f.shape[1] for n, f in frames.items()}
    if last is not None and last[0] == key:
      metrics = last[1]
    else:
      params = projection.fold(variables["params"], frames, side)
      metrics = evaluate.evaluate(model, {**variables, "params": params}, val, trigger,
                                  attack_config, batch_size, progress=False)
      last = (key, metrics)
    rows.append({"tau": float(tau), "kept": int(sum(key.values())), "layers": key,
                 "acc": float(metrics["acc"]), "asr": float(metrics["asr"])})
  return rows


def analyze(model, variables: Mapping[str, Any], feats: Mapping[str, np.ndarray],
            order: Sequence[str], poison_idx: np.ndarray, val: data.Split,
            trigger: attacks.Trigger | None, attack_config: dict[str, Any],
            drr_config: Mapping[str, Any], *, taus: Sequence[float] = TAUS,
            progress: bool = True) -> dict[str, Any]:
  """Per layer (forward order): C of Assumption 2 and the top criterion; and the tau
  sweep over the layers DRR may project (its `layers` / `skip_classifier` settings).

  feats: {layer: (N, C)} of the training images in order (one pass, DRR's side and
  pooling); poison_idx: rows of feats that are poisoned (analysis only).
  """
  t0 = time.time()
  n = len(next(iter(feats.values())))
  poisoned = np.zeros(n, bool)
  poisoned[np.asarray(poison_idx, np.int64)] = True
  cfg = drr_config
  directions = layer_directions(
      feats, order, k=int(cfg["k"]), steps=int(cfg["steps"]), lr=float(cfg["lr"]),
      standardize=bool(cfg["standardize"]), search=cfg["search"], progress=progress)
  layers = []
  for i, name in enumerate(order):
    x = feats[name]
    if x.shape[0] != n:
      raise ValueError(f"layer {name!r} has {x.shape[0]} rows, not one per image ({n}); "
                       "the analysis needs a pooling with one row per image")
    stats = separation_stats(x[~poisoned], x[poisoned])
    layers.append({"layer": name, "index": i, "channels": int(x.shape[1]), **stats,
                   "top_criterion": float(np.max(directions[name]["values"]))})
  t_layers = time.time() - t0
  eligible = list(order)
  if cfg.get("skip_classifier", True) and len(eligible) > 1:
    eligible = eligible[:-1]
  if cfg.get("layers") is not None:
    eligible = [name for name in eligible if name in set(cfg["layers"])]
  sweep = tau_sweep(model, variables, {n: directions[n] for n in eligible}, val, trigger,
                    attack_config, taus=taus, side=cfg["side"],
                    batch_size=int(cfg["batch_size"]), progress=progress)
  return {"layers": layers, "tau_sweep": sweep, "swept_layers": eligible,
          "seconds": {"layers": t_layers, "tau_sweep": time.time() - t0 - t_layers}}
