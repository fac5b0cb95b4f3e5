"""``torch.ops.grace_quant.w4a16_linear`` (the INT4 linear) and ``torch.ops.grace_quant.decode_attention`` (split-KV
decode attention) as opaque PyTorch custom ops.

Being a custom op with a fake (meta) implementation keeps ``torch.compile(fullgraph=True)`` from tracing into the
Triton launcher, and its CUDA implementation only makes shape-based choices, so it is safe to capture in CUDA
graphs. CPUs (and any unsupported case) run the torch reference: dequantize, then matmul.
"""

from __future__ import annotations

import torch

from .reference import decode_attention_reference, dequantize, quant_linear_reference

OP_NAME = "grace_quant::w4a16_linear"
ATTENTION_OP_NAME = "grace_quant::decode_attention"

__all__ = ["ATTENTION_OP_NAME", "OP_NAME", "attention_cuda", "cuda_linear", "decode_attention_op", "w4a16_linear_op"]


def _fake(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def cuda_linear(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """The op's CUDA implementation: the Triton kernels where they apply, the torch reference otherwise (eager code
    that needs no gradient skips the op and calls ``triton_w4a16.eager_linear``, the same rule resolved once per call
    shape)."""
    from . import triton_w4a16

    if triton_w4a16.supports(x, packed, scales, group_size):
        return triton_w4a16.linear_unchecked(x, packed, scales, bias, group_size)
    return quant_linear_reference(x, packed, scales, bias, group_size, 4)


def _define():
    @torch.library.custom_op(OP_NAME, mutates_args=())
    def w4a16_linear(
        x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, group_size: int
    ) -> torch.Tensor:
        """``x @ W^T + bias`` for INT4 ``W`` (packed int32 ``[N, K/8]``, ``scales [N, K/group]``)."""
        return quant_linear_reference(x, packed, scales, bias, group_size, 4)

    w4a16_linear.register_kernel("cuda")(cuda_linear)
    w4a16_linear.register_fake(_fake)
    w4a16_linear.register_autograd(_backward, setup_context=_setup_context)
    return torch.ops.grace_quant.w4a16_linear


def _setup_context(ctx, inputs, output) -> None:
    x, packed, scales, bias, group_size = inputs
    ctx.save_for_backward(packed, scales)
    ctx.group_size = group_size
    ctx.has_bias = bias is not None


def _backward(ctx, grad: torch.Tensor):
    """``dL/dx = dL/dy @ W`` and ``dL/db = sum dL/dy``; the packed weights and scales are frozen buffers."""
    packed, scales = ctx.saved_tensors
    weight = dequantize(packed, scales, ctx.group_size, 4).to(grad.dtype)
    grad_x = grad @ weight
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, grad_bias, None


w4a16_linear_op = _define()
"""The registered op packet; call as ``w4a16_linear_op(x, packed, scales, bias, group_size)``."""


def _attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    kv_lens: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1], q.shape[3]))


def attention_cuda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    kv_lens: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """The Triton split-KV kernel where it applies, the torch reference otherwise."""
    from . import triton_decode_attention as tda

    if tda.unsupported_reason(q, k, v, mask) is None:
        return tda.decode_attention(q, k, v, mask, kv_lens, scale)
    return decode_attention_reference(q, k, v, mask, kv_lens, scale)


def _define_attention():
    @torch.library.custom_op(ATTENTION_OP_NAME, mutates_args=())
    def decode_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        kv_lens: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        """``q [B, H, Q, D]`` over the cache ``k``/``v [B, Hkv, L, D]`` -> ``[B, Q, H, D]`` (inference only)."""
        return decode_attention_reference(q, k, v, mask, kv_lens, scale)

    decode_attention.register_kernel("cuda")(attention_cuda)
    decode_attention.register_fake(_attention_fake)
    return torch.ops.grace_quant.decode_attention


decode_attention_op = _define_attention()
"""The registered op packet; call as ``decode_attention_op(q, k, v, mask, kv_lens, scale)``."""
