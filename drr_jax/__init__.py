"""drr_jax: Directional Rank Reduction backdoor defense in JAX/Flax."""
from drr_jax import attacks, checkpoint, configs, data, evaluate, features, models, stiefel
from drr_jax.defenses import defend

__version__ = "0.1.0"

__all__ = ["attacks", "checkpoint", "configs", "data", "evaluate", "features", "models",
           "stiefel", "defend"]
