"""Fused Triton kernels for GRACE's QAT fake quantization (``grace_quant.quant.fake_quantize``).

The weight ``[out, in]`` is read as ``out * in / group`` contiguous groups of ``group`` elements; one program owns
``BLOCK_G`` whole groups (a ``[BLOCK_G, next_pow2(group)]`` tile), so the per-group reduction of the backward stays
inside the program: no atomics, no second pass, no host syncs (both launches are CUDA-graph safe).

* forward, one pass: read ``w`` and the group's ``e = exp(theta)``, write ``w_hat = s * clamp(round(w / s))``;
* backward, one pass: read ``w``, the upstream gradient and ``e``; write ``dw`` (straight through inside the code
  range, 0 where clamped) and ``dtheta = e * sum_group g * (round(w/s) - w/s inside | clamp(round(w/s)) outside)``.

Bit-exactness with the torch path (and so with the packed export) is by construction:

* ``e`` is ``torch.exp(theta)`` computed by the caller (an ``[out, in / group]`` tensor, 1/group of the weight):
  an in-kernel ``exp`` could differ from torch's by an ulp, and the scale must equal what the export stores;
* ``s`` is ``e`` rounded to the weight dtype in the kernel, the ratio is an IEEE division (``tl.div_rn``; ``/``
  on fp32 may be approximate on a GPU), rounding is half to even through the ``1.5 * 2**23`` trick on a ratio
  first clamped to ``[lo - 1, hi + 1]`` (exact there; libdevice's ``rint`` does not run in the interpreter), and a
  NaN ratio stays NaN as in torch;
* ``q * s`` is one fp32 multiply: for fp32 weights that is torch's ``codes * scales``; for bf16/fp16 scales
  (8/11-bit significands times a code of at most 8 bits) it is exact, and rounding it to the weight dtype is the
  single rounding of torch's ``codes.to(dtype) * scales``. fp32 -> bf16 rounding is done on the bits (round to
  nearest even), because Triton's interpreter truncates that conversion.

All maths is in fp32 whatever the storage dtypes (loads are upcast first); stores cast exactly representable
values only.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .packing import code_range, group_size_problem
from .runtime import interpreting

INTERPRET = interpreting()
"""Running under Triton's CPU interpreter (programs run one after another; keep blocks small there)."""

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_ELEMENTS = 4096  # weight elements per program on a GPU (whole groups; not tuned on hardware yet)
NUM_WARPS = 8
INTERPRET_BLOCK_ELEMENTS = 2048
MAX_GROUP = 4096  # one program holds at least one whole group
_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # constexpr codes of the storage dtypes
_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: x + M - M rounds |x| < 2**22 to an integer, half to even

__all__ = ["SUPPORTED_DTYPES", "fake_quant_backward", "fake_quant_forward", "launch_backward", "launch_forward", "supports"]


# ----------------------------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _round_to(x, KIND: tl.constexpr):
    """fp32 ``x`` rounded to the nearest (ties to even) value of the storage dtype ``KIND``, kept in fp32."""
    if KIND == 1:
        x = x.to(tl.float16).to(tl.float32)
    elif KIND == 2:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x


@triton.jit
def _quantize(w, s, LO: tl.constexpr, HI: tl.constexpr):
    """``(ratio, rounded, q)``: ``w / s`` (IEEE), ``round_half_even(ratio)`` (exact inside ``[LO - 1, HI + 1]``,
    saturated to ``LO - 1`` / ``HI + 1`` beyond, NaN kept) and ``q = clamp(rounded, LO, HI)`` (NaN kept)."""
    ratio = tl.div_rn(w, s)
    r = tl.minimum(tl.maximum(ratio, LO - 1.0), HI + 1.0)
    r = (r + _ROUND_MAGIC) - _ROUND_MAGIC
    rounded = tl.where(ratio != ratio, ratio, r)
    q = tl.where(rounded < LO, LO * 1.0, tl.where(rounded > HI, HI * 1.0, rounded))
    return ratio, rounded, q


@triton.jit
def _tile(pid, num_groups, BLOCK_G: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr):
    """Element offsets ``[BLOCK_G, GROUP_PAD]``, their mask, the group indices and their mask for program ``pid``."""
    gid = pid.to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    cols = tl.arange(0, GROUP_PAD)
    g_mask = gid < num_groups
    offs = gid[:, None] * GROUP + cols[None, :]
    if GROUP_PAD == GROUP:
        mask = g_mask[:, None]
    else:
        mask = g_mask[:, None] & (cols[None, :] < GROUP)
    return offs, mask, gid, g_mask


