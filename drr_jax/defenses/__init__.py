"""Backdoor defenses that map (model, variables, poisoned data) -> new variables."""
from drr_jax.defenses.drr import (DefenseError, DRRConfig, default_config, defend,
                                  format_report)
from drr_jax.defenses.paper import paper_config

__all__ = ["DefenseError", "DRRConfig", "default_config", "defend", "format_report",
           "paper_config"]
