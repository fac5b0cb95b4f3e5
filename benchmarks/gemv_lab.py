"""Lab: the Gluon GEMV (``grace_quant.kernels.gluon_gemv``) against cuBLAS bf16 and the shipped dispatch at 1-4
tokens, timed as the tuner times (CUDA-graph replay over weight copies cycled past L2), each configuration and split
checked against dequantize + matmul (fp32) first.

    PYTHONSAFEPATH=1 PYTHONPATH=$PWD python benchmarks/gemv_lab.py   # on an NVIDIA GPU; ~3-5 minutes

``--ncu M,N,K``: one launch each of cuBLAS bf16, the shipped dispatch and the Gluon GEMV (``--config R,C,W,S``)
inside the profiler range, for ``ncu --profile-from-start off``.
"""

from __future__ import annotations

import argparse
import time

import torch

from grace_quant.kernels import gluon_gemv as gg
from grace_quant.kernels import w4a16_linear_op
from grace_quant.kernels.reference import dequantize
from grace_quant.kernels.timing import dense_time_us, graph_time_us, random_w4, w4_copies

SHAPES = {  # (N, K): each model's identical-shape layer linears, then the fused ones it runs
    "llava": ((4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096), (22016, 4096)),
    "qwen": ((1536, 1536), (256, 1536), (8960, 1536), (1536, 8960), (2048, 1536), (17920, 1536)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ms", default="1,2,4")
    parser.add_argument("--models", default="llava,qwen")
    parser.add_argument("--splits", default="1,2,4,8")
    parser.add_argument("--deadline-s", type=float, default=420)
    parser.add_argument("--ncu", default="", help="M,N,K: profile one launch per arm instead of the race")
    parser.add_argument("--config", default="4,4,4,2", help="rows,cols,warps,split of the GEMV under --ncu")
    args = parser.parse_args()
    if args.ncu:
        _profile(*(int(v) for v in args.ncu.split(",")), tuple(int(v) for v in args.config.split(",")))
        return
    start = time.time()
    dtype, group = torch.bfloat16, 128
    splits = [int(s) for s in args.splits.split(",")]
    print(f"{torch.cuda.get_device_name()}: us per call (CUDA-graph replay past L2); ratio to cuBLAS bf16", flush=True)
    for model in args.models.split(","):
        for n, k in SHAPES[model]:
            copies = w4_copies(n, k, group, dtype, "cuda")
            packed0, scales0 = copies[0]
            dense = dequantize(packed0, scales0, group, 4)
            for m in (int(v) for v in args.ms.split(",")):
                if time.time() - start > args.deadline_s:
                    print("deadline reached", flush=True)
                    return
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                ref = x.float() @ dense.float().T
                base = dense_time_us(n, k, m, dtype)
                shipped = graph_time_us(
                    [lambda p=p, s=s, x=x: w4a16_linear_op(x, p, s, None, group) for p, s in copies]
                )
                line = [
                    f"{model} N={n} K={k} M={m}: cuBLAS {base:.1f} us, shipped {shipped:.1f} ({base / shipped:.2f}x) |"
                ]
                best = (float("inf"), None)
                for config in sorted(gg.CONFIGS):
                    if not gg.supports(x, packed0, scales0, group, config[1]):
                        continue
                    for split in splits:
                        try:
                            out = gg.gemv4_w4a16(x, packed0, scales0, None, group, rows=config[0], cols=config[1],
                                                 warps=config[2], split=split)  # fmt: skip
                            err = ((out.float() - ref).norm() / ref.norm()).item()
                            us = graph_time_us([
                                lambda p=p, s=s, x=x, c=config, sp=split: gg.gemv4_w4a16(
                                    x, p, s, None, group, rows=c[0], cols=c[1], warps=c[2], split=sp)
                                for p, s in copies
                            ])  # fmt: skip
                        except Exception as exc:  # a lab arm may fail to compile or launch: say so, go on
                            line.append(f" {config}/s{split} FAIL {type(exc).__name__}: {str(exc)[:100]}")
                            continue
                        flag = "" if err < 1e-2 else f" ERR {err:.1e}"
                        line.append(f" {config[0]}x{config[1]}w{config[2]}/s{split} {base / us:.2f}x{flag}")
                        if not flag and us < best[0]:
                            best = (us, f"{config}/s{split}")
                line.append(
                    f" | best {best[1]} {best[0]:.1f} us ({base / best[0]:.2f}x, {shipped / best[0]:.2f}x shipped)"
                )
                print("".join(line), flush=True)


def _profile(m: int, n: int, k: int, config: tuple[int, ...]) -> None:
    """One launch of each arm inside the profiler range (warm-up before it)."""
    dtype, group = torch.bfloat16, 128
    (packed, scales), dense = random_w4(n, k, group, dtype, "cuda"), torch.randn(n, k, device="cuda", dtype=dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    rows, cols, warps, split = config
    arms = {
        "cublas-bf16": lambda: torch.nn.functional.linear(x, dense),
        "shipped": lambda: w4a16_linear_op(x, packed, scales, None, group),
        "gemv4": lambda: gg.gemv4_w4a16(x, packed, scales, None, group, rows=rows, cols=cols, warps=warps, split=split),
    }
    for fn in arms.values():
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for fn in arms.values():
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"profiled {list(arms)} at M={m} N={n} K={k} on {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
