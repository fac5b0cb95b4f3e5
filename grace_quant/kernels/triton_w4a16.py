"""W4A16 Triton kernels for GRACE's packed INT4 format (bits=4, fp16/bf16 activations, fp32 accumulate).

Three paths, chosen from the token count ``M`` alone (no host syncs, CUDA-graph safe):

* ``M <= 2``: CUDA-core GEMV with split-K (fp32 atomics + a last-arriving-program epilogue); it takes up to 4
  rows, but from 3 rows on the tensor-core kernel is faster on the H200;
* ``2 < M <= 64``: tensor-core GEMM (``tl.dot``, weights as the wide MMA operand) with split-K;
* larger ``M``: a Triton dequantize kernel to the activation dtype, then cuBLAS (the robust fallback), unless this
  GPU's tuned table says the tensor-core kernel won the race for that shape and M bucket.

Launch parameters come from this GPU's tuned table (``kernels.dispatch``: per M bucket, N, K, group and dtype,
filled ahead of time by ``kernels.tuner``) where it has an entry, and from fixed heuristics otherwise; nothing is
tuned during a call. All kernels read the checkpoint layout directly (``packed`` int32 ``[N, K/8]``, ``scales`` ``[N, K/group]``), so
no repack is needed. A 4-bit code becomes an exact fp32 in two instructions: the nibble, left in place, is OR'd
into the mantissa of ``2**23`` and one FMA rescales it and removes the offset (``2**23`` and the ``+8``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .dispatch import SUPPORTED_GROUPS, config_for, path_for
from .packing import group_size_problem
from .runtime import interpreting

INTERPRET = interpreting()
"""Running under Triton's CPU interpreter: dot operands are upcast to fp32 there (bf16 dot is wrong in it)."""

GEMV_ROWS = 4
"""Rows the GEMV kernel accepts (the dispatch routes it ``dispatch.GEMV_MAX_M`` of them)."""
_SPLIT_MIN_WEIGHTS = 1 << 22  # below ~4M weights the split-K memset and atomics cost more than they hide
_MAGIC = 0x4B000000  # bit pattern of 2**23: a 4-bit field OR'd into its mantissa reads back as 2**23 + field
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)

__all__ = [
    "GEMV_ROWS",
    "dequantize_w4",
    "gemv_w4a16",
    "linear_unchecked",
    "linear_with_config",
    "supports",
    "tc_gemm_w4a16",
    "w4a16_linear",
]


# ----------------------------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _code(w, whi, magic, IDX: tl.constexpr):
    """Code ``IDX`` (0..7, least significant first) of uint32 words ``w`` as an exact fp32 in [-8, 7].

    ``whi = w >> 16`` holds codes 4..7, so every field sits at bit ``4P``, ``P < 4``, inside the 23-bit mantissa:
    ``bits(field | 2**23) = 2**23 + u * 2**(4P)``, and ``* 2**-4P - (2**(23-4P) + 8)`` gives ``u - 8`` exactly.
    """
    P: tl.constexpr = IDX % 4
    if IDX < 4:
        v = (w & (0xF << (4 * P))) | magic
    else:
        v = (whi & (0xF << (4 * P))) | magic
    return tl.fma(v.to(tl.float32, bitcast=True), 2.0 ** (-4 * P), -(2.0 ** (23 - 4 * P) + 8.0))


@triton.jit
def _codes_joined(words, magic):
    """int32 words ``[..., W]`` -> fp32 codes ``[..., W, 2, 2, 2]``; flattening the last 3 dims gives K order."""
    w = words.to(tl.uint32, bitcast=True)
    whi = w >> 16
    t0 = tl.join(_code(w, whi, magic, 0), _code(w, whi, magic, 4))
    t1 = tl.join(_code(w, whi, magic, 1), _code(w, whi, magic, 5))
    t2 = tl.join(_code(w, whi, magic, 2), _code(w, whi, magic, 6))
    t3 = tl.join(_code(w, whi, magic, 3), _code(w, whi, magic, 7))
    return tl.join(tl.join(t0, t2), tl.join(t1, t3))


