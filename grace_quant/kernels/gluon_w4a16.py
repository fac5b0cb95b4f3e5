"""W4A16 GEMM on Hopper (sm_90), written in Gluon: the weight is dequantized in registers straight into the tensor
cores' A operand, so INT4 is read inside the GEMM instead of dequantize + cuBLAS writing and re-reading every weight
in bf16. Prefill takes 128-256-token tiles; decode and small batches take 16-64-token tiles (the MMA's N), which
stream the weight once with K split over programs to fill the GPU.

``y^T = W x^T``: each program owns 128 weight rows (two warpgroups of 64) and ``block_m`` tokens. The token tile (the
MMA's B operand) comes through TMA into a ring of shared-memory stages, the packed words beside it. Each thread turns
columns ``2c`` and ``2c + 1`` of every word of its fragment rows (``c`` its lane in the quad; in memory they sit in
fields ``c`` and ``c + 4``, ``kernels.packing``) into one 32-bit pair of 16-bit floats: exactly the elements
``k = 8 * word + 2c + {0, 1}`` that ``wgmma``'s register A fragment puts in that thread
(``convert_layout(..., assert_trivial=True)`` proves it at compile time: no data moves). Per pair: a shift by ``4c``,
one ``lop3`` of both fields into the mantissas of 2**7 (bf16) or 2**10 (fp16), one FMA removing the offset exactly
and one multiplying by the scale (the one rounding ``kernels.reference.dequantize`` makes), so results match
dequantize + matmul up to the summation order.

Three forms (``pipe``): 1 keeps one MMA in flight while the next K tile is dequantized (unrolled by two so that a
tile's A registers are redefined only after the MMA reading them retired; ptxas keeps the MMAs asynchronous only with
this shape, see ``benchmarks/results/prefill_h100.md``); 0 retires each MMA before the next dequantization and relies
on a second program per SM to overlap; :data:`WS` (2) is form 1 warp-specialized and persistent: a loader warp keeps
the ring full across output tiles, the compute warps only dequantize and issue MMAs (``_ws_kernel``; 2-6 points of
cuBLAS faster on 128-token tiles, level on 256-token ones: ``benchmarks/results/gluon_h200.md``, section 4). A
stream-K schedule of form 1 lost to these at every shape it was raced on (section 10; it lived as ``pipe`` 3 up to
commit c90e147). Which
one, and the tile, is the tuner's choice per shape
(``kernels.tuner.WGMMA_SPACE`` in the large buckets up to ``WGMMA_MAX_M``, ``WGMMA_SMALL_SPACE`` up to 64 tokens);
dequantize + cuBLAS and the Triton kernels stay the fallbacks.

Gluon is Triton's layout-explicit dialect; it has no CPU interpreter, so this kernel is checked on GPUs only
(``tests/test_kernels_gpu.py``); it is imported only where a tuned entry names it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .gluon_api import cta_barrier, tma_load
from .launch import DirectLauncher
from .triton_w4a16 import _num_sms, _outputs, dequant_ptx

__all__ = ["BLOCK_N", "TILES", "WS", "plan", "reads", "supports", "tile_of", "wgmma_w4a16"]

BLOCK_N = 128
"""Weight rows per program (two warpgroups of 64): N must be a multiple."""
WS = 2
"""``pipe`` of the warp-specialized persistent kernel (:func:`_ws_kernel`; no split-K)."""
TILES = {
    (128, 128, 3, True), (128, 128, 4, True), (256, 128, 3, True), (128, 64, 4, False), (128, 128, 3, False),
    (16, 128, 4, True), (16, 128, 8, True), (32, 128, 4, True), (64, 128, 4, True),
    (128, 128, 4, WS), (128, 128, 5, WS), (256, 128, 2, WS), (256, 128, 3, WS),
}  # fmt: skip
"""The ``(block_m, block_k, stages, pipe)`` tiles checked on GPUs: prefill tiles of 128-256 tokens, and for decode
and small batches (M <= 64) token tiles of 16-64 that stream the weight, split over K to fill the GPU (64-column K
tiles serialize the pipelined loop's MMAs, so they run unpipelined only). ``pipe``: 0 (False) retires each MMA before
the next dequantization, 1 (True) keeps one in flight, :data:`WS` runs the warp-specialized persistent kernel."""
_WARPS = 8

# One word shifted right by 4c -> fields c and c + 4 (columns 2c and 2c + 1 in memory) times the scale pair $3, as two
# 16-bit floats: both fields into the two mantissas of MAGIC by one lop3, the offset removed exactly, one rounding by
# the scale.
_PAIR_PTX = """{
.reg .b32 v, one, off, nz;
mov.b32 one, ONE;
mov.b32 off, OFF;
mov.b32 nz, 0x80008000;
lop3.b32 v, $2, 0x000F000F, MAGIC, 0xEA;
fma.rn.TY v, v, one, off;
fma.rn.TY v, v, $3, nz;
mov.b32 {$0, $1}, v;
}"""
LANE_BITS = 4
"""Lane ``c`` of a quad shifts its words right by ``LANE_BITS * c`` before :data:`_PAIR_PTX`."""
_BF16_PAIR = gl.constexpr(dequant_ptx(_PAIR_PTX, "bf16x2"))
_FP16_PAIR = gl.constexpr(dequant_ptx(_PAIR_PTX, "f16x2"))


@functools.cache
def _layouts(block_m: int, block_k: int) -> tuple:
    """(MMA accumulator, A operand, words ``[BLOCK_N, block_k / 8, 4]``, epilogue) layouts for 8 warps."""
    mma = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[_WARPS, 1], instr_shape=[16, block_m, 16])
    dot = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    # registers: the word index, then the row 8 below; lanes: the quad's c, then rows; warps: 16-row bands
    reg = [[0, 1 << bit, 0] for bit in range((block_k // 8).bit_length() - 1)] + [[8, 0, 0]]
    lane = [[0, 0, 1], [0, 0, 2], [1, 0, 0], [2, 0, 0], [4, 0, 0]]
    warp = [[16, 0, 0], [32, 0, 0], [64, 0, 0]]
    words = gl.DistributedLinearLayout(reg, lane, warp, [], [BLOCK_N, block_k // 8, 4])
    out = gl.BlockedLayout([4, 1], [32, 1], [1, _WARPS], [0, 1])
    return mma, dot, words, out


@gluon.jit
def _dequant_tile(words_smem, sc, shift, PAIR: gl.constexpr, WORDS: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                  dtype: gl.constexpr):  # fmt: skip
    """One ``[BN, BK]`` weight tile from its packed words in shared memory and its scales, in the A fragment's order."""
    words = gl.expand_dims(words_smem.load(gl.SliceLayout(2, WORDS)), 2)
    s16 = sc.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    s2 = gl.expand_dims(gl.expand_dims(s16 | (s16 << 16), 1), 2)
    e0, e1 = gl.inline_asm_elementwise(
        PAIR, "=h,=h,r,r", [words >> shift, s2], dtype=(gl.int16, gl.int16), is_pure=True, pack=1
    )
    return gl.reshape(gl.join(e0, e1), [BN, BK]).to(dtype, bitcast=True)  # k = 8 * word + 2c + {0, 1}


@gluon.jit
def _scales(s_rows, srows, kt, k_end, BK: gl.constexpr, GROUP: gl.constexpr):
    """The rows' scales of the matrix's K tile ``kt``; zeros from ``k_end`` on (tiles run past a split's end)."""
    return gl.load(s_rows + (kt * BK) // GROUP, mask=(srows * 0 + kt) < k_end, other=0.0)


@gluon.jit
def _load_tile(x_desc, w_desc, bars, x_smem, w_smem, m0, n0, k0, kt, STAGES: gl.constexpr, BK: gl.constexpr):
    """TMA the token and word tiles of this program's K tile ``kt`` (``k0 + kt`` of the matrix) into its ring slot."""
    slot = kt % STAGES
    mbarrier.expect(bars.index(slot), x_desc.block_type.nbytes + w_desc.block_type.nbytes)
    tma_load(x_desc, [m0, (k0 + kt) * BK], bars.index(slot), x_smem.index(slot))
    tma_load(w_desc, [n0, (k0 + kt) * (BK // 8)], bars.index(slot), w_smem.index(slot))


@gluon.jit
def _pipe_step(acc, x_desc, w_desc, bars, x_smem, w_smem, m0, n0, k0, kt, num_k, sc, shift,
               STAGES: gl.constexpr, BK: gl.constexpr, PAIR: gl.constexpr, WORDS: gl.constexpr, DOT: gl.constexpr):  # fmt: skip
    """K tile ``kt`` (of ``num_k`` from ``k0``) with one MMA left in flight: dequantize it while tile ``kt - 1``'s MMA
    runs, issue its MMA, retire ``kt - 1``'s, then (both warpgroups past it) refill ``kt - 1``'s slot."""
    BN: gl.constexpr = 128
    stage = kt % STAGES
    mbarrier.wait(bars.index(stage), (kt // STAGES) & 1)
    w = _dequant_tile(w_smem.index(stage), sc, shift, PAIR, WORDS, BN, BK, x_desc.dtype)
    a = gl.convert_layout(w, DOT, assert_trivial=True)
    acc = warpgroup_mma(a, x_smem.index(stage).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(1, deps=[acc])
    cta_barrier()  # the other warpgroup has retired tile kt - 1 too: its slot may be overwritten
    if kt >= 1:
        if kt - 1 + STAGES < num_k:
            _load_tile(x_desc, w_desc, bars, x_smem, w_smem, m0, n0, k0, kt - 1 + STAGES, STAGES, BK)
    return acc


@gluon.jit
def _lane_shift(WORDS: gl.constexpr, LANE_BITS: gl.constexpr):
    """``[1, 1, 4]``: lane ``c`` of a quad shifts its words right by ``LANE_BITS * c`` before the pair PTX (4: fields
    ``c``, ``c + 4`` of the in-memory order; ``benchmarks/repack_lab.py`` runs 8 on the checkpoint's order)."""
    quad = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, WORDS)))
    return gl.expand_dims(gl.expand_dims(quad, 0), 1) * LANE_BITS


@gluon.jit
def _ring(x_desc, w_desc, BM: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr):
    """The ring of ``STAGES`` shared-memory slots (token tile, word tile) and their initialized TMA barriers."""
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BM, BK], x_desc.layout)
    w_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES, 128, BK // 8], w_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bars.index(s), count=1)
    return x_smem, w_smem, bars


@gluon.jit
def _pipe_loop(acc, x_desc, w_desc, bars, x_smem, w_smem, s_rows, srows, m0, n0, k0, k_end, sc_next, sc_after,
               shift, STAGES: gl.constexpr, BK: gl.constexpr, GROUP: gl.constexpr, PAIR: gl.constexpr,
               WORDS: gl.constexpr, DOT: gl.constexpr):  # fmt: skip
    """Form 1's loop over the matrix's K tiles ``k0 .. k_end - 1`` of one output tile (the first two tiles' scales
    given): the ring filled, then :func:`_pipe_step` in pairs, so that a tile's A registers are redefined only after
    the MMA reading them retired. An odd count runs one tile past ``k_end`` with zero scales, so its weights are
    zeros (past K, TMA fills its tiles with zeros; a branch for the last tile instead makes ptxas serialize every
    MMA). Returns the accumulator with every MMA retired."""
    num_k = (k_end - k0 + 1) // 2 * 2
    for s in gl.static_range(STAGES):
        if s < num_k:
            _load_tile(x_desc, w_desc, bars, x_smem, w_smem, m0, n0, k0, s, STAGES, BK)
    for kp in range(num_k // 2):
        kt = 2 * kp
        sc0 = sc_next
        sc1 = sc_after
        sc_next = _scales(s_rows, srows, k0 + kt + 2, k_end, BK, GROUP)
        sc_after = _scales(s_rows, srows, k0 + kt + 3, k_end, BK, GROUP)
        acc = _pipe_step(acc, x_desc, w_desc, bars, x_smem, w_smem, m0, n0, k0, kt, num_k, sc0, shift,
                         STAGES, BK, PAIR, WORDS, DOT)  # fmt: skip
        acc = _pipe_step(acc, x_desc, w_desc, bars, x_smem, w_smem, m0, n0, k0, kt + 1, num_k, sc1, shift,
                         STAGES, BK, PAIR, WORDS, DOT)  # fmt: skip
    return warpgroup_mma_wait(0, deps=[acc])


@gluon.jit
def _kernel(
    x_desc, w_desc, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, KW, KG, stride_ym, K_PER,
    BM: gl.constexpr, BK: gl.constexpr, GROUP: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr,
    PAIR: gl.constexpr, MMA: gl.constexpr, DOT: gl.constexpr, WORDS: gl.constexpr, OUT: gl.constexpr,
    PIPE: gl.constexpr, SPLIT: gl.constexpr, LANE_BITS: gl.constexpr,
):  # fmt: skip
    BN: gl.constexpr = 128
    pid_m = gl.program_id(0)  # token tiles fastest: programs in flight share weight rows (read once into L2)
    pid_n = gl.program_id(1)
    pid_k = gl.program_id(2)  # split-K: this program's K tiles are k0 .. k_end - 1 (K_PER of them, the last fewer)
    n0 = pid_n * BN
    m0 = pid_m * BM
    k0 = pid_k * K_PER
    k_end = gl.minimum(k0 + K_PER, (KW * 8) // BK)
    num_k = k_end - k0
    # scales: one per row and K tile, loaded two tiles ahead (registers carried through the loop); zero past k_end
    srows = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, WORDS)))
    s_rows = s_ptr + srows * KG
    sc_next = _scales(s_rows, srows, k0, k_end, BK, GROUP)
    sc_after = _scales(s_rows, srows, k0 + 1, k_end, BK, GROUP)
    shift = _lane_shift(WORDS, LANE_BITS)
    x_smem, w_smem, bars = _ring(x_desc, w_desc, BM, BK, STAGES)
    acc = gl.zeros([BN, BM], gl.float32, layout=MMA)
    if PIPE:
        # register A with one MMA in flight; every slot refilled only once both warpgroups have retired its tile
        acc = _pipe_loop(acc, x_desc, w_desc, bars, x_smem, w_smem, s_rows, srows, m0, n0, k0, k_end, sc_next, sc_after,
                         shift, STAGES, BK, GROUP, PAIR, WORDS, DOT)  # fmt: skip
    else:
        for s in gl.static_range(STAGES - 1):
            if s < num_k:
                _load_tile(x_desc, w_desc, bars, x_smem, w_smem, m0, n0, k0, s, STAGES, BK)
        for kt in range(num_k):
            stage = kt % STAGES
            mbarrier.wait(bars.index(stage), (kt // STAGES) & 1)
            sc = sc_next
            sc_next = sc_after
            sc_after = _scales(s_rows, srows, k0 + kt + 2, k_end, BK, GROUP)
            w = _dequant_tile(w_smem.index(stage), sc, shift, PAIR, WORDS, BN, BK, x_desc.dtype)
            a = gl.convert_layout(w, DOT, assert_trivial=True)
            acc = warpgroup_mma(a, x_smem.index(stage).permute((1, 0)), acc, is_async=True)
            # wgmma reads its A registers while it runs: retire it before the next tile's dequantization (other
            # programs on the SM overlap their dequantization with this MMA)
            acc, a = warpgroup_mma_wait(0, deps=[acc, a])
            refill = kt + STAGES - 1
            if refill < num_k:
                _load_tile(x_desc, w_desc, bars, x_smem, w_smem, m0, n0, k0, refill, STAGES, BK)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(s))
    out = gl.convert_layout(acc, OUT)
    on = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, OUT))
    om = m0 + gl.arange(0, BM, layout=gl.SliceLayout(0, OUT))
    m_mask = gl.expand_dims(om < M, 0)
    y_ptrs = y_ptr + gl.expand_dims(om, 0) * stride_ym + gl.expand_dims(on, 1)
    if SPLIT:
        # every split writes its fp32 partial; the last to arrive adds them in split order (deterministic), adds the
        # bias, stores y and resets the tile's counter for the next call
        ws_tile = ws_ptr + gl.expand_dims(om, 0) * N + gl.expand_dims(on, 1)
        gl.store(ws_tile + pid_k * M * N, out, mask=m_mask)
        cta_barrier()  # every thread's partial is written before the release below
        tile = pid_n * gl.num_programs(0) + pid_m
        count = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if count == gl.num_programs(2) - 1:
            out = gl.zeros([BN, BM], gl.float32, layout=OUT)
            for split in range(0, gl.num_programs(2)):
                out += gl.load(ws_tile + split * M * N, mask=m_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                out = out + gl.expand_dims(gl.load(b_ptr + on).to(gl.float32), 1)
            gl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=m_mask)
            gl.atomic_xchg(cnt_ptr + tile, 0)
    else:
        if HAS_BIAS:
            out = out + gl.expand_dims(gl.load(b_ptr + on).to(gl.float32), 1)
        gl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=m_mask)


