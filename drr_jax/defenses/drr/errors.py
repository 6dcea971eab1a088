"""The one error type of the defense: input DRR cannot work with."""
from __future__ import annotations


class DefenseError(ValueError):
  """Input that DRR cannot work with; the message names the problem."""
