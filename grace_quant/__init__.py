"""grace-quant: GRACE quantization-aware distillation of vision-language models to INT4, for Hugging Face.

Importing this package registers ``quant_method="grace"`` with transformers, so that
``from_pretrained(..., quantization_config=GraceConfig())`` quantizes on load and GRACE checkpoints load.
"""

from __future__ import annotations

from transformers import AutoModelForImageTextToText as AutoModelForVision2Seq

from grace_quant.checkpoint import saving_qat_master
from grace_quant.config import GraceConfig
from grace_quant.convert import convert_to_packed, prepare_qat, quantize_model
from grace_quant.integrations import register as _register
from grace_quant.modules import GraceQATLinear, GraceQuantLinear

__version__ = "0.1.0"

_register()

#: ``AutoModelForVision2Seq`` was removed in transformers 5.0; this is its successor,
#: ``transformers.AutoModelForImageTextToText``, under the old name for code that still uses it.
AutoModelForVision2Seq = AutoModelForVision2Seq

_LAZY = {"GraceTrainer": "trainer", "GraceTrainingArguments": "training_args"}


def __getattr__(name: str):
    """``GraceTrainer`` / ``GraceTrainingArguments`` import the Trainer stack only when first used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"grace_quant.integrations.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'grace_quant' has no attribute {name!r}")


__all__ = [
    "AutoModelForVision2Seq",
    "GraceTrainer",
    "GraceTrainingArguments",
    "GraceConfig",
    "GraceQATLinear",
    "GraceQuantLinear",
    "convert_to_packed",
    "prepare_qat",
    "quantize_model",
    "saving_qat_master",
]
