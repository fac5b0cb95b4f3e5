"""The two layer types GRACE puts in place of ``nn.Linear``.

* ``GraceQATLinear``: full-precision master ``weight`` (same name as ``nn.Linear``, so fp checkpoints load
  into it unchanged) plus a learnable fp32 ``log_scale`` per group; forward uses the fake-quant weight.
* ``GraceQuantLinear``: packed integer ``weight`` (int32 words) and ``scales`` buffers, named exactly as
  they are saved; forward goes through ``grace_quant.kernels.quant_linear``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from grace_quant.kernels import codes_per_word, dequantize, group_size_problem, quant_linear, unpack
from grace_quant.quant import (
    fake_quant_backend_problem,
    fake_quantize,
    fake_quantize_many,
    fused_qat_linear,
    mse_scales,
    pack_weight,
    runs_fused,
)


class _GraceLinearBase(nn.Module):
    """Shape and quantization settings shared by both layer types."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bits: int):
        super().__init__()
        if (problem := group_size_problem(group_size, bits, in_features)) is not None:
            raise ValueError(problem)
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.bits = bits

    @property
    def num_groups(self) -> int:
        return self.in_features // self.group_size

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}"
        )


class GraceQATLinear(_GraceLinearBase):
    """Linear layer trained with fake-quantized weights (symmetric, per group, learnable scales).

    ``fake_quant_backend`` (``grace_quant.quant.FAKE_QUANT_BACKENDS``; default ``"auto"``: fused Triton kernels on
    CUDA, torch ops elsewhere; ``"triton_linear"`` quantizes inside the matmul) is a plain attribute, not state:
    set it for a whole model with :func:`set_fake_quant_backend` (``GraceTrainer`` does, from
    ``GraceTrainingArguments.fake_quant_backend``)."""

    fake_quant_backend: str = "auto"
    _grouped_weight: torch.Tensor | None = None  # set inside grouped_fake_quant(): this step's fake-quant weight

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        group_size: int = 128,
        bits: int = 4,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(in_features, out_features, group_size, bits)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.log_scale = nn.Parameter(torch.zeros(out_features, self.num_groups, device=device, dtype=torch.float32))

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group_size: int, bits: int) -> GraceQATLinear:
        """Wrap an existing ``nn.Linear``: share its weight and bias, MSE-initialise the scales."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            group_size=group_size,
            bits=bits,
            device="meta",
        )
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.log_scale = nn.Parameter(log_scale_init(linear.weight, group_size, bits))
        return layer

    def quantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The fake-quant weight the forward uses (differentiable in ``weight`` and ``log_scale``), in ``dtype``
        (default the weight's): ``fake_quantize(...).to(dtype)``, written directly in ``dtype`` on CUDA."""
        return fake_quantize(
            self.weight, self.log_scale, self.group_size, self.bits, out_dtype=dtype, backend=self.fake_quant_backend
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _matmul_dtype(x)
        if self.fake_quant_backend == "triton_linear":  # experimental: quantize inside the matmul kernels
            y = fused_qat_linear(x.to(dtype), self.weight, self.log_scale, self.bias, self.group_size, self.bits)
            if y is not None:
                return y
        weight = self._grouped_weight
        if weight is None or weight.dtype != dtype:
            weight = self.quantized_weight(dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        """``{"weight": packed codes, "scales": scales}`` whose dequantization equals ``quantized_weight()``."""
        return pack_weight(self.weight, self.log_scale, self.group_size, self.bits)


@contextlib.contextmanager
def grouped_fake_quant(model: nn.Module) -> Iterator[int]:
    """Within the block, the trainable QAT linears of ``model`` that run the fused kernels take their fake-quant weights
    from :func:`grace_quant.quant.fake_quantize_many`, computed on entry for all of them (one call per group size,
    bits, dtype and device; the matmul dtype is autocast's where it is on): two kernel launches per step instead of
    two per layer. Yields how many layers it covers (0 without gradients, where nothing is saved for backward and
    one weight at a time keeps memory low). Frozen layers and other backends quantize per call as usual.

    For one forward whose backward follows: a layer recomputed after the block (gradient checkpointing) quantizes
    per call, and the grouped weights' backward then waits for gradients that never come; use it without
    checkpointing."""
    layers: dict[tuple, list[GraceQATLinear]] = {}
    if torch.is_grad_enabled():
        for module in model.modules():
            if (
                isinstance(module, GraceQATLinear)
                and module.fake_quant_backend in ("auto", "triton")
                and (module.weight.requires_grad or module.log_scale.requires_grad)
            ):
                dtype = _autocast_dtype(module.weight.device.type, module.weight.dtype)
                key = (module.group_size, module.bits, module.weight.dtype, module.weight.device, dtype)
                layers.setdefault(key, []).append(module)
    layers = {key: same for key, same in layers.items() if runs_fused(same[0].weight, same[0].log_scale, key[0],
                                                                       same[0].fake_quant_backend)}  # fmt: skip
    grouped = [module for same in layers.values() for module in same]
    try:
        for (group_size, bits, _, _, dtype), same in layers.items():
            weights = fake_quantize_many([m.weight for m in same], [m.log_scale for m in same], group_size, bits,
                                         dtype, same[0].fake_quant_backend)  # fmt: skip
            for module, weight in zip(same, weights, strict=True):
                module._grouped_weight = weight
        yield len(grouped)
    finally:
        for module in grouped:
            module._grouped_weight = None


def set_fake_quant_backend(model: nn.Module, backend: str) -> int:
    """Run every ``GraceQATLinear`` of ``model`` on ``backend`` (one of ``grace_quant.quant.FAKE_QUANT_BACKENDS``):
    the one place the choice reaches the layers. Returns how many layers it set; raises on an unknown backend."""
    if (problem := fake_quant_backend_problem(backend)) is not None:
        raise ValueError(problem)
    layers = [module for module in model.modules() if isinstance(module, GraceQATLinear)]
    for layer in layers:
        layer.fake_quant_backend = backend
    return len(layers)


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(x, w)`` computes in: the autocast dtype when autocast is on for ``x``'s device (it
    casts fp32/fp16/bf16 operands, not fp64), else ``x.dtype``."""
    return _autocast_dtype(x.device.type, x.dtype)


def _autocast_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """What autocast makes of a ``dtype`` operand of a matmul on ``device_type``: its dtype if on, else ``dtype``."""
    if device_type in ("cuda", "cpu") and dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def log_scale_init(weight: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    """``theta = log(s)`` with ``s`` from the MSE grid, in fp32 on the weight's device."""
    return torch.log(mse_scales(weight, group_size, bits))


class GraceQuantLinear(_GraceLinearBase):
    """Inference linear layer holding packed integer weights; runs on the kernels of ``grace_quant.kernels``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        group_size: int = 128,
        bits: int = 4,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(in_features, out_features, group_size, bits)
        self.backend = backend
        words = in_features // codes_per_word(bits)
        self.register_buffer("weight", torch.zeros(out_features, words, device=device, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(out_features, self.num_groups, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self._fusion: tuple[nn.Module, int] | None = None  # (FusedProjection, slot) once fused

    @classmethod
    def from_qat(cls, layer: GraceQATLinear, backend: str = "auto") -> GraceQuantLinear:
        """Pack a QAT layer: the result computes with exactly the QAT layer's fake-quant weight."""
        packed = cls(
            layer.in_features,
            layer.out_features,
            layer.bias is not None,
            group_size=layer.group_size,
            bits=layer.bits,
            backend=backend,
            device="meta",
        )
        tensors = layer.packed_tensors()
        packed.weight, packed.scales = tensors["weight"], tensors["scales"]
        if layer.bias is not None:
            packed.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        return packed

    def dequantized_weight(self) -> torch.Tensor:
        """Dense ``[out, in]`` weight in the scales' dtype."""
        return dequantize(self.weight, self.scales, self.group_size, self.bits)

    def codes(self) -> torch.Tensor:
        """Signed integer codes ``[out, in]``."""
        return unpack(self.weight, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fusion is not None:  # a member of a fused group (grace_quant.fusion)
            holder, slot = self._fusion
            return holder.project(x, slot)
        return quant_linear(
            x, self.weight, self.scales, self.bias, group_size=self.group_size, bits=self.bits, backend=self.backend
        )

    def to_qat(self) -> GraceQATLinear:
        """A trainable QAT layer starting from these codes: ``weight = dequantized``, ``theta = log(scales)``."""
        layer = GraceQATLinear(
            self.in_features,
            self.out_features,
            self.bias is not None,
            group_size=self.group_size,
            bits=self.bits,
            device="meta",
        )
        layer.weight = nn.Parameter(self.dequantized_weight())
        layer.log_scale = nn.Parameter(torch.log(self.scales.float()))
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.detach().clone())
        return layer

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight (for ``model.dequantize()``)."""
        weight = self.dequantized_weight().to(dtype or self.scales.dtype)
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(weight.dtype).clone())
        return linear
