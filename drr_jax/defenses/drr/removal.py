"""Removing directions from a layer: fold P = I - V V^T into its kernel and, with
`keep_mean`, replace the removed component by its benign mean instead of zeroing it.

The mean-replacement constant is folded into biases or BatchNorm running means where the
network allows it exactly (`projection.absorb_shifts`); else the component is zeroed. For
an input-side 3x3 conv with `mean_fit='average'` the constant depends on which kernel taps
see real input rather than zero padding (`projection.tap_coverage`); that coverage is
traced once per layer, on the network as it stood the first time the layer was projected,
and kept in an explicit cache (`Coverage`) that callers thread through the run.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np

from drr_jax import features, projection
from drr_jax import sites as sites_lib

Coverage = Mapping[str, Any]  # layer -> projection.tap_coverage(...), filled on first use


@dataclasses.dataclass(frozen=True)
class Removal:
  """How a run removes directions: the model, the side, and the mean replacement."""
  model: nn.Module | Callable
  side: str            # 'input' or 'output'
  keep_mean: bool
  mean_fit: str        # 'average' or 'interior'
  probe: jax.Array     # images on which mean shifts are traced to where they are absorbed
  sites: Mapping[str, sites_lib.Site] = dataclasses.field(default_factory=dict)

  def project(self, current: Mapping[str, Any], name: str, v: np.ndarray,
              mean: np.ndarray, coverage: Coverage
              ) -> tuple[dict[str, Any], bool, Coverage]:
    """`current` with v (C, m) removed from layer `name`: zeroed, or replaced by `mean`
    (the constant folded exactly where the network allows; else zeroed).
    -> (variables, whether the mean was kept, the coverage cache, extended if need be).
    `name` is a layer, or with side 'sites' a site (folded into all of its readers)."""
    if name in self.sites:
      return self._project_site(current, self.sites[name], v, mean, coverage)
    kernel = features.layer_kernels(current["params"])[name]
    folded = {**current, "params": projection.fold(current["params"], {name: v},
                                                   self.side)}
    if not self.keep_mean:
      return folded, False, coverage
    if self.mean_fit == "average" and self.side != "output" and name not in coverage:
      coverage = {**coverage,
                  name: projection.tap_coverage(self.model, current, name, self.probe)}
    shift = projection.mean_shift(kernel, v, mean, self.side, coverage.get(name))
    absorbed, ok = projection.absorb_shifts(self.model, folded, {name: shift}, self.probe)
    return (absorbed, True, coverage) if ok else (folded, False, coverage)

  def _project_site(self, current, site: sites_lib.Site, v, mean, coverage):
    if not self.keep_mean:
      return sites_lib.fold(current, site, v), False, coverage
    if site.side == "input" and self.mean_fit == "average":
      for layer in site.folds:
        if layer not in coverage:
          coverage = {**coverage, layer: projection.tap_coverage(self.model, current,
                                                                 layer, self.probe)}
    cov = {layer: coverage.get(layer) for layer in site.folds}
    if site.side == "input" and self.mean_fit != "average":
      cov = {layer: np.ones(features.layer_kernels(current["params"])[layer].shape[:-2])
             if features.layer_kernels(current["params"])[layer].ndim == 4 else None
             for layer in site.folds}
    out, ok = sites_lib.fold_with_mean(self.model, current, site, v, mean, self.probe,
                                       {k: c for k, c in cov.items() if c is not None})
    if not ok:
      return sites_lib.fold(current, site, v), False, coverage
    return out, True, coverage
