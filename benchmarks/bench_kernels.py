"""GPU benchmark of the W4A16 kernels against cuBLAS bf16/fp16, torch's tinygemm, GemLite 0.6 and dequantize + cuBLAS.

Every arm is timed the same way: a CUDA graph of one call per weight copy, with enough copies (~128 MB, `kernels.timing`) that
the weights come from HBM rather than L2; the per-call time is the median over graph replays. Writes a markdown report
(``--out``/kernels_h200.md) and prints it. Run from the repository root: ``python benchmarks/bench_kernels.py --out DIR``.
GemLite (``pip install gemlite``, or the wheel benchmarks/h200_session.sh installs from .whl/) runs at M in
GEMLITE_MS unless ``--gemlite-all-m``; when it cannot be imported, its column says n/a and the header says why.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

import grace_quant.kernels as K
from grace_quant.kernels import dispatch, tables
from grace_quant.kernels import timing as TIMING
from grace_quant.kernels import triton_w4a16 as TW

graph_time_us, copies_for = TIMING.graph_time_us, TIMING.copies_for

SHAPES = {  # (K, N) per model, with how many times each appears in one decoder layer
    "LLaVA-1.5-7B": [((4096, 4096), 4), ((4096, 11008), 2), ((11008, 4096), 1)],
    "Qwen2-VL-2B": [((1536, 1536), 2), ((1536, 256), 2), ((1536, 8960), 2), ((8960, 1536), 1)],
}
MS = (1, 2, 4, 8, 16, 32, 64, 256, 2048)
GROUP = 128
FUSED = {  # (K, N) of the linears the GRACE model runs per decoder layer (q|k|v and gate|up fused), once each
    "LLaVA-1.5-7B": [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)],
    "Qwen2-VL-2B": [(1536, 2048), (1536, 1536), (1536, 17920), (8960, 1536)],
}
# Issue "W4A16 kernels, second generation": layer-sum ratio to cuBLAS bf16 per M, (target, resolve no lower than)
TARGETS = {
    "LLaVA-1.5-7B": {1: (3.0, 2.2), 2: (2.5, 1.9), 4: (2.5, 1.9), 8: (2.5, 1.9), 16: (2.2, 1.6), 64: (1.4, 1.1),
                     256: (1.0, 0.95), 2048: (0.97, 0.95)},
    "Qwen2-VL-2B": {1: (2.2, None), 2: (2.0, None), 4: (2.0, None), 8: (2.0, None), 16: (1.6, None), 64: (1.1, None),
                    256: (1.0, None), 2048: (0.95, None)},
}  # fmt: skip
PEERS = {
    "bf16": "cuBLAS bf16",
    "fp16": "cuBLAS fp16",
    "tinygemm": "tinygemm",
    "gemlite": "GemLite",
    "deq": "deq+cuBLAS",
}
GEMLITE_MS = (1, 16, 64)  # GemLite autotunes once per shape and M: by default only the targets' M (--gemlite-all-m)
GEMLITE_ZERO = 8  # GRACE stores u = q + 8, so GemLite's integer zero point 8 gives (u - 8) * s = q * s
GEMLITE_TOL = 6e-2  # its M = 1 GEMV adds partial sums with bf16 atomics (up to K/16 roundings: ~2e-2 at K = 11008);
# a zero point off by one already errs by >= 0.14 (a transposed scale layout or signed codes: O(1))
GEMLITE_DTYPES = {torch.bfloat16: "BF16", torch.float16: "FP16"}


# ----------------------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------------------


def copy_tbps() -> float:
    """Measured copy bandwidth, the memory ceiling the W4 kernels are judged against."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / graph_time_us([lambda: dst.copy_(src)] * 4) / 1e6


# ----------------------------------------------------------------------------------------------------------------
# arms
# ----------------------------------------------------------------------------------------------------------------


def arm_tinygemm(n: int, k: int, m: int) -> float | None:
    try:
        copies = []
        for _ in range(copies_for(TIMING.w4_bytes(n, k, GROUP))):
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


def path_of(m: int, n: int, k: int, dtype: torch.dtype = torch.bfloat16) -> str:
    """The kernel the dispatch runs for this call: the tuned table's entry for it if this GPU has one (named as
    ``grace_quant/kernels/configs/README.md`` names entries), else the path's built-in heuristic."""
    path = dispatch.path_for(m)
    config = tables.table(tables.device_name(torch.device("cuda"))).get(dispatch.key_for(m, n, k, GROUP, dtype))
    if config:
        if config.get("wgmma"):
            return f"gluon {config['block_m']}-token tile" + (", warp-specialized" if config.get("pipe") == 2 else "")
        if config.get("gemv4"):
            return "gluon gemv"
        if "tc" in config:
            return "tc (tuned)" if config["tc"] else "deq+cuBLAS"
        return "gemv (tuned)"
    return "deq+cuBLAS" if path == "large" else path


