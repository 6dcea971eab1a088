"""RR-FP: fine-pruning recast as rank reduction (this project's own method, after the
paper's section 6, which leaves it as future work).

FP removes the classifier-input neurons with the smallest mean activation on clean data;
the paper suggests "the direction with the smallest projected mean" instead. Read
literally that is degenerate: every direction orthogonal to the clean mean has projected
mean 0, and -mean/|mean| has a negative one. What FP's criterion measures for a ReLU
neuron is how little it carries on clean inputs, so RR-FP ranks directions v by the
energy of the clean projection, E[(x . v)^2] (its root is reported as the criterion):
the eigenvectors of the clean second-moment matrix X^T X / N, smallest eigenvalue first.
A direction the clean data leaves empty but a trigger excites comes first, whether or not
it is a neuron axis. Everything else is FP's (`fp`): removed one direction at a time
from the classifier's input (P = I - V V^T folded into its kernel) until the clean
accuracy drops by the margin, then fine-tuned on the clean data with V held out. Like
FP it needs the clean validation split, never the test set.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import numpy as np

from drr_jax.defenses import fp, head, settings

METHOD = "rr-fp"

SETTINGS = dict(fp.SETTINGS)


def default_config() -> dict[str, Any]:
  """RR-FP's settings: FP's (see `fp.SETTINGS` for the source of each)."""
  return settings.defaults(SETTINGS)


def make_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
  return fp.make_config(overrides, SETTINGS, METHOD)


def _order(h: head.Head) -> tuple[np.ndarray, np.ndarray]:
  """Directions by increasing clean energy: eigenvectors of X^T X / N, ascending."""
  second = h.x.T @ h.x / len(h.x)
  values, vectors = np.linalg.eigh(second)
  return vectors, np.sqrt(np.clip(values, 0.0, None))


def defend(model: nn.Module | Callable, variables: Mapping[str, Any], batch: Any = None,
           *, config: Mapping[str, Any] | None = None, clean: Any = None,
           progress: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
  """RR-FP; returns (new variables, report), as `fp.defend`, with 'pruned' holding the
  removed unit directions of the classifier's input and 'criterion' the root mean
  square of their clean projections."""
  cfg = make_config(config)
  return fp.run(METHOD, cfg, settings.sources(SETTINGS), model, variables, clean, _order,
                "directions", progress)
