"""grace-quant: GRACE quantization-aware distillation of vision-language models to INT4, for Hugging Face.

Importing this package registers ``quant_method="grace"`` with transformers, so that
``from_pretrained(..., quantization_config=GraceConfig())`` quantizes on load and GRACE checkpoints load.
"""

from __future__ import annotations

import os as _os

# A source checkout keeps kernels/ and integrations/ at the repository root (pyproject maps them into this
# package when installed); let `grace_quant.kernels` resolve there too, so a plain checkout on PYTHONPATH works.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and all(
    _os.path.exists(_os.path.join(_root, name)) for name in ("pyproject.toml", "kernels", "integrations")
):
    __path__.append(_root)

from transformers import AutoModelForImageTextToText as AutoModelForVision2Seq  # noqa: E402

from grace_quant.checkpoint import saving_qat_master  # noqa: E402
from grace_quant.config import GraceConfig  # noqa: E402
from grace_quant.convert import convert_to_packed, prepare_qat, quantize_model  # noqa: E402
from grace_quant.fusion import fuse_projections, unfuse_projections  # noqa: E402
from grace_quant.integrations import register as _register  # noqa: E402
from grace_quant.modules import GraceQATLinear, GraceQuantLinear  # noqa: E402

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
    "fuse_projections",
    "prepare_qat",
    "quantize_model",
    "saving_qat_master",
    "unfuse_projections",
]
