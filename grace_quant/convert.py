"""Post-load conversions between full precision, QAT and packed layers, for models already in memory."""

from __future__ import annotations

from torch import nn

from grace_quant.config import GraceConfig
from grace_quant.fusion import fuse_projections, unfuse_projections
from grace_quant.modules import GraceQATLinear, GraceQuantLinear
from grace_quant.surgery import grace_layers, resolve_layers, set_submodule


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


def quantize_model(model: nn.Module, config: GraceConfig | None = None) -> nn.Module:
    """Quantize a full-precision transformers model already in memory, in place, as ``from_pretrained`` would.

    ``config.mode="qat"`` gives trainable QAT layers, ``"packed"`` packed layers. The model then saves with
    ``save_pretrained`` like a model loaded with ``quantization_config=config``.
    """
    from grace_quant.integrations.quantizer import GraceHfQuantizer

    config = config or GraceConfig()
    if getattr(model, "hf_quantizer", None) is not None or any(True for _ in grace_layers(model)):
        raise ValueError("quantize_model: the model is already quantized.")
    names = resolve_layers(model, config)
    for name in names:
        set_submodule(
            model,
            name,
            GraceQATLinear.from_linear(model.get_submodule(name), group_size=config.group_size, bits=config.bits),
        )
    quantizer = GraceHfQuantizer(config, pre_quantized=False)
    model.hf_quantizer = quantizer
    model.config.quantization_config = config
    model.is_quantized = True
    model.quantization_method = config.quant_method
    if config.mode == "packed":
        convert_to_packed(model, config.backend)
    return model
