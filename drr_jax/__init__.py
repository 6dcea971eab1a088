"""drr_jax: Directional Rank Reduction backdoor defense in JAX/Flax.

Submodules and `defend` load on first use (PEP 562), so that importing one module, such
as `drr_jax.inference`, does not pull in the others (the attacks among them).
"""
import importlib

__version__ = "0.1.0"

__all__ = ["attacks", "checkpoint", "configs", "data", "evaluate", "features", "models",
           "stiefel", "defend"]


def __getattr__(name):
  if name == "defend":
    from drr_jax.defenses import defend
    return defend
  if not name.startswith("_"):
    try:
      return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"{__name__}.{name}":
        raise
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted({*globals(), *__all__})
