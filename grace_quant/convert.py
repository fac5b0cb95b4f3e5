"""Post-load conversions between QAT and packed layers, for models already in memory (``quantize_model``, which
starts from full precision and gives the model its ``hf_quantizer``, lives beside the quantizer)."""

from __future__ import annotations

from torch import nn

from grace_quant.fusion import fuse_projections, unfuse_projections
from grace_quant.modules import GraceQATLinear, GraceQuantLinear
from grace_quant.surgery import grace_layers, set_submodule


def _set_layer_kind(model: nn.Module, kind: str | None) -> None:
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "layer_kind"):
        quantizer.layer_kind = kind


def prepare_qat(model: nn.Module) -> nn.Module:
    """Turn a loaded packed GRACE model back into a trainable QAT model, in place.

    Each packed layer becomes a QAT layer with ``weight = dequantized`` and ``log_scale = log(scales)``, so
    training continues from exactly the stored codes (``from_pretrained`` ignores a ``quantization_config``
    passed for an already-quantized checkpoint; this is the call to use instead).
    """
    unfuse_projections(model)
    layers = list(grace_layers(model, GraceQuantLinear))
    if not layers and not any(True for _ in grace_layers(model, GraceQATLinear)):
        raise ValueError("prepare_qat: the model has no GRACE layers; load it with quantization_config=GraceConfig().")
    for name, layer in layers:
        set_submodule(model, name, layer.to_qat())
    _set_layer_kind(model, "qat")
    return model


def convert_to_packed(model: nn.Module, backend: str | None = None, fuse: bool | None = None) -> nn.Module:
    """Replace every QAT layer by its packed equivalent, in place (what ``save_pretrained`` writes, without I/O).

    ``fuse`` (default: the model's ``GraceConfig.fuse_projections``) then fuses ``q|k|v`` and ``gate|up`` for
    inference, as loading a packed checkpoint does.
    """
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    backend = backend or getattr(config, "backend", "auto")
    for name, layer in list(grace_layers(model, GraceQATLinear)):
        set_submodule(model, name, GraceQuantLinear.from_qat(layer, backend=backend))
    _set_layer_kind(model, "packed")
    if getattr(config, "fuse_projections", True) if fuse is None else fuse:
        fuse_projections(model)
    return model
