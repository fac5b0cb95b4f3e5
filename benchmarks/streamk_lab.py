"""Lab (not yet run on a GPU; compiled offline for sm_90): the Gluon W4A16 tile kernel's stream-K schedule
(``gluon_w4a16._sk_kernel``, ``pipe`` :data:`~grace_quant.kernels.gluon_w4a16.SK`).

At 256-600 tokens the shipped tiles leave SMs idle: LLaVA-1.5-7B's gate|up at 256 tokens is 172 output tiles of
256 x 128 on 132 SMs (two rounds, the second 30% full), q|k|v 96, o and down 32 (split-K fills those, at the price of
fp32 partials for every tile). Stream-K gives every program the same number of K tiles of the whole problem: program
``p`` runs K tiles ``[p L, (p + 1) L)`` of the row of all output tiles (each ``K / 128`` K tiles long, token tiles
fastest), so a program finishes one tile's tail, runs whole tiles, and starts the next tile's head. A tile run whole is
stored directly; a tile cut between programs has each piece's fp32 partial written to the piece's slot (two per
program: its first and its last tile) and the last piece to arrive adds them in program order (deterministic), adds
the bias and stores. One ring of shared-memory stages and its barriers serve all of a program's pieces (the ring
position carries over, so no barrier is re-initialized); each piece runs the shipped pipelined loop
(``gluon_w4a16._pipe_step``: one MMA in flight, K tiles in pairs).

Against the shipped tiles and splits and cuBLAS bf16 on LLaVA-1.5-7B's fused shapes (q|k|v, o, gate|up, down) at 256,
600 and 2048 tokens, every arm checked against dequantize + matmul (fp32), timed as the tuner times (CUDA-graph
replay over weight copies cycled past L2); per M, the layer's sum with the best shipped arm per shape and with the
best of both:

    PYTHONSAFEPATH=1 PYTHONPATH=$PWD python benchmarks/streamk_lab.py   # on a Hopper GPU; ~3 minutes
"""

from __future__ import annotations

import argparse
import time

import torch

from grace_quant.kernels import gluon_w4a16 as gw
from grace_quant.kernels.reference import dequantize
from grace_quant.kernels.timing import dense_time_us, graph_time_us, w4_copies

SHAPES = {"q|k|v": (12288, 4096), "o": (4096, 4096), "gate|up": (22016, 4096), "down": (4096, 11008)}  # N, K
SHIPPED = (((128, 128, 4, 1), 1), ((128, 128, 4, 1), 2), ((256, 128, 3, 1), 1), ((128, 128, 5, gw.WS), 1))
STREAM = ((128, 128, 4, gw.SK), (256, 128, 3, gw.SK))


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
            arms |= {f"SK {t[0]}/{t[2]}": gw.plan(dtype, n, k, 128, False, t) for t in STREAM}
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
