"""W4A16 / W8A16 compute for GRACE's packed format. Knows nothing of transformers.

``quant_linear`` is the single entry point the INT4 linear calls; it picks an implementation by backend
and device. The torch reference (dequantize + matmul) is always available and is what CPUs run; on CUDA, 4-bit
weights go through the ``grace_quant::w4a16_linear`` custom op and its Triton kernels (``triton_w4a16``).
``decode_attention`` is the entry point of split-KV decode attention (``grace_quant::decode_attention`` on CUDA,
``triton_decode_attention``).
"""

from __future__ import annotations

import torch

from .custom_op import decode_attention_op, w4a16_linear_op
from .dispatch import SUPPORTED_GROUPS
from .packing import (
    NIBBLE_COLUMNS,
    SUPPORTED_BITS,
    code_range,
    codes_per_word,
    from_checkpoint,
    group_size_problem,
    pack,
    to_checkpoint,
    unpack,
)
from .reference import decode_attention_reference, dequantize, dequantize_codes, quant_linear_reference
from .runtime import interpreting, kernels_can_run

BACKENDS = ("auto", "torch", "triton")

__all__ = [
    "BACKENDS",
    "NIBBLE_COLUMNS",
    "SUPPORTED_BITS",
    "SUPPORTED_GROUPS",
    "code_range",
    "decode_attention",
    "decode_attention_op",
    "decode_attention_reference",
    "codes_per_word",
    "dequantize",
    "dequantize_codes",
    "from_checkpoint",
    "group_size_problem",
    "interpreting",
    "kernels_can_run",
    "pack",
    "quant_linear",
    "quant_linear_reference",
    "to_checkpoint",
    "unpack",
    "w4a16_linear_op",
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

    ``backend="torch"`` always runs the reference; ``"auto"`` runs the ``grace_quant::w4a16_linear`` custom op
    (Triton kernels) for 4-bit weights on CUDA (the same kernels through ``triton_w4a16.eager_linear``, without the op's
    dispatch and with the call's checks and kernel choice resolved once per call shape, in eager
    code that needs no gradient) and the reference otherwise; ``"triton"`` insists on the Triton
    kernels and raises if they cannot run (not CUDA and not ``TRITON_INTERPRET=1``, bits != 4, unsupported
    dtype or group size).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "torch":
        return quant_linear_reference(x, packed, scales, bias, group_size, bits)
    if backend == "auto":
        if bits == 4 and x.is_cuda and packed.is_cuda and scales.is_cuda:
            if _eager_inference(x, bias):
                from .triton_w4a16 import eager_linear  # the dispatch resolved once per call shape

                return eager_linear(x, packed, scales, bias, group_size)
            return w4a16_linear_op(x, packed, scales, bias, group_size)
        return quant_linear_reference(x, packed, scales, bias, group_size, bits)
    return _quant_linear_triton(x, packed, scales, bias, group_size, bits)


def _eager_inference(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Eager call that needs no gradient: the custom op's dispatch (tens of us per call on the host, which
    eager prefill pays for every layer) buys nothing here, so the kernels are called directly. Under
    ``torch.compile`` the op stays, opaque to the tracer."""
    if torch.compiler.is_compiling():
        return False
    return not torch.is_grad_enabled() or not (x.requires_grad or (bias is not None and bias.requires_grad))


def _quant_linear_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    bits: int,
) -> torch.Tensor:
    """``backend="triton"``: the custom op on CUDA, the kernels themselves under Triton's CPU interpreter."""
    if bits != 4:
        raise ValueError(f'backend="triton" implements bits=4 only, got bits={bits}; use backend="torch"')
    if not kernels_can_run(x):
        raise RuntimeError(
            f'backend="triton" needs CUDA tensors (got {x.device}) or TRITON_INTERPRET=1 set before triton is '
            'imported; use backend="auto" or "torch" on CPU'
        )
    from . import triton_w4a16

    if not triton_w4a16.supports(x, packed, scales, group_size):
        raise ValueError(
            f'backend="triton" cannot run x {tuple(x.shape)} {x.dtype} on {x.device} with packed '
            f"{tuple(packed.shape)} on {packed.device}, scales {tuple(scales.shape)} {scales.dtype}, group_size "
            f"{group_size}: needs fp16/bf16 activations, group_size in {SUPPORTED_GROUPS}, "
            "all tensors on one device"
        )
    if x.is_cuda:
        return w4a16_linear_op(x, packed, scales, bias, group_size)
    return triton_w4a16.w4a16_linear(x, packed, scales, bias, group_size)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    kv_lens: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of a few query tokens ``q [B, H, Q, D]`` over a KV cache ``k``/``v [B, Hkv, L, D]`` -> ``[B, Q, H, D]``.

    Only the slots the boolean ``mask [B|1, 1, Q, L]`` keeps (and, with ``kv_lens [B]``, slots below each row's length,
    causally) are read. CUDA: the ``grace_quant::decode_attention`` custom op under ``torch.compile`` (Triton split-KV
    kernel, safe in CUDA graphs), its implementation without the op's dispatch in eager code (inference only: no
    autograd); Triton's CPU interpreter: the kernel itself; otherwise the torch reference.
    """
    scale = 1.0 / q.shape[-1] ** 0.5 if scale is None else float(scale)
    if q.is_cuda:
        if torch.compiler.is_compiling():
            return decode_attention_op(q, k, v, mask, kv_lens, scale)
        from .custom_op import attention_cuda  # eager: the op's CUDA implementation without its dispatch

        return attention_cuda(q, k, v, mask, kv_lens, scale)
    if interpreting():
        from . import triton_decode_attention

        return triton_decode_attention.decode_attention(q, k, v, mask, kv_lens, scale)
    return decode_attention_reference(q, k, v, mask, kv_lens, scale)