@triton.jit
def _split8(v):
    """``[..., 2, 2, 2]`` (flat index 4a + 2b + c) -> its 8 slices in flat order."""
    c0, c1 = tl.split(v)
    b00, b01 = tl.split(c0)
    b10, b11 = tl.split(c1)
    v0, v4 = tl.split(b00)
    v2, v6 = tl.split(b01)
    v1, v5 = tl.split(b10)
    v3, v7 = tl.split(b11)
    return v0, v1, v2, v3, v4, v5, v6, v7


@triton.jit
def _load_x8(x_row, g, g_mask, NG: tl.constexpr, GROUP: tl.constexpr):
    """Activations of groups ``g`` of one row as 8 fp32 tensors ``[NG, GROUP/8]``, slice ``i`` = k % 8 == i."""
    offs_k = tl.arange(0, GROUP)
    xv = tl.load(x_row + g[:, None] * GROUP + offs_k[None, :], mask=g_mask[:, None], other=0.0).to(tl.float32)
    return _split8(tl.reshape(xv, [NG, GROUP // 8, 2, 2, 2]))


@triton.jit
def _dot8(q0, q1, q2, q3, q4, q5, q6, q7, x_row, g, g_mask, NG: tl.constexpr, GROUP: tl.constexpr):
    """Per-word partial dot products ``sum_i q_i * x_i`` ``[BLOCK_N, NG, GROUP/8]`` as one FMA chain."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _load_x8(x_row, g, g_mask, NG, GROUP)
    d = q0 * x0[None]
    d = tl.fma(q1, x1[None], d)
    d = tl.fma(q2, x2[None], d)
    d = tl.fma(q3, x3[None], d)
    d = tl.fma(q4, x4[None], d)
    d = tl.fma(q5, x5[None], d)
    d = tl.fma(q6, x6[None], d)
    d = tl.fma(q7, x7[None], d)
    return d


@triton.jit
def _finish_row(out, bias, y_row, ws_row, offs_n, n_mask, FROM_WS: tl.constexpr):
    """Write one output row: directly (no split), or read the fp32 split-K total back from the workspace."""
    if FROM_WS:
        out = tl.load(ws_row + offs_n, mask=n_mask, other=0.0, cache_modifier=".cg")
    tl.store(y_row + offs_n, (out + bias).to(y_row.dtype.element_ty), mask=n_mask)


# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    N, KW, KG, stride_xm, stride_ym, groups_per_split, magic,
    M: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """``y[m] = x[m] @ W^T (+ b)`` for ``M <= 4`` rows: program (n-tile, k-split) walks ``NG`` groups per step."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    GW: tl.constexpr = GROUP // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_g = tl.arange(0, NG)
    offs_w = tl.arange(0, GW)
    g_begin = pid_k * groups_per_split
    g_end = tl.minimum(g_begin + groups_per_split, KG)
    w_rows = w_ptr + offs_n[:, None, None] * KW + offs_w[None, None, :]
    s_rows = s_ptr + offs_n[:, None] * KG
    acc0 = tl.zeros([BLOCK_N, NG, GW], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, NG, GW], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, NG, GW], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, NG, GW], dtype=tl.float32)
    g = g_begin + offs_g
    words = tl.load(w_rows + g[None, :, None] * GW, mask=n_mask[:, None, None] & (g < g_end)[None, :, None], other=0)
    for g0 in range(g_begin, g_end, NG):
        g = g0 + offs_g
        g_mask = g < g_end
        gn = g + NG  # software prefetch of the next step's words: more bytes in flight per thread
        words_next = tl.load(
            w_rows + gn[None, :, None] * GW, mask=n_mask[:, None, None] & (gn < g_end)[None, :, None], other=0
        )
        sc = tl.load(s_rows + g[None, :], mask=n_mask[:, None] & g_mask[None, :], other=0.0).to(tl.float32)
        sc = sc[:, :, None]
        w = words.to(tl.uint32, bitcast=True)
        whi = w >> 16
        q0 = _code(w, whi, magic, 0)
        q1 = _code(w, whi, magic, 1)
        q2 = _code(w, whi, magic, 2)
        q3 = _code(w, whi, magic, 3)
        q4 = _code(w, whi, magic, 4)
        q5 = _code(w, whi, magic, 5)
        q6 = _code(w, whi, magic, 6)
        q7 = _code(w, whi, magic, 7)
        acc0 += _dot8(q0, q1, q2, q3, q4, q5, q6, q7, x_ptr, g, g_mask, NG, GROUP) * sc
        if M > 1:
            acc1 += _dot8(q0, q1, q2, q3, q4, q5, q6, q7, x_ptr + stride_xm, g, g_mask, NG, GROUP) * sc
        if M > 2:
            acc2 += _dot8(q0, q1, q2, q3, q4, q5, q6, q7, x_ptr + 2 * stride_xm, g, g_mask, NG, GROUP) * sc
        if M > 3:
            acc3 += _dot8(q0, q1, q2, q3, q4, q5, q6, q7, x_ptr + 3 * stride_xm, g, g_mask, NG, GROUP) * sc
        words = words_next

    out0 = tl.sum(tl.sum(acc0, axis=2), axis=1)
    out1 = tl.sum(tl.sum(acc1, axis=2), axis=1)
    out2 = tl.sum(tl.sum(acc2, axis=2), axis=1)
    out3 = tl.sum(tl.sum(acc3, axis=2), axis=1)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    if SPLIT:
        # fp32 partials into the zeroed workspace; the program that arrives last for this n-tile finishes it.
        tl.atomic_add(ws_ptr + offs_n, out0, mask=n_mask)
        if M > 1:
            tl.atomic_add(ws_ptr + N + offs_n, out1, mask=n_mask)
        if M > 2:
            tl.atomic_add(ws_ptr + 2 * N + offs_n, out2, mask=n_mask)
        if M > 3:
            tl.atomic_add(ws_ptr + 3 * N + offs_n, out3, mask=n_mask)
        tl.debug_barrier()
        count = tl.atomic_add(cnt_ptr + pid_n, 1)
        if count == tl.num_programs(1) - 1:
            _finish_row(out0, bias, y_ptr, ws_ptr, offs_n, n_mask, True)
            if M > 1:
                _finish_row(out1, bias, y_ptr + stride_ym, ws_ptr + N, offs_n, n_mask, True)
            if M > 2:
                _finish_row(out2, bias, y_ptr + 2 * stride_ym, ws_ptr + 2 * N, offs_n, n_mask, True)
            if M > 3:
                _finish_row(out3, bias, y_ptr + 3 * stride_ym, ws_ptr + 3 * N, offs_n, n_mask, True)
    else:
        _finish_row(out0, bias, y_ptr, ws_ptr, offs_n, n_mask, False)
        if M > 1:
            _finish_row(out1, bias, y_ptr + stride_ym, ws_ptr, offs_n, n_mask, False)
        if M > 2:
            _finish_row(out2, bias, y_ptr + 2 * stride_ym, ws_ptr, offs_n, n_mask, False)
        if M > 3:
            _finish_row(out3, bias, y_ptr + 3 * stride_ym, ws_ptr, offs_n, n_mask, False)