@gluon.jit
def _ws_loader(x_desc, w_desc, ready, empty, x_smem, w_smem, M, N, K_ITERS, STAGES: gl.constexpr, BM: gl.constexpr,
               BK: gl.constexpr):  # fmt: skip
    """The loader warp of :func:`_ws_kernel`: TMA every K tile of this program's output tiles into the ring, a slot
    once the compute warps have released it (tiles past K come back zero-filled)."""
    tiles_m = gl.cdiv(M, BM)
    it = 0
    for t in range(gl.program_id(0), tiles_m * (N // 128), gl.num_programs(0)):
        m0 = (t % tiles_m) * BM
        n0 = (t // tiles_m) * 128
        for kt in range(K_ITERS):
            slot = it % STAGES
            mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)  # a fresh barrier passes phase 1 at once
            mbarrier.expect(ready.index(slot), x_desc.block_type.nbytes + w_desc.block_type.nbytes)
            tma_load(x_desc, [m0, kt * BK], ready.index(slot), x_smem.index(slot))
            tma_load(w_desc, [n0, kt * (BK // 8)], ready.index(slot), w_smem.index(slot))
            it += 1


@gluon.jit
def _ws_step(acc, ready, empty, x_smem, w_smem, it, kt, sc, shift, STAGES: gl.constexpr, BK: gl.constexpr,
             PAIR: gl.constexpr, WORDS: gl.constexpr, DOT: gl.constexpr, dtype: gl.constexpr):  # fmt: skip
    """Ring entry ``it`` (K tile ``kt``): dequantize it while the previous MMA runs, issue its MMA, retire the previous
    one and hand that one's slot back to the loader."""
    slot = it % STAGES
    mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
    w = _dequant_tile(w_smem.index(slot), sc, shift, PAIR, WORDS, 128, BK, dtype)
    a = gl.convert_layout(w, DOT, assert_trivial=True)
    acc = warpgroup_mma(a, x_smem.index(slot).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(1, deps=[acc])
    fence_async_shared()  # the words were read through the generic proxy; TMA (the async proxy) overwrites them next
    mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), pred=kt > 0)  # after every compute warp got here
    return acc


@gluon.jit
def _ws_compute(s_ptr, b_ptr, y_ptr, ready, empty, x_smem, w_smem, M, N, KG, stride_ym, K_TILES, K_ITERS,
                BM: gl.constexpr, BK: gl.constexpr, GROUP: gl.constexpr, STAGES: gl.constexpr,
                HAS_BIAS: gl.constexpr, PAIR: gl.constexpr, MMA: gl.constexpr, DOT: gl.constexpr,
                WORDS: gl.constexpr, OUT: gl.constexpr, DIRECT: gl.constexpr, dtype: gl.constexpr,
                LANE_BITS: gl.constexpr):  # fmt: skip
    """The compute warpgroups of :func:`_ws_kernel`: per output tile, the pipelined loop of :func:`_pipe_step` fed by
    the loader warp, then the epilogue (while the loader already fills the next tile's stages)."""
    BN: gl.constexpr = 128
    tiles_m = gl.cdiv(M, BM)
    shift = _lane_shift(WORDS, LANE_BITS)
    it = 0
    for t in range(gl.program_id(0), tiles_m * (N // BN), gl.num_programs(0)):
        m0 = (t % tiles_m) * BM
        n0 = (t // tiles_m) * BN
        srows = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, WORDS)))
        s_rows = s_ptr + srows * KG
        sc_next = _scales(s_rows, srows, 0, K_TILES, BK, GROUP)
        sc_after = _scales(s_rows, srows, 1, K_TILES, BK, GROUP)
        acc = gl.zeros([BN, BM], gl.float32, layout=MMA)
        for kp in range(K_ITERS // 2):  # in pairs, as in _kernel: A registers redefined only after their MMA retired
            kt = 2 * kp
            sc0 = sc_next
            sc1 = sc_after
            sc_next = _scales(s_rows, srows, kt + 2, K_TILES, BK, GROUP)
            sc_after = _scales(s_rows, srows, kt + 3, K_TILES, BK, GROUP)
            acc = _ws_step(acc, ready, empty, x_smem, w_smem, it, kt, sc0, shift, STAGES, BK, PAIR, WORDS, DOT, dtype)
            acc = _ws_step(acc, ready, empty, x_smem, w_smem, it + 1, kt + 1, sc1, shift, STAGES, BK, PAIR, WORDS,
                           DOT, dtype)  # fmt: skip
            it += 2
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
        if DIRECT:  # straight from the accumulator's registers: no shared-memory scratch beside a large ring
            out = acc
        else:
            out = gl.convert_layout(acc, OUT)
        _store_tile(out, b_ptr, y_ptr, m0, n0, M, stride_ym, BN, BM, HAS_BIAS)


@gluon.jit
def _store_tile(out, b_ptr, y_ptr, m0, n0, M, stride_ym, BN: gl.constexpr, BM: gl.constexpr, HAS_BIAS: gl.constexpr):
    """``y[m0:m0+BM, n0:n0+BN]`` from the fp32 tile ``out [BN, BM]`` (any layout) plus the bias; tokens past M left."""
    on = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, out.type.layout))
    om = m0 + gl.arange(0, BM, layout=gl.SliceLayout(0, out.type.layout))
    if HAS_BIAS:
        out = out + gl.expand_dims(gl.load(b_ptr + on).to(gl.float32), 1)
    y_ptrs = y_ptr + gl.expand_dims(om, 0) * stride_ym + gl.expand_dims(on, 1)
    gl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=gl.expand_dims(om < M, 0))


@gluon.jit
def _ws_kernel(
    x_desc, w_desc, s_ptr, b_ptr, y_ptr, M, N, KG, stride_ym, K_TILES, K_ITERS,
    BM: gl.constexpr, BK: gl.constexpr, GROUP: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr,
    PAIR: gl.constexpr, MMA: gl.constexpr, DOT: gl.constexpr, WORDS: gl.constexpr, OUT: gl.constexpr,
    DIRECT: gl.constexpr, LANE_BITS: gl.constexpr,
):  # fmt: skip
    """Warp-specialized, persistent form of :func:`_kernel` (``pipe`` 2): one loader warp keeps the ring full across
    output tiles while the two compute warpgroups only wait on its barriers, dequantize and issue MMAs (no refill and
    no barrier between the warpgroups in their loop); one program per SM walks the output tiles, token tiles fastest."""
    BN: gl.constexpr = 128
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BM, BK], x_desc.layout)
    w_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, BK // 8], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    gl.warp_specialize(
        [
            (_ws_compute, (s_ptr, b_ptr, y_ptr, ready, empty, x_smem, w_smem, M, N, KG, stride_ym, K_TILES, K_ITERS,
                           BM, BK, GROUP, STAGES, HAS_BIAS, PAIR, MMA, DOT, WORDS, OUT, DIRECT, x_desc.dtype,
                           LANE_BITS)),
            (_ws_loader, (x_desc, w_desc, ready, empty, x_smem, w_smem, M, N, K_ITERS, STAGES, BM, BK)),
        ],
        [1],
        [24],
    )  # fmt: skip


