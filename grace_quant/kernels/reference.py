"""Torch reference implementation of W4A16 / W8A16: dequantize, then a dense matmul.

It is the CPU path, the fallback on any device, and the ground truth the Triton kernels are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .packing import unpack


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """``w[r, c] = codes[r, c] * scales[r, c // group_size]``, computed in ``scales.dtype``.

    Fake quantization uses this same function, which is what makes packed and fake-quant weights bit-identical.
    """
    out_features, in_features = codes.shape
    groups = codes.to(scales.dtype).reshape(out_features, in_features // group_size, group_size)
    return (groups * scales.unsqueeze(-1)).reshape(out_features, in_features)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    """Dense ``[out, in]`` weight in ``scales.dtype`` from packed int32 words and per-group scales."""
    return dequantize_codes(unpack(packed, bits), scales, group_size)


def quant_linear_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    bits: int,
) -> torch.Tensor:
    """``x @ dequantize(packed, scales).T + bias`` in the activation dtype."""
    weight = dequantize(packed, scales, group_size, bits).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
