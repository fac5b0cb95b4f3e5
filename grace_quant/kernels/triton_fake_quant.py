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
from collections.abc import Sequence
from typing import NamedTuple

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

__all__ = [
    "SUPPORTED_DTYPES", "fake_quant_backward", "fake_quant_forward", "launch_backward", "launch_forward",
    "launch_many_backward", "launch_many_forward", "supports", "supports_many",
]  # fmt: skip


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
def _tile(block, num_groups, BLOCK_G: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr):
    """Element offsets ``[BLOCK_G, GROUP_PAD]``, their mask, the group indices and their mask of tile ``block``."""
    gid = block.to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    cols = tl.arange(0, GROUP_PAD)
    g_mask = gid < num_groups
    offs = gid[:, None] * GROUP + cols[None, :]
    if GROUP_PAD == GROUP:
        mask = g_mask[:, None]
    else:
        mask = g_mask[:, None] & (cols[None, :] < GROUP)
    return offs, mask, gid, g_mask


@triton.jit
def _pointer(address, KIND: tl.constexpr, ALIGNED: tl.constexpr):
    """An int64 ``address`` (read from a pointer table) as a pointer to the storage dtype ``KIND``; ``ALIGNED``: the
    caller checked it is a multiple of 16 bytes, as a tensor argument's is, so loads vectorize (and reduce in the
    same order) as in the one-weight kernels."""
    if KIND == 0:
        pointer = address.to(tl.pointer_type(tl.float32))
    elif KIND == 1:
        pointer = address.to(tl.pointer_type(tl.float16))
    else:
        pointer = address.to(tl.pointer_type(tl.bfloat16))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _weight_tile(
    w_ptr, e_ptr, block, num_groups, W_KIND: tl.constexpr, BLOCK_G: tl.constexpr, GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
):  # fmt: skip
    """Tile ``block`` of one weight: offsets, masks and group indices (as :func:`_tile`), ``e = exp(theta)`` per
    group, the scales ``s = e`` rounded to the weight dtype ``[BLOCK_G, 1]`` and the weights in fp32."""
    offs, mask, gid, g_mask = _tile(block, num_groups, BLOCK_G, GROUP, GROUP_PAD)
    e = tl.load(e_ptr + gid, mask=g_mask, other=1.0).to(tl.float32)
    s = _round_to(e, W_KIND)[:, None]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return offs, mask, gid, g_mask, e, s, w


