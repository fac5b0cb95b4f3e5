"""W4A16 GEMV for decode (1-4 tokens) on NVIDIA GPUs, written in Gluon so that each thread's data is placed, not
inferred: every thread owns ``R`` weight rows times ``C`` consecutive words (one 16-byte load per row for ``C = 4``)
and the activations of those words, decoded once and shared by its ``R`` rows.

Why a second GEMV: the Triton one (:func:`.triton_w4a16.gemv_pipe_w4a16`) issues ~7 instructions per weight (its
layout gives each thread one row, so the activations are re-converted per row and a group's words are summed
across lanes every step), which bounds it near 1.1-1.5 TB/s on an H200, not the bytes. Here a weight costs its code
(``lop3`` into the mantissa of 2**23, one FMA removes the offset exactly: the code in fp32), one FMA per token, and
per word one FMA by the group scale: ~4.3 SASS instructions per weight for ``R = C = 4`` (sm_90, one token).

Each program walks its K range in steps of ``32 * C`` words, the next step's words, scales and activations loaded
(into registers) before the current step is computed; K is split over programs to fill the GPU, the last split to
arrive adding the fp32 partials in split order (deterministic, as the Triton kernels do). The arithmetic is the
reference's: exact codes times activations in fp32, times the group scale in fp32, one rounding to the output dtype.

Gluon has no CPU interpreter: the kernel is checked on GPUs (``tests/test_kernels_gpu.py``) and imported only where
a tuned entry names it (``"gemv4": 1``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from .gluon_api import cta_barrier
from .launch import DirectLauncher, _arg_key
from .triton_w4a16 import _MAGIC, _outputs

__all__ = ["CONFIGS", "MAX_TOKENS", "config_of", "fits", "gemv4_w4a16", "plan", "reads", "supports"]

MAX_TOKENS = 4
"""Tokens per call (decode rows); more take the tensor-core kernels."""
CONFIGS = {(4, 4, 4), (8, 2, 4), (4, 2, 4), (2, 4, 4), (8, 1, 4), (2, 2, 4)}
"""The ``(rows, cols, warps)`` shapes checked on GPUs: ``rows`` weight rows and ``cols`` consecutive words per
thread, ``warps`` warps stacked along N (a program owns ``rows * warps`` rows and steps ``32 * cols`` words)."""


@gluon.jit
def _halves(p, FP16: gl.constexpr):
    """int32 words holding two 16-bit floats (low half first in K) -> both as fp32."""
    if FP16:
        lo = (p & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
        hi = (p >> 16).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
    else:
        lo = (p << 16).to(gl.float32, bitcast=True)
        hi = (p & -65536).to(gl.float32, bitcast=True)
    return lo, hi


@gluon.jit
def _token(xq, WL: gl.constexpr, FP16: gl.constexpr):
    """One token's activations of a step, ``[BJ, 4]`` int32 pairs, -> its 8 fp32 vectors ``[1, BJ]`` (``k % 8``)."""
    BJ: gl.constexpr = xq.shape[0]
    xa, xb = gl.split(gl.reshape(xq, [BJ, 2, 2]))
    p0, p2 = gl.split(xa)
    p1, p3 = gl.split(xb)
    x0, x1 = _halves(gl.expand_dims(gl.convert_layout(p0, gl.SliceLayout(0, WL), assert_trivial=True), 0), FP16)
    x2, x3 = _halves(gl.expand_dims(gl.convert_layout(p1, gl.SliceLayout(0, WL), assert_trivial=True), 0), FP16)
    x4, x5 = _halves(gl.expand_dims(gl.convert_layout(p2, gl.SliceLayout(0, WL), assert_trivial=True), 0), FP16)
    x6, x7 = _halves(gl.expand_dims(gl.convert_layout(p3, gl.SliceLayout(0, WL), assert_trivial=True), 0), FP16)
    return x0, x1, x2, x3, x4, x5, x6, x7


@gluon.jit
def _code(w, SHIFT: gl.constexpr, magic):
    """The signed code at bit ``SHIFT`` (0-16) of uint32 words ``w``, exactly, in fp32: OR'd into the mantissa
    of 2**23 it reads ``2**23 + u * 2**SHIFT``; one FMA scales it back and subtracts ``2**23 / 2**SHIFT + 8``."""
    v = ((w & (0xF << SHIFT)) | magic).to(gl.float32, bitcast=True)
    return gl.fma(v, 1.0 / (1 << SHIFT), -(8388608.0 / (1 << SHIFT) + 8.0))


