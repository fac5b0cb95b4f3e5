"""Hugging Face glue for GRACE: the quantizer and its registration (importing this package registers it), the
Trainer, the Hub, the checkpoint formats of other tools, optimum."""

from __future__ import annotations

from transformers import AutoModelForImageTextToText
from transformers.quantizers import auto

from grace_quant.config import GraceConfig

from .quantizer import GraceHfQuantizer

METHOD = "grace"

#: ``AutoModelForVision2Seq`` was removed in transformers 5.0; this is its successor,
#: ``transformers.AutoModelForImageTextToText``, under the old name for code that still uses it.
AutoModelForVision2Seq = AutoModelForImageTextToText


def register() -> None:
    """Register ``quant_method="grace"`` with transformers; safe to call any number of times."""
    for mapping, register_fn, cls in (
        (auto.AUTO_QUANTIZATION_CONFIG_MAPPING, auto.register_quantization_config, GraceConfig),
        (auto.AUTO_QUANTIZER_MAPPING, auto.register_quantizer, GraceHfQuantizer),
    ):
        current = mapping.get(METHOD)
        if current is None:
            register_fn(METHOD)(cls)
        elif current.__module__ != cls.__module__:
            raise RuntimeError(
                f"quant_method '{METHOD}' is already registered by {current.__module__}.{current.__name__}; "
                "two packages claim the same name."
            )
        else:
            mapping[METHOD] = cls  # this module imported again (e.g. importlib.reload): keep the newest class


register()

__all__ = ["AutoModelForVision2Seq", "GraceHfQuantizer", "register"]