# ----------------------------------------------------------------------------------------------------------------
# GemLite
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class GemLiteArm:
    """The GemLite arm over one run: the module (None when unavailable), the M it runs at, and per shape and M the
    outcome of its checks ("" when it passed and may be timed, else the table cell)."""

    gl: ModuleType | None
    note: str
    ms: frozenset[int] = frozenset()
    budget_s: float = 0.0
    status: dict[tuple[int, int, int], str] = field(default_factory=dict)
    rows: list[str] = field(default_factory=list)
    ok: bool = True
    checks: int = 0
    exact: int = 0
    setup_s: float = 0.0


def load_gemlite(mode: str) -> tuple[ModuleType | None, str]:
    """GemLite with its autotuning set to ``mode`` (without CUDA-graph timing), or None and why not."""
    try:
        import gemlite
    except Exception as exc:  # noqa: BLE001  (any failure: report n/a)
        missing = isinstance(exc, ModuleNotFoundError) and exc.name == "gemlite"
        return None, f"n/a, {'not installed' if missing else 'import failed'} ({type(exc).__name__}: {str(exc)[:160]})"
    try:
        gemlite.set_autotune(mode, use_cuda_graph=False)  # reloads GemLite's kernel modules with that config set
    except Exception as exc:  # noqa: BLE001
        return None, f"n/a, set_autotune({mode!r}) failed ({type(exc).__name__}: {str(exc)[:160]})"
    shipped = getattr(gemlite.core, "selected_tag", None)
    cache = f"its shipped config {Path(shipped).name} loaded" if shipped else "no shipped config matches this GPU"
    return gemlite, f"GemLite {gemlite.__version__}, autotune {mode!r}, {cache}"


def gemlite_layer(gl: ModuleType, packed: torch.Tensor, scales: torch.Tensor) -> torch.nn.Module:
    """A ``GemLiteLinear`` holding the same weight as ``(packed, scales)``: unsigned codes u = q + 8, ``scales``
    [N, K/128] as given, integer zero point 8 (GemLite's "symmetric with shift", W_group_mode 3)."""
    n, k = packed.shape[0], packed.shape[1] * 8
    dtype = getattr(gl.DType, GEMLITE_DTYPES[scales.dtype])
    layer = gl.GemLiteLinear(4, group_size=GROUP, in_features=k, out_features=n, input_dtype=dtype, output_dtype=dtype)
    codes = (K.unpack(packed, 4) + GEMLITE_ZERO).to(torch.uint8)
    layer.pack(codes, scales, GEMLITE_ZERO, None)
    return layer


