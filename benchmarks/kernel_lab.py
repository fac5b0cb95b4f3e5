"""Kernel lab: candidate W4A16 kernels at a grid of launch configurations against cuBLAS bf16, the shipped dispatch
and dequantize + cuBLAS, for the LLaVA-1.5-7B / Qwen2-VL-2B layer shapes: the pipelined GEMV at M <= 4 (as tuned
entries, through ``linear_with_config``; a step that does not tile K is skipped) and dequantize + cuBLAS in L2-sized
chunks at M >= 128. Results and what earlier runs tried: benchmarks/results/kernel_lab_h100.md.

    python benchmarks/kernel_lab.py --out /tmp/lab --ms 1,4,16,64,256,1024
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from grace_quant.kernels import triton_w4a16 as tk
from grace_quant.kernels.reference import dequantize
from grace_quant.kernels.timing import dense_time_us, graph_time_us, w4_copies

SHAPES = {
    "llava-1.5-7b": [((4096, 4096), 4), ((4096, 11008), 2), ((11008, 4096), 1)],
    "qwen2-vl-2b": [((1536, 1536), 2), ((1536, 256), 2), ((1536, 8960), 2), ((8960, 1536), 1)],
}


GEMV_GRID = [  # block_n, block_j, num_warps, num_stages, target_programs_per_sm
    (4, 32, 2, 4, 8), (4, 64, 2, 4, 8), (8, 32, 4, 4, 4), (8, 64, 4, 4, 4), (8, 64, 4, 6, 4), (16, 32, 4, 4, 4),
    (16, 64, 4, 4, 4), (8, 64, 2, 4, 8), (4, 64, 4, 5, 8), (16, 64, 8, 4, 2), (8, 128, 4, 3, 4), (32, 32, 4, 4, 2),
]


def variants(m: int) -> list[tuple[str, dict[str, int]]]:
    """(kind, launch configuration) worth timing at ``m`` tokens."""
    if m <= 4:
        return [
            ("gemv", dict(block_n=bn, block_j=bj, num_warps=w, num_stages=st, target_programs_per_sm=tp))
            for bn, bj, w, st, tp in GEMV_GRID
        ]
    if m >= 128:
        return [("chunk", dict(rows=r)) for r in (1024, 2048, 4096)]
    return []


def chunked(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, rows: int) -> torch.Tensor:
    """Dequantize + cuBLAS over ``rows`` output rows at a time: each dequantized chunk stays in L2 for its GEMM."""
    n = packed.shape[0]
    y = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    for c0 in range(0, n, rows):
        w = tk.dequantize_w4(packed[c0 : c0 + rows], scales[c0 : c0 + rows], 128, x.dtype)
        torch.mm(x, w.t(), out=y[:, c0 : c0 + rows])
    return y


def run(kind: str, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, v: dict[str, int]) -> torch.Tensor:
    if kind == "gemv":
        return tk.linear_with_config(x, packed, scales, None, 128, "gemv", v)
    return chunked(x, packed, scales, v["rows"])


def label(kind: str, v: dict[str, int]) -> str:
    return kind + " " + " ".join(f"{a}={b}" for a, b in v.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ms", default="1,2,4,256,576,1024")
    parser.add_argument("--models", nargs="+", default=list(SHAPES))
    parser.add_argument("--out", default="lab_out")
    parser.add_argument("--deadline-s", type=float, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = []
    print(f"# kernel lab {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}", flush=True)  # fmt: skip
    for model in args.models:
        for (k, n), count in SHAPES[model]:
            copies = w4_copies(n, k, 128, dtype, "cuda")
            for m in [int(v) for v in args.ms.split(",")]:
                if time.perf_counter() - start > args.deadline_s:
                    print(f"deadline: {model} {k}x{n} M={m} skipped", flush=True)
                    continue
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                ref = x.double() @ dequantize(*copies[0], 128, 4).double().T
                row = {"model": model, "k": k, "n": n, "m": m, "count": count}
                row["bf16"] = dense_time_us(n, k, m, dtype)
                row["ours"] = graph_time_us([lambda p=p, s=s, x=x: tk.w4a16_linear(x, p, s, None, 128) for p, s in copies])
                row["deq"] = graph_time_us(
                    [lambda p=p, s=s, x=x: F.linear(x, tk.dequantize_w4(p, s, 128, dtype)) for p, s in copies]
                )
                row["lab"] = {}
                for kind, v in variants(m):
                    if kind == "gemv" and not tk.supports_pipe(x, copies[0][1], 128, v["block_j"]):
                        continue  # linear_with_config would time the heuristic's kernel instead
                    try:
                        y = run(kind, x, *copies[0], v)
                        err = ((y.double() - ref).norm() / ref.norm()).item()
                        if not err < 1e-2:
                            row["lab"][label(kind, v)] = f"wrong {err:.2e}"
                            continue
                        row["lab"][label(kind, v)] = graph_time_us(
                            [lambda p=p, s=s, x=x, v=v, kind=kind: run(kind, x, p, s, v) for p, s in copies]
                        )
                    except Exception as exc:  # noqa: BLE001 - a lab: report and go on (shared memory, etc.)
                        row["lab"][label(kind, v)] = f"{type(exc).__name__}: {str(exc)[:80]}"
                timed = {a: b for a, b in row["lab"].items() if isinstance(b, float)}
                best = min(timed, key=timed.get) if timed else None
                row["best"] = best
                print(
                    f"{model} {k}x{n} M={m}: bf16 {row['bf16']:.1f} ours {row['ours']:.1f} ({row['bf16'] / row['ours']:.2f}x) "
                    f"deq {row['deq']:.1f} | lab best {best} {timed.get(best, float('nan')):.1f} "
                    f"({row['bf16'] / timed[best] if best else float('nan'):.2f}x)",
                    flush=True,
                )  # fmt: skip
                rows.append(row)
            del copies
            torch.cuda.empty_cache()
    (out / "kernel_lab.json").write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    # per-layer sums at each M
    for model in args.models:
        for m in sorted({r["m"] for r in rows}):
            rs = [r for r in rows if r["model"] == model and r["m"] == m]
            if len(rs) != len(SHAPES[model]):
                continue
            tot = {a: sum(r[a] * r["count"] for r in rs) for a in ("bf16", "ours", "deq")}
            bestp = sum(
                min([t for t in r["lab"].values() if isinstance(t, float)] + [r["ours"]]) * r["count"] for r in rs
            )
            print(f"LAYER {model} M={m}: bf16 {tot['bf16']:.1f} ours {tot['ours']:.1f} ({tot['bf16'] / tot['ours']:.2f}x) "
                  f"deq {tot['deq']:.1f} ({tot['bf16'] / tot['deq']:.2f}x) best(ours,lab) {bestp:.1f} "
                  f"({tot['bf16'] / bestp:.2f}x)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
