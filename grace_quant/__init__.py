"""grace-quant: GRACE quantization-aware distillation of vision-language models to INT4, for Hugging Face.

Importing this package registers ``quant_method="grace"`` with transformers, so that
``from_pretrained(..., quantization_config=GraceConfig())`` quantizes on load and GRACE checkpoints load.

The package imports lazily: ``import grace_quant`` (or ``grace_quant.kernels``) costs no transformers import.
If transformers' quantizer registry is already loaded, the registration happens now; otherwise it happens the
moment transformers loads it (:mod:`grace_quant._registration`), before any ``from_pretrained`` can look.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from grace_quant._registration import register_when_transformers_loads

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_EXPORTS = {
    "AutoModelForVision2Seq": "grace_quant.integrations",
    "GraceConfig": "grace_quant.config",
    "GraceDataCollator": "grace_quant.integrations.collator",
    "GraceQATLinear": "grace_quant.modules",
    "GraceQuantLinear": "grace_quant.modules",
    "GraceTrainer": "grace_quant.integrations.trainer",
    "GraceTrainingArguments": "grace_quant.integrations.training_args",
    "convert_to_packed": "grace_quant.convert",
    "deferred_stop_check": "grace_quant.integrations.generation",
    "fuse_projections": "grace_quant.fusion",
    "grace_greedy": "grace_quant.integrations.fast_decode",
    "prepare_qat": "grace_quant.convert",
    "quantize_model": "grace_quant.integrations.quantizer",
    "saving_qat_master": "grace_quant.checkpoint",
    "set_fake_quant_backend": "grace_quant.modules",
    "tune_model": "grace_quant.tuning",
    "unfuse_projections": "grace_quant.fusion",
}

__all__ = [
    "AutoModelForVision2Seq",
    "GraceConfig",
    "GraceDataCollator",
    "GraceQATLinear",
    "GraceQuantLinear",
    "GraceTrainer",
    "GraceTrainingArguments",
    "convert_to_packed",
    "deferred_stop_check",
    "fuse_projections",
    "grace_greedy",
    "prepare_qat",
    "quantize_model",
    "saving_qat_master",
    "set_fake_quant_backend",
    "tune_model",
    "unfuse_projections",
]

if TYPE_CHECKING:
    from grace_quant.checkpoint import saving_qat_master
    from grace_quant.config import GraceConfig
    from grace_quant.convert import convert_to_packed, prepare_qat
    from grace_quant.fusion import fuse_projections, unfuse_projections
    from grace_quant.integrations import AutoModelForVision2Seq
    from grace_quant.integrations.collator import GraceDataCollator
    from grace_quant.integrations.fast_decode import grace_greedy
    from grace_quant.integrations.generation import deferred_stop_check
    from grace_quant.integrations.quantizer import quantize_model
    from grace_quant.integrations.trainer import GraceTrainer
    from grace_quant.integrations.training_args import GraceTrainingArguments
    from grace_quant.modules import GraceQATLinear, GraceQuantLinear, set_fake_quant_backend
    from grace_quant.tuning import tune_model


def __getattr__(name: str):
    """Public names import their module on first use (``grace_quant.GraceTrainer`` loads the Trainer stack then)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'grace_quant' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


register_when_transformers_loads()
