"""The defense report: one entry per layer visit, the carried directions, the totals; and
its plain-text table (`format_report`)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from drr_jax import stiefel
from drr_jax.defenses.drr.config import DRRConfig


def layer_entry(name: str, x: np.ndarray, result: stiefel.FrameResult, keep: np.ndarray,
                checks: list[dict[str, Any]], seconds: float, v_kept: np.ndarray
                ) -> dict[str, Any]:
  """One layer's report; `directions` holds the removed unit vectors, one list each."""
  return {"layer": name, "channels": int(x.shape[1]), "rows": int(x.shape[0]),
          "criterion": [float(v) for v in np.asarray(result.values)],
          "kept": int(np.sum(keep)), "checks": checks, "seconds": seconds,
          "directions": np.asarray(v_kept, np.float64).T.tolist()}


def build_report(cfg: DRRConfig, entries: list[dict[str, Any]],
                 carried: Sequence[dict[str, Any]], passes: int, num_images: int,
                 seconds: float) -> dict[str, Any]:
  """The report `defend` returns: its settings (as a dict), the layer entries, the carry
  tries, the number of feature passes, the totals kept and the layers projected."""
  carried = list(carried)
  carried_kept = [c for c in carried if c["kept"]]
  projected = [e["layer"] for e in entries if e["kept"]]
  projected += [c["to"] for c in carried_kept if c["to"] not in projected]
  return {"config": cfg.to_dict(), "layers": entries, "carried": carried,
          "feature_passes": passes,
          "directions_kept": sum(e["kept"] for e in entries) + len(carried_kept),
          "layers_projected": projected,
          "num_images": int(num_images), "seconds": seconds}


def format_report(report: Mapping[str, Any]) -> str:
  """The per-layer report as a plain-text table."""
  lines = [f"{'layer':32s} {'C':>4s} {'criterion':>10s} {'tail flip':>9s} kept {'s':>6s}"]
  for e in report["layers"]:
    crit = " ".join(f"{v:.2f}" for v in e["criterion"][:3])
    flips = " ".join(f"{c['tail_flip']:.2f}" for c in e.get("checks", [])[:3]) or "-"
    lines.append(f"{e['layer']:32s} {e['channels']:4d} {crit:>10s} {flips:>9s} "
                 f"{e['kept']:4d} {e['seconds']:6.2f}")
  for c in report.get("carried", []):
    lines.append(f"  carried {c['from']} -> {c['to']}: link {c['link']:.2f}, flips "
                 f"{c['tail_flip']:.2f} of {c['residual']} unflipped tail images, "
                 f"collateral {c['collateral']:.3f}: {'kept' if c['kept'] else 'not kept'}")
  if report.get("capped_k"):
    lines.append(f"k = {report['config']['k']} starts capped at the width of "
                 + ", ".join(f"{u} ({c})" for u, c in report["capped_k"].items()))
  cfg = report["config"]
  lines.append(f"tau {cfg['tau']}, confirm {cfg['confirm']} (tail z > {cfg['tail_z']}, "
               f"flip >= {cfg['min_tail_flip']}"
               + (f" or implant >= {cfg['min_implant']}" if cfg.get("min_implant") else "")
               + f", collateral <= "
               f"{cfg.get('max_collateral', 1.0)}): {report['directions_kept']} direction(s) "
               f"kept in {len(report['layers_projected'])} layer(s) "
               f"{report['layers_projected']}, {report['feature_passes']} feature pass(es), "
               f"{report['seconds']:.1f} s")
  return "\n".join(lines)
