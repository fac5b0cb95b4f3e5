"""Lab (run once, on an H100, 2026-12-07: both forms lose, ``benchmarks/results/gluon_h200.md`` section 6): the W4A16
GEMM with the dequantization taken out of the MMA warps. A converter warpgroup turns each INT4 weight tile into a
16-bit tile in shared memory and the MMA warpgroups run shared-memory-operand ``wgmma`` on it (as mixed-input GEMMs on
Hopper do); one program per SM walks the output tiles.
``benchmarks/results/gluon_h200.md`` (section 4) says why: with the dequantization in the MMA warps' own instruction
stream (``grace_quant.kernels.gluon_w4a16``) the tensor pipe idles 28-46% of the time.

Two forms, both compiled offline for sm_90 (Triton 3.6; no spills):
- ``conv``: a TMA loader warp (``gluon_w4a16._ws_loader``), a converter warpgroup and two MMA warpgroups: 16 warps,
  so 128 registers per thread at launch; 128-token tiles only (a 256-token accumulator does not fit).
- ``feed``: the converter warpgroup also issues the TMA loads (``STAGES - 1`` entries ahead, each slot refilled once
  the MMA reading it retired): 12 warps, so the MMA warps get 240 registers and 256-token tiles fit
  (``HGMMA.64x256x16``, 4 stages of 64-column K tiles in 213 KB of shared memory).

Timed against cuBLAS bf16, the pipelined and the warp-specialized Gluon tiles, each arm checked against dequantize +
matmul (fp32):

    PYTHONSAFEPATH=1 PYTHONPATH=$PWD python benchmarks/conv_lab.py   # on a Hopper GPU; ~1-2 minutes
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
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

from benchmarks.gluon_profile import checked_ratio
from grace_quant.kernels import gluon_w4a16 as gw
from grace_quant.kernels.gluon_api import tma_load
from grace_quant.kernels.gluon_w4a16 import _dequant_tile, _scales, _store_tile, _ws_loader
from grace_quant.kernels.reference import dequantize
from grace_quant.kernels.timing import random_w4

BN = 128  # weight rows per program


@functools.cache
def _layouts(block_m: int, block_k: int, conv_warps: int) -> tuple:
    """(MMA accumulator for 8 warps, the converter's words ``[BN, block_k / 8, 4]`` for ``conv_warps`` warps)."""
    mma = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1], instr_shape=[16, block_m, 16])
    warp_bits = conv_warps.bit_length() - 1
    lane = [[0, 0, 1], [0, 0, 2], [1, 0, 0], [2, 0, 0], [4, 0, 0]]  # the quad's c, then rows 0-7
    warp = [[8 << i, 0, 0] for i in range(warp_bits)]
    reg = [[0, 1 << b, 0] for b in range((block_k // 8).bit_length() - 1)]  # the words of a row, then rows 32, 64
    reg += [[8 << i, 0, 0] for i in range(warp_bits, 4)]
    return mma, gl.DistributedLinearLayout(reg, lane, warp, [], [BN, block_k // 8, 4])


@gluon.jit
def _converter(s_ptr, ready, converted, q_smem, w_smem, M, N, KG, K_TILES, STAGES: gl.constexpr, BM: gl.constexpr,
               BK: gl.constexpr, GROUP: gl.constexpr, PAIR: gl.constexpr, WORDS: gl.constexpr):  # fmt: skip
    tiles_m = gl.cdiv(M, BM)
    quad = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, WORDS)))
    shift = gl.expand_dims(gl.expand_dims(quad, 0), 1) * gw.LANE_BITS
    it = 0
    for t in range(gl.program_id(0), tiles_m * (N // 128), gl.num_programs(0)):
        srows = (t // tiles_m) * 128 + gl.arange(0, 128, layout=gl.SliceLayout(1, gl.SliceLayout(2, WORDS)))
        s_rows = s_ptr + srows * KG
        sc_next = _scales(s_rows, srows, 0, K_TILES, BK, GROUP)
        for kt in range(K_TILES):
            slot = it % STAGES
            sc = sc_next
            sc_next = _scales(s_rows, srows, kt + 1, K_TILES, BK, GROUP)
            mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
            w_smem.index(slot).store(_dequant_tile(q_smem.index(slot), sc, shift, PAIR, WORDS, 128, BK, w_smem.dtype))
            fence_async_shared()  # the generic-proxy store, then the MMA's async-proxy read
            mbarrier.arrive(converted.index(slot))
            it += 1


@gluon.jit
def _mma(b_ptr, y_ptr, ready, converted, empty, x_smem, w_smem, M, N, stride_ym, K_TILES, STAGES: gl.constexpr,
         BM: gl.constexpr, HAS_BIAS: gl.constexpr, MMA: gl.constexpr):  # fmt: skip
    tiles_m = gl.cdiv(M, BM)
    it = 0
    for t in range(gl.program_id(0), tiles_m * (N // 128), gl.num_programs(0)):
        m0 = (t % tiles_m) * BM
        n0 = (t // tiles_m) * 128
        acc = gl.zeros([128, BM], gl.float32, layout=MMA)
        for kt in range(K_TILES):
            slot = it % STAGES
            phase = (it // STAGES) & 1
            mbarrier.wait(ready.index(slot), phase)  # the token tile (TMA)
            mbarrier.wait(converted.index(slot), phase)  # the weight tile (converter)
            acc = warpgroup_mma(w_smem.index(slot), x_smem.index(slot).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=[acc])
            mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), pred=kt > 0)
            it += 1
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
        _store_tile(acc, b_ptr, y_ptr, m0, n0, M, stride_ym, 128, BM, HAS_BIAS)


@gluon.jit
def _ring(x_desc, q_desc, W_LAYOUT: gl.constexpr, STAGES: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr):
    """The ring: token, word and 16-bit weight tiles per stage, and its ready / converted / empty barriers."""
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BM, BK], x_desc.layout)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [STAGES, 128, BK // 8], q_desc.layout)
    w_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES, 128, BK], W_LAYOUT)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    converted = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(converted.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    return x_smem, q_smem, w_smem, ready, converted, empty


@gluon.jit
def _conv_kernel(
    x_desc, q_desc, s_ptr, b_ptr, y_ptr, M, N, KG, stride_ym, K_TILES,
    BM: gl.constexpr, BK: gl.constexpr, GROUP: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr,
    PAIR: gl.constexpr, MMA: gl.constexpr, WORDS: gl.constexpr, W_LAYOUT: gl.constexpr, CONV_WARPS: gl.constexpr,
    CONV_REGS: gl.constexpr,
):  # fmt: skip
    x_smem, q_smem, w_smem, ready, converted, empty = _ring(x_desc, q_desc, W_LAYOUT, STAGES, BM, BK)
    gl.warp_specialize(
        [
            (_mma, (b_ptr, y_ptr, ready, converted, empty, x_smem, w_smem, M, N, stride_ym, K_TILES, STAGES, BM,
                    HAS_BIAS, MMA)),
            (_converter, (s_ptr, ready, converted, q_smem, w_smem, M, N, KG, K_TILES, STAGES, BM, BK, GROUP, PAIR,
                          WORDS)),
            (_ws_loader, (x_desc, q_desc, ready, empty, x_smem, q_smem, M, N, K_TILES, STAGES, BM, BK)),
        ],
        [CONV_WARPS, 1],
        [CONV_REGS, 24],
    )  # fmt: skip


@gluon.jit
def _feed(x_desc, q_desc, ready, empty, x_smem, q_smem, j, tiles_m, K_TILES, STAGES: gl.constexpr, BM: gl.constexpr,
          BK: gl.constexpr):  # fmt: skip
    """TMA this program's ring entry ``j`` (its output tile ``j // K_TILES``, K tile ``j % K_TILES``) into its slot."""
    t = gl.program_id(0) + (j // K_TILES) * gl.num_programs(0)
    slot = j % STAGES
    mbarrier.wait(empty.index(slot), ((j // STAGES) & 1) ^ 1)
    mbarrier.expect(ready.index(slot), x_desc.block_type.nbytes + q_desc.block_type.nbytes)
    kt = j % K_TILES
    tma_load(x_desc, [(t % tiles_m) * BM, kt * BK], ready.index(slot), x_smem.index(slot))
    tma_load(q_desc, [(t // tiles_m) * 128, kt * (BK // 8)], ready.index(slot),
                                    q_smem.index(slot))  # fmt: skip


@gluon.jit
def _feeder(x_desc, q_desc, s_ptr, ready, converted, empty, x_smem, q_smem, w_smem, M, N, KG, K_TILES,
            STAGES: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr, GROUP: gl.constexpr, PAIR: gl.constexpr,
            WORDS: gl.constexpr):  # fmt: skip
    """Loader and converter in one warpgroup (12 warps in all, so the MMA warps can hold a 256-token accumulator):
    convert entry ``j``, then load entry ``j + STAGES - 1`` (its slot frees once the MMA of ``j - 1`` retired)."""
    tiles_m = gl.cdiv(M, BM)
    total = gl.cdiv(tiles_m * (N // 128) - gl.program_id(0), gl.num_programs(0)) * K_TILES
    quad = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, WORDS)))
    shift = gl.expand_dims(gl.expand_dims(quad, 0), 1) * gw.LANE_BITS
    rows = gl.arange(0, 128, layout=gl.SliceLayout(1, gl.SliceLayout(2, WORDS)))
    for j in range(gl.minimum(total, STAGES - 1)):
        _feed(x_desc, q_desc, ready, empty, x_smem, q_smem, j, tiles_m, K_TILES, STAGES, BM, BK)
    for j in range(total):
        t = gl.program_id(0) + (j // K_TILES) * gl.num_programs(0)
        srows = (t // tiles_m) * 128 + rows
        sc = _scales(s_ptr + srows * KG, srows, j % K_TILES, K_TILES, BK, GROUP)
        slot = j % STAGES
        mbarrier.wait(ready.index(slot), (j // STAGES) & 1)
        w_smem.index(slot).store(_dequant_tile(q_smem.index(slot), sc, shift, PAIR, WORDS, 128, BK, w_smem.dtype))
        fence_async_shared()
        mbarrier.arrive(converted.index(slot))
        if j + STAGES - 1 < total:
            _feed(x_desc, q_desc, ready, empty, x_smem, q_smem, j + STAGES - 1, tiles_m, K_TILES, STAGES, BM, BK)


@gluon.jit
def _feed_kernel(
    x_desc, q_desc, s_ptr, b_ptr, y_ptr, M, N, KG, stride_ym, K_TILES,
    BM: gl.constexpr, BK: gl.constexpr, GROUP: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr,
    PAIR: gl.constexpr, MMA: gl.constexpr, WORDS: gl.constexpr, W_LAYOUT: gl.constexpr, FEED_REGS: gl.constexpr,
):  # fmt: skip
    x_smem, q_smem, w_smem, ready, converted, empty = _ring(x_desc, q_desc, W_LAYOUT, STAGES, BM, BK)
    gl.warp_specialize(
        [
            (_mma, (b_ptr, y_ptr, ready, converted, empty, x_smem, w_smem, M, N, stride_ym, K_TILES, STAGES, BM,
                    HAS_BIAS, MMA)),
            (_feeder, (x_desc, q_desc, s_ptr, ready, converted, empty, x_smem, q_smem, w_smem, M, N, KG, K_TILES,
                       STAGES, BM, BK, GROUP, PAIR, WORDS)),
        ],
        [4],
        [FEED_REGS],
    )  # fmt: skip


def feed_w4a16(x2, packed, scales, bias, tile, sms):
    """As :func:`conv_w4a16` with the loader folded into the converter: ``tile = (block_m, block_k, stages,
    feeder registers)``."""
    bm, bk, stages, feed_regs = tile
    (m, k), n = x2.shape, packed.shape[0]
    x_desc, q_desc, w_layout, consts = _descriptors(x2, packed, bm, bk, 4)
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    _feed_kernel[(min(triton.cdiv(m, bm) * (n // 128), sms),)](
        x_desc, q_desc, scales, bias if bias is not None else y, y, m, n, k // 128, y.stride(0), k // bk,
        BM=bm, BK=bk, GROUP=128, STAGES=stages, HAS_BIAS=bias is not None, W_LAYOUT=w_layout, FEED_REGS=feed_regs,
        num_warps=8, maxnreg=168, **consts,
    )  # fmt: skip
    return y


def _descriptors(x2, packed, bm, bk, conv_warps):
    """(token descriptor, word descriptor, the bf16 weight tile's shared layout, PAIR/MMA/WORDS constexprs)."""
    gdt = gl.bfloat16 if x2.dtype == torch.bfloat16 else gl.float16
    x_desc = TensorDescriptor.from_tensor(x2, [bm, bk], gl.NVMMASharedLayout.get_default_for([bm, bk], gdt))
    q_layout = gl.NVMMASharedLayout.get_default_for([128, bk // 8], gl.int32)
    q_desc = TensorDescriptor.from_tensor(packed, [128, bk // 8], q_layout)
    mma, words = _layouts(bm, bk, conv_warps)
    pair = gw._BF16_PAIR if x2.dtype == torch.bfloat16 else gw._FP16_PAIR
    return x_desc, q_desc, gl.NVMMASharedLayout.get_default_for([128, bk], gdt), dict(PAIR=pair, MMA=mma, WORDS=words)


def conv_w4a16(x2, packed, scales, bias, tile, sms):
    """``x2 @ W^T (+ bias)`` with ``tile = (block_m, block_k, stages, converter warps, converter registers)``."""
    bm, bk, stages, conv_warps, conv_regs = tile
    (m, k), n = x2.shape, packed.shape[0]
    x_desc, q_desc, w_layout, consts = _descriptors(x2, packed, bm, bk, conv_warps)
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    _conv_kernel[(min(triton.cdiv(m, bm) * (n // 128), sms),)](
        x_desc, q_desc, scales, bias if bias is not None else y, y, m, n, k // 128, y.stride(0), k // bk,
        BM=bm, BK=bk, GROUP=128, STAGES=stages, HAS_BIAS=bias is not None, W_LAYOUT=w_layout,
        CONV_WARPS=conv_warps, CONV_REGS=conv_regs, num_warps=8, maxnreg=128, **consts,
    )  # fmt: skip
    return y


def main() -> None:
    bench = functools.partial(triton.testing.do_bench, warmup=20, rep=100)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}: ratio to cuBLAS bf16 (do_bench, L2 flushed)", flush=True)
    for m, n, k in ((2048, 22016, 4096), (2048, 4096, 11008), (600, 22016, 4096), (2048, 4096, 4096)):
        packed, scales = random_w4(n, k, 128, torch.bfloat16, "cuda")
        dense = dequantize(packed, scales, 128, 4)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ dense.float().T
        base = bench(functools.partial(F.linear, x, dense))
        arms = [
            ("pipe 256/3", functools.partial(gw.wgmma_w4a16, x, packed, scales, None, 128, block_m=256, stages=3)),
            ("ws 128/5", functools.partial(gw.wgmma_w4a16, x, packed, scales, None, 128, stages=5, pipe=gw.WS)),
        ]
        arms += [
            (f"conv {tile}", functools.partial(conv_w4a16, x, packed, scales, None, tile, sms))
            for tile in ((128, 64, 4, 4, 96), (128, 64, 6, 4, 96), (128, 64, 6, 4, 120))
        ]
        arms += [
            (f"feed {tile}", functools.partial(feed_w4a16, x, packed, scales, None, tile, sms))
            for tile in ((256, 64, 4, 104), (256, 64, 3, 104), (128, 64, 6, 104))
        ]
        line = [f"M={m} N={n} K={k}: cuBLAS {base * 1e3:.1f} us |"]
        line += [checked_ratio(name, fn, ref, base, bench) for name, fn in arms]
        print("".join(line), flush=True)


if __name__ == "__main__":
    main()
