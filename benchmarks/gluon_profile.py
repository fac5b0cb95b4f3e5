"""One launch each of the Gluon W4A16 kernel (128- and 256-token pipelined tiles) and of cuBLAS bf16 on one shape, for
Nsight Compute: what bounds the kernel (tensor-pipe activity, shared-memory wavefronts, warp stalls) next to cuBLAS.

Warm-up (compiles) runs before the profiler range, so only the measured launches are profiled:

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section WarpStateStats \\
        python benchmarks/gluon_profile.py --m 2048 --n 22016 --k 4096
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from grace_quant.kernels import gluon_w4a16 as gw
from grace_quant.kernels.timing import random_w4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, default=2048)
    parser.add_argument("--n", type=int, default=22016)
    parser.add_argument("--k", type=int, default=4096)
    args = parser.parse_args()
    dtype, group = torch.bfloat16, 128
    packed, scales = random_w4(args.n, args.k, group, dtype, "cuda")
    x = torch.randn(args.m, args.k, device="cuda", dtype=dtype)
    dense = torch.randn(args.n, args.k, device="cuda", dtype=dtype)
    arms = [
        ("cublas-bf16", lambda: F.linear(x, dense)),
        ("gluon-128x128x4-pipe", lambda: gw.wgmma_w4a16(x, packed, scales, None, group, block_m=128, stages=4)),
        ("gluon-256x128x3-pipe", lambda: gw.wgmma_w4a16(x, packed, scales, None, group, block_m=256, stages=3)),
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
    print(f"profiled {[name for name, _ in arms]} at M={args.m} N={args.n} K={args.k} on {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
