"""Lab: dequantize + cuBLAS in slabs of output rows, so each dequantized bf16 slab is still in L2 when cuBLAS reads it.

At 600-2048 tokens the large path dequantizes the whole ``[N, K]`` weight to bf16 (LLaVA-1.5-7B's gate|up: 180 MB
written and read back, past the 50 MB L2) and then runs cuBLAS bf16: the dequantization is ~15% of the call at 2048
tokens and ~40% at 600 (``kernels_h200.md``). Done in slabs of ``R`` rows into one reused buffer, the written slab
is read back from L2 by the slab's GEMM (``torch.mm(x, slab.T, out=y[:, rows])``: cuBLAS writes the strided columns of
``y`` in place), so DRAM sees the INT4 weight once and the dequantization's write and read mostly stay on chip; the
buffer is ``R x K`` instead of ``N x K`` (peak memory of a prefill drops with it). ``2 streams``: the next slab's
dequantization runs on a side stream beside the current slab's GEMM (two buffers).

Against cuBLAS bf16, whole-weight dequantize + cuBLAS and the Gluon tiles, LLaVA-1.5-7B's fused shapes (q|k|v, o,
gate|up, down) and Qwen2-VL-2B's gate|up and down at 256-2048 tokens; every arm checked against dequantize + matmul
(fp32), timed as the tuner times (CUDA-graph replay over weight copies cycled past L2):

    PYTHONSAFEPATH=1 PYTHONPATH=$PWD python benchmarks/slab_lab.py   # on a Hopper GPU; ~2-3 minutes
"""

from __future__ import annotations

import argparse
import time

import torch

from grace_quant.kernels import gluon_w4a16 as gw
from grace_quant.kernels import triton_w4a16 as tw
from grace_quant.kernels.reference import dequantize
from grace_quant.kernels.timing import dense_time_us, graph_time_us, w4_copies

SHAPES = {
    "llava q|k|v": (12288, 4096), "llava o": (4096, 4096), "llava gate|up": (22016, 4096), "llava down": (4096, 11008),
    "qwen gate|up": (17920, 1536), "qwen down": (1536, 8960),
}  # fmt: skip
GROUP = 128
TILES = (((256, 128, 3, 1), 1), ((128, 128, 5, gw.WS), 1))


def slab_linear(rows: int, buffers: list[torch.Tensor], side: torch.cuda.Stream | None):
    """``x @ W^T`` in slabs of ``rows`` output rows; ``side``: dequantize the next slab on that stream."""

    def run(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        n = packed.shape[0]
        y = x.new_empty((x.shape[0], n))
        starts = list(range(0, n, rows))
        if side is None:
            for r0 in starts:
                w = tw.dequantize_w4(packed[r0 : r0 + rows], scales[r0 : r0 + rows], GROUP, x.dtype, buffers[0])
                torch.mm(x, w.T, out=y[:, r0 : r0 + w.shape[0]])
            return y
        main = torch.cuda.current_stream()
        done = [torch.cuda.Event(), torch.cuda.Event()]  # slab i's GEMM finished with buffer i % 2
        ready = torch.cuda.Event()
        w = tw.dequantize_w4(packed[:rows], scales[:rows], GROUP, x.dtype, buffers[0])
        for i, r0 in enumerate(starts):
            nxt = None
            if i + 1 < len(starts):
                r1 = starts[i + 1]
                side.wait_stream(main) if i == 0 else side.wait_event(done[(i + 1) % 2])
                with torch.cuda.stream(side):
                    nxt = tw.dequantize_w4(
                        packed[r1 : r1 + rows], scales[r1 : r1 + rows], GROUP, x.dtype, buffers[(i + 1) % 2]
                    )
                    ready.record(side)
            torch.mm(x, w.T, out=y[:, r0 : r0 + w.shape[0]])
            done[i % 2].record(main)
            if nxt is not None:
                main.wait_event(ready)
                w = nxt
        return y

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ms", default="256,600,1024,2048")
    parser.add_argument("--rows", default="1024,2048,4096")
    parser.add_argument("--deadline-s", type=float, default=200)
    args = parser.parse_args()
    start, dtype = time.time(), torch.bfloat16
    rows_list = [int(v) for v in args.rows.split(",")]
    side = torch.cuda.Stream()
    print(f"{torch.cuda.get_device_name()}: us per call (CUDA-graph replay past L2), ratio to cuBLAS bf16", flush=True)
    for m in (int(v) for v in args.ms.split(",")):
        sums: dict[tuple[str, str], float] = {}
        for name, (n, k) in SHAPES.items():
            if time.time() - start > args.deadline_s:
                print("deadline reached", flush=True)
                return
            copies = w4_copies(n, k, GROUP, dtype, "cuda")
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = x.float() @ dequantize(*copies[0], GROUP, 4).float().T
            base = dense_time_us(n, k, m, dtype)
            arms = {"deq full": lambda x, p, s: torch.nn.functional.linear(x, tw.dequantize_w4(p, s, GROUP, x.dtype))}
            for r in rows_list:
                bufs = [torch.empty(r, k, device="cuda", dtype=dtype) for _ in range(2)]
                arms[f"slab {r}"] = slab_linear(r, bufs[:1], None)
                arms[f"slab {r} 2s"] = slab_linear(r, bufs, side)
            for t, s in TILES:
                plan = gw.plan(dtype, n, k, GROUP, False, t, s)
                arms[f"gluon {t[0]}/{t[2]}/p{t[3]}"] = lambda x, p, s, plan=plan: plan(x, p, s, None)
            line = [f"M={m} {name} N={n} K={k}: cuBLAS {base:.1f} us |"]
            model = name.split()[0]
            sums[model, "cuBLAS"] = sums.get((model, "cuBLAS"), 0.0) + base
            for label, run in arms.items():
                try:
                    err = ((run(x, *copies[0]).float() - ref).norm() / ref.norm()).item()
                    us = graph_time_us([lambda p=p, s=s, r=run, x=x: r(x, p, s) for p, s in copies])
                except Exception as exc:  # a lab arm may fail: say so, the race goes on
                    line.append(f" {label} FAIL {type(exc).__name__}: {str(exc)[:100]}")
                    sums[model, label] = float("nan")
                    continue
                line.append(f" {label} {us:.1f} ({base / us:.2f}x)" + ("" if err < 1e-2 else f" ERR {err:.1e}"))
                sums[model, label] = sums.get((model, label), 0.0) + (us if err < 1e-2 else float("nan"))
            print("".join(line), flush=True)
        for model in dict.fromkeys(mo for mo, _ in sums):
            arms_us = {a: us for (mo, a), us in sums.items() if mo == model}
            base = arms_us.pop("cuBLAS")
            print(f"M={m} {model} layer (fused shapes): cuBLAS {base:.1f} us, "
                  + ", ".join(f"{a} {base / us:.2f}x" for a, us in arms_us.items()), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