def gemlite_weight_check(layer: torch.nn.Module, packed: torch.Tensor, scales: torch.Tensor) -> str | None:
    """None if the layer's stored weight, unpacked by GemLite's own ``unpack_over_cols_torch`` (the layout its
    kernels read) and dequantized by its W_group_mode-3 rule (u - zero) * s, is bit for bit
    ``kernels.reference.dequantize``; else what differs."""
    from gemlite.bitpack import unpack_over_cols_torch

    n, k = packed.shape[0], packed.shape[1] * 8
    meta = (layer.W_nbits, layer.group_size, layer.elements_per_sample, layer.W_group_mode, layer.zeros.numel())
    if meta != (4, GROUP, 8, 3, 1) or int(layer.zeros) != GEMLITE_ZERO:
        zero = layer.zeros.flatten()[:1].tolist()
        return f"(bits, group, per word, W_group_mode, zeros) = {meta}, zero {zero}"
    codes = unpack_over_cols_torch(layer.W_q.t().contiguous(), 4, k, torch.uint8)  # W_q is [K/8, N], packed along K
    w = (codes.to(torch.int32) - layer.zeros).to(layer.scales.dtype).view(n, k // GROUP, GROUP)
    w = (w * layer.scales.t().unsqueeze(-1)).view(n, k)  # scales are stored [K/128, N]
    ref = K.dequantize(packed, scales, GROUP, 4)
    if not torch.equal(w, ref):
        return f"{int((w != ref).sum())} of {w.numel()} weights differ from kernels.reference.dequantize"
    return None


def gemlite_check(arm: GemLiteArm, packed: torch.Tensor, scales: torch.Tensor, m: int) -> str:
    """Check a GemLite layer of this weight (:func:`gemlite_weight_check`, then its output at M = m against fp64 in
    its first call, which autotunes this shape and M); "" if it passed, else the table cell."""
    n, k = packed.shape[0], packed.shape[1] * 8
    kernel = "?"
    try:
        kernel = arm.gl.core.get_matmul_type(m, 4)  # the kernel GemLite's forward picks for this M
        layer = gemlite_layer(arm.gl, packed, scales)
        bad = gemlite_weight_check(layer, packed, scales)
        arm.checks += 1
        if bad:
            arm.ok = False
            arm.rows.append(f"| {k}x{n} | {m} | {kernel} | weights: {bad} | - | WRONG |")
            return "WRONG weights"
        arm.exact += 1
        x = torch.randn(m, k, device="cuda", dtype=scales.dtype)
        start = time.perf_counter()
        y = layer(x)
        torch.cuda.synchronize()
        first_s = time.perf_counter() - start
        err = rel_err_fp64(y, x, packed, scales)
    except Exception as exc:  # noqa: BLE001  (any failure: report it in the cells)
        print(f"  GemLite n/a for {k}x{n} M={m}: {type(exc).__name__}: {str(exc)[:200]}")
        why = str(exc)[:80].replace("|", "/").replace("\n", " ")
        arm.rows.append(f"| {k}x{n} | {m} | {kernel} | error {type(exc).__name__}: {why} | - | no |")
        return f"err {type(exc).__name__}"
    good = math.isfinite(err) and err < GEMLITE_TOL
    arm.rows.append(f"| {k}x{n} | {m} | {kernel} | {err:.2e} | {first_s:.1f} | {'yes' if good else 'WRONG'} |")
    arm.ok &= good
    return "" if good else f"WRONG (err {err:.1e})"


def gemlite_prepare(arm: GemLiteArm, shapes: list[tuple[int, int]]) -> None:
    """Check and autotune GemLite at every shape, one M after the other from the smallest (M = 1 is what the
    best-peer target judges), until ``arm.budget_s`` is spent; what is left is marked skipped."""
    start = time.perf_counter()
    for m in sorted(arm.ms):
        for k, n in shapes:
            if time.perf_counter() - start > arm.budget_s:
                arm.status[(k, n, m)] = "skipped (budget)"
                continue
            packed, scales = TIMING.random_w4(n, k, GROUP, torch.bfloat16, "cuda")
            arm.status[(k, n, m)] = gemlite_check(arm, packed, scales, m)
            print(f"  GemLite {k}x{n} M={m}: {arm.status[(k, n, m)] or 'checked'}", flush=True)
    arm.setup_s = time.perf_counter() - start


def gemlite_report(arm: GemLiteArm, lines: list[str]) -> None:
    """Append the check pass's table and summary to the report."""
    lines.append(f"## GemLite vs fp64 reference (relative L2, bf16; wrong above {GEMLITE_TOL:.0e}: not timed)\n")
    lines.append("| K x N | M | GemLite kernel | rel err | first call s (autotune) | ok |")
    lines.append("|---|---|---|---|---|---|")
    lines.extend(arm.rows)
    cells = list(arm.status.values())
    lines.append(
        f"\n{cells.count('')} of {len(cells)} shape-and-M checks passed, "
        f"{sum(c.startswith('WRONG') for c in cells)} wrong, {sum(c.startswith('err') for c in cells)} errors, "
        f"{sum(c.startswith('skipped') for c in cells)} skipped (budget); packed weights bit-exact to "
        f"`kernels.reference.dequantize` (unpacked by GemLite's own `unpack_over_cols_torch`, then its (u - 8) * s) "
        f"in {arm.exact} of {arm.checks} layers. Checks and autotuning took {arm.setup_s:.0f} s "
        f"(budget {arm.budget_s:.0f} s).\n"
    )


def gemlite_layers(arm: GemLiteArm, copies: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.nn.Module] | str:
    """One GemLite layer per weight copy, or the table cell saying why there are none."""
    try:
        return [gemlite_layer(arm.gl, p, s) for p, s in copies]
    except Exception as exc:  # noqa: BLE001  (any failure: report it in the cells)
        n, k = copies[0][0].shape[0], copies[0][0].shape[1] * 8
        print(f"  GemLite n/a for {k}x{n}: {type(exc).__name__}: {str(exc)[:200]}")
        return f"err {type(exc).__name__}"


def arm_gemlite(layers: list[torch.nn.Module], k: int, m: int) -> float:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    return graph_time_us([lambda layer=layer: layer(x) for layer in layers])


def gemlite_time(
    arm: GemLiteArm, layers: list[torch.nn.Module] | str | None, k: int, n: int, m: int
) -> tuple[float | None, str]:
    """GemLite's time at one shape and M where it passed its checks (tuned already); else None and the cell."""
    if arm.gl is None:
        return None, "n/a"
    cell = arm.status.get((k, n, m), "-")
    if cell or layers is None:
        return None, cell or "-"
    if isinstance(layers, str):
        return None, layers
    try:
        return arm_gemlite(layers, k, m), ""
    except Exception as exc:  # noqa: BLE001  (any failure: report it in the cell)
        print(f"  GemLite n/a for {k}x{n} M={m}: {type(exc).__name__}: {str(exc)[:200]}")
        return None, f"err {type(exc).__name__}"


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
            packed, scales = TIMING.random_w4(n, k, GROUP, dtype, "cuda")
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
                lines.append(
                    f"| {k}x{n} | {name} | {m} | {path_of(m, n, k, dtype)} | {err:.2e} | {'yes' if good else 'FAIL'} |"
                )
    lines.append("")
    return ok


# ----------------------------------------------------------------------------------------------------------------
# main table
# ----------------------------------------------------------------------------------------------------------------


def fmt_ratio(base: float, t: float | None) -> str:
    return "n/a" if t is None else f"{t:.1f} ({base / t:.2f}x)"


def layer_sum(vals: list[float | None], counts: list[int]) -> float | None:
    """One decoder layer's time from its linears' times and counts; None if any linear has none."""
    return None if any(v is None for v in vals) else sum(v * c for v, c in zip(vals, counts, strict=True))


def best_peer(sums: dict[str, float | None]) -> tuple[float, str] | None:
    """The fastest arm other than ours with a time for every linear of the layer, as (time, name)."""
    timed = [(sums[arm], name) for arm, name in PEERS.items() if sums.get(arm) is not None]
    return min(timed) if timed else None


def peer_cells(ours: float, best: tuple[float, str] | None) -> str:
    """The layer-sum table's best-peer cells: the peer, and ours against it (ahead: > 1)."""
    if best is None:
        return "n/a | n/a"
    t, name = best
    return f"{name} {t:.1f} | {t / ours:.2f}x"


def layer_table(lines: list[str], results: dict, ms: list[int]) -> list[dict]:
    """The 7-linear layer sums per model and M against the issue's targets; returns the results file's rows."""
    lines.append("## One decoder layer's 7 linears, summed (us; ratio to cuBLAS bf16)\n")
    lines.append(
        "| model | M | bf16 | tinygemm | GemLite | deq+cuBLAS | ours | target / floor | met | best peer "
        "| ours vs best peer |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for model, shapes in SHAPES.items():
        counts = [c for _, c in shapes]
        for m in ms:
            sums = {
                arm: layer_sum([results[(model, k, n, m)][arm] for (k, n), _ in shapes], counts)
                for arm in ("bf16", "tinygemm", "gemlite", "deq", "ours")
            }
            base, ratio = sums["bf16"], sums["bf16"] / sums["ours"]
            target, floor = TARGETS[model].get(m, (None, None))
            if target is None:
                goal, met = "-", "-"
            else:
                goal = f"{target:.2f}x / {floor:.2f}x" if floor else f"{target:.2f}x / -"
                met = "target" if ratio >= target else "floor" if floor and ratio >= floor else "no"
            peer = best_peer(sums)
            lines.append(
                f"| {model} | {m} | {base:.1f} | {fmt_ratio(base, sums['tinygemm'])} "
                f"| {fmt_ratio(base, sums['gemlite'])} | {fmt_ratio(base, sums['deq'])} | "
                f"**{fmt_ratio(base, sums['ours'])}** | {goal} | {met} | {peer_cells(sums['ours'], peer)} |"
            )
            rows.append({"model": model, "m": m, "ours_vs_bf16": round(ratio, 3),
                         "best_peer": None if peer is None else peer[1],
                         "best_peer_vs_bf16": None if peer is None else round(base / peer[0], 3)})  # fmt: skip
    lines.append("")
    return rows


def fused_table(lines: list[str], results: dict, ms: list[int]) -> None:
    """The linears a GRACE model runs (q|k|v and gate|up fused, once each) against the unfused bf16 layer."""
    lines.append("## One decoder layer as each runs it: ours fused (q|k|v, o, gate|up, down) vs bf16 unfused\n")
    lines.append("| model | M | bf16 unfused 7 linears (us) | ours fused 4 (us) | ratio |")
    lines.append("|---|---|---|---|---|")
    for model, shapes in SHAPES.items():
        for m in ms:
            base = layer_sum([results[(model, k, n, m)]["bf16"] for (k, n), _ in shapes], [c for _, c in shapes])
            fused = sum(results[(model, k, n, m, "fused")] for k, n in FUSED[model])
            lines.append(f"| {model} | {m} | {base:.1f} | {fused:.1f} | **{base / fused:.2f}x** |")
    lines.append("")


def gemlite_arm(args: argparse.Namespace, ms: list[int]) -> GemLiteArm:
    """The run's GemLite arm from the command line (loaded before anything is timed)."""
    if args.no_gemlite:
        return GemLiteArm(None, "n/a, --no-gemlite")
    gl, note = load_gemlite(args.gemlite_autotune)
    run_ms = frozenset(ms) if args.gemlite_all_m else frozenset(ms) & frozenset(GEMLITE_MS)
    note = f"{note}; rows at M = {', '.join(map(str, sorted(run_ms))) or 'none'}, checks and autotuning within "
    return GemLiteArm(gl, f"{note}{args.gemlite_budget_s:.0f} s", run_ms, args.gemlite_budget_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results", help="folder for kernels_h200.md")
    parser.add_argument(
        "--extra-arms", action="store_true", help="also time cuBLAS fp16 and each W4A16 kernel forced at every M"
    )
    parser.add_argument("--ms", default=",".join(map(str, MS)), help="comma-separated token counts")
    parser.add_argument("--no-gemlite", action="store_true", help="leave GemLite out")
    parser.add_argument(
        "--gemlite-all-m", action="store_true", help=f"GemLite at every M, not only {GEMLITE_MS} (autotunes each)"
    )
    parser.add_argument(
        "--gemlite-autotune",
        default="fast",
        choices=("fast", "max", "default"),
        help="GemLite's autotune config set: fast (its default), max (exhaustive: far too slow for one session), "
        "default (its one or two fixed configs)",
    )
    parser.add_argument(
        "--gemlite-budget-s",
        type=float,
        default=150.0,
        help="seconds for GemLite's checks and autotuning (M by M from the smallest); the rest is skipped",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/bench_kernels.py needs a CUDA GPU")
    import triton

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    ms = [int(v) for v in args.ms.split(",")]
    gl_arm = gemlite_arm(args, ms)
    props = torch.cuda.get_device_properties(0)
    lines = [
        "# W4A16 kernel benchmark\n",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- GPU: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
        f"triton {triton.__version__}, CUDA {torch.version.cuda}",
        "- method: CUDA-graph replay of one call per weight copy, copies rotated past L2 "
        f"({TIMING.ROTATE_BYTES >> 20} MB per arm, at most {TIMING.MAX_COPIES} copies), median of 15 replays; weights are INT4 g128 with bf16 scales; 'ours' is the "
        "`grace_quant::w4a16_linear` custom op (bf16); ratios are to cuBLAS bf16 `F.linear` in the same run.",
        "- GemLite: `GemLiteLinear(4, group_size=128)` bf16 per weight copy, packed from the same codes as ours "
        "(unsigned u = q + 8 with integer zero point 8: its W_group_mode 3, (u - 8) * s), with its own kernel choice "
        "per M (GEMV_REVSPLITK M <= 4, GEMM_SPLITK M < 64, GEMM above). Before any GemLite timing, a check pass over "
        "every shape, M by M from the smallest, builds a layer, checks its weight bit-exact against "
        "`kernels.reference.dequantize` through GemLite's own unpacker and its first (eager) call's output against "
        "fp64; that call runs GemLite's Triton autotuner for the shape and M (its cache is global per shape and M, "
        "so the timed copies reuse it). Autotune timing is Triton's eager `do_bench`, which flushes L2 between "
        "repetitions as our weight rotation does, not GemLite's CUDA-graph autotune (`enable_cudagraph_autotune`: "
        "no L2 flush, and a graph of ~100 ms of calls per candidate).",
        f"- GemLite here: {gl_arm.note}",
    ]
    lines.append(f"- device-to-device copy: {copy_tbps():.2f} TB/s (1 GiB, read + write counted)\n")
    print("\n".join(lines), flush=True)

    ok = correctness(lines)
    print("\n".join(lines[-30:]), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def flush() -> None:  # a partial report survives a killed run
        (out / "kernels_h200.md").write_text("\n".join(lines) + "\n")

    flush()
    if gl_arm.gl is not None and gl_arm.ms:
        gemlite_prepare(gl_arm, list(dict.fromkeys(shape for v in SHAPES.values() for shape, _ in v)))
        gemlite_report(gl_arm, lines)
        flush()
    results: dict[tuple[str, int, int, int], dict[str, float | None]] = {}
    lines.append("## Per-linear times (us; ratio to cuBLAS bf16)\n")
    lines.append(
        "| model | K x N | M | bf16 | fp16 | tinygemm | GemLite | deq+cuBLAS | gemv forced | tc forced | ours "
        "| ours path | ours TB/s |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, shapes in SHAPES.items():
        for (k, n), _ in shapes:
            copies = TIMING.w4_copies(n, k, GROUP, torch.bfloat16, "cuda")
            timed = any(gl_arm.status.get((k, n, m)) == "" for m in ms)
            gl_layers = gemlite_layers(gl_arm, copies) if timed else None
            for m in ms:
                r: dict[str, float | None] = {}
                r["bf16"] = TIMING.dense_time_us(n, k, m, torch.bfloat16)
                r["fp16"] = TIMING.dense_time_us(n, k, m, torch.float16) if args.extra_arms else None
                r["tinygemm"] = arm_tinygemm(n, k, m) if m <= 256 else None
                r["gemlite"], gl_cell = gemlite_time(gl_arm, gl_layers, k, n, m)
                r["deq"] = arm_w4(deq_cublas, copies, k, m, torch.bfloat16)
                extra = args.extra_arms
                r["gemv"] = arm_w4(gemv_forced, copies, k, m, torch.bfloat16) if extra and m <= TW.GEMV_ROWS else None
                r["tc"] = arm_w4(tc_forced, copies, k, m, torch.bfloat16) if extra else None
                r["ours"] = arm_w4(ours, copies, k, m, torch.bfloat16)
                results[(model, k, n, m)] = r
                base = r["bf16"]
                tbps = (TIMING.w4_bytes(n, k, GROUP) + 2 * m * (k + n)) / r["ours"] / 1e6
                lines.append(
                    f"| {model} | {k}x{n} | {m} | {base:.1f} | {fmt_ratio(base, r['fp16'])} | "
                    f"{fmt_ratio(base, r['tinygemm'])} | {gl_cell or fmt_ratio(base, r['gemlite'])} | "
                    f"{fmt_ratio(base, r['deq'])} | {fmt_ratio(base, r['gemv'])} | "
                    f"{fmt_ratio(base, r['tc'])} | "
                    f"**{fmt_ratio(base, r['ours'])}** | {path_of(m, n, k)} | {tbps:.2f} |"
                )
                print(lines[-1], flush=True)
            del copies, gl_layers
            torch.cuda.empty_cache()
            flush()
        for k, n in FUSED[model]:  # the fused linears, ours only (the unfused ones above hold every arm)
            copies = TIMING.w4_copies(n, k, GROUP, torch.bfloat16, "cuda")
            for m in ms:
                results[(model, k, n, m, "fused")] = arm_w4(ours, copies, k, m, torch.bfloat16)
            del copies
            torch.cuda.empty_cache()
    lines.append("")

    json_rows = layer_table(lines, results, ms)
    fused_table(lines, results, ms)
    lines.append(
        f"Best peer: the fastest of {', '.join(PEERS.values())} with a time for every linear of the layer "
        "(GemLite only where it ran and passed its check); the issue asks ours ahead of it at every M."
    )
    lines.append(f"Correctness check: {'passed' if ok else 'FAILED'}.")
    if gl_arm.gl is not None:
        verdict = "passed" if gl_arm.ok else "FAILED (wrong output: those cells say WRONG and were not timed)"
        lines.append(f"GemLite check: {verdict}.")
    flush()
    stamp = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"
    payload = {"date": stamp, "gpu": props.name, "torch": torch.__version__, "triton": triton.__version__,
               "correct": ok, "rows": json_rows}  # fmt: skip
    (out / "kernels_h200.json").write_text(json.dumps(payload, indent=1) + "\n")
    print("\n".join(lines))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