@triton.jit
def _forward_tile(
    w_ptr, e_ptr, out_ptr, block, num_groups,
    LO: tl.constexpr, HI: tl.constexpr, W_KIND: tl.constexpr, OUT_KIND: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    """``w_hat`` of tile ``block`` of one weight (``w_ptr``, ``e_ptr`` and ``out_ptr`` at its first element/group)."""
    offs, mask, gid, g_mask, e, s, w = _weight_tile(w_ptr, e_ptr, block, num_groups, W_KIND, BLOCK_G, GROUP, GROUP_PAD)
    _, _, q = _quantize(w, s, LO, HI)
    w_hat = _round_to(q * s, W_KIND)
    if OUT_KIND != W_KIND:
        w_hat = _round_to(w_hat, OUT_KIND)  # what torch's w_hat.to(out_dtype) does after the weight-dtype rounding
    tl.store(out_ptr + offs, w_hat.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_tile(
    w_ptr, e_ptr, g_ptr, gw_ptr, gls_ptr, block, num_groups,
    LO: tl.constexpr, HI: tl.constexpr, W_KIND: tl.constexpr, G_KIND: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    """``dw`` and ``dtheta`` of tile ``block`` of one weight (every pointer at the weight's first element/group)."""
    offs, mask, gid, g_mask, e, s, w = _weight_tile(w_ptr, e_ptr, block, num_groups, W_KIND, BLOCK_G, GROUP, GROUP_PAD)
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


@triton.jit
def _fake_quant_fwd_kernel(
    w_ptr, e_ptr, out_ptr, num_groups,
    LO: tl.constexpr, HI: tl.constexpr, W_KIND: tl.constexpr, OUT_KIND: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    _forward_tile(w_ptr, e_ptr, out_ptr, tl.program_id(0), num_groups, LO, HI, W_KIND, OUT_KIND, GROUP, GROUP_PAD,
                  BLOCK_G)  # fmt: skip


@triton.jit
def _fake_quant_bwd_kernel(
    w_ptr, e_ptr, g_ptr, gw_ptr, gls_ptr, num_groups,
    LO: tl.constexpr, HI: tl.constexpr, W_KIND: tl.constexpr, G_KIND: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    _backward_tile(w_ptr, e_ptr, g_ptr, gw_ptr, gls_ptr, tl.program_id(0), num_groups, LO, HI, W_KIND, G_KIND, GROUP,
                   GROUP_PAD, BLOCK_G)  # fmt: skip


@triton.jit
def _many_program(program_weight, program_block, first_group, group_counts):
    """Which weight this program of a many-weight launch works on, its tile there, that weight's first group in
    the flat per-group buffers and its group count."""
    pid = tl.program_id(0)
    i = tl.load(program_weight + pid)
    return i, tl.load(program_block + pid), tl.load(first_group + i), tl.load(group_counts + i)


@triton.jit
def _fake_quant_many_fwd_kernel(
    w_table, e_ptr, out_ptr, program_weight, program_block, first_group, group_counts,
    LO: tl.constexpr, HI: tl.constexpr, W_KIND: tl.constexpr, OUT_KIND: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_G: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    i, block, g0, n = _many_program(program_weight, program_block, first_group, group_counts)
    w_ptr = _pointer(tl.load(w_table + i), W_KIND, ALIGNED)
    _forward_tile(w_ptr, e_ptr + g0, out_ptr + g0 * GROUP, block, n, LO, HI, W_KIND, OUT_KIND, GROUP, GROUP_PAD,
                  BLOCK_G)  # fmt: skip


@triton.jit
def _fake_quant_many_bwd_kernel(
    w_table, e_ptr, g_table, gw_ptr, gls_ptr, program_weight, program_block, first_group, group_counts,
    LO: tl.constexpr, HI: tl.constexpr, W_KIND: tl.constexpr, G_KIND: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_G: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    i, block, g0, n = _many_program(program_weight, program_block, first_group, group_counts)
    w_ptr = _pointer(tl.load(w_table + i), W_KIND, ALIGNED)
    g_ptr = _pointer(tl.load(g_table + i), G_KIND, ALIGNED)
    _backward_tile(w_ptr, e_ptr + g0, g_ptr, gw_ptr + g0 * GROUP, gls_ptr + g0, block, n, LO, HI, W_KIND, G_KIND,
                   GROUP, GROUP_PAD, BLOCK_G)  # fmt: skip


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


# ----------------------------------------------------------------------------------------------------------------
# many weights in one launch
# ----------------------------------------------------------------------------------------------------------------


class ManyPlan(NamedTuple):
    """Static tables of a many-weight launch: weight ``i`` owns groups ``first_group[i] : + group_counts[i]`` of the
    flat per-group buffers (elements ``* group`` of the flat weight-sized ones); program ``p`` does tile
    ``program_block[p]`` of weight ``program_weight[p]``."""

    first_group: torch.Tensor  # int64 [N], on the device
    group_counts: torch.Tensor  # int64 [N]
    program_weight: torch.Tensor  # int32 [programs]
    program_block: torch.Tensor  # int32 [programs]
    total_groups: int

    @property
    def tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The four tables in the order both many-weight kernels take them (their last pointer arguments)."""
        return self.program_weight, self.program_block, self.first_group, self.group_counts


@functools.lru_cache(maxsize=16)
def many_plan(group_counts: tuple[int, ...], block_g: int, device: torch.device) -> ManyPlan:
    """The tables for weights of ``group_counts`` groups each, ``block_g`` groups per program (cached: the same
    layers give the same plan every step)."""
    firsts, weights, blocks, total = [], [], [], 0
    for i, count in enumerate(group_counts):
        firsts.append(total)
        tiles = triton.cdiv(count, block_g)
        weights += [i] * tiles
        blocks += range(tiles)
        total += count

    def table(values: list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device)

    return ManyPlan(table(firsts, torch.int64), table(list(group_counts), torch.int64), table(weights, torch.int32),
                    table(blocks, torch.int32), total)  # fmt: skip


@functools.lru_cache(maxsize=32)
def _address_table(addresses: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The int64 tensor of ``addresses`` on ``device``, copied without a host sync (pinned memory, non-blocking) and
    cached: a table is only numbers, so the same addresses give the same table whatever lives there now."""
    table = torch.tensor(addresses, dtype=torch.int64)
    if device.type != "cuda":
        return table
    return table.pin_memory().to(device, non_blocking=True)


def aligned(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every tensor starts at a multiple of 16 bytes (a fresh allocation does; a view may not)."""
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def addresses(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A device table of the tensors' data pointers (all on one device) for the many-weight kernels."""
    return _address_table(tuple(t.data_ptr() for t in tensors), tensors[0].device)


def supports_many(weights: Sequence[torch.Tensor], log_scales: Sequence[torch.Tensor], group_size: int) -> bool:
    """Whether one many-weight launch takes these ``[out, in]`` weights with their fp32 log-scales: each one as
    :func:`supports` says, all contiguous, of one dtype, on one device."""
    if not weights or len(weights) != len(log_scales):
        return False
    first = weights[0]
    return all(
        w.dtype == first.dtype and w.device == first.device and w.is_contiguous() and supports(w, ls, group_size)
        for w, ls in zip(weights, log_scales, strict=True)
    )


def launch_many_forward(
    weights: Sequence[torch.Tensor],
    exp_log_scale: torch.Tensor,
    group_size: int,
    bits: int,
    out_dtype: torch.dtype,
    *,
    block_elements: int | None = None,
) -> torch.Tensor:
    """:func:`launch_forward` of every weight in one launch: the flat ``w_hat`` of all of them, weight after
    weight (``out_dtype``). ``exp_log_scale`` is the flat ``exp(log_scale)`` of all of them in the same order; the
    caller checked :func:`supports_many`."""
    plan, options = _many_launch(weights, group_size, bits, block_elements, exp_log_scale.device)
    out = torch.empty(plan.total_groups * group_size, dtype=out_dtype, device=exp_log_scale.device)
    if plan.total_groups:
        _fake_quant_many_fwd_kernel[(plan.program_weight.numel(),)](
            addresses(weights), exp_log_scale, out, *plan.tables, OUT_KIND=_KIND[out_dtype], ALIGNED=aligned(weights),
            **options,
        )  # fmt: skip
    return out


def launch_many_backward(
    weights: Sequence[torch.Tensor],
    exp_log_scale: torch.Tensor,
    grads: Sequence[torch.Tensor],
    group_size: int,
    bits: int,
    *,
    block_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`launch_backward` of every weight in one launch: the flat ``grad_weight`` (weight dtype) and flat
    ``grad_log_scale`` (fp32) of all of them. ``grads`` are contiguous, each of its weight's shape, of one
    supported dtype."""
    plan, options = _many_launch(weights, group_size, bits, block_elements, exp_log_scale.device)
    grad_weight = torch.empty(plan.total_groups * group_size, dtype=weights[0].dtype, device=exp_log_scale.device)
    grad_log_scale = torch.empty_like(exp_log_scale)
    if plan.total_groups:
        _fake_quant_many_bwd_kernel[(plan.program_weight.numel(),)](
            addresses(weights), exp_log_scale, addresses(grads), grad_weight, grad_log_scale, *plan.tables,
            G_KIND=_KIND[grads[0].dtype], ALIGNED=aligned([*weights, *grads]), **options,
        )  # fmt: skip
    return grad_weight, grad_log_scale


def _many_launch(
    weights: Sequence[torch.Tensor], group_size: int, bits: int, block_elements: int | None, device: torch.device
) -> tuple[ManyPlan, dict]:
    """The plan of a many-weight launch and the launch options both kernels share (code range, weight dtype, tile)."""
    group_pad, block_g, warps = _launch_config(group_size, block_elements)
    plan = many_plan(tuple(w.numel() // group_size for w in weights), block_g, device)
    lo, hi = code_range(bits)
    options = dict(LO=lo, HI=hi, W_KIND=_KIND[weights[0].dtype], GROUP=group_size, GROUP_PAD=group_pad,
                   BLOCK_G=block_g, num_warps=warps)  # fmt: skip
    return plan, options
