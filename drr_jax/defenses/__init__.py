"""Backdoor defenses that map (model, variables, poisoned data) -> new variables."""
from drr_jax.defenses.drr import (DefenseError, DRRConfig, default_config, defend,
                                  format_report)

__all__ = ["DefenseError", "DRRConfig", "default_config", "defend", "format_report"]
