"""Lab (offline SASS: 395 instead of 489 loop instructions per two K tiles of the 16-token tile; not yet run on a GPU):
the Gluon kernel's small token tiles in their offset-MMA form (``gluon_w4a16.plan(..., offset_mma=True)``) against
the shipped form, at M = 1-64.

The shipped tiles make each A pair with a shift, a ``lop3`` into the mantissas of 2**7, an FMA that removes the offset
and one that multiplies by the scale (4 instructions per pair; at small M the MMA is cheap and these issue slots bound
the kernel, most of all on the H200, whose faster memory leaves the issue rate as the limit). The offset-MMA form
keeps only the shift and the ``lop3`` (A = magic + u, exact), subtracts the offset with a second MMA whose A is the
constant -(magic + 8) in shared memory (written once per program), and scales each K tile's fp32 product per row as it
adds it to the accumulator (a K tile never spans two groups). Same tile, same split, both forms in one process, each
checked against dequantize + matmul (fp32) and timed as the tuner times (CUDA-graph replay over weight copies cycled
past L2), with cuBLAS bf16 beside them; per shape the best split of each form, then one decoder layer's 7 linears
summed:

    PYTHONSAFEPATH=1 PYTHONPATH=$PWD python benchmarks/offset_lab.py   # on a Hopper GPU; ~3 minutes
"""

from __future__ import annotations

import argparse
import time

import torch

from grace_quant.kernels import gluon_w4a16 as gw
from grace_quant.kernels.dispatch import m_bucket
from grace_quant.kernels.reference import dequantize
from grace_quant.kernels.timing import dense_time_us, graph_time_us, w4_copies
from grace_quant.kernels.tuner import WGMMA_SMALL_SPACE

LAYERS = {  # (N, K) of one decoder layer's linears, with how many of each (q, k, v, o / gate, up / down)
    "LLaVA-1.5-7B": ((4096, 4096, 4), (11008, 4096, 2), (4096, 11008, 1)),
    "Qwen2-VL-2B": ((1536, 1536, 2), (256, 1536, 2), (8960, 1536, 2), (1536, 8960, 1)),
}
MS = (4, 16, 1, 64, 2, 8, 32)
ARMS = {"shipped": 0, "offset-MMA x2": 2, "offset-MMA x4": 4}
"""The forms raced: the shipped tiles, the offset-MMA form with 2 and with 4 K tiles per loop iteration."""


def candidates(m: int) -> list[tuple[tuple[int, int, int, int], int]]:
    """The ``(tile, split)`` pairs the tuner races for the Gluon kernel at ``m`` tokens
    (``kernels.tuner.WGMMA_SMALL_SPACE``): every form is timed on the same ones."""
    return [(gw.tile_of(config), config.get("split", 1)) for config in WGMMA_SMALL_SPACE[m_bucket(m)]]


def best_us(n: int, k: int, m: int, offset_mma: int, copies, x, ref) -> tuple[float, str]:
    """The fastest (tile, split) of one form for this shape: (us per call, which); wrong candidates are reported."""
    best, which = float("inf"), ""
    for tile, split in candidates(m):
        if split > k // 128:
            continue
        run = gw.plan(torch.bfloat16, n, k, 128, False, tile, split, offset_mma=offset_mma)
        err = ((run(x, *copies[0], None).float() - ref).norm() / ref.norm()).item()
        if not err < 1e-2:
            print(f"  WRONG: M={m} N={n} K={k} tile {tile[:3]} split {split} offset_mma={offset_mma}: {err:.1e}")
            continue
        us = graph_time_us([lambda p=p, s=s, r=run: r(x, p, s, None) for p, s in copies])
        if us < best:
            best, which = us, f"{tile[0]}/{tile[2]}/s{split}"
    return best, which


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ms", default=",".join(map(str, MS)), help="token counts, comma-separated")
    parser.add_argument("--models", nargs="+", choices=tuple(LAYERS), default=tuple(LAYERS))
    parser.add_argument("--deadline-s", type=float, default=400)
    args = parser.parse_args()
    start = time.time()
    print(f"{torch.cuda.get_device_name()}: us per call (CUDA-graph replay past L2), ratio to cuBLAS bf16", flush=True)
    for m in (int(v) for v in args.ms.split(",")):
        for model in args.models:
            layer = LAYERS[model]
            sums = [0.0] * (1 + len(ARMS))
            for n, k, count in layer:
                if time.time() - start > args.deadline_s:
                    print("deadline reached", flush=True)
                    return
                copies = w4_copies(n, k, 128, torch.bfloat16, "cuda")
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = x.float() @ dequantize(*copies[0], 128, 4).float().T
                base = dense_time_us(n, k, m, torch.bfloat16)
                results = [best_us(n, k, m, unroll, copies, x, ref) for unroll in ARMS.values()]
                for i, us in enumerate([base] + [us for us, _ in results]):
                    sums[i] += count * us
                cells = " | ".join(
                    f"{arm} {us:.1f} ({base / us:.2f}x, {which})"
                    for arm, (us, which) in zip(ARMS, results, strict=True)
                )
                print(f"M={m} {model} N={n} K={k}: cuBLAS {base:.1f} | {cells}", flush=True)
            ratios = " | ".join(f"{arm} {sums[0] / us:.2f}x" for arm, us in zip(ARMS, sums[1:], strict=True))
            print(f"M={m} {model} layer: cuBLAS {sums[0]:.1f} us | {ratios}", flush=True)


if __name__ == "__main__":
    main()
