"""Lab (not yet run on a GPU; compiled offline for sm_90): the Gluon W4A16 tile kernel with a stream-K schedule.

At 256-600 tokens the shipped tiles leave SMs idle: LLaVA-1.5-7B's gate|up at 256 tokens is 172 output tiles of
256 x 128 on 132 SMs (two rounds, the second 30% full), q|k|v 96, o and down 32 (split-K fills those, at the price of
fp32 partials for every tile). Stream-K gives every program the same number of K tiles of the whole problem: program
``p`` runs K tiles ``[p L, (p + 1) L)`` of the row of all output tiles (each ``K / 128`` K tiles long, token tiles
fastest), so a program finishes one tile's tail, runs whole tiles, and starts the next tile's head. A tile run whole is
stored directly; a tile cut between programs has each piece's fp32 partial written to the piece's slot (two per
program: its first and its last tile) and the last piece to arrive adds them in program order (deterministic), adds
the bias and stores. One ring of shared-memory stages and its barriers serve all of a program's pieces (the ring
position carries over, so no barrier is re-initialized); each piece runs the shipped pipelined loop
(``gluon_w4a16._pipe_step``'s order: one MMA in flight, K tiles in pairs) with the shipped dequantization helpers.

Against the shipped tiles and splits and cuBLAS bf16 on LLaVA-1.5-7B's fused shapes (q|k|v, o, gate|up, down) at 256,
600 and 2048 tokens, every arm checked against dequantize + matmul (fp32), timed as the tuner times (CUDA-graph
replay over weight copies cycled past L2); per M, the layer's sum with the best shipped arm per shape and with the
best of both:

    PYTHONSAFEPATH=1 PYTHONPATH=$PWD python benchmarks/streamk_lab.py   # on a Hopper GPU; ~3 minutes
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from grace_quant.kernels import gluon_w4a16 as gw
from grace_quant.kernels.gluon_w4a16 import _lane_shift, _load_tile, _pipe_step, _ring, _scales
from grace_quant.kernels.reference import dequantize
from grace_quant.kernels.timing import dense_time_us, graph_time_us, w4_copies

BN = 128  # weight rows per output tile (two warpgroups of 64)
SHAPES = {"q|k|v": (12288, 4096), "o": (4096, 4096), "gate|up": (22016, 4096), "down": (4096, 11008)}  # N, K
SHIPPED = (((128, 128, 4, 1), 1), ((128, 128, 4, 1), 2), ((256, 128, 3, 1), 1), ((128, 128, 5, gw.WS), 1))
STREAM = ((128, 4), (256, 3))  # (block_m, stages) of the stream-K arms; 128-column K tiles


@gluon.jit
def _sk_kernel(
    x_desc, w_desc, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, KG, stride_ym, K_TILES, L,
    BM: gl.constexpr, BK: gl.constexpr, GROUP: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr,
    PAIR: gl.constexpr, MMA: gl.constexpr, DOT: gl.constexpr, WORDS: gl.constexpr, OUT: gl.constexpr,
    LANE_BITS: gl.constexpr,
):  # fmt: skip
    BN: gl.constexpr = 128
    pid = gl.program_id(0)
    tiles_m = gl.cdiv(M, BM)
    start = pid * L  # this program's K tiles of the whole problem: [start, end)
    end = gl.minimum(start + L, tiles_m * (N // BN) * K_TILES)
    t_first = start // K_TILES
    shift = _lane_shift(WORDS, LANE_BITS)
    x_smem, w_smem, bars = _ring(x_desc, w_desc, BM, BK, STAGES)
    it = 0  # ring position: K tiles consumed by this program so far
    for t in range(t_first, (end - 1) // K_TILES + 1):
        m0 = (t % tiles_m) * BM
        n0 = (t // tiles_m) * BN
        k_lo = gl.maximum(start - t * K_TILES, 0)  # this piece's K tiles of tile t: [k_lo, k_hi)
        k_hi = gl.minimum(end - t * K_TILES, K_TILES)
        num_k = (k_hi - k_lo + 1) // 2 * 2  # in pairs; an odd piece's extra K tile has zero scales
        srows = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, WORDS)))
        s_rows = s_ptr + srows * KG
        sc_next = _scales(s_rows, srows, k_lo, k_hi, BK, GROUP)
        sc_after = _scales(s_rows, srows, k_lo + 1, k_hi, BK, GROUP)
        kbase = k_lo - it
        for s in gl.static_range(STAGES):
            if s < num_k:
                _load_tile(x_desc, w_desc, bars, x_smem, w_smem, m0, n0, kbase, it + s, STAGES, BK)
        acc = gl.zeros([BN, BM], gl.float32, layout=MMA)
        for kp in range(num_k // 2):
            kt = 2 * kp
            sc0 = sc_next
            sc1 = sc_after
            sc_next = _scales(s_rows, srows, k_lo + kt + 2, k_hi, BK, GROUP)
            sc_after = _scales(s_rows, srows, k_lo + kt + 3, k_hi, BK, GROUP)
            acc = _pipe_step(acc, x_desc, w_desc, bars, x_smem, w_smem, m0, n0, k_lo, kt, it + kt, num_k, sc0, shift,
                             STAGES, BK, PAIR, WORDS, DOT)  # fmt: skip
            acc = _pipe_step(acc, x_desc, w_desc, bars, x_smem, w_smem, m0, n0, k_lo, kt + 1, it + kt + 1, num_k, sc1,
                             shift, STAGES, BK, PAIR, WORDS, DOT)  # fmt: skip
        acc = warpgroup_mma_wait(0, deps=[acc])
        gl.thread_barrier()  # both warpgroups are done with the ring before the next piece's loads refill it
        it += num_k
        out = gl.convert_layout(acc, OUT)
        on = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, OUT))
        om = m0 + gl.arange(0, BM, layout=gl.SliceLayout(0, OUT))
        m_mask = gl.expand_dims(om < M, 0)
        y_ptrs = y_ptr + gl.expand_dims(om, 0) * stride_ym + gl.expand_dims(on, 1)
        if (k_lo == 0) & (k_hi == K_TILES):  # the whole tile: store it
            if HAS_BIAS:
                out = out + gl.expand_dims(gl.load(b_ptr + on).to(gl.float32), 1)
            gl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=m_mask)
        else:  # a piece: its partial to this program's slot (first tile: 2 pid, last: 2 pid + 1)
            loc = gl.expand_dims(on - n0, 1) * BM + gl.expand_dims(om - m0, 0)  # [BN, BM] within a slot
            gl.store(ws_ptr + (2 * pid + (t != t_first).to(gl.int32)) * (BN * BM) + loc, out)
            gl.thread_barrier()  # every thread's partial is written before the release below
            count = gl.atomic_add(cnt_ptr + t, 1, sem="acq_rel")
            p_first = (t * K_TILES) // L
            p_last = ((t + 1) * K_TILES - 1) // L
            if count == p_last - p_first:  # the last piece to arrive adds all, in program order
                out = gl.zeros([BN, BM], gl.float32, layout=OUT)
                for p in range(p_first, p_last + 1):
                    slot = 2 * p + (((p * L) // K_TILES) != t).to(gl.int32)
                    out += gl.load(ws_ptr + slot * (BN * BM) + loc, cache_modifier=".cg")
                if HAS_BIAS:
                    out = out + gl.expand_dims(gl.load(b_ptr + on).to(gl.float32), 1)
                gl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=m_mask)
                gl.atomic_xchg(cnt_ptr + t, 0)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(s))


def constexprs(block_m: int, stages: int, dtype: torch.dtype, has_bias: bool = False) -> dict:
    """The kernel's compile-time arguments for a ``block_m``-token tile with 128-column K tiles."""
    mma, dot, words, out = gw._layouts(block_m, 128)
    pair = gw._BF16_PAIR if dtype == torch.bfloat16 else gw._FP16_PAIR
    return dict(BM=block_m, BK=128, GROUP=128, STAGES=stages, HAS_BIAS=has_bias, PAIR=pair, MMA=mma, DOT=dot,
                WORDS=words, OUT=out, LANE_BITS=8, num_warps=8)  # fmt: skip