@triton.jit
def _tc_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, KW, KG, stride_xm, stride_ym, groups_per_split, magic,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """Small-M GEMM on tensor cores, computed as ``y^T = W x^T`` so the wide weight tile is the MMA's M side.

    One group per K step: the exact codes go into ``tl.dot`` and the group scale multiplies the fp32 result.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    GW: tl.constexpr = GROUP // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    offs_w = tl.arange(0, GW)
    offs_k = tl.arange(0, GROUP)
    g_begin = pid_k * groups_per_split
    g_end = tl.minimum(g_begin + groups_per_split, KG)
    w_rows = w_ptr + offs_n[:, None] * KW + offs_w[None, :]
    x_rows = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    words = tl.load(w_rows + g_begin * GW, mask=n_mask[:, None] & (g_begin + 0 * offs_w < g_end)[None, :], other=0)
    for g in range(g_begin, g_end):
        # software prefetch of the next group's words (the dot pipeline only prefetches x)
        words_next = tl.load(
            w_rows + (g + 1) * GW, mask=n_mask[:, None] & (g + 1 + 0 * offs_w < g_end)[None, :], other=0
        )
        xk = tl.load(x_rows + g * GROUP, mask=m_mask[:, None], other=0.0)
        q = tl.reshape(_codes_joined(words, magic), [BLOCK_N, GROUP])
        if DOT_FP32:
            part = tl.dot(q, tl.trans(xk.to(tl.float32)))
        else:
            part = tl.dot(q.to(xk.dtype), tl.trans(xk))
        sc = tl.load(s_ptr + offs_n * KG + g, mask=n_mask, other=0.0).to(tl.float32)
        acc += part * sc[:, None]
        words = words_next

    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    out_mask = n_mask[:, None] & m_mask[None, :]
    y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
    if SPLIT:
        ws_ptrs = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
        tl.atomic_add(ws_ptrs, acc, mask=out_mask)
        tl.debug_barrier()
        count = tl.atomic_add(cnt_ptr + pid, 1)
        if count == tl.num_programs(1) - 1:
            total = tl.load(ws_ptrs, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, (total + bias[:, None]).to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(y_ptrs, (acc + bias[:, None]).to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _dequant_kernel(
    w_ptr, s_ptr, out_ptr, N, KW, KG, magic,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr,
):  # fmt: skip
    """Dense ``W[n, k] = q * s`` in ``out``'s dtype (rounded once from the exact fp32 product)."""
    pid_n = tl.program_id(0)
    pid_g = tl.program_id(1)
    GW: tl.constexpr = GROUP // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    g = pid_g * NG + tl.arange(0, NG)
    offs_w = tl.arange(0, GW)
    offs_k = tl.arange(0, GROUP)
    mask2 = (offs_n < N)[:, None] & (g < KG)[None, :]
    words = tl.load(
        w_ptr + offs_n[:, None, None] * KW + g[None, :, None] * GW + offs_w[None, None, :],
        mask=mask2[:, :, None],
        other=0,
    )
    sc = tl.load(s_ptr + offs_n[:, None] * KG + g[None, :], mask=mask2, other=0.0).to(tl.float32)
    q = tl.reshape(_codes_joined(words, magic), [BLOCK_N, NG, GROUP])
    w = (q * sc[:, :, None]).to(out_ptr.dtype.element_ty)
    out_ptrs = out_ptr + offs_n[:, None, None] * (KW * 8) + g[None, :, None] * GROUP + offs_k[None, None, :]
    tl.store(out_ptrs, w, mask=mask2[:, :, None])


