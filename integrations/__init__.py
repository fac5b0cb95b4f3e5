"""Hugging Face glue for GRACE: the quantizer registration (this module) and, beside it, the Trainer."""

from __future__ import annotations

from grace_quant.config import GraceConfig

from .quantizer import GraceHfQuantizer

METHOD = "grace"


def register() -> None:
    """Register ``quant_method="grace"`` with transformers; safe to call any number of times."""
    from transformers.quantizers import auto

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


__all__ = ["GraceHfQuantizer", "register"]
