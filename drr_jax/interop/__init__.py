"""Interoperability with other frameworks' checkpoints.

`drr_jax.interop.torch`: PyTorch state dicts of the common CIFAR ResNet layouts to and
from drr_jax's Flax models, and BackdoorBench's `attack_result.pt` (docs/interop.md).
It imports PyTorch only when a function needs it (`pip install -e '.[torch]'`).
"""
from drr_jax.interop.torch import (LAYOUTS, NORMALIZATIONS, AttackResult,
                                   AttackResultError, LayoutError, TorchPreActResNet,
                                   TorchResNet, build_model, defend_attack_result,
                                   defender_images, from_torch, layout_of_model_name,
                                   load_attack_result, load_record, poisoned_samples,
                                   save_attack_result_model, save_defense_result,
                                   to_torch)

__all__ = ["LAYOUTS", "NORMALIZATIONS", "AttackResult", "AttackResultError", "LayoutError",
           "TorchPreActResNet", "TorchResNet", "build_model", "defend_attack_result",
           "defender_images", "from_torch", "layout_of_model_name", "load_attack_result",
           "load_record", "poisoned_samples", "save_attack_result_model",
           "save_defense_result", "to_torch"]