# ----------------------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------------------


@functools.cache
def _num_sms(device_index: int | None) -> int:
    if INTERPRET or device_index is None:
        return 4  # the interpreter runs programs one by one: keep the CPU grids small
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sms(t: torch.Tensor) -> int:
    return _num_sms(t.device.index if t.is_cuda else None)


def _split_groups(num_groups: int, tiles: int, target_programs: int, step: int, max_split: int | None = None) -> int:
    """Groups per split so that ``tiles * splits`` reaches ``target_programs`` (whole ``step``s per split)."""
    want = max(1, triton.cdiv(target_programs, tiles))
    if max_split is not None:
        want = min(want, max_split)
    return triton.cdiv(triton.cdiv(num_groups, want), step) * step


def supports(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> bool:
    """Whether the Triton kernels handle these tensors (device, dtypes, group size, shapes)."""
    if not (x.is_cuda or INTERPRET) or x.device != packed.device or x.device != scales.device:
        return False
    if x.dtype not in _KERNEL_DTYPES or packed.dtype != torch.int32 or group_size not in SUPPORTED_GROUPS:
        return False
    if packed.dim() != 2 or scales.dim() != 2:
        return False
    n, kw = packed.shape
    k = x.shape[-1]
    return kw * 8 == k and group_size_problem(group_size, 4, k) is None and tuple(scales.shape) == (n, k // group_size)


def _check(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> None:
    if not supports(x, packed, scales, group_size):
        raise ValueError(
            "w4a16 Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), fp16/bf16 activations, int32 packed "
            f"[N, K/8], scales [N, K/group] and group_size in {SUPPORTED_GROUPS}; got x {tuple(x.shape)} {x.dtype} "
            f"on {x.device}, packed {tuple(packed.shape)} {packed.dtype}, scales {tuple(scales.shape)}, "
            f"group_size {group_size}"
        )


def _outputs(
    x2: torch.Tensor, packed: torch.Tensor, tiles: int, splits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The output ``[M, N]`` and, when K is split, one zeroed buffer holding the fp32 split-K accumulators
    ``[M * N]`` and the int32 arrival counters ``[tiles]`` (without a split both are unused placeholders)."""
    m, n = x2.shape[0], packed.shape[0]
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if splits == 1:
        return y, y, packed
    buf = torch.zeros(m * n + tiles, dtype=torch.int32, device=x2.device)
    return y, buf[: m * n].view(torch.float32), buf[m * n :]


def gemv_w4a16(
    x2: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    *,
    block_n: int = 8,
    step_k: int | None = None,
    num_warps: int = 4,
    target_programs: int | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Split-K GEMV for a 2-D ``x2`` of 1..4 rows; keyword arguments override the heuristic config.

    By default K is split only when the n-tiles fill less than two waves of 4-warp programs and the weight is
    large enough to pay for the zeroed workspace; the split then aims at ``4 x SMs`` programs. Each step walks
    1024 K for a single row with K >= 4096 (more bytes in flight; H200 sweep), else 512.
    """
    m, k = x2.shape
    if not 1 <= m <= GEMV_ROWS:
        raise ValueError(f"gemv_w4a16 takes 1..{GEMV_ROWS} rows, got {m}")
    n = packed.shape[0]
    kg = k // group_size
    if step_k is None:
        step_k = 1024 if m == 1 and k >= 4096 else 512
    ng = max(1, step_k // group_size)
    tiles = triton.cdiv(n, block_n)
    if splits is None and target_programs is None:
        no_split = tiles >= 2 * _sms(x2) or n * k < _SPLIT_MIN_WEIGHTS
        per = kg if no_split else _split_groups(kg, tiles, 4 * _sms(x2), ng)
    elif splits is None:
        per = _split_groups(kg, tiles, target_programs, ng)
    else:
        per = triton.cdiv(triton.cdiv(kg, splits), ng) * ng
    splits = triton.cdiv(kg, per)
    y, ws, cnt = _outputs(x2, packed, tiles, splits)
    _gemv_kernel[(tiles, splits)](
        x2, packed, scales, bias if bias is not None else scales, y, ws, cnt,
        n, k // 8, kg, x2.stride(0), y.stride(0), per, _MAGIC,
        M=m, GROUP=group_size, BLOCK_N=block_n, NG=ng, SPLIT=splits > 1, HAS_BIAS=bias is not None,
        num_warps=num_warps, num_stages=1,
    )  # fmt: skip
    return y


def _tc_config(m: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, programs per SM) per M bucket, from an H200 sweep; fixed, so
    nothing is tuned during graph capture."""
    if m <= 16:
        return 16, 64, 4, 3, 4
    if m <= 32:
        return 32, 64, 4, 3, 4
    if m <= 64:
        return 64, 64, 4, 2, 2
    return 128, 128, 8, 2, 2


def tc_gemm_w4a16(
    x2: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    target_programs: int | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Tensor-core GEMM with split-K for a 2-D ``x2``; keyword arguments override the per-M-bucket config."""
    m, k = x2.shape
    n = packed.shape[0]
    kg = k // group_size
    bm, bn, nw, ns, per_sm = _tc_config(m)
    bm, bn = block_m or bm, block_n or bn
    nw, ns = num_warps or nw, num_stages or ns
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    target = per_sm * _sms(x2) if target_programs is None else target_programs
    per = _split_groups(kg, tiles, target, 1) if splits is None else triton.cdiv(kg, splits)
    splits = triton.cdiv(kg, per)
    y, ws, cnt = _outputs(x2, packed, tiles, splits)
    _tc_kernel[(tiles, splits)](
        x2, packed, scales, bias if bias is not None else scales, y, ws, cnt,
        m, n, k // 8, kg, x2.stride(0), y.stride(0), per, _MAGIC,
        GROUP=group_size, BLOCK_M=bm, BLOCK_N=bn, SPLIT=splits > 1, HAS_BIAS=bias is not None,
        DOT_FP32=INTERPRET, num_warps=nw, num_stages=ns,
    )  # fmt: skip
    return y


def linear_with_config(
    x2: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    path: str,
    config: dict[str, int] | None,
) -> torch.Tensor:
    """``x2 @ W^T (+ bias)`` on ``path`` (``gemv``, ``tc`` or ``large``; see ``kernels.dispatch``) with a tuned
    ``config`` from the table, or the built-in heuristic when ``config`` is None (``large``: dequantize + cuBLAS)."""
    if path == "gemv":
        overrides = {}
        if config is not None:
            per_sm = config.get("target_programs_per_sm", 0)
            split = {"target_programs": per_sm * _sms(x2)} if per_sm else {"splits": 1}
            overrides = {"block_n": config["block_n"], "step_k": config["step_k"], "num_warps": config["num_warps"],
                         **split}  # fmt: skip
        return gemv_w4a16(x2, packed, scales, bias, group_size, **overrides)
    if path == "tc":
        overrides = {}
        if config is not None:
            overrides = {"block_n": config["block_n"], "num_warps": config["num_warps"],
                         "num_stages": config["num_stages"],
                         "target_programs": config["target_programs_per_sm"] * _sms(x2)}  # fmt: skip
        return tc_gemm_w4a16(x2, packed, scales, bias, group_size, **overrides)
    if path != "large":
        raise ValueError(f"unknown kernel path {path!r} (expected 'gemv', 'tc' or 'large')")
    if config is not None and config.get("tc"):
        return tc_gemm_w4a16(x2, packed, scales, bias, group_size, block_m=config["block_m"],
                             block_n=config["block_n"], num_warps=config["num_warps"],
                             num_stages=config["num_stages"], splits=1)  # fmt: skip
    weight = dequantize_w4(packed, scales, group_size, x2.dtype)
    return F.linear(x2, weight, None if bias is None else bias.to(x2.dtype))


def dequantize_w4(packed: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``[N, K]`` weight in ``dtype`` from the packed format, with the Triton dequantize kernel."""
    n, kw = packed.shape
    kg = kw * 8 // group_size
    out = torch.empty((n, kw * 8), dtype=dtype, device=packed.device)
    block_n, ng = 32, max(1, 256 // group_size)
    grid = (triton.cdiv(n, block_n), triton.cdiv(kg, ng))
    _dequant_kernel[grid](packed, scales, out, n, kw, kg, _MAGIC, GROUP=group_size, BLOCK_N=block_n, NG=ng, num_warps=4)
    return out


def w4a16_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    group_size: int = 128,
) -> torch.Tensor:
    """``x @ W^T + bias`` for INT4 ``W`` in the packed format; dispatches on the token count alone."""
    _check(x, packed, scales, group_size)
    return linear_unchecked(x, packed, scales, bias, group_size)


def linear_unchecked(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """:func:`w4a16_linear` for callers that already checked :func:`supports` (one check per call on the host)."""
    k = x.shape[-1]
    n = packed.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    packed = packed.contiguous()
    scales = scales.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    m = x2.shape[0]
    if m == 0:
        y = x2.new_empty((0, n))
    else:
        y = linear_with_config(x2, packed, scales, bias, group_size, path_for(m), config_for(x2, n, group_size))
    return y.reshape(*x.shape[:-1], n)