@functools.cache
def _scratch(programs: int, block_m: int, tiles: int, device: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two fp32 partial slots per program and one zeroed counter per output tile (the kernel resets what it uses)."""
    ws = torch.empty(2 * programs * BN * block_m, dtype=torch.float32, device=f"cuda:{device}")
    return ws, torch.zeros(tiles, dtype=torch.int32, device=f"cuda:{device}")


def stream_k(x2, packed, scales, bias, block_m: int = 256, stages: int = 3, programs: int | None = None):
    """``x2 @ W^T (+ bias)`` with the stream-K schedule over ``programs`` (default: one per SM) programs."""
    m, k = x2.shape
    n = packed.shape[0]
    tiles = triton.cdiv(m, block_m) * (n // BN)
    k_tiles = k // 128
    programs = programs or torch.cuda.get_device_properties(x2.device).multi_processor_count
    per = 2 * triton.cdiv(tiles * k_tiles, 2 * programs)  # even: pieces start on a pair of K tiles
    grid = triton.cdiv(tiles * k_tiles, per)
    ws, counters = _scratch(grid, block_m, tiles, x2.device.index)
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    x_layout, w_layout = gw._shared_layouts(block_m, 128, x2.dtype)
    _sk_kernel[(grid,)](
        TensorDescriptor.from_tensor(x2, [block_m, 128], x_layout), TensorDescriptor.from_tensor(packed, [BN, 16], w_layout),
        scales, bias if bias is not None else y, y, ws, counters, m, n, k // 128, y.stride(0), k_tiles, per,
        **constexprs(block_m, stages, x2.dtype, bias is not None),
    )  # fmt: skip
    return y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ms", default="256,600,2048")
    parser.add_argument("--deadline-s", type=float, default=240)
    args = parser.parse_args()
    start, dtype = time.time(), torch.bfloat16
    print(f"{torch.cuda.get_device_name()}: us per call (CUDA-graph replay past L2), ratio to cuBLAS bf16", flush=True)
    for m in (int(v) for v in args.ms.split(",")):
        sums = {"cuBLAS": 0.0, "shipped": 0.0, "with stream-K": 0.0}
        for name, (n, k) in SHAPES.items():
            if time.time() - start > args.deadline_s:
                print("deadline reached", flush=True)
                return
            copies = w4_copies(n, k, 128, dtype, "cuda")
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = x.float() @ dequantize(*copies[0], 128, 4).float().T
            base = dense_time_us(n, k, m, dtype)
            arms = {f"{t[0]}/{t[2]}/p{t[3]}/s{s}": gw.plan(dtype, n, k, 128, False, t, s) for t, s in SHIPPED}
            arms |= {f"SK {bm}/{st}": functools.partial(stream_k, block_m=bm, stages=st) for bm, st in STREAM}
            times, line = {}, [f"M={m} {name} N={n} K={k}: cuBLAS {base:.1f} us |"]
            for label, run in arms.items():
                try:
                    err = ((run(x, *copies[0], None).float() - ref).norm() / ref.norm()).item()
                    us = graph_time_us([lambda p=p, s=s, r=run, x=x: r(x, p, s, None) for p, s in copies])
                except Exception as exc:  # a lab arm may fail to compile or launch: say so, the race goes on
                    line.append(f" {label} FAIL {type(exc).__name__}: {str(exc)[:100]}")
                    continue
                ok = err < 1e-2
                if ok:
                    times[label] = us
                line.append(f" {label} {us:.1f} ({base / us:.2f}x)" + ("" if ok else f" ERR {err:.1e}"))
            print("".join(line), flush=True)
            shipped = [us for label, us in times.items() if not label.startswith("SK")]
            sums["cuBLAS"] += base
            sums["shipped"] += min(shipped, default=float("nan"))
            sums["with stream-K"] += min(times.values(), default=float("nan"))
        print(f"M={m} layer (4 fused linears): " + ", ".join(f"{a} {us:.1f} us" for a, us in sums.items())
              + f"; ratios to cuBLAS: shipped {sums['cuBLAS'] / sums['shipped']:.2f}x, with stream-K "
              f"{sums['cuBLAS'] / sums['with stream-K']:.2f}x", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
