"""W4A16 Triton kernels for GRACE's packed INT4 format (bits=4, fp16/bf16 activations, fp32 accumulate), 2nd generation.

Three paths, chosen from the token count ``M`` alone (no host syncs, CUDA-graph safe):

* ``M <= GEMV_MAX_M`` (``gemv``): a CUDA-core GEMV (up to 4 rows) or, where the tuned table says it won, the
  tensor-core kernel with its token tile padded to 16. Two GEMVs: the pipelined one (every load issued ``STAGES``
  steps ahead through shared memory by Triton's pipeliner, scales read as int32 pairs; large weights) and the
  first-generation one (software prefetch of one step; small weights, and layouts the pipelined one does not read);
* up to ``TC_MAX_M`` (``tc``): the tensor-core kernel with split-K;
* larger ``M`` (``large``): dequantize to the activation dtype + cuBLAS (the robust fallback), unless this GPU's
  tuned table says the tensor-core kernel or, on Hopper, the Gluon kernel that reads INT4 inside the GEMM
  (:mod:`.gluon_w4a16`) won the race for that shape and M bucket.

The tensor-core kernel dequantizes each weight tile in registers with its group scale already applied (a K tile
never straddles a group), so ``tl.dot`` accumulates in place (``acc = tl.dot(w, x, acc)``) and Triton can pipeline
the loop. On the GPU a tile is dequantized by a few PTX instructions per word (``lop3`` builds ``magic + u`` in
both halves of a 16-bit pair, one packed FMA removes the offset exactly, one multiplies by the scale: one rounding,
bit-identical to dequantize + cast); the interpreter runs the same arithmetic in fp32.

Split-K never zeroes a buffer: each K split writes its fp32 partial tile to a workspace, and the split that arrives
last (per-tile counters, reset by that split) adds the partials in split order, so results do not depend on
arrival order and no memset kernel is launched. The counters live in one persistent zeroed buffer per device;
calls on one device must therefore not run concurrently on two streams.

Launch parameters come from this GPU's tuned table (``kernels.dispatch``: per M bucket, N, K, group and dtype,
filled ahead of time by ``kernels.tuner``) where it has an entry, and from fixed heuristics otherwise; nothing is
tuned during a call. All kernels read the in-memory layout (``kernels.packing``: ``packed`` int32 ``[N, K/8]``,
``scales`` ``[N, K/group]``).
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import tables
from .dispatch import GEMV_ROWS, SUPPORTED_GROUPS, config_for, m_bucket, path_for
from .launch import DirectLauncher
from .packing import group_size_problem
from .reference import quant_linear_reference
from .runtime import interpreting

INTERPRET = interpreting()
"""Running under Triton's CPU interpreter: dot operands are upcast to fp32 there (bf16 dot is wrong in it), and the
PTX dequantization is replaced by the same arithmetic in fp32."""

_SPLIT_MIN_WEIGHTS = 1 << 22  # below ~4M weights a split costs more (partials, last-arrival pass) than it hides
_MAGIC = 0x4B000000  # bit pattern of 2**23: a 4-bit field OR'd into its mantissa reads back as 2**23 + field
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_COUNTERS = 1 << 16  # split-K arrival counters per device (one per output tile of a split call)

__all__ = [
    "GEMV_ROWS",
    "dequantize_w4",
    "eager_linear",
    "gemv_pipe_w4a16",
    "gemv_w4a16",
    "linear_unchecked",
    "linear_with_config",
    "supports",
    "supports_pipe",
    "tc_gemm_w4a16",
    "w4a16_linear",
]


# ----------------------------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _code(w, whi, magic, IDX: tl.constexpr):
    """The code of column ``IDX`` (0..7) of uint32 words ``w`` as an exact fp32 in [-8, 7].

    In memory column ``IDX`` sits in field ``IDX // 2 + 4 * (IDX % 2)`` (``kernels.packing.NIBBLE_COLUMNS``).
    ``whi = w >> 16`` holds fields 4..7, so every field sits at bit ``4P``, ``P < 4``, inside the 23-bit mantissa:
    ``bits(field | 2**23) = 2**23 + u * 2**(4P)``, and ``* 2**-4P - (2**(23-4P) + 8)`` gives ``u - 8`` exactly.
    """
    P: tl.constexpr = IDX // 2
    if IDX % 2 == 0:
        v = (w & (0xF << (4 * P))) | magic
    else:
        v = (whi & (0xF << (4 * P))) | magic
    return tl.fma(v.to(tl.float32, bitcast=True), 2.0 ** (-4 * P), -(2.0 ** (23 - 4 * P) + 8.0))


@triton.jit
def _join8(v0, v1, v2, v3, v4, v5, v6, v7):
    """Eight ``[..., W]`` tensors (code ``i`` of each word) -> ``[..., W, 2, 2, 2]`` whose flattening is K order."""
    return tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))


@triton.jit
def _codes_joined(words, magic):
    """int32 words ``[..., W]`` -> fp32 codes ``[..., W, 2, 2, 2]``; flattening the last 3 dims gives K order."""
    w = words.to(tl.uint32, bitcast=True)
    whi = w >> 16
    return _join8(
        _code(w, whi, magic, 0), _code(w, whi, magic, 1), _code(w, whi, magic, 2), _code(w, whi, magic, 3),
        _code(w, whi, magic, 4), _code(w, whi, magic, 5), _code(w, whi, magic, 6), _code(w, whi, magic, 7),
    )  # fmt: skip


# One 32-bit word -> its 8 codes times the scale, as 16-bit floats, in PTX. Fields (i, i+4), which hold columns 2i
# and 2i + 1 in memory, share a register: lop3 ORs them (bits 4i and 16+4i after a shift) into the mantissas of
# ``magic`` (2**7 in bf16, 2**10 in fp16, whose unit in the last place is 1), an FMA subtracts ``magic + 8`` exactly,
# another multiplies by the scale (one rounding of the exact product), and the pair is split into outputs i, i + 4.
_DEQUANT_PTX = """{
.reg .b32 w1, w2, w3, p0, p1, p2, p3, one, off, nz;
mov.b32 one, ONE;
mov.b32 off, OFF;
mov.b32 nz, 0x80008000;
shr.u32 w1, $8, 4;
shr.u32 w2, $8, 8;
shr.u32 w3, $8, 12;
lop3.b32 p0, $8, 0x000F000F, MAGIC, 0xEA;
lop3.b32 p1, w1, 0x000F000F, MAGIC, 0xEA;
lop3.b32 p2, w2, 0x000F000F, MAGIC, 0xEA;
lop3.b32 p3, w3, 0x000F000F, MAGIC, 0xEA;
fma.rn.TY p0, p0, one, off;
fma.rn.TY p1, p1, one, off;
fma.rn.TY p2, p2, one, off;
fma.rn.TY p3, p3, one, off;
fma.rn.TY p0, p0, $9, nz;
fma.rn.TY p1, p1, $9, nz;
fma.rn.TY p2, p2, $9, nz;
fma.rn.TY p3, p3, $9, nz;
mov.b32 {$0, $4}, p0;
mov.b32 {$1, $5}, p1;
mov.b32 {$2, $6}, p2;
mov.b32 {$3, $7}, p3;
}"""
_PTX_CONSTANTS = {  # per 16-bit float pair type: 1.0, -(magic + 8) and magic (2**7 / 2**10: unit in the last place 1)
    "bf16x2": {"ONE": "0x3F803F80", "OFF": "0xC308C308", "MAGIC": "0x43004300"},
    "f16x2": {"ONE": "0x3C003C00", "OFF": "0xE408E408", "MAGIC": "0x64006400"},
}


def dequant_ptx(template: str, ty: str) -> str:
    """A dequantizing PTX ``template`` for pairs of type ``ty`` (``"bf16x2"`` or ``"f16x2"``): its ``ONE``, ``OFF``,
    ``MAGIC`` and ``TY`` filled in (also used by :mod:`.gluon_w4a16`)."""
    for name, value in _PTX_CONSTANTS[ty].items():
        template = template.replace(name, value)
    return template.replace("TY", ty)


_BF16_PTX = tl.constexpr(dequant_ptx(_DEQUANT_PTX, "bf16x2"))
_FP16_PTX = tl.constexpr(dequant_ptx(_DEQUANT_PTX, "f16x2"))


@triton.jit
def _dequant_tile(words, sc, magic, BLOCK_K: tl.constexpr, OUT: tl.constexpr, MODE: tl.constexpr):
    """Words ``[BN, BLOCK_K/8]`` and one scale per row ``[BN]`` -> the weight tile ``[BN, BLOCK_K]`` in ``OUT``
    (``q * s`` rounded once, as ``kernels.reference.dequantize`` does). ``MODE`` (:func:`_tile_mode`): 0 PTX (``OUT``
    is the scales' dtype), 1 fp32 math, 2 the interpreter, which gets fp32 holding the ``OUT`` values."""
    BN: tl.constexpr = words.shape[0]
    if MODE != 0:
        w = tl.reshape(_codes_joined(words, magic), [BN, BLOCK_K]) * sc.to(tl.float32)[:, None]
        if MODE == 1:
            w = w.to(OUT)
        elif OUT == tl.bfloat16:  # round to nearest even by hand: the interpreter's cast to bf16 truncates
            bits = w.to(tl.uint32, bitcast=True)
            w = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        else:
            w = w.to(tl.float16).to(tl.float32)
    else:
        s16 = sc.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        s2 = tl.broadcast_to((s16 | (s16 << 16))[:, None], words.shape)
        if OUT == tl.bfloat16:
            v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
                _BF16_PTX, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [words, s2], dtype=(tl.int16,) * 8, is_pure=True, pack=1
            )
        else:
            v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
                _FP16_PTX, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [words, s2], dtype=(tl.int16,) * 8, is_pure=True, pack=1
            )
        w = tl.reshape(_join8(v0, v4, v1, v5, v2, v6, v3, v7), [BN, BLOCK_K]).to(OUT, bitcast=True)  # by field
    return w


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
def _store_tile(
    acc, b_ptr, y_ptr, ws_ptr, cnt_ptr, tile, pid_k, num_splits, offs_n, offs_m, n_mask, m_mask, M, N, stride_ym,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """Write ``y[m, n] = acc[n, m] (+ bias[n])``; with split-K, the last-arriving split of this tile adds every
    split's fp32 partial in split order (deterministic) and resets the tile's counter for the next call."""
    out_mask = n_mask[:, None] & m_mask[None, :]
    y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([acc.shape[0]], dtype=tl.float32)
    if SPLIT:
        ws_tile = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
        tl.store(ws_tile + pid_k * M * N, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is written before the release below
        count = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if count == num_splits - 1:
            total = tl.zeros_like(acc)
            for split in range(0, num_splits):
                total += tl.load(ws_tile + split * M * N, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, (total + bias[:, None]).to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)
    else:
        tl.store(y_ptrs, (acc + bias[:, None]).to(y_ptr.dtype.element_ty), mask=out_mask)


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
    acc = tl.reshape(tl.join(tl.join(out0, out2), tl.join(out1, out3)), [BLOCK_N, 4])  # column m = row m's sums
    offs_m = tl.arange(0, 4)
    _store_tile(
        acc, b_ptr, y_ptr, ws_ptr, cnt_ptr, pid_n, pid_k, tl.num_programs(1), offs_n, offs_m, n_mask, offs_m < M,
        M, N, stride_ym, SPLIT, HAS_BIAS,
    )  # fmt: skip


@triton.jit
def _gemv_pipe_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, KW, KP, stride_xm, stride_ym, words_per_split, magic,
    GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    STAGES: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """``y = x W^T`` for up to ``ROWS`` tokens on CUDA cores, every load pipelined ``STAGES`` deep by Triton: a step
    reads ``BLOCK_J`` words of ``BLOCK_N`` rows (whole pairs of groups; the scales as int32 pairs, ``s_ptr``
    ``[N, KP]``) and the matching activations, decodes each word's 8 codes in its thread and reduces them there."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    WPG: tl.constexpr = GROUP // 8
    PPS: tl.constexpr = BLOCK_J // (2 * WPG)  # scale pairs per step
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, ROWS)
    r_mask = offs_r < M
    offs_j = tl.arange(0, BLOCK_J)
    j_begin = pid_k * words_per_split
    j_end = tl.minimum(j_begin + words_per_split, KW)
    w_ptrs = w_ptr + offs_n[:, None] * KW + offs_j[None, :]
    s_ptrs = s_ptr + offs_n[:, None] * KP + tl.arange(0, PPS)[None, :]
    x_ptrs = x_ptr + offs_r[:, None, None] * stride_xm + offs_j[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    acc = tl.zeros([BLOCK_N, ROWS, 2 * PPS], dtype=tl.float32)
    for j0 in tl.range(j_begin, j_end, BLOCK_J, num_stages=STAGES):
        words = tl.load(w_ptrs + j0, mask=n_mask[:, None], other=0)
        sp = tl.load(s_ptrs + j0 // (2 * WPG), mask=n_mask[:, None], other=0)
        xv = tl.load(x_ptrs + j0 * 8, mask=r_mask[:, None, None], other=0.0).to(tl.float32)
        codes = tl.reshape(_codes_joined(words, magic), [BLOCK_N, 1, BLOCK_J, 8])
        part = tl.sum(codes * xv[None, :, :, :], axis=3)  # [BN, ROWS, BJ]: each word's dot product, in its thread
        part = tl.sum(tl.reshape(part, [BLOCK_N, ROWS, 2 * PPS, WPG]), axis=3)  # per group
        s16 = tl.reshape(tl.join(sp & 0xFFFF, (sp >> 16) & 0xFFFF), [BLOCK_N, 2 * PPS])
        sc = s16.to(tl.int16).to(x_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
        acc += part * sc[:, None, :]
    out = tl.sum(acc, axis=2)  # [BN, ROWS]
    _store_tile(
        out, b_ptr, y_ptr, ws_ptr, cnt_ptr, pid_n, pid_k, tl.num_programs(1), offs_n, offs_r, n_mask, r_mask,
        M, N, stride_ym, SPLIT, HAS_BIAS,
    )  # fmt: skip


@triton.jit
def _tc_step(acc, words, x_ptrs, s_ptrs, kt, n_mask, m_mask, magic, GROUP: tl.constexpr, BLOCK_K: tl.constexpr,
             MODE: tl.constexpr):  # fmt: skip
    """One K tile of the tensor-core kernel: dequantize ``words`` with the tile's scales, ``acc += w @ x^T``."""
    xk = tl.load(x_ptrs + kt * BLOCK_K, mask=m_mask[:, None], other=0.0)
    sc = tl.load(s_ptrs + (kt * BLOCK_K) // GROUP, mask=n_mask, other=0.0)
    w = _dequant_tile(words, sc, magic, BLOCK_K, x_ptrs.dtype.element_ty, MODE)
    if MODE == 2:
        acc = tl.dot(w, tl.trans(xk.to(tl.float32)), acc)
    else:
        acc = tl.dot(w, tl.trans(xk), acc)
    return acc


@triton.jit
def _tc_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, KW, KG, stride_xm, stride_ym, tiles_per_split, magic,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_TILES_M: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, MODE: tl.constexpr,
    PREFETCH: tl.constexpr,
):  # fmt: skip
    """GEMM on tensor cores, computed as ``y^T = W x^T`` so the wide weight tile is the MMA's M side.

    Each K tile (inside one group) is dequantized with its scale applied and accumulated in place by ``tl.dot``.
    Programs sweep ``GROUP_TILES_M`` token tiles per weight tile column before moving on (L2 reuse at large M).
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_band = GROUP_TILES_M * num_n
    band = pid // per_band
    first_m = band * GROUP_TILES_M
    band_m = tl.minimum(num_m - first_m, GROUP_TILES_M)
    pid_m = first_m + (pid % per_band) % band_m
    pid_n = (pid % per_band) // band_m
    KTW: tl.constexpr = BLOCK_K // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    offs_kw = tl.arange(0, KTW)
    offs_k = tl.arange(0, BLOCK_K)
    num_k_tiles = KW // KTW
    kt_begin = pid_k * tiles_per_split
    kt_end = tl.minimum(kt_begin + tiles_per_split, num_k_tiles)
    w_ptrs = w_ptr + offs_n[:, None] * KW + offs_kw[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    s_ptrs = s_ptr + offs_n * KG
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if PREFETCH:  # the next K tile's words load while this one is dequantized and multiplied
        words = tl.load(
            w_ptrs + kt_begin * KTW, mask=n_mask[:, None] & (kt_begin + 0 * offs_kw < kt_end)[None, :], other=0
        )
        for kt in range(kt_begin, kt_end):
            more = (kt + 1 + 0 * offs_kw < kt_end)[None, :]  # a tensor: the interpreter rejects scalar masks here
            words_next = tl.load(w_ptrs + (kt + 1) * KTW, mask=n_mask[:, None] & more, other=0)
            acc = _tc_step(acc, words, x_ptrs, s_ptrs, kt, n_mask, m_mask, magic, GROUP, BLOCK_K, MODE)
            words = words_next
    else:
        for kt in range(kt_begin, kt_end):
            words = tl.load(w_ptrs + kt * KTW, mask=n_mask[:, None], other=0)
            acc = _tc_step(acc, words, x_ptrs, s_ptrs, kt, n_mask, m_mask, magic, GROUP, BLOCK_K, MODE)
    tile = pid_m * num_n + pid_n
    _store_tile(
        acc, b_ptr, y_ptr, ws_ptr, cnt_ptr, tile, pid_k, tl.num_programs(1), offs_n, offs_m, n_mask, m_mask,
        M, N, stride_ym, SPLIT, HAS_BIAS,
    )  # fmt: skip


@triton.jit
def _dequant_kernel(
    w_ptr, s_ptr, out_ptr, N, KW, KG, magic,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr,
):  # fmt: skip
    """Dense ``W[n, k] = q * s`` in ``out``'s dtype, one group of ``BLOCK_N`` rows per program (the tile rule of the
    tensor-core kernel, so both round identically)."""
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_w = tl.arange(0, GROUP // 8)
    offs_k = tl.arange(0, GROUP)
    words = tl.load(w_ptr + offs_n[:, None] * KW + g * (GROUP // 8) + offs_w[None, :], mask=n_mask[:, None], other=0)
    sc = tl.load(s_ptr + offs_n * KG + g, mask=n_mask, other=0.0)
    w = _dequant_tile(words, sc, magic, GROUP, out_ptr.dtype.element_ty, MODE)
    out_ptrs = out_ptr + offs_n[:, None] * (KW * 8) + g * GROUP + offs_k[None, :]
    tl.store(out_ptrs, w.to(out_ptr.dtype.element_ty), mask=n_mask[:, None])


# ----------------------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------------------

# repeat launches skip the JIT's argument binding (eager prefill pays a launch per INT4 linear)
_launch_gemv = DirectLauncher(_gemv_kernel)
_launch_gemv_pipe = DirectLauncher(_gemv_pipe_kernel)
_launch_tc = DirectLauncher(_tc_kernel)
_launch_dequant = DirectLauncher(_dequant_kernel)


@functools.cache
def _num_sms(device_index: int | None) -> int:
    if INTERPRET or device_index is None:
        return 4  # the interpreter runs programs one by one: keep the CPU grids small
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sms(t: torch.Tensor) -> int:
    return _num_sms(t.device.index if t.is_cuda else None)


_COUNTER_BUFFERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device) -> torch.Tensor:
    """This device's zeroed split-K arrival counters (allocated once, outside any graph capture; every split call
    leaves them zero again)."""
    buf = _COUNTER_BUFFERS.get(device)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "the W4A16 kernels' split-K counters are allocated on a device's first call, which must not be "
                "captured: run one eager forward before capturing a CUDA graph"
            )
        buf = _COUNTER_BUFFERS[device] = _allocate_counters(device)
    return buf


def _allocate_counters(device: torch.device) -> torch.Tensor:
    """Zeroed counters, allocated by a helper thread on CUDA: torch.compile's CUDA-graph trees run their warm-up calls
    with every allocation of the calling thread (and its stream) routed to the graph's private pool, where a buffer
    that outlives the call is refused ("tensor(s) in the cudagraph pool not tracked as outputs")."""
    if device.type != "cuda":
        return torch.zeros(_COUNTERS, dtype=torch.int32, device=device)

    def allocate() -> torch.Tensor:
        buf = torch.zeros(_COUNTERS, dtype=torch.int32, device=device)
        torch.cuda.synchronize(device)  # zeroed before any stream of the calling thread reads them
        return buf

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grace-quant-counters") as pool:
        return pool.submit(allocate).result()  # an error in the thread is raised here


def _tile_mode(scales: torch.Tensor, out: torch.dtype) -> int:
    """How :func:`_dequant_tile` dequantizes: 2 under the interpreter, 0 (PTX) where the scales are already in the
    output dtype, else 1 (fp32 math, then one rounding)."""
    return 2 if INTERPRET else 0 if scales.dtype == out else 1


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
    """The output ``[M, N]`` and, when K is split, the fp32 partials ``[splits, M, N]`` (never zeroed: each split
    writes its own) and this device's counters (without a split both are unused placeholders)."""
    m, n = x2.shape[0], packed.shape[0]
    counters = _counters(x2.device)  # on a device's first call, split or not: any eager call readies graph capture
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if splits == 1:
        return y, y, counters
    if tiles > _COUNTERS:
        raise ValueError(f"a split-K call needs one counter per output tile: {tiles} tiles > {_COUNTERS}")
    return y, torch.empty((splits, m, n), dtype=torch.float32, device=x2.device), counters


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
    large enough to pay for the partials; the split then aims at ``4 x SMs`` programs. Each step walks
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
    _launch_gemv(
        (tiles, splits),
        x2, packed, scales, bias if bias is not None else scales, y, ws, cnt,
        n, k // 8, kg, x2.stride(0), y.stride(0), per, _MAGIC,
        M=m, GROUP=group_size, BLOCK_N=block_n, NG=ng, SPLIT=splits > 1, HAS_BIAS=bias is not None,
        num_warps=num_warps, num_stages=1,
    )  # fmt: skip
    return y