@gluon.jit
def _step(acc0, acc1, acc2, acc3, words, sc, xq0, xq1, xq2, xq3, magic, T: gl.constexpr, WL: gl.constexpr,
          FP16: gl.constexpr):  # fmt: skip
    """One step: every word's codes once, their dot product with each token's activations, times the group scale."""
    w = words.to(gl.uint32, bitcast=True)
    whi = w >> 16
    x = (_token(xq0, WL, FP16), _token(xq1, WL, FP16), _token(xq2, WL, FP16), _token(xq3, WL, FP16))
    d0 = gl.zeros_like(acc0)
    d1 = d0
    d2 = d0
    d3 = d0
    for i in gl.static_range(8):  # column i of each word sits in field i // 2 + 4 * (i % 2) (kernels.packing)
        if i // 2 + 4 * (i % 2) < 5:  # fields 0-4 read in place (bits 16-19 still sit inside the mantissa)
            c = _code(w, 4 * (i // 2 + 4 * (i % 2)), magic)
        else:  # fields 5-7 from the high half
            c = _code(whi, 4 * (i // 2), magic)
        d0 = gl.fma(c, x[0][i], d0)
        if T > 1:
            d1 = gl.fma(c, x[1][i], d1)
        if T > 2:
            d2 = gl.fma(c, x[2][i], d2)
        if T > 3:
            d3 = gl.fma(c, x[3][i], d3)
    acc0 = gl.fma(d0, sc, acc0)
    if T > 1:
        acc1 = gl.fma(d1, sc, acc1)
    if T > 2:
        acc2 = gl.fma(d2, sc, acc2)
    if T > 3:
        acc3 = gl.fma(d3, sc, acc3)
    return acc0, acc1, acc2, acc3


@gluon.jit
def _finish(acc, t, ws_ptr, y_ptr, b_ptr, rows, r_mask, pid_k, M, N, stride_ym, PARTIAL: gl.constexpr,
            HAS_BIAS: gl.constexpr):  # fmt: skip
    """Token ``t``'s sums over the program's words: its fp32 partial (split K), or ``y`` plus the bias."""
    out = gl.sum(acc, axis=1)
    if PARTIAL:
        gl.store(ws_ptr + (pid_k * M + t) * N + rows, out, mask=r_mask)
    else:
        if HAS_BIAS:
            out = out + gl.load(b_ptr + rows, mask=r_mask, other=0.0).to(gl.float32)
        gl.store(y_ptr + t * stride_ym + rows, out.to(y_ptr.dtype.element_ty), mask=r_mask)


@gluon.jit
def _reduce_splits(ws_ptr, y_ptr, b_ptr, rows, r_mask, t, M, N, stride_ym, HAS_BIAS: gl.constexpr):
    """Token ``t``'s output from every split's partial, added in split order, plus the bias."""
    out = gl.load(ws_ptr + t * N + rows, mask=r_mask, other=0.0, cache_modifier=".cg")
    for split in range(1, gl.num_programs(1)):
        out += gl.load(ws_ptr + (split * M + t) * N + rows, mask=r_mask, other=0.0, cache_modifier=".cg")
    if HAS_BIAS:
        out = out + gl.load(b_ptr + rows, mask=r_mask, other=0.0).to(gl.float32)
    gl.store(y_ptr + t * stride_ym + rows, out.to(y_ptr.dtype.element_ty), mask=r_mask)


@gluon.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, KW, KG, stride_xm, stride_ym, WORDS_PER, magic,
    R: gl.constexpr, C: gl.constexpr, WARPS: gl.constexpr, GROUP: gl.constexpr, T: gl.constexpr,
    FP16: gl.constexpr, SPLIT: gl.constexpr, HAS_BIAS: gl.constexpr,
):  # fmt: skip
    """``y[t] = W x[t] (+ b)`` for ``T`` (padded) tokens: program (row block, K split) of ``R * WARPS`` rows."""
    BN: gl.constexpr = R * WARPS
    BJ: gl.constexpr = 32 * C
    WPG: gl.constexpr = GROUP // 8
    P: gl.constexpr = gl.BlockedLayout([R, C, 4], [1, 32, 1], [WARPS, 1, 1], [2, 1, 0])
    WL: gl.constexpr = gl.SliceLayout(2, P)  # words [BN, BJ]: R rows x C consecutive words per thread
    XL: gl.constexpr = gl.SliceLayout(0, P)  # activations [BJ, 4] int32 pairs: each thread's C words' 8C values
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    j0 = pid_k * WORDS_PER
    j_end = gl.minimum(j0 + WORDS_PER, KW)
    rows = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, WL))
    r_mask = rows < N
    cols = gl.arange(0, BJ, layout=gl.SliceLayout(0, WL))
    w_ptrs = w_ptr + gl.expand_dims(rows, 1) * KW + gl.expand_dims(cols + j0, 0)
    # scales read unmasked (clamped to the matrix) so each thread's C words load their one scale once
    s_rows = s_ptr + gl.expand_dims(gl.minimum(rows, N - 1), 1) * KG
    s_cols = gl.expand_dims(cols // WPG, 0)
    xc = gl.arange(0, BJ, layout=gl.SliceLayout(1, XL))
    x_ptrs = (x_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + gl.expand_dims((xc + j0) * 4, 1)
              + gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, XL)), 0))  # fmt: skip
    x_row = stride_xm // 2  # int32 pairs per token row
    r2 = gl.expand_dims(r_mask, 1)
    acc0 = gl.zeros([BN, BJ], gl.float32, layout=WL)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    # step s's loads, issued one step ahead: words, scales and each token's activations (zeros past j_end)
    chunk = (cols // C) * C  # masks constant over each thread's C words (K is a whole number of chunks): vector loads
    xchunk = (xc // C) * C
    left = j_end - j0
    wm = r2 & gl.expand_dims(chunk < left, 0)
    xm = gl.expand_dims(xchunk < left, 1)
    words = gl.load(w_ptrs, mask=wm, other=0)
    sc = gl.load(s_rows + gl.minimum(s_cols + j0 // WPG, KG - 1)).to(gl.float32)
    xq0 = gl.load(x_ptrs, mask=xm, other=0)
    xq1 = xq0
    xq2 = xq0
    xq3 = xq0
    if T > 1:
        xq1 = gl.load(x_ptrs + x_row, mask=xm & (M > 1), other=0)
    if T > 2:
        xq2 = gl.load(x_ptrs + 2 * x_row, mask=xm & (M > 2), other=0)
    if T > 3:
        xq3 = gl.load(x_ptrs + 3 * x_row, mask=xm & (M > 3), other=0)
    for j in range(j0, j_end, BJ):
        nxt = j + BJ - j0
        left = j_end - j - BJ
        wm = r2 & gl.expand_dims(chunk < left, 0)
        xm = gl.expand_dims(xchunk < left, 1)
        words_n = gl.load(w_ptrs + nxt, mask=wm, other=0)
        sc_n = gl.load(s_rows + gl.minimum(s_cols + (j + BJ) // WPG, KG - 1))
        xq0_n = gl.load(x_ptrs + nxt * 4, mask=xm, other=0)
        xq1_n = xq0_n
        xq2_n = xq0_n
        xq3_n = xq0_n
        if T > 1:
            xq1_n = gl.load(x_ptrs + nxt * 4 + x_row, mask=xm & (M > 1), other=0)
        if T > 2:
            xq2_n = gl.load(x_ptrs + nxt * 4 + 2 * x_row, mask=xm & (M > 2), other=0)
        if T > 3:
            xq3_n = gl.load(x_ptrs + nxt * 4 + 3 * x_row, mask=xm & (M > 3), other=0)
        acc0, acc1, acc2, acc3 = _step(acc0, acc1, acc2, acc3, words, sc, xq0, xq1, xq2, xq3, magic, T, WL, FP16)
        words = words_n
        sc = sc_n.to(gl.float32)
        xq0 = xq0_n
        xq1 = xq1_n
        xq2 = xq2_n
        xq3 = xq3_n
    _finish(acc0, 0, ws_ptr, y_ptr, b_ptr, rows, r_mask, pid_k, M, N, stride_ym, SPLIT, HAS_BIAS)
    if T > 1 and M > 1:
        _finish(acc1, 1, ws_ptr, y_ptr, b_ptr, rows, r_mask, pid_k, M, N, stride_ym, SPLIT, HAS_BIAS)
    if T > 2 and M > 2:
        _finish(acc2, 2, ws_ptr, y_ptr, b_ptr, rows, r_mask, pid_k, M, N, stride_ym, SPLIT, HAS_BIAS)
    if T > 3 and M > 3:
        _finish(acc3, 3, ws_ptr, y_ptr, b_ptr, rows, r_mask, pid_k, M, N, stride_ym, SPLIT, HAS_BIAS)
    if SPLIT:
        # the last split to arrive adds the partials in split order, stores y and resets the counter for the next call
        cta_barrier()  # every thread's partial is written before the release below
        count = gl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if count == gl.num_programs(1) - 1:
            for t in range(0, M):
                _reduce_splits(ws_ptr, y_ptr, b_ptr, rows, r_mask, t, M, N, stride_ym, HAS_BIAS)
            gl.atomic_xchg(cnt_ptr + pid_n, 0)


_launch = DirectLauncher(_gemv_kernel)


def reads(x2: torch.Tensor) -> bool:
    """Whether the kernel reads the ``[M, K]`` activation as it is: 1-4 rows of whole 32-bit pairs (unit stride along
    K, an even row stride, 4-byte aligned)."""
    return 1 <= x2.shape[0] <= MAX_TOKENS and x2.stride(-1) == 1 and x2.stride(0) % 2 == 0 and x2.data_ptr() % 4 == 0


def fits(k: int, group: int, cols: int) -> bool:
    """Whether ``cols`` words per thread tile this K: whole groups of whole words, K a whole number of ``cols``-word
    chunks (the masks' unit), and a step (``32 * cols`` words) that never straddles a group."""
    return group % 8 == 0 and k % group == 0 and k % (8 * cols) == 0 and (32 * cols) % (group // 8) == 0


def supports(x2: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group: int, cols: int = 4) -> bool:
    """Whether the kernel takes this call with ``cols`` words per thread: activations it :func:`reads`, fp16/bf16 on
    CUDA, a K that ``cols`` :func:`fits`, contiguous weights and scales."""
    return (
        x2.is_cuda
        and x2.dtype in (torch.float16, torch.bfloat16)
        and reads(x2)
        and fits(x2.shape[1], group, cols)
        and packed.is_contiguous()
        and scales.is_contiguous()
    )


def config_of(entry: dict[str, int]) -> tuple[int, int, int]:
    """``(rows, cols, warps)`` of a tuned ``"gemv4"`` entry."""
    return entry["rows"], entry["cols"], entry["warps"]


def _checked(config: tuple[int, int, int]) -> tuple[int, int, int]:
    if config not in CONFIGS:
        raise ValueError(f"GEMV shape {config} is not one of the checked (rows, cols, warps) shapes {sorted(CONFIGS)}")
    return config


@functools.lru_cache(maxsize=1024)
def plan(
    dtype: torch.dtype, n: int, k: int, group: int, has_bias: bool, config: tuple[int, int, int], split: int = 1
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """``run(x2, packed, scales, bias)`` for every call of this weight shape and configuration, with K split over
    ``split`` programs (rounded to whole steps); callers check :func:`supports` first."""
    rows, cols, warps = _checked(config)
    if not fits(k, group, cols):
        raise ValueError(f"{cols} words per thread do not tile K = {k} in groups of {group}: pick another shape")
    if split < 1:
        raise ValueError(f"split = {split}: K is split over at least one program (1 for no split)")
    kw = k // 8
    step = 32 * cols
    per = triton.cdiv(triton.cdiv(kw, split), step) * step  # words per split, whole steps
    splits = triton.cdiv(kw, per)
    tiles = triton.cdiv(n, rows * warps)
    constexprs = dict(R=rows, C=cols, WARPS=warps, GROUP=group, FP16=dtype == torch.float16, SPLIT=splits > 1,
                      HAS_BIAS=has_bias, num_warps=warps)  # fmt: skip
    bound: dict[tuple, Callable[..., None]] = {}

    def run(x2: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        m = x2.shape[0]
        y, ws, counters = _outputs(x2, packed, tiles, splits)
        b = bias if bias is not None else y
        # what Triton specializes the per-call arguments on (the shapes are fixed by the plan; weights of one shape may
        # sit at other alignments)
        key = (m, *map(_arg_key, (x2, x2.stride(0), packed, scales, b)))
        launch = bound.get(key)
        if launch is None:
            launch = bound[key] = _launch.bind((tiles, splits), T=triton.next_power_of_2(m), **constexprs)
        launch(x2, packed, scales, b, y, ws, counters, m, n, kw, k // group, x2.stride(0), y.stride(0), per, _MAGIC)
        return y

    return run


def gemv4_w4a16(
    x2: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    group: int,
    *,
    rows: int = 4,
    cols: int = 4,
    warps: int = 4,
    split: int = 1,
) -> torch.Tensor:
    """``x2 @ W^T (+ bias)`` for 1-4 tokens by this GEMV (callers check :func:`supports`)."""
    n, kw = packed.shape
    return plan(x2.dtype, n, kw * 8, group, bias is not None, (rows, cols, warps), split)(x2, packed, scales, bias)