_launch = DirectLauncher(_kernel)  # eager prefill calls it per linear: repeat launches skip the JIT's binding
_launch_ws = DirectLauncher(_ws_kernel)
_WS_MAXNREG = 168
"""Registers per thread the warp-specialized kernel is launched with: its 12 warps (8 compute, the loader's warpgroup)
fit the SM's 64K; the loader gives its share back (24) and the compute warps take up to 240."""


@functools.cache
def _shared_layouts(block_m: int, block_k: int, dtype: torch.dtype) -> tuple:
    """(token tile, word tile) shared-memory layouts, built once per tile and dtype rather than on every launch."""
    gdt = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return (
        gl.NVMMASharedLayout.get_default_for([block_m, block_k], gdt),
        gl.NVMMASharedLayout.get_default_for([BLOCK_N, block_k // 8], gl.int32),
    )


def supports(x2: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group: int, block_k: int = 128) -> bool:
    """Whether :func:`wgmma_w4a16` takes this call: a Hopper GPU, 16-bit activations with scales of the same dtype,
    N a multiple of 128, K of ``block_k``, groups of at least ``block_k`` columns, 16-byte aligned rows."""
    if not (x2.is_cuda and torch.cuda.get_device_capability(x2.device)[0] == 9):
        return False
    n, kw = packed.shape
    k = kw * 8
    return (
        x2.dtype in (torch.float16, torch.bfloat16) and scales.dtype == x2.dtype and x2.dim() == 2 and reads(x2)
        and n % BLOCK_N == 0 and k % block_k == 0 and group % block_k == 0 and k % group == 0
        and packed.is_contiguous() and scales.is_contiguous() and packed.data_ptr() % 16 == 0
    )  # fmt: skip


def reads(x2: torch.Tensor) -> bool:
    """Whether TMA can read the ``[M, K]`` activation as it is: unit stride along K, 16-byte aligned rows."""
    return x2.stride(-1) == 1 and (x2.stride(0) * x2.element_size()) % 16 == 0 and x2.data_ptr() % 16 == 0


def tile_of(config: dict[str, int]) -> tuple[int, int, int, int]:
    """The ``(block_m, block_k, stages, pipe)`` tile a tuned ``"wgmma"`` entry names (absent keys: the defaults of
    :func:`wgmma_w4a16`)."""
    get = config.get
    return get("block_m", 128), get("block_k", 128), get("stages", 4), int(get("pipe", 1))


def wgmma_w4a16(
    x2: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    group: int,
    *,
    block_m: int = 128,
    block_k: int = 128,
    stages: int = 4,
    pipe: int = 1,
    split: int = 1,
) -> torch.Tensor:
    """``x2 @ W^T (+ bias)`` for ``x2 [M, K]`` in one launch; callers check :func:`supports` first. The tile must
    be one of :data:`TILES`; ``split`` > 1 splits K over that many programs per output tile (for shapes with too
    few tiles to fill the GPU), their fp32 partials added by the last one."""
    tile = _checked((block_m, block_k, stages, int(pipe)))
    n, kw = packed.shape
    return plan(x2.dtype, n, kw * 8, group, bias is not None, tile, split)(x2, packed, scales, bias)


def _checked(tile: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    if tile not in TILES:
        raise ValueError(f"{tile} is not a checked (block_m, block_k, stages, pipe) tile; pick one of {sorted(TILES)}")
    return tile


@functools.lru_cache(maxsize=1024)
def plan(
    dtype: torch.dtype,
    n: int,
    k: int,
    group: int,
    has_bias: bool,
    tile: tuple[int, int, int, int],
    split: int = 1,
    *,
    pair: str | None = None,
    lane_bits: int = LANE_BITS,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """``run(x2, packed, scales, bias)`` for every call of this weight shape and tile: layouts, constexprs and the
    split resolved once, the kernel launched through a bound runner per class of M (what Triton specializes an
    integer on), so a call costs the host two descriptors, the outputs' allocation and the launch. Callers check
    :func:`supports` first. Labs only: ``pair``, another pair-making PTX template (placeholders as
    :data:`_PAIR_PTX`'s), and ``lane_bits``, its per-lane shift (``benchmarks/repack_lab.py``,
    ``benchmarks/gluon_profile.py --probe``)."""
    block_m, block_k, stages, pipe = _checked(tile)
    if split < 1 or (pipe == WS and split > 1):
        raise ValueError(
            f"split = {split}: K is split over at least one program (1 for no split), and the warp-specialized "
            "kernel (pipe = 2) takes no split"
        )
    k_tiles = k // block_k
    k_per = triton.cdiv(k_tiles, split)
    splits = triton.cdiv(k_tiles, k_per)  # no split left empty
    mma, dot, words, out = _layouts(block_m, block_k)
    x_layout, w_layout = _shared_layouts(block_m, block_k, dtype)
    ptx = _BF16_PAIR if dtype == torch.bfloat16 else _FP16_PAIR
    if pair is not None:
        ptx = gl.constexpr(dequant_ptx(pair, "bf16x2" if dtype == torch.bfloat16 else "f16x2"))
    common = dict(BM=block_m, BK=block_k, GROUP=group, STAGES=stages, HAS_BIAS=has_bias, PAIR=ptx, MMA=mma, DOT=dot,
                  WORDS=words, OUT=out, LANE_BITS=lane_bits, num_warps=_WARPS)  # fmt: skip
    if pipe == WS:  # a 256-token tile's ring leaves no room for the epilogue's layout change through shared memory
        launcher, constexprs = _launch_ws, dict(common, DIRECT=block_m > 128, maxnreg=_WS_MAXNREG)
    else:
        launcher, constexprs = _launch, dict(common, PIPE=bool(pipe), SPLIT=splits > 1)
    bound: dict[tuple[bool, ...], Callable[..., None]] = {}

    def run(x2: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        m = x2.shape[0]
        if m == 0:
            return torch.empty((0, n), dtype=dtype, device=x2.device)
        if splits > 1 and splits * m * n >= 2**31:  # the partials' int32 offsets
            return plan(dtype, n, k, group, has_bias, tile, 1, pair=pair, lane_bits=lane_bits)(x2, packed, scales, bias)
        tiles_m = triton.cdiv(m, block_m)
        y, ws, counters = _outputs(x2, packed, tiles_m * (n // BLOCK_N), splits)
        if bias is not None:
            bias = bias.to(dtype).contiguous()
        # what Triton specializes the runtime arguments that vary between calls on
        key = (m == 1, m % 16 == 0, scales.data_ptr() % 16 == 0, bias is None or bias.data_ptr() % 16 == 0)
        launch = bound.get(key)
        if launch is None:
            launch = bound[key] = launcher.bind(None, **constexprs)
        x_desc = TensorDescriptor.from_tensor(x2, [block_m, block_k], x_layout)
        w_desc = TensorDescriptor.from_tensor(packed, [BLOCK_N, block_k // 8], w_layout)
        b = bias if bias is not None else y
        if pipe == WS:  # one program per SM (at most one per output tile); K tiles rounded up to pairs
            grid = (min(tiles_m * (n // BLOCK_N), _num_sms(x2.device.index)),)
            launch(grid, x_desc, w_desc, scales, b, y, m, n, k // group, y.stride(0), k_tiles, (k_tiles + 1) // 2 * 2)
            return y
        launch(
            (tiles_m, n // BLOCK_N, splits), x_desc, w_desc,
            scales, b, y, ws, counters, m, n, k // 8, k // group, y.stride(0), k_per,
        )  # fmt: skip
        return y

    return run
