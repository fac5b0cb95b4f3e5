"""Torch reference implementation of W4A16 / W8A16: dequantize, then a dense matmul.

It is the CPU path, the fallback on any device, and the ground truth the Triton kernels are tested against.
"""

from __future__ import annotations

import math

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


def decode_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    kv_lens: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Decode attention in torch (fp32 math), the contract of ``triton_decode_attention.decode_attention``: the custom
    op's CPU implementation and its fallback."""
    batch, heads, n_q, dim = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    group = heads // kv_heads
    keys = k.float().repeat_interleave(group, dim=1)
    values = v.float().repeat_interleave(group, dim=1)
    scores = q.float() @ keys.transpose(-1, -2) * (1.0 / math.sqrt(dim) if scale is None else scale)
    keep = torch.ones((batch, 1, n_q, length), dtype=torch.bool, device=q.device)
    if mask is not None:
        keep = keep & mask
    if kv_lens is not None:
        slots = torch.arange(length, device=q.device)
        last = kv_lens.to(q.device).long()[:, None] - n_q + torch.arange(n_q, device=q.device)[None, :]
        keep = keep & (slots[None, None, None, :] <= last[:, None, :, None])
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with nothing to attend gives zeros
    return (probs @ values).to(q.dtype).transpose(1, 2).contiguous()