def _tc_config(m: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, programs per SM) per M bucket: the most frequent winners of
    the H200 sweep (benchmarks/results/sweep_h200.json), fixed (nothing is tuned during graph capture); the fallback
    for shapes the GPU's table lacks."""
    if m <= 16:
        return 16, 64, 128, 4, 3, 4
    if m <= 32:
        return 32, 64, 128, 4, 3, 2
    if m <= 64:
        return 64, 64, 128, 4, 3, 2
    return 128, 128, 64, 8, 3, 1


def tc_gemm_w4a16(
    x2: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    target_programs: int | None = None,
    splits: int | None = None,
    group_tiles_m: int = 8,
    prefetch: int = 0,
) -> torch.Tensor:
    """Tensor-core GEMM with split-K for a 2-D ``x2``; keyword arguments override the per-M-bucket config.

    ``block_k`` is capped at the group size (a K tile never straddles two scales); K is split so that
    ``tiles * splits`` reaches ``target_programs`` (none by default above M = 64).
    """
    m, k = x2.shape
    n = packed.shape[0]
    bm, bn, bk, nw, ns, per_sm = _tc_config(m)
    bm, bn, bk = block_m or bm, block_n or bn, min(block_k or bk, group_size)
    nw, ns = num_warps or nw, num_stages or ns
    k_tiles = k // bk
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    target = per_sm * _sms(x2) if target_programs is None else target_programs
    per = _split_groups(k_tiles, tiles, target, 1) if splits is None else triton.cdiv(k_tiles, splits)
    splits = triton.cdiv(k_tiles, per)
    y, ws, cnt = _outputs(x2, packed, tiles, splits)
    _launch_tc(
        (tiles, splits),
        x2, packed, scales, bias if bias is not None else scales, y, ws, cnt,
        m, n, k // 8, k // group_size, x2.stride(0), y.stride(0), per, _MAGIC,
        GROUP=group_size, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_TILES_M=group_tiles_m,
        SPLIT=splits > 1, HAS_BIAS=bias is not None, MODE=_tile_mode(scales, x2.dtype), PREFETCH=bool(prefetch),
        num_warps=nw, num_stages=ns,
    )  # fmt: skip
    return y


