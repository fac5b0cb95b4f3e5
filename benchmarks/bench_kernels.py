"""GPU benchmark of the W4A16 kernels against cuBLAS bf16/fp16, torch's tinygemm and dequantize + cuBLAS.

Every arm is timed the same way: a CUDA graph of one call per weight copy, with enough copies (~128 MB, `kernels.timing`) that
the weights come from HBM rather than L2; the per-call time is the median over graph replays. Writes a markdown report
(``--out``/kernels_h200.md) and prints it. Run from the repository root: ``python benchmarks/bench_kernels.py --out DIR``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F


def _import_kernels():
    """The repo's ``kernels`` package from a checkout, else the installed ``grace_quant.kernels``."""
    root = Path(__file__).resolve().parents[1]
    if (root / "kernels" / "triton_w4a16.py").exists():
        sys.path.insert(0, str(root))
        import kernels
    else:
        import grace_quant.kernels as kernels
    return kernels


K = _import_kernels()
TW = importlib.import_module(K.__name__ + ".triton_w4a16")
TIMING = importlib.import_module(K.__name__ + ".timing")
graph_time_us, copies_for = TIMING.graph_time_us, TIMING.copies_for

SHAPES = {  # (K, N) per model, with how many times each appears in one decoder layer
    "LLaVA-1.5-7B": [((4096, 4096), 4), ((4096, 11008), 2), ((11008, 4096), 1)],
    "Qwen2-VL-2B": [((1536, 1536), 2), ((1536, 256), 2), ((1536, 8960), 2), ((8960, 1536), 1)],
}
MS = (1, 2, 4, 8, 16, 32, 64, 256, 2048)
GROUP = 128
TARGETS = {1: 3.0, 16: 1.8, 64: 1.2}  # layer-sum ratio to cuBLAS bf16; M >= 256: 0.95 (per-layer sums too)


# ----------------------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------------------


