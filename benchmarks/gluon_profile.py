"""One launch each of the Gluon W4A16 kernel (128- and 256-token pipelined tiles) and of cuBLAS bf16 on one shape, for
Nsight Compute: what bounds the kernel (tensor-pipe activity, shared-memory wavefronts, warp stalls) next to cuBLAS.

Warm-up (compiles) runs before the profiler range, so only the measured launches are profiled:

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section WarpStateStats \\
        python benchmarks/gluon_profile.py --m 2048 --n 22016 --k 4096

Without counters (``--probe``): each tile timed as shipped and with the dequantization's arithmetic taken out (the
words go to the MMA as they are; same loads, barriers and MMAs), against cuBLAS bf16. If the kernel without the
arithmetic is no faster, the dequantization is not what bounds it.

``--ws``: the warp-specialized persistent kernel (``pipe`` 2) against the pipelined one and cuBLAS bf16 on the
LLaVA-1.5-7B prefill shapes (256-2048 tokens), each arm checked against dequantize + matmul.

``--small``: the same kernel on token tiles of 16-64 (the weight-streaming regime of decode and small batches) with
split-K, checked against dequantize + matmul and timed against cuBLAS bf16 and the shipped dispatch.
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F
import triton

from grace_quant.kernels import gluon_w4a16 as gw
from grace_quant.kernels.timing import random_w4

_NO_MATH = "{\nmov.b32 {$0, $1}, $2;\n}"  # the shifted word as the pair: the dequantization's arithmetic left out


def _arm(x, packed, scales, group, tile, pair=None):
    """The kernel on ``tile`` through its launch plan, optionally with another pair-making PTX (``pair``)."""
    n, k = packed.shape[0], packed.shape[1] * 8
    return functools.partial(gw.plan(x.dtype, n, k, group, False, tile, pair=pair), x, packed, scales, None)


def checked_ratio(label: str, fn, ref: torch.Tensor, base_ms: float, bench) -> str:
    """`` label 1.23x`` for one arm: its output's relative error against ``ref`` (`` ERR`` from 1e-2 on) and its time
    as a ratio to ``base_ms``; an arm that does not compile or launch says so instead (the race goes on)."""
    try:
        err = ((fn().float() - ref).norm() / ref.norm()).item()
        ms = bench(fn)
    except Exception as exc:  # a lab arm may fail to compile or launch: say so, the race goes on
        return f" {label} FAIL {type(exc).__name__}: {str(exc)[:120]}"
    return f" {label} {base_ms / ms:.2f}x" + ("" if err < 1e-2 else f" ERR {err:.1e}")


def _small() -> None:
    """Token tiles of 16-64 with split-K on the LLaVA-1.5-7B shapes at M = 1-64: error vs dequantize + matmul (fp32)
    and time vs cuBLAS bf16 and the shipped dispatch (``w4a16_linear``)."""
    from grace_quant.kernels import w4a16_linear_op as w4a16_linear
    from grace_quant.kernels.reference import dequantize

    dtype, group = torch.bfloat16, 128
    bench = functools.partial(triton.testing.do_bench, warmup=25, rep=100)
    print(f"{torch.cuda.get_device_name()}: us per call (do_bench, L2 flushed); ratio to cuBLAS bf16")
    for n, k in ((4096, 4096), (22016, 4096), (4096, 11008)):
        packed, scales = random_w4(n, k, group, dtype, "cuda")
        dense = dequantize(packed, scales, group, 4)
        for m in (1, 4, 16, 64):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = x.float() @ dense.float().T
            base = bench(functools.partial(F.linear, x, dense))
            ours = bench(functools.partial(w4a16_linear, x, packed, scales, None, group))
            line = [f"N={n} K={k} M={m}: cuBLAS {base * 1e3:.1f}  shipped {base / ours:.2f}x |"]
            for bm in (16, 32, 64):
                if bm > 16 and bm > 2 * m:
                    continue
                for stages in (4, 8):
                    gw.TILES.add((bm, 128, stages, True))
                    for split in (1, 2, 4, 8):
                        fn = functools.partial(gw.wgmma_w4a16, x, packed, scales, None, group, block_m=bm,
                                               stages=stages, split=split)  # fmt: skip
                        line.append(checked_ratio(f"{bm}/{stages}/s{split}", fn, ref, base, bench))
            print("".join(line), flush=True)


def _ws() -> None:
    """Warp-specialized vs pipelined tiles at 256-2048 tokens: error vs dequantize + matmul (fp32), time vs cuBLAS."""
    from grace_quant.kernels.reference import dequantize

    dtype, group = torch.bfloat16, 128
    bench = functools.partial(triton.testing.do_bench, warmup=25, rep=150)
    tiles = [(128, 128, 4, 1), (256, 128, 3, 1)] + [t for t in sorted(gw.TILES) if t[3] == gw.WS]
    print(f"{torch.cuda.get_device_name()}: ratio to cuBLAS bf16 (do_bench, L2 flushed); tiles (bm, bk, stages, pipe)")
    for m, n, k in ((2048, 22016, 4096), (2048, 4096, 11008), (2048, 12288, 4096), (2048, 4096, 4096),
                    (600, 22016, 4096), (600, 4096, 11008), (600, 12288, 4096), (256, 22016, 4096)):  # fmt: skip
        packed, scales = random_w4(n, k, group, dtype, "cuda")
        dense = dequantize(packed, scales, group, 4)
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = x.float() @ dense.float().T
        base = bench(functools.partial(F.linear, x, dense))
        line = [f"M={m} N={n} K={k}: cuBLAS {base * 1e3:.1f} us ({2 * m * n * k / base / 1e9:.0f} TFLOP/s) |"]
        for bm, bk, stages, pipe in tiles:
            fn = functools.partial(gw.wgmma_w4a16, x, packed, scales, None, group, block_m=bm, block_k=bk,
                                   stages=stages, pipe=pipe)  # fmt: skip
            line.append(checked_ratio(f"{bm}/{stages}/p{pipe}", fn, ref, base, bench))
        print("".join(line), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, default=2048)
    parser.add_argument("--n", type=int, default=22016)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--small", action="store_true", help="small token tiles with split-K at M = 1-64")
    parser.add_argument("--ws", action="store_true", help="warp-specialized vs pipelined tiles at 256-2048 tokens")
    parser.add_argument(
        "--probe", action="store_true", help="time the tiles with and without the dequantization's math"
    )
    args = parser.parse_args()
    if args.small:
        _small()
        return
    if args.ws:
        _ws()
        return
    dtype, group = torch.bfloat16, 128
    packed, scales = random_w4(args.n, args.k, group, dtype, "cuda")
    x = torch.randn(args.m, args.k, device="cuda", dtype=dtype)
    dense = torch.randn(args.n, args.k, device="cuda", dtype=dtype)
    if args.probe:
        flops = 2 * args.m * args.n * args.k
        base = triton.testing.do_bench(lambda: F.linear(x, dense), warmup=50, rep=300)
        print(f"M={args.m} N={args.n} K={args.k} on {torch.cuda.get_device_name()}: cuBLAS bf16 {base * 1e3:.1f} us "
              f"({flops / base / 1e9:.0f} TFLOP/s)")  # fmt: skip
        for tile in ((128, 128, 4, True), (256, 128, 3, True), (128, 128, 3, False)):
            for label, pair in (("shipped", None), ("no dequant math", _NO_MATH)):
                ms = triton.testing.do_bench(_arm(x, packed, scales, group, tile, pair), warmup=50, rep=300)
                print(
                    f"  {tile} {label:16s} {ms * 1e3:8.1f} us  {base / ms:.2f}x cuBLAS  {flops / ms / 1e9:.0f} TFLOP/s"
                )
        return
    arms = [
        ("cublas-bf16", lambda: F.linear(x, dense)),
        ("gluon-128x128x4-pipe", lambda: gw.wgmma_w4a16(x, packed, scales, None, group, block_m=128, stages=4)),
        ("gluon-256x128x3-pipe", lambda: gw.wgmma_w4a16(x, packed, scales, None, group, block_m=256, stages=3)),
        ("gluon-256x128x3-ws", lambda: gw.wgmma_w4a16(x, packed, scales, None, group, block_m=256, stages=3, pipe=2)),
    ]
    for _, fn in arms:
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, fn in arms:
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(
        f"profiled {[name for name, _ in arms]} at M={args.m} N={args.n} K={args.k} on {torch.cuda.get_device_name()}"
    )


if __name__ == "__main__":
    main()
