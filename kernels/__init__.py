"""W4A16 / W8A16 compute for GRACE's packed format. Knows nothing of transformers.

``quant_linear`` is the single entry point the INT4 linear calls; it picks an implementation by backend
and device. The torch reference (dequantize + matmul) is always available and is what CPUs run.
"""

from __future__ import annotations

import torch

from .packing import SUPPORTED_BITS, code_range, codes_per_word, pack, unpack
from .reference import dequantize, dequantize_codes, quant_linear_reference

BACKENDS = ("auto", "torch", "triton")

__all__ = [
    "BACKENDS",
    "SUPPORTED_BITS",
    "code_range",
    "codes_per_word",
    "dequantize",
    "dequantize_codes",
    "pack",
    "quant_linear",
    "quant_linear_reference",
    "unpack",
]


def quant_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    group_size: int,
    bits: int = 4,
    backend: str = "auto",
) -> torch.Tensor:
    """``y = x @ W^T + b`` with ``W`` given as packed ``bits``-bit codes and per-group ``scales``.

    ``backend="torch"`` always runs the reference; ``"auto"`` and ``"triton"`` use the Triton kernels
    where they exist for the device and fall back to the reference otherwise.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    return quant_linear_reference(x, packed, scales, bias, group_size, bits)
