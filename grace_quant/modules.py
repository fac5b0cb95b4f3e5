"""The two layer types GRACE puts in place of ``nn.Linear``.

* ``GraceQATLinear``: full-precision master ``weight`` (same name as ``nn.Linear``, so fp checkpoints load
  into it unchanged) plus a learnable fp32 ``log_scale`` per group; forward uses the fake-quant weight.
* ``GraceQuantLinear``: packed integer ``weight`` (int32 words) and ``scales`` buffers, named exactly as
  they are saved; forward goes through ``grace_quant.kernels.quant_linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from grace_quant.kernels import codes_per_word, dequantize, group_size_problem, quant_linear, unpack
from grace_quant.quant import fake_quant_backend_problem, fake_quantize, fused_qat_linear, mse_scales, pack_weight


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
        weight = self.quantized_weight(dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        """``{"weight": packed codes, "scales": scales}`` whose dequantization equals ``quantized_weight()``."""
        return pack_weight(self.weight, self.log_scale, self.group_size, self.bits)


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
    device_type = x.device.type
    if device_type in ("cuda", "cpu") and x.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


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
