"""``GraceHfQuantizer``: the transformers ``HfQuantizer`` behind ``quantization_config=GraceConfig(...)``.

Module swapping happens on the meta model before weights load; full-precision linears are quantized one
tensor at a time while loading (``GraceQuantizeOp``), so the peak memory stays near one fp layer. Module
tensor names equal their serialized names, so no weight-converter machinery is needed (portable across
transformers 5.17 to 5.25). ``quantize_model`` does for a model already in memory what loading with a
``GraceConfig`` does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from grace_quant.checkpoint import (
    PACKED,
    QAT_MASTER,
    checkpoint_kind,
    metadata_for,
    packed_state_dict,
    qat_master_state_dict,
    save_kind,
    words_from_checkpoint,
)
from grace_quant.config import GraceConfig
from grace_quant.convert import convert_to_packed
from grace_quant.fusion import fuse_projections, unfuse_projections
from grace_quant.modules import GraceQATLinear, GraceQuantLinear, log_scale_init
from grace_quant.quant import nonfinite_problem, pack_weight, zero_nonfinite
from grace_quant.surgery import GRACE_LAYERS, grace_layers, replace_with_empty_layers, resolve_layers, set_submodule

from .hub import publish_grace_card


class GraceHfQuantizer(HfQuantizer):
    """Quantize on load (QAT or packed), load GRACE checkpoints, and save packed INT4."""

    requires_calibration = False
    quantization_config: GraceConfig

    def __init__(self, quantization_config: GraceConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        # "qat" or "packed": which GRACE layer type the model holds (decided before weights load).
        self.layer_kind = None if self.pre_quantized else quantization_config.mode
        self.requested_dtype: torch.dtype | None = None
        self.nonfinite: list[str] = []  # layers whose weights held NaN/inf, found while quantizing on load

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                "GRACE cannot offload quantized layers to disk; give the device_map enough CPU/GPU memory "
                "(device_map='auto' with max_memory) instead."
            )

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        self.requested_dtype = dtype if isinstance(dtype, torch.dtype) else None
        return dtype

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs: Any):
        if self.pre_quantized:
            self.layer_kind = "qat" if checkpoint_kind(checkpoint_files) == QAT_MASTER else "packed"
        names = resolve_layers(model, self.quantization_config, check_skips=not self.pre_quantized)
        dense_dtypes = {name: model.get_submodule(name).weight.dtype for name in names}
        replace_with_empty_layers(model, names, self.quantization_config, self.layer_kind)
        if not self.pre_quantized and self.layer_kind == "packed":
            # The loader matches checkpoint tensors to module tensors by name and (on transformers 5.17) casts
            # them to the module tensor's dtype before our op runs: give each packed layer a float placeholder
            # `weight` of the dense shape, which GraceQuantizeOp replaces by the packed int32 words.
            for name in names:
                layer = model.get_submodule(name)
                layer.weight = torch.empty(
                    layer.out_features, layer.in_features, device="meta", dtype=dense_dtypes[name]
                )
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs: Any) -> bool:
        if self.pre_quantized:
            return False
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, GRACE_LAYERS) and tensor_name == "weight"

    def get_quantize_ops(self) -> ConversionOps:
        return GraceQuantizeOp(self)

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        if self.nonfinite:
            more = f" ({len(self.nonfinite) - 1} more layer(s) too)" if len(self.nonfinite) > 1 else ""
            raise ValueError(self.nonfinite[0] + more)
        dtype = self.requested_dtype
        if self.pre_quantized and dtype is not None and dtype.is_floating_point:
            # transformers 5.17 keeps a pre-quantized checkpoint in its stored dtype; honour `dtype=` here.
            cast_floating_tensors(model, dtype)
        if self.pre_quantized and self.layer_kind == "packed":  # the files' word order -> memory's
            words_from_checkpoint(model)
        if self.layer_kind == "packed" and getattr(self.quantization_config, "fuse_projections", True):
            fuse_projections(model)
        if self.layer_kind == "packed":
            enable_decode_attention(model, self.quantization_config)
            enable_generate_defaults(model, self.quantization_config)
        publish_grace_card(model)
        return model

    def get_state_dict_and_metadata(self, model):
        """What ``save_pretrained`` writes: packed weights (or qat-master ones inside ``saving_qat_master``), and
        ``mode`` set to match on the config it writes next, so ``config.json`` says what the files hold."""
        kind = save_kind(model)
        state = qat_master_state_dict(model) if kind == QAT_MASTER else packed_state_dict(model)
        mode = "qat" if kind == QAT_MASTER else "packed"
        for config in {
            id(c): c for c in (self.quantization_config, getattr(model.config, "quantization_config", None))
        }.values():
            if isinstance(config, GraceConfig):
                config.mode = mode
        return state, metadata_for(kind)

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """True for QAT models (full fine-tuning of the master weights and scales); packed models are frozen."""
        return self.layer_kind == "qat"

    @property
    def is_qat_trainable(self) -> bool:
        return self.layer_kind == "qat"

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        unfuse_projections(model)
        for name, layer in list(grace_layers(model)):
            if isinstance(layer, GraceQATLinear):
                layer = GraceQuantLinear.from_qat(layer)
            set_submodule(model, name, layer.to_linear(dtype))
        self.layer_kind = None
        return model


class GraceQuantizeOp(ConversionOps):
    """Turns one full-precision ``weight`` into what the layer stores: ``weight`` + ``log_scale`` (QAT) or
    packed ``weight`` + ``scales`` (packed), with MSE-grid scales."""

    def __init__(self, hf_quantizer: GraceHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], **kwargs: Any) -> dict[str, torch.Tensor]:
        config = self.hf_quantizer.quantization_config
        result: dict[str, torch.Tensor] = {}
        for key, value in input_dict.items():
            weight = value[0] if isinstance(value, list) else value
            prefix = key.removesuffix("weight")
            if config.allow_nonfinite:
                weight = zero_nonfinite(weight)
            elif (problem := nonfinite_problem(prefix.rstrip("."), weight)) is not None:
                # raised once loading ends: transformers turns an error raised here into a generic load report
                self.hf_quantizer.nonfinite.append(problem)
            log_scale = log_scale_init(weight, config.group_size, config.bits)
            if self.hf_quantizer.layer_kind == "qat":
                result[key] = weight
                result[prefix + "log_scale"] = log_scale
            else:  # exactly what a fresh QAT layer exports
                packed = pack_weight(weight, log_scale, config.group_size, config.bits)
                result.update({prefix + name: tensor for name, tensor in packed.items()})
        return result


def quantize_model(model: nn.Module, config: GraceConfig | None = None) -> nn.Module:
    """Quantize a full-precision transformers model already in memory, in place, as ``from_pretrained`` would.

    ``config.mode="qat"`` gives trainable QAT layers, ``"packed"`` packed layers. The model then saves with
    ``save_pretrained`` like a model loaded with ``quantization_config=config``.
    """
    config = config or GraceConfig()
    if getattr(model, "hf_quantizer", None) is not None or any(True for _ in grace_layers(model)):
        raise ValueError("quantize_model: the model is already quantized.")
    names = resolve_layers(model, config)
    for name in names:
        weight = model.get_submodule(name).weight
        if config.allow_nonfinite:
            with torch.no_grad():
                weight.copy_(zero_nonfinite(weight))
        elif (problem := nonfinite_problem(name, weight)) is not None:
            raise ValueError(problem)
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
        enable_decode_attention(model, config)
        enable_generate_defaults(model, config)
    publish_grace_card(model)
    return model


def enable_decode_attention(model: nn.Module, config: GraceConfig) -> bool:
    """``GraceConfig.decode_attention``: a packed model gets ``attn_implementation="grace_decode"`` for its language
    model (the vision tower keeps its own), wherever it sits: on CPU every call falls back to sdpa, so a model moved
    to CUDA after loading gets the kernel too. Returns whether it was set."""
    if not getattr(config, "decode_attention", True):
        return False
    from .attention import use_decode_attention  # imported late: this module loads while transformers still does

    return use_decode_attention(model)


def enable_generate_defaults(model: nn.Module, config: GraceConfig) -> bool:
    """``GraceConfig.deferred_stop_check`` and ``GraceConfig.fast_generate``: a packed model's ``generate`` reads its
    stop flag one step late on CUDA (no host sync per token) and decodes greedy calls through ``grace_greedy``
    (``integrations.generation``). Returns whether either was set."""
    from .generation import install_generate_defaults

    defer = getattr(config, "deferred_stop_check", True)
    return install_generate_defaults(model, defer, getattr(config, "fast_generate", True)) is not None


def cast_floating_tensors(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters and persistent buffers to ``dtype``; QAT log-scales stay fp32 and
    non-persistent buffers (rotary frequencies) keep the dtype the model computed them in."""
    for module in model.modules():
        tensors = list(module.named_parameters(recurse=False))
        tensors += [
            (n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set
        ]
        for name, tensor in tensors:
            if tensor is None or not tensor.is_floating_point() or tensor.dtype == dtype:
                continue
            if isinstance(module, GraceQATLinear) and name == "log_scale":
                continue
            tensor.data = tensor.data.to(dtype)


__all__ = ["GraceHfQuantizer", "GraceQuantizeOp", "PACKED", "QAT_MASTER", "quantize_model"]