def supports_pipe(x2: torch.Tensor, scales: torch.Tensor, group_size: int, block_j: int) -> bool:
    """Whether :func:`gemv_pipe_w4a16` runs this call with ``block_j`` words per step: 16-bit scales in the
    activations' dtype (read as int32 pairs), steps of whole group pairs that tile K exactly, at most 4 rows."""
    m, k = x2.shape
    return (
        m <= GEMV_ROWS
        and scales.dtype == x2.dtype
        and (8 * block_j) % (2 * group_size) == 0
        and k % (8 * block_j) == 0
        and scales.is_contiguous()
    )


def gemv_pipe_w4a16(
    x2: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    *,
    block_n: int = 8,
    block_j: int = 64,
    num_warps: int = 4,
    num_stages: int = 4,
    target_programs: int | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """The pipelined CUDA-core GEMV (:func:`_gemv_pipe_kernel`) for 1..4 rows, ``block_j`` words per step; K is split
    so that the programs reach ``target_programs`` (default 4 per SM), or into ``splits``. Callers check
    :func:`supports_pipe` first."""
    m, k = x2.shape
    n = packed.shape[0]
    kw = k // 8
    steps = kw // block_j
    tiles = triton.cdiv(n, block_n)
    target = 4 * _sms(x2) if target_programs is None else target_programs
    per = _split_groups(steps, tiles, target, 1) if splits is None else triton.cdiv(steps, splits)
    splits = triton.cdiv(steps, per)
    y, ws, cnt = _outputs(x2, packed, tiles, splits)
    _launch_gemv_pipe(
        (tiles, splits),
        x2, packed, scales.view(torch.int32), bias if bias is not None else scales, y, ws, cnt,
        m, n, kw, k // (2 * group_size), x2.stride(0), y.stride(0), per * block_j, _MAGIC,
        GROUP=group_size, ROWS=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_J=block_j, STAGES=num_stages,
        SPLIT=splits > 1, HAS_BIAS=bias is not None, num_warps=num_warps,
    )  # fmt: skip
    return y


_TC_KEYS = ("block_m", "block_n", "block_k", "num_warps", "num_stages", "prefetch")
_GEMV_KEYS = ("block_n", "step_k", "num_warps")
_PIPE_KEYS = ("block_n", "block_j", "num_warps", "num_stages")
_PIPE_MIN_WEIGHTS = 12 << 20
"""Below ~12M weights the pipelined GEMV's prologue and split costs outweigh its deeper pipeline (H100 lab run,
benchmarks/results/kernel_lab_h100.md): the first-generation GEMV serves them when no tuned entry says otherwise."""


def _pipe_heuristic(x2: torch.Tensor, n: int, scales: torch.Tensor, group_size: int) -> dict[str, int] | None:
    """The pipelined GEMV's untuned configuration for this call (the H100 lab's most frequent winners), or None where
    the first-generation GEMV serves it (small weights, or a layout the pipelined kernel does not read)."""
    k = x2.shape[1]
    if n * k < _PIPE_MIN_WEIGHTS:
        return None
    if supports_pipe(x2, scales, group_size, 64):
        return {"block_n": 8, "block_j": 64, "num_warps": 2, "num_stages": 4, "target_programs": 8 * _sms(x2)}
    if supports_pipe(x2, scales, group_size, 32):
        return {"block_n": 32, "block_j": 32, "num_warps": 4, "num_stages": 4, "target_programs": 2 * _sms(x2)}
    return None


def _overrides(config: dict[str, int], names: tuple[str, ...], x2: torch.Tensor) -> dict[str, int]:
    """Keyword arguments of a kernel from a tuned entry: its ``names`` present there, and the split rule
    (``target_programs_per_sm`` times this GPU's SMs, or no split when 0)."""
    out = {name: config[name] for name in names if name in config}
    per_sm = config.get("target_programs_per_sm", 0)
    return {**out, **({"target_programs": per_sm * _sms(x2)} if per_sm else {"splits": 1})}


@functools.cache
def _gluon():
    """:mod:`.gluon_w4a16`, imported on first use (only tuned Hopper entries name it), or None where this Triton has
    no Gluon for Hopper."""
    try:
        from . import gluon_w4a16
    except ImportError:
        return None
    return gluon_w4a16


@functools.cache
def _gluon_gemv():
    """:mod:`.gluon_gemv`, imported on first use (only tuned entries name it), or None where this Triton has no
    Gluon."""
    try:
        from . import gluon_gemv
    except ImportError:
        return None
    return gluon_gemv


def _gemv4(x2: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, group: int,
           config: dict[str, int]) -> _Plan | None:  # fmt: skip
    """The Gluon GEMV's ``run(x2, packed, scales, bias)`` for a ``"gemv4"`` entry, or None where it does not take
    this call."""
    gemv = _gluon_gemv()
    if gemv is None or not gemv.supports(x2, packed, scales, group, config["cols"]):
        return None
    n, kw = packed.shape
    return gemv.plan(x2.dtype, n, kw * 8, group, bias is not None, gemv.config_of(config), config.get("split", 1))


def _gluon_launch(x2: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, group: int,
                  config: dict[str, int] | None) -> tuple[_Plan, Callable[[torch.Tensor], bool]] | None:  # fmt: skip
    """A Gluon kernel's bound launch for a ``"wgmma"`` or ``"gemv4"`` entry and the test of the activations it reads,
    or None (no such entry, or the kernel does not take this call)."""
    if config is None:
        return None
    if config.get("wgmma"):
        launch = _wgmma(x2, packed, scales, bias, group, config)
        return None if launch is None else (launch, _gluon().reads)
    if config.get("gemv4"):
        launch = _gemv4(x2, packed, scales, bias, group, config)
        return None if launch is None else (launch, _gluon_gemv().reads)
    return None


def _wgmma(x2: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, group: int,
           config: dict[str, int]) -> _Plan | None:  # fmt: skip
    """The Gluon kernel's ``run(x2, packed, scales, bias)`` for a ``"wgmma"`` entry, or None where it does not take
    this call."""
    gluon = _gluon()
    if gluon is None or not gluon.supports(x2, packed, scales, group, config.get("block_k", 128)):
        return None
    n, kw = packed.shape
    return gluon.plan(x2.dtype, n, kw * 8, group, bias is not None, gluon.tile_of(config), config.get("split", 1))


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
    ``config`` from the table, or the path's built-in heuristic when ``config`` is None (``large``: dequantize +
    cuBLAS). An entry names its kernel: ``"tc": 1`` the tensor-core kernel, ``"step_k"`` the GEMV and ``"block_j"``
    the pipelined GEMV (up to ``GEMV_ROWS`` rows; a pipelined entry the call's layout does not fit runs the path's
    heuristic), ``"wgmma": 1`` the Gluon Hopper kernel and ``"gemv4": 1`` the Gluon GEMV (where either does not take
    the call: the path's heuristic), ``"tc": 0`` dequantize + cuBLAS."""
    if path not in ("gemv", "tc", "large"):
        raise ValueError(f"unknown kernel path {path!r} (expected 'gemv', 'tc' or 'large')")
    gluon = _gluon_launch(x2, packed, scales, bias, group_size, config)
    if gluon is not None:
        return gluon[0](x2, packed, scales, bias)
    if config is not None and config.get("tc"):
        return tc_gemm_w4a16(x2, packed, scales, bias, group_size, **_overrides(config, _TC_KEYS, x2))
    if config is not None and "step_k" in config and x2.shape[0] <= GEMV_ROWS:
        return gemv_w4a16(x2, packed, scales, bias, group_size, **_overrides(config, _GEMV_KEYS, x2))
    if config is not None and "block_j" in config and supports_pipe(x2, scales, group_size, config["block_j"]):
        return gemv_pipe_w4a16(x2, packed, scales, bias, group_size, **_overrides(config, _PIPE_KEYS, x2))
    if path == "gemv":
        pipe = _pipe_heuristic(x2, packed.shape[0], scales, group_size)
        if pipe is not None:
            return gemv_pipe_w4a16(x2, packed, scales, bias, group_size, **pipe)
        return gemv_w4a16(x2, packed, scales, bias, group_size)
    if path == "tc":
        return tc_gemm_w4a16(x2, packed, scales, bias, group_size)
    if not (x2.is_cuda and torch.cuda.is_current_stream_capturing()):
        _counters(x2.device)  # an eager prefill readies the split-K counters for the decode steps' graphs
    weight = dequantize_w4(packed, scales, group_size, x2.dtype)
    return F.linear(x2, weight, None if bias is None else bias.to(x2.dtype))


def dequantize_w4(
    packed: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense ``[N, K]`` weight in ``dtype`` from the packed format, with the Triton dequantize kernel; into the first
    ``N`` rows of a contiguous ``out`` (a reused buffer) where given."""
    n, kw = packed.shape
    out = torch.empty((n, kw * 8), dtype=dtype, device=packed.device) if out is None else out[:n]
    grid, constexprs = _dequant_launch(n, kw * 8, group_size, _tile_mode(scales, dtype))
    _launch_dequant(grid, packed, scales, out, n, kw, kw * 8 // group_size, _MAGIC, **constexprs)
    return out


def _dequant_launch(n: int, k: int, group: int, mode: int) -> tuple[tuple[int, int], dict[str, int]]:
    """Grid and constexprs of the dequantize kernel for an ``[n, k]`` weight: one group of ``BLOCK_N`` rows per
    program."""
    block_n = 64 if group <= 64 else 32
    return (triton.cdiv(n, block_n), k // group), {"GROUP": group, "BLOCK_N": block_n, "MODE": mode, "num_warps": 4}


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
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    resolved: tuple[str, dict[str, int] | None] | None = None,
) -> torch.Tensor:
    """:func:`w4a16_linear` for callers that already checked :func:`supports` (one check per call on the host);
    ``resolved`` = ``(path, config)`` for callers that looked the dispatch up already (at least one token)."""
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
        path, config = resolved or (path_for(m), config_for(x2, n, group_size))
        y = linear_with_config(x2, packed, scales, bias, group_size, path, config)
    return y.reshape(*x.shape[:-1], n)


# ----------------------------------------------------------------------------------------------------------------
# eager inference: the dispatch resolved once per call shape
# ----------------------------------------------------------------------------------------------------------------

_Plan = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
_EAGER_PLANS: dict[tuple, _Plan] = {}
_MAX_PLANS = 4096  # distinct call shapes kept (a model has a handful per M bucket)


def eager_linear(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """:func:`w4a16_linear` (the torch reference where the kernels do not apply) for eager calls that need no
    gradient, with everything that depends only on the call's shape resolved by its first call: the checks, the
    tuned-table lookup and, on the dequantize + cuBLAS path, the dequantize kernel's launch (a table edit makes every
    shape look again). Eager prefill is host-bound, and these cost more host time than cuBLAS itself
    (``benchmarks/results/prefill_h100.md``)."""
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    key = (
        m_bucket(m) if m else 0, x.dtype, x.device, k, group_size, tables.EDITS,
        packed.shape, packed.dtype, packed.device, packed.stride(), packed.data_ptr() % 16,
        scales.shape, scales.dtype, scales.device, scales.stride(), scales.data_ptr() % 16,
        None if bias is None else (bias.shape, bias.dtype, bias.device),
    )  # fmt: skip
    plan = _EAGER_PLANS.get(key)
    if plan is None:
        if len(_EAGER_PLANS) >= _MAX_PLANS:
            _EAGER_PLANS.clear()
        plan = _EAGER_PLANS[key] = _plan(x, packed, scales, bias, group_size)
    return plan(x, packed, scales, bias)


def _plan(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, group: int) -> _Plan:
    """How every call shaped like this one runs (see :func:`eager_linear`)."""
    if not supports(x, packed, scales, group):
        return lambda x, p, s, b: quant_linear_reference(x, p, s, b, group, 4)
    k, m = x.shape[-1], x.numel() // x.shape[-1]
    if m == 0 or not (packed.is_contiguous() and scales.is_contiguous()):
        return lambda x, p, s, b: linear_unchecked(x, p, s, b, group)
    n = packed.shape[0]
    path, config = path_for(m), config_for(x.reshape(-1, k), n, group)
    if path == "large" and x.is_cuda and not torch.cuda.is_current_stream_capturing():
        _counters(x.device)  # an eager prefill readies the split-K counters for the decode steps' graphs
    gluon = _gluon_launch(x.reshape(-1, k), packed, scales, bias, group, config)
    if gluon is not None:
        return _gluon_plan(*gluon, n, k, group, (path, config))
    if path != "large" or (config is not None and (config.get("tc") or config.get("wgmma"))):
        return lambda x, p, s, b: linear_unchecked(x, p, s, b, group, (path, config))
    return _dequant_matmul_plan(n, k, group, x.dtype, _tile_mode(scales, x.dtype), bias)


def _gluon_plan(launch: _Plan, reads: Callable[[torch.Tensor], bool], n: int, k: int, group: int,
                resolved: tuple[str, dict[str, int]]) -> _Plan:  # fmt: skip
    """A Gluon kernel, its launch resolved once (:func:`.gluon_w4a16.plan`, :func:`.gluon_gemv.plan`); a call whose
    activation the kernel cannot read as it is (``reads``: strided or misaligned rows) takes the general path."""

    def gluon(x: torch.Tensor, p: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, k)
        if not reads(x2):
            return linear_unchecked(x, p, s, b, group, resolved)
        return launch(x2, p, s, b).reshape(*x.shape[:-1], n)

    return gluon


def _dequant_matmul_plan(n: int, k: int, group: int, dtype: torch.dtype, mode: int, bias: torch.Tensor | None) -> _Plan:
    """Dequantize (one launch, bound once) + cuBLAS: what :func:`linear_with_config` runs on the ``large`` path."""
    grid, constexprs = _dequant_launch(n, k, group, mode)
    launch = _launch_dequant.bind(grid, **constexprs)
    cast = bias is not None and bias.dtype != dtype
    kw, kg = k // 8, k // group

    def dequant_matmul(x: torch.Tensor, p: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        weight = torch.empty((n, k), dtype=dtype, device=x.device)
        launch(p, s, weight, n, kw, kg, _MAGIC)
        b = b.to(dtype) if cast else b
        if x.is_contiguous():  # F.linear folds the leading dimensions itself: the 2-D product, bit for bit
            return F.linear(x, weight, b)
        x2 = x.reshape(-1, k)  # as linear_unchecked passes it, so both paths give the same bits
        return F.linear(x2 if x2.stride(-1) == 1 else x2.contiguous(), weight, b).reshape(*x.shape[:-1], n)

    return dequant_matmul
