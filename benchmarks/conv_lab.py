"""Lab (not yet run on a GPU): the W4A16 GEMM with the dequantization taken out of the MMA warps. A converter
warpgroup turns each INT4 weight tile into a 16-bit tile in shared memory and the MMA warpgroups run
shared-memory-operand ``wgmma`` on it (as mixed-input GEMMs on Hopper do), fed by a TMA loader warp; one program per
SM walks the output tiles. ``benchmarks/results/gluon_h200.md`` (section 4) says why: with the dequantization in the
MMA warps' own instruction stream (``grace_quant.kernels.gluon_w4a16``) the tensor pipe idles 28-46% of the time.
The loader is that module's warp-specialized kernel's own (``_ws_loader``).

Compiled offline for sm_90 (Triton 3.6): 128-token tiles with 64-column K tiles, 4-6 stages, no spills, 96 registers
for the converter; 256-token tiles do not compile (the MMA warps' accumulator needs more than the 128 registers per
thread that 16 warps leave). Timed against cuBLAS bf16, the pipelined and the warp-specialized Gluon tiles, each arm
checked against dequantize + matmul (fp32):

    python benchmarks/conv_lab.py        # on a Hopper GPU; ~1 minute
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

from grace_quant.kernels import gluon_w4a16 as gw
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
    shift = gl.expand_dims(gl.expand_dims(quad, 0), 1) * 8
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
def _conv_kernel(
    x_desc, q_desc, s_ptr, b_ptr, y_ptr, M, N, KG, stride_ym, K_TILES,
    BM: gl.constexpr, BK: gl.constexpr, GROUP: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr,
    PAIR: gl.constexpr, MMA: gl.constexpr, WORDS: gl.constexpr, W_LAYOUT: gl.constexpr, CONV_WARPS: gl.constexpr,
    CONV_REGS: gl.constexpr,
):  # fmt: skip
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


def conv_w4a16(x2, packed, scales, bias, tile, sms):
    """``x2 @ W^T (+ bias)`` with ``tile = (block_m, block_k, stages, converter warps, converter registers)``."""
    bm, bk, stages, conv_warps, conv_regs = tile
    (m, k), n = x2.shape, packed.shape[0]
    gdt = gl.bfloat16 if x2.dtype == torch.bfloat16 else gl.float16
    x_layout = gl.NVMMASharedLayout.get_default_for([bm, bk], gdt)
    q_layout = gl.NVMMASharedLayout.get_default_for([128, bk // 8], gl.int32)
    mma, words = _layouts(bm, bk, conv_warps)
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    tiles = triton.cdiv(m, bm) * (n // 128)
    _conv_kernel[(min(tiles, sms),)](
        TensorDescriptor.from_tensor(x2, [bm, bk], x_layout), TensorDescriptor.from_tensor(packed, [128, bk // 8], q_layout),
        scales, bias if bias is not None else y, y, m, n, k // 128, y.stride(0), k // bk,
        BM=bm, BK=bk, GROUP=128, STAGES=stages, HAS_BIAS=bias is not None,
        PAIR=gw._BF16_PAIR if x2.dtype == torch.bfloat16 else gw._FP16_PAIR, MMA=mma, WORDS=words,
        W_LAYOUT=gl.NVMMASharedLayout.get_default_for([128, bk], gdt), CONV_WARPS=conv_warps, CONV_REGS=conv_regs,
        num_warps=8, maxnreg=128,
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
        ] + [
            (f"conv {tile}", functools.partial(conv_w4a16, x, packed, scales, None, tile, sms))
            for tile in ((128, 64, 4, 4, 96), (128, 64, 6, 4, 96), (128, 64, 6, 4, 120))
        ]
        line = [f"M={m} N={n} K={k}: cuBLAS {base * 1e3:.1f} us |"]
        for name, fn in arms:
            try:
                err = ((fn().float() - ref).norm() / ref.norm()).item()
                ms = bench(fn)
            except Exception as exc:  # an arm that does not compile or launch: say so, go on
                line.append(f" {name} FAIL {type(exc).__name__}: {str(exc)[:150]}")
                continue
            line.append(f" {name} {base / ms:.2f}x{'' if err < 1e-2 else f' ERR {err:.1e}'}")
        print("".join(line), flush=True)


if __name__ == "__main__":
    main()