@triton.jit
def _weight_tile(
    w_ptr, e_ptr, num_groups, W_KIND: tl.constexpr, BLOCK_G: tl.constexpr, GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
):  # fmt: skip
    """This program's tile: offsets, masks and group indices (as :func:`_tile`), ``e = exp(theta)`` per group, the
    scales ``s = e`` rounded to the weight dtype ``[BLOCK_G, 1]`` and the weights in fp32."""
    offs, mask, gid, g_mask = _tile(tl.program_id(0), num_groups, BLOCK_G, GROUP, GROUP_PAD)
    e = tl.load(e_ptr + gid, mask=g_mask, other=1.0).to(tl.float32)
    s = _round_to(e, W_KIND)[:, None]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return offs, mask, gid, g_mask, e, s, w


@triton.jit
def _fake_quant_fwd_kernel(
    w_ptr, e_ptr, out_ptr, num_groups,
    LO: tl.constexpr, HI: tl.constexpr, W_KIND: tl.constexpr, OUT_KIND: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    offs, mask, gid, g_mask, e, s, w = _weight_tile(w_ptr, e_ptr, num_groups, W_KIND, BLOCK_G, GROUP, GROUP_PAD)
    _, _, q = _quantize(w, s, LO, HI)
    w_hat = _round_to(q * s, W_KIND)
    if OUT_KIND != W_KIND:
        w_hat = _round_to(w_hat, OUT_KIND)  # what torch's w_hat.to(out_dtype) does after the weight-dtype rounding
    tl.store(out_ptr + offs, w_hat.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fake_quant_bwd_kernel(
    w_ptr, e_ptr, g_ptr, gw_ptr, gls_ptr, num_groups,
    LO: tl.constexpr, HI: tl.constexpr, W_KIND: tl.constexpr, G_KIND: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    offs, mask, gid, g_mask, e, s, w = _weight_tile(w_ptr, e_ptr, num_groups, W_KIND, BLOCK_G, GROUP, GROUP_PAD)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if G_KIND != W_KIND:
        g = _round_to(g, W_KIND)  # the gradient of w_hat.to(out_dtype) arrives in the weight dtype
    ratio, rounded, q = _quantize(w, s, LO, HI)
    inside = (rounded >= LO) & (rounded <= HI)
    tl.store(gw_ptr + offs, tl.where(inside, g, 0.0).to(gw_ptr.dtype.element_ty), mask=mask)
    step = tl.where(inside, rounded - ratio, q)  # d w_hat / d s
    contrib = tl.where(mask, g * step, 0.0)
    grad_log_scale = tl.sum(contrib, axis=1) * e
    tl.store(gls_ptr + gid, grad_log_scale.to(gls_ptr.dtype.element_ty), mask=g_mask)


# ----------------------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------------------


def supports(weight: torch.Tensor, log_scale: torch.Tensor, group_size: int | None = None) -> bool:
    """Whether the kernels run this ``[out, in]`` weight with its fp32 ``[out, in / group]`` ``log_scale``: CUDA (or
    ``TRITON_INTERPRET=1``), one device, fp32/bf16/fp16 weight, ``group_size`` (default ``in / log_scale.shape[1]``)
    a multiple of 8 dividing ``in`` and at most ``MAX_GROUP``."""
    if not ((weight.is_cuda or INTERPRET) and weight.device == log_scale.device):
        return False
    if weight.dtype not in SUPPORTED_DTYPES or log_scale.dtype != torch.float32:
        return False
    if weight.dim() != 2 or log_scale.dim() != 2 or log_scale.shape[0] != weight.shape[0] or log_scale.shape[1] < 1:
        return False
    in_features = weight.shape[1]
    if group_size is None:
        group_size = in_features // log_scale.shape[1]
    return (
        group_size_problem(group_size, in_features=in_features) is None
        and group_size <= MAX_GROUP
        and group_size % 8 == 0
        and log_scale.shape[1] == in_features // group_size
    )


@functools.cache
def _launch_config(group_size: int, block_elements: int | None) -> tuple[int, int, int]:
    """``(GROUP_PAD, BLOCK_G, num_warps)`` for a group size."""
    group_pad = triton.next_power_of_2(group_size)
    elements = block_elements or (INTERPRET_BLOCK_ELEMENTS if INTERPRET else BLOCK_ELEMENTS)
    block_g = max(1, triton.next_power_of_2(elements) // group_pad)
    return group_pad, block_g, (4 if INTERPRET else NUM_WARPS)


def _check(weight: torch.Tensor, exp_log_scale: torch.Tensor, group_size: int) -> None:
    if not supports(weight, exp_log_scale, group_size):
        raise ValueError(
            "the fake-quant kernels need an fp32/bf16/fp16 [out, in] weight and an fp32 [out, in / group_size] "
            "exp(log_scale) on one CUDA device (or TRITON_INTERPRET=1), group_size a multiple of 8 dividing in "
            f"(at most {MAX_GROUP}); got weight {tuple(weight.shape)} {weight.dtype} on {weight.device}, "
            f"exp(log_scale) {tuple(exp_log_scale.shape)} {exp_log_scale.dtype} on {exp_log_scale.device}, "
            f"group_size {group_size}"
        )


def fake_quant_forward(
    weight: torch.Tensor,
    exp_log_scale: torch.Tensor,
    group_size: int,
    bits: int,
    out_dtype: torch.dtype | None = None,
    *,
    block_elements: int | None = None,
) -> torch.Tensor:
    """``w_hat [out, in]`` in ``out_dtype`` (default the weight's) from ``weight`` and the fp32 per-group
    ``exp_log_scale = torch.exp(log_scale)`` ``[out, in / group_size]``; one kernel launch.

    Equals ``dequantize_codes(clamp(round(w / s)), s).to(out_dtype)`` bit for bit, ``s = exp_log_scale.to(weight.dtype)``.
    """
    _check(weight, exp_log_scale, group_size)
    out_dtype = out_dtype or weight.dtype
    if out_dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"out_dtype must be one of {SUPPORTED_DTYPES}, got {out_dtype}")
    return launch_forward(weight, exp_log_scale, group_size, bits, out_dtype, block_elements=block_elements)


def launch_forward(
    weight: torch.Tensor,
    exp_log_scale: torch.Tensor,
    group_size: int,
    bits: int,
    out_dtype: torch.dtype,
    *,
    block_elements: int | None = None,
) -> torch.Tensor:
    """:func:`fake_quant_forward` without its argument checks, for a caller that ran :func:`supports` on these
    tensors (the autograd function, once per weight per step: a QAT step is host-bound on such per-call work)."""
    lo, hi = code_range(bits)
    weight, exp_log_scale = weight.contiguous(), exp_log_scale.contiguous()
    out = torch.empty(weight.shape, dtype=out_dtype, device=weight.device)
    num_groups = exp_log_scale.numel()
    if num_groups == 0:
        return out
    group_pad, block_g, warps = _launch_config(group_size, block_elements)
    _fake_quant_fwd_kernel[(triton.cdiv(num_groups, block_g),)](
        weight, exp_log_scale, out, num_groups,
        LO=lo, HI=hi, W_KIND=_KIND[weight.dtype], OUT_KIND=_KIND[out_dtype],
        GROUP=group_size, GROUP_PAD=group_pad, BLOCK_G=block_g, num_warps=warps,
    )  # fmt: skip
    return out


def fake_quant_backward(
    weight: torch.Tensor,
    exp_log_scale: torch.Tensor,
    grad: torch.Tensor,
    group_size: int,
    bits: int,
    *,
    block_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_weight, grad_log_scale)`` of ``fake_quant_forward`` for the upstream ``grad`` ``[out, in]``
    (fp32/bf16/fp16: it is first rounded to the weight dtype, as the gradient of ``.to(out_dtype)`` is); one launch.

    ``grad_weight`` has the weight's dtype, ``grad_log_scale`` is fp32 ``[out, in / group_size]``.
    """
    _check(weight, exp_log_scale, group_size)
    if grad.shape != weight.shape or grad.dtype not in SUPPORTED_DTYPES or grad.device != weight.device:
        raise ValueError(
            f"grad must be an fp32/bf16/fp16 {tuple(weight.shape)} tensor on {weight.device}, got "
            f"{tuple(grad.shape)} {grad.dtype} on {grad.device}"
        )
    return launch_backward(weight, exp_log_scale, grad, group_size, bits, block_elements=block_elements)


def launch_backward(
    weight: torch.Tensor,
    exp_log_scale: torch.Tensor,
    grad: torch.Tensor,
    group_size: int,
    bits: int,
    *,
    block_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fake_quant_backward` without its argument checks (the caller checked the tensors, as for
    :func:`launch_forward`; ``grad`` has the weight's shape and device and a supported dtype)."""
    lo, hi = code_range(bits)
    weight, exp_log_scale, grad = weight.contiguous(), exp_log_scale.contiguous(), grad.contiguous()
    grad_weight = torch.empty_like(weight)
    grad_log_scale = torch.empty_like(exp_log_scale)
    num_groups = exp_log_scale.numel()
    if num_groups == 0:
        return grad_weight, grad_log_scale
    group_pad, block_g, warps = _launch_config(group_size, block_elements)
    _fake_quant_bwd_kernel[(triton.cdiv(num_groups, block_g),)](
        weight, exp_log_scale, grad, grad_weight, grad_log_scale, num_groups,
        LO=lo, HI=hi, W_KIND=_KIND[weight.dtype], G_KIND=_KIND[grad.dtype],
        GROUP=group_size, GROUP_PAD=group_pad, BLOCK_G=block_g, num_warps=warps,
    )  # fmt: skip
    return grad_weight, grad_log_scale
