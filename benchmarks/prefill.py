"""Where the time to first token goes: stock bf16 against GRACE INT4 prefill (issue 16's TTFT floor).

Per arm, in one process, eager as transformers runs prefill: the time to first token (``generate`` of one token with
a static cache, as ``e2e.py`` measures it), the model's forward alone, the host's share of that forward (the time
until the forward returns, before the final sync: with no sync inside, the GPU cannot hold the host back), the GPU's
kernel time (profiler), and the host's hottest Python functions (cProfile). GRACE runs with its kernels launched
through Triton's JIT (``grace-jit``) and with direct launches (``grace``, the library default), alternating.

    python benchmarks/prefill.py --out prefill.md --json prefill.json
    python benchmarks/prefill.py --device cpu --tiny --repeats 1     # CPU smoke run of every code path
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402  (the sibling benchmark: models, inputs, arms, generate)

from grace_quant.kernels import triton_w4a16  # noqa: E402

LAUNCHERS = ("_launch_gemv", "_launch_gemv_pipe", "_launch_tc", "_launch_dequant")


def set_direct_launch(on: bool) -> None:
    """Direct launches (the default) or every launch through Triton's JIT, for all W4A16 kernels."""
    for name in LAUNCHERS:
        getattr(triton_w4a16, name).direct = on and not triton_w4a16.INTERPRET


def _forward(model, inputs: dict):
    return model(**inputs, logits_to_keep=1, use_cache=False)


@torch.no_grad()
def forward_split(model, inputs: dict, repeats: int) -> tuple[float, float]:
    """(forward ms, host ms): medians of the whole forward and of the time until it returns before the final sync."""
    totals, hosts = [], []
    for _ in range(repeats):
        e2e.sync()
        start = time.perf_counter()
        _forward(model, inputs)
        returned = time.perf_counter()
        e2e.sync()
        totals.append(time.perf_counter() - start)
        hosts.append(returned - start)
    return statistics.median(totals) * 1e3, statistics.median(hosts) * 1e3


@torch.no_grad()
def gpu_time(model, inputs: dict) -> tuple[float, int]:
    """(ms of GPU kernels, kernel count) in one forward, from the profiler (0 on CPU)."""
    if e2e.Setup.device != "cuda":
        return 0.0, 0
    from torch.profiler import ProfilerActivity, profile

    e2e.sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _forward(model, inputs)
        e2e.sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in kernels) * 1e-3, len(kernels)


def hot_functions(model, inputs: dict, rows: int) -> str:
    """cProfile of one first-token ``generate``: the top functions by own time and by cumulative time."""
    profiler = cProfile.Profile()
    e2e.sync()
    profiler.enable()
    e2e.generate(model, inputs, 1)
    e2e.sync()
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(rows)
    stats.sort_stats("cumulative").print_stats(rows)
    return text.getvalue()


def measure(model, inputs: dict, repeats: int) -> dict:
    ttft = e2e.timed(lambda: e2e.generate(model, inputs, 1), repeats) * 1e3
    forward, host = forward_split(model, inputs, repeats)
    gpu, kernels = gpu_time(model, inputs)
    return {"ttft_ms": ttft, "forward_ms": forward, "host_ms": host, "gpu_ms": gpu, "kernels": kernels}


def run_model(name: str, args: argparse.Namespace, log_dir: Path) -> dict:
    rows: dict = {}
    for arm in ("bf16", "grace"):
        torch._dynamo.reset()
        model = e2e.make_arm(name, arm)
        inputs = e2e.inputs_for(model, 1)
        for _ in range(2):  # warm-ups: compiles the kernels, fills the allocator
            e2e.generate(model, inputs, 1)
        variants = [("bf16", True)] if arm == "bf16" else [("grace-jit", False), ("grace", True)] * args.rounds
        for label, direct in variants:
            set_direct_launch(direct)
            e2e.generate(model, inputs, 1)
            rows.setdefault(label, []).append(measure(model, inputs, args.repeats))
            print(name, label, rows[label][-1], flush=True)
        set_direct_launch(True)
        profile_arm = "bf16" if arm == "bf16" else "grace"
        (log_dir / f"prefill_cprofile_{name}_{profile_arm}.txt").write_text(hot_functions(model, inputs, args.rows))
        del model
        e2e.free_memory()
    return {label: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for label, runs in rows.items()}


def report(results: dict) -> str:
    lines = [
        f"# Prefill at batch 1: where the time to first token goes ({results['date']}, {results['gpu']})",
        "",
        f"torch {results['torch']}, transformers {results['transformers']}. Eager prefill, medians; host = time until "
        "the forward returns (before the final sync); GPU = the kernels' summed time in one forward (profiler).",
        "",
        "| model | arm | TTFT ms | vs bf16 | forward ms | host ms | GPU ms | kernels |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, arms in results["models"].items():
        base = arms["bf16"]["ttft_ms"]
        for arm, r in arms.items():
            lines.append(
                f"| {name} | {arm} | {r['ttft_ms']:.1f} | {r['ttft_ms'] / base:.2f}x | {r['forward_ms']:.1f} | "
                f"{r['host_ms']:.1f} | {r['gpu_ms']:.1f} | {r['kernels']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["llava-1.5-7b", "qwen2-vl-2b"], choices=sorted(e2e.MODELS))
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per measurement (median)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of grace-jit and grace")
    parser.add_argument("--rows", type=int, default=30, help="functions per cProfile table")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny stand-in models (the CPU smoke run)")
    parser.add_argument("--out", default="prefill.md", help="markdown report")
    parser.add_argument("--json", default="prefill.json", help="the numbers, per model and arm")
    parser.add_argument("--log-dir", default=".", help="where the cProfile tables go")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    import transformers

    args = parse_args(argv)
    e2e.Setup.device, e2e.Setup.tiny = args.device, args.tiny
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/prefill.py needs a CUDA GPU (or --device cpu --tiny for a smoke run).")
        torch.backends.cuda.enable_cudnn_sdp(False)  # as e2e.py
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": e2e.device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "models": {},
    }
    for name in args.models:
        results["models"][name] = run_model(name, args, log_dir)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        Path(args.out).write_text(report(results))
    print(report(results))
    return results


if __name__ == "__main__":
    main()