def copy_tbps() -> float:
    """Measured copy bandwidth, the memory ceiling the W4 kernels are judged against."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / graph_time_us([lambda: dst.copy_(src)] * 4) / 1e6


def random_w4(n: int, k: int, dtype: torch.dtype, device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed weight and scales in GRACE's format (packing done on the GPU for speed)."""
    codes = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=device)
    packed = K.pack(codes, 4)
    scales = (torch.rand(n, k // GROUP, device=device) * 0.02 + 0.002).to(dtype)
    return packed, scales


def w4_bytes(n: int, k: int) -> int:
    return n * k // 2 + n * (k // GROUP) * 2


# ----------------------------------------------------------------------------------------------------------------
# arms
# ----------------------------------------------------------------------------------------------------------------


def arm_dense(n: int, k: int, m: int, dtype: torch.dtype) -> float:
    weights = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(copies_for(n * k * 2))]
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    return graph_time_us([lambda w=w: F.linear(x, w) for w in weights])


def arm_tinygemm(n: int, k: int, m: int) -> float | None:
    try:
        copies = []
        for _ in range(copies_for(w4_bytes(n, k))):
            w = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
            w_u8 = (w[:, ::2] << 4 | w[:, 1::2]).to(torch.uint8)
            packed = torch._convert_weight_to_int4pack(w_u8, 8)
            sz = torch.randn(k // GROUP, n, 2, device="cuda", dtype=torch.bfloat16) * 0.01
            copies.append((packed, sz))
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        return graph_time_us([lambda p=p, s=s: torch._weight_int4pack_mm(x, p, GROUP, s) for p, s in copies])
    except Exception as exc:  # noqa: BLE001  (any failure: report n/a)
        print(f"  tinygemm n/a for {k}x{n} M={m}: {type(exc).__name__}: {str(exc)[:120]}")
        return None


def w4_copies(n: int, k: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [random_w4(n, k, dtype) for _ in range(copies_for(w4_bytes(n, k)))]


def arm_w4(fn: Callable, copies, k: int, m: int, dtype: torch.dtype) -> float:
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    return graph_time_us([lambda p=p, s=s: fn(x, p, s) for p, s in copies])


def ours(x, p, s):
    return K.w4a16_linear_op(x, p, s, None, GROUP)


def deq_cublas(x, p, s):
    return F.linear(x, TW.dequantize_w4(p, s, GROUP, x.dtype))


def tc_forced(x, p, s):
    return TW.tc_gemm_w4a16(x, p, s, None, GROUP)


def gemv_forced(x, p, s):
    return TW.gemv_w4a16(x, p, s, None, GROUP)


def path_of(m: int) -> str:
    if m <= TW.GEMV_DISPATCH_MAX_M:
        return "gemv"
    if m <= TW.TC_MAX_M:
        return "tc"
    return "deq+cuBLAS"


# ----------------------------------------------------------------------------------------------------------------
# checks and sweeps
# ----------------------------------------------------------------------------------------------------------------


def rel_err_fp64(y: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> float:
    q = K.unpack(packed, 4).double()
    w = (q.view(q.shape[0], -1, GROUP) * scales.double().unsqueeze(-1)).view(q.shape[0], -1)
    ref = x.double() @ w.T
    return ((y.double() - ref).norm() / ref.norm()).item()


def correctness(lines: list[str]) -> bool:
    ok = True
    lines.append("## Correctness (ours vs fp64 reference, relative L2)\n")
    lines.append("| K x N | dtype | M | path | rel err | ok |")
    lines.append("|---|---|---|---|---|---|")
    for (k, n), _ in [s for v in SHAPES.values() for s in v]:
        dtypes = (torch.bfloat16, torch.float16) if (k, n) in ((4096, 4096), (1536, 256)) else (torch.bfloat16,)
        for dtype in dtypes:
            packed, scales = random_w4(n, k, dtype)
            for m in (1, 3, 16, 64, 256):
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
                del y  # poison the allocator block the op is likely to reuse
                y = ours(x, packed, scales)
                err = rel_err_fp64(y, x, packed, scales)
                tol = 5e-3 if dtype == torch.bfloat16 else 1e-3
                good = math.isfinite(err) and err < tol
                ok &= good
                name = str(dtype).removeprefix("torch.")
                lines.append(f"| {k}x{n} | {name} | {m} | {path_of(m)} | {err:.2e} | {'yes' if good else 'FAIL'} |")
    lines.append("")
    return ok


def sweep(lines: list[str]) -> None:
    """Time alternative fixed configs of the GEMV (M = 1, 2) and the tensor-core GEMM (M = 16, 64); an empty
    config is the shipped heuristic."""
    gemv_cfgs = [
        (1, dict(block_n=8, step_k=512, num_warps=4)),
        (1, dict(block_n=8, step_k=512, num_warps=2)),
        (1, dict(block_n=4, step_k=512, num_warps=2)),
        (1, dict(block_n=4, step_k=512, num_warps=1)),
        (1, dict(block_n=8, step_k=1024, num_warps=4)),
        (1, dict(block_n=16, step_k=512, num_warps=4, splits=1)),
        (2, dict(block_n=8, step_k=512, num_warps=4)),
        (2, dict(block_n=8, step_k=512, num_warps=2)),
    ]
    tc_cfgs = [
        (16, dict()),
        (16, dict(num_stages=4)),
        (16, dict(block_n=128, num_stages=3)),
        (64, dict()),
        (64, dict(num_stages=3)),
    ]
    shapes = [(4096, 4096), (4096, 11008), (11008, 4096), (1536, 256), (1536, 8960), (8960, 1536)]
    lines.append("## Config sweep (bf16, g128, us per call)\n")
    header = "| kernel | M | config | " + " | ".join(f"{k}x{n}" for k, n in shapes) + " |"
    lines.append(header)
    lines.append("|" + "---|" * (3 + len(shapes)))
    copies = {s: w4_copies(s[1], s[0], torch.bfloat16) for s in shapes}
    for name, fn, cfgs in (("gemv", TW.gemv_w4a16, gemv_cfgs), ("tc", TW.tc_gemm_w4a16, tc_cfgs)):
        for m, cfg in cfgs:
            cells = []
            for k, n in shapes:
                try:
                    t = arm_w4(lambda x, p, s, cfg=cfg, fn=fn: fn(x, p, s, None, GROUP, **cfg), copies[(k, n)], k, m,
                               torch.bfloat16)  # fmt: skip
                    cells.append(f"{t:.1f}")
                except Exception as exc:  # noqa: BLE001
                    cells.append(f"err {type(exc).__name__}")
            cfg_s = ",".join(f"{a}={b}" for a, b in cfg.items()) or "shipped heuristic"
            lines.append(f"| {name} | {m} | {cfg_s} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    lines.append("")


# ----------------------------------------------------------------------------------------------------------------
# main table
# ----------------------------------------------------------------------------------------------------------------


def fmt_ratio(base: float, t: float | None) -> str:
    return "n/a" if t is None else f"{t:.1f} ({base / t:.2f}x)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results", help="folder for kernels_h200.md")
    parser.add_argument("--sweep", action="store_true", help="also time alternative kernel configs")
    parser.add_argument("--ms", default=",".join(map(str, MS)), help="comma-separated token counts")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/bench_kernels.py needs a CUDA GPU")
    import triton

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    ms = [int(v) for v in args.ms.split(",")]
    props = torch.cuda.get_device_properties(0)
    lines = [
        "# W4A16 kernel benchmark\n",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- GPU: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
        f"triton {triton.__version__}, CUDA {torch.version.cuda}",
        "- method: CUDA-graph replay of one call per weight copy, copies rotated past L2 "
        f"({TIMING.ROTATE_BYTES >> 20} MB per arm, at most {TIMING.MAX_COPIES} copies), median of 15 replays; weights are INT4 g128 with bf16 scales; 'ours' is the "
        "`grace_quant::w4a16_linear` custom op (bf16); ratios are to cuBLAS bf16 `F.linear` in the same run.",
    ]
    lines.append(f"- device-to-device copy: {copy_tbps():.2f} TB/s (1 GiB, read + write counted)\n")
    print("\n".join(lines), flush=True)

    ok = correctness(lines)
    print("\n".join(lines[-30:]), flush=True)
    if args.sweep:
        sweep(lines)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def flush() -> None:  # a partial report survives a killed run
        (out / "kernels_h200.md").write_text("\n".join(lines) + "\n")

    flush()
    results: dict[tuple[str, int, int, int], dict[str, float | None]] = {}
    lines.append("## Per-linear times (us; ratio to cuBLAS bf16)\n")
    lines.append(
        "| model | K x N | M | bf16 | fp16 | tinygemm | deq+cuBLAS | gemv forced | tc forced | ours | ours path "
        "| ours TB/s |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, shapes in SHAPES.items():
        for (k, n), _ in shapes:
            copies = w4_copies(n, k, torch.bfloat16)
            for m in ms:
                r: dict[str, float | None] = {}
                r["bf16"] = arm_dense(n, k, m, torch.bfloat16)
                r["fp16"] = arm_dense(n, k, m, torch.float16)
                r["tinygemm"] = arm_tinygemm(n, k, m) if m <= 256 else None
                r["deq"] = arm_w4(deq_cublas, copies, k, m, torch.bfloat16)
                r["gemv"] = arm_w4(gemv_forced, copies, k, m, torch.bfloat16) if m <= TW.GEMV_MAX_M else None
                r["tc"] = arm_w4(tc_forced, copies, k, m, torch.bfloat16) if m >= 2 else None
                r["ours"] = arm_w4(ours, copies, k, m, torch.bfloat16)
                results[(model, k, n, m)] = r
                base = r["bf16"]
                tbps = (w4_bytes(n, k) + 2 * m * (k + n)) / r["ours"] / 1e6
                lines.append(
                    f"| {model} | {k}x{n} | {m} | {base:.1f} | {fmt_ratio(base, r['fp16'])} | "
                    f"{fmt_ratio(base, r['tinygemm'])} | {fmt_ratio(base, r['deq'])} | {fmt_ratio(base, r['gemv'])} | "
                    f"{fmt_ratio(base, r['tc'])} | "
                    f"**{fmt_ratio(base, r['ours'])}** | {path_of(m)} | {tbps:.2f} |"
                )
                print(lines[-1], flush=True)
            del copies
            torch.cuda.empty_cache()
            flush()
    lines.append("")

    lines.append("## One decoder layer's 7 linears, summed (us; ratio to cuBLAS bf16)\n")
    lines.append("| model | M | bf16 | fp16 | tinygemm | deq+cuBLAS | ours | target | met |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for model, shapes in SHAPES.items():
        for m in ms:
            sums: dict[str, float | None] = {}
            for arm in ("bf16", "fp16", "tinygemm", "deq", "ours"):
                vals = [results[(model, k, n, m)][arm] for (k, n), _ in shapes]
                counts = [c for _, c in shapes]
                sums[arm] = (
                    None if any(v is None for v in vals) else sum(v * c for v, c in zip(vals, counts, strict=True))
                )
            base = sums["bf16"]
            if m == 1:
                target = 3.0 if model.startswith("LLaVA") else 2.2
            else:
                target = TARGETS.get(m, 0.95 if m >= 256 else None)
            ratio = base / sums["ours"]
            met = "-" if target is None else ("yes" if ratio >= target else f"no ({ratio / target:.0%} of target)")
            lines.append(
                f"| {model} | {m} | {base:.1f} | {fmt_ratio(base, sums['fp16'])} | {fmt_ratio(base, sums['tinygemm'])} "
                f"| {fmt_ratio(base, sums['deq'])} | **{fmt_ratio(base, sums['ours'])}** | "
                f"{'-' if target is None else f'{target:.2f}x'} | {met} |"
            )
    lines.append("")
    lines.append(f"Correctness check: {'passed' if ok else 'FAILED'}.")
    flush()
    print("\n".join(lines))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
