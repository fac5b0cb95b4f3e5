"""Where the time to first token goes: stock bf16 against GRACE INT4 prefill (issue 16's TTFT floor).

Per arm, in one process, eager as transformers runs prefill: the time to first token (``generate`` of one token with
a static cache, as ``e2e.py`` measures it), the model's forward alone, the time until that forward returns (before
the final sync), the GPU's kernel time (profiler), host and GPU clocks at the vision tower and the decoder layers (a
stretch whose GPU time equals its host time kept the GPU waiting), and the host's hottest Python functions
(cProfile), with the profiler's host ops and sync counts. GRACE also runs with its eager INT4 path
swapped (see ``Variant``). Both models stay in memory and every variant is measured once per round, rounds
interleaved: a host-bound number drifts with the machine.

    python benchmarks/prefill.py --out prefill.md --json prefill.json
    python benchmarks/prefill.py --device cpu --tiny --repeats 1     # CPU smoke run of every code path
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import importlib.util
import io
import json
import pstats
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from grace_quant.integrations.generation import deferred_stop_check
from grace_quant.kernels import launch, tables, triton_w4a16
from grace_quant.kernels.custom_op import cuda_linear


def _sibling(name: str):
    """A sibling benchmark loaded by path (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


e2e = _sibling("e2e")  # models, inputs, arms, generate


class Variant(contextlib.AbstractContextManager):
    """GRACE's eager INT4 path with one of its parts switched off, to attribute the prefill's extra time:
    ``jit-runner`` launches through the compiled kernel's own Python runner (no direct C launch, Triton 3.6);
    ``unplanned`` is the per-call dispatch (checks, table lookup, dequantize launch on every call: the path before
    ``triton_w4a16.eager_linear``); ``dense-linear`` sends every call to ``F.linear`` on dense weights dequantized
    once and cached (what the module and fused-projection Python alone cost); ``nodefer`` runs ``generate`` without
    the deferred stop check (on by default for GRACE INT4 models; it sets up pinned copies and events); ``no-wgmma``
    drops this GPU's tuned Gluon-kernel entries (``"wgmma"``), so their shapes run dequantize + cuBLAS as before."""

    def __init__(self, kind: str | None):
        self.kind, self.dense, self.saved = kind, {}, triton_w4a16.eager_linear

    def _dense_linear(self, x, packed, scales, bias, group_size):
        key = (packed.data_ptr(), tuple(packed.shape), x.dtype)
        if key not in self.dense:
            self.dense[key] = triton_w4a16.dequantize_w4(packed, scales, group_size, x.dtype)
        return F.linear(x, self.dense[key], bias)

    def __enter__(self):
        self.block = deferred_stop_check(False) if self.kind == "nodefer" else contextlib.nullcontext()
        self.block.__enter__()
        if self.kind == "unplanned":
            triton_w4a16.eager_linear = cuda_linear
        elif self.kind == "dense-linear":
            triton_w4a16.eager_linear = self._dense_linear
        elif self.kind == "jit-runner":
            self._runners(())
        elif self.kind == "no-wgmma":
            self.table = tables.table(tables.device_name(torch.device(e2e.Setup.device)))
            self.entries = dict(self.table.configs)
            self.table.configs = {key: c for key, c in self.entries.items() if not c.get("wgmma")}
            tables.EDITS += 1  # every eager plan looks its entry up again
        return self

    def __exit__(self, *exc):
        triton_w4a16.eager_linear = self.saved
        if self.kind == "jit-runner":
            self._runners(self.native)
        if self.kind == "no-wgmma":
            self.table.configs = self.entries
            tables.EDITS += 1
        self.block.__exit__(*exc)
        return None

    def _runners(self, versions: tuple) -> None:
        """Launch through the Triton versions' direct C launch or not: forget every runner and plan made so far."""
        self.native, launch._NATIVE_TRITON = launch._NATIVE_TRITON, versions
        triton_w4a16._EAGER_PLANS.clear()
        for launcher in vars(triton_w4a16).values():
            if isinstance(launcher, launch.DirectLauncher):
                launcher.compiled.clear()


def host_ops(model, inputs: dict, rows: int) -> dict:
    """The profiler's view of one forward (CPU + CUDA): top host ops by self time, allocator and sync calls."""
    if e2e.Setup.device != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    e2e.sync()
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _forward(model, inputs)
        e2e.sync()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    counts = {
        name: sum(1 for e in prof.events() if e.name == name)
        for name in ("cudaMalloc", "cudaFree", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaLaunchKernel",
                     "cuLaunchKernel", "cuLaunchKernelEx", "cudaMemcpyAsync")
    }  # fmt: skip
    return {"table": table, "counts": counts}


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


def measure(model, inputs: dict, repeats: int, gpu: bool = True) -> dict:
    times, _ = e2e.timed_calls({"first": lambda: e2e.generate(model, inputs, 1)}, repeats)
    ttft = statistics.median(times["first"]) * 1e3
    forward, host = forward_split(model, inputs, repeats)
    gpu, kernels = gpu_time(model, inputs) if gpu else (0.0, 0)
    return {"ttft_ms": ttft, "forward_ms": forward, "host_ms": host, "gpu_ms": gpu, "kernels": kernels}


def _segments(model) -> list[tuple[str, torch.nn.Module]]:
    """The vision tower and the text decoder's layer list, where the timeline puts its marks."""
    found = []
    for name, module in model.named_modules():
        if name.endswith(("vision_tower", "visual")) and not found:
            found.append(("vision", module))
        if name.endswith("language_model.layers") or name == "model.layers":
            found.append(("decoder layers", module))
            break
    return found


@torch.no_grad()
def timeline(model, inputs: dict) -> dict[str, tuple[float, float]]:
    """Per stretch of one forward (before the vision tower, the tower, up to the decoder layers, the layers, the
    rest): (host ms, GPU ms), from ``perf_counter`` and CUDA events taken at the same marks. A stretch whose GPU time
    exceeds its host time held the host back (GPU-bound); the reverse left the GPU waiting (host-bound)."""
    if e2e.Setup.device != "cuda":
        return {}
    marks: list[tuple[str, float, torch.cuda.Event]] = []

    def mark(label: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        marks.append((label, time.perf_counter(), event))

    handles = []
    for label, module in _segments(model):
        first, last = (module[0], module[-1]) if isinstance(module, torch.nn.ModuleList) else (module, module)
        handles.append(first.register_forward_pre_hook(lambda *_, label=label: mark(f"{label} start")))
        handles.append(last.register_forward_hook(lambda *_, label=label: mark(f"{label} end")))
    try:
        e2e.sync()
        mark("forward start")
        _forward(model, inputs)
        mark("forward end")
        e2e.sync()
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for (a, host_a, gpu_a), (b, host_b, gpu_b) in zip(marks, marks[1:], strict=False):
        out[f"{a} -> {b}"] = ((host_b - host_a) * 1e3, gpu_a.elapsed_time(gpu_b))
    return out


def run_model(name: str, args: argparse.Namespace, log_dir: Path) -> dict:
    """Both models in memory, every variant measured once per round, rounds interleaved (a noisy host drifts)."""
    torch._dynamo.reset()
    models = {arm: e2e.make_arm(name, arm) for arm in ("bf16", "grace")}
    inputs = e2e.inputs_for(models["bf16"], 1)
    for model in models.values():
        for _ in range(2):  # warm-ups: compiles the kernels, fills the allocator
            e2e.generate(model, inputs, 1)
    variants = [("bf16", "bf16", None), ("grace", "grace", None)]
    variants += [(f"grace-{kind}", "grace", kind) for kind in args.variants]
    rows: dict = {label: [] for label, *_ in variants}
    extra: dict = {}
    for round_ in range(args.rounds):
        for label, arm, kind in variants:
            with Variant(kind):
                e2e.generate(models[arm], inputs, 1)
                rows[label].append(measure(models[arm], inputs, args.repeats, gpu=round_ == 0))
                if round_ == 0:
                    extra[label] = {"timeline": timeline(models[arm], inputs)}
            print(name, label, rows[label][-1], flush=True)
    for arm, model in models.items():
        (log_dir / f"prefill_cprofile_{name}_{arm}.txt").write_text(hot_functions(model, inputs, args.rows))
        ops = host_ops(model, inputs, args.rows)
        if ops:
            (log_dir / f"prefill_ops_{name}_{arm}.txt").write_text(f"{ops['counts']}\n\n{ops['table']}")
    del models, model
    e2e.free_memory()
    summary = {}
    for label, runs in rows.items():
        summary[label] = {
            key: statistics.median(r[key] for r in runs) for key in runs[0] if key not in ("gpu_ms", "kernels")
        }
        summary[label].update({f"{key}_min": min(r[key] for r in runs) for key in ("ttft_ms", "forward_ms")})
        summary[label].update({key: runs[0][key] for key in ("gpu_ms", "kernels")}, **extra[label])
    return summary


def report(results: dict) -> str:
    lines = [
        f"# Prefill at batch 1: where the time to first token goes ({results['date']}, {results['gpu']})",
        "",
        f"torch {results['torch']}, transformers {results['transformers']}. Eager prefill, medians; host = time until "
        "the forward returns (before the final sync); GPU = the kernels' summed time in one forward (profiler).",
        "",
        "| model | arm | TTFT ms | vs bf16 | TTFT min ms | forward ms | forward min ms | host ms | GPU ms | kernels |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, arms in results["models"].items():
        base = arms["bf16"]["ttft_ms"]
        for arm, r in arms.items():
            lines.append(
                f"| {name} | {arm} | {r['ttft_ms']:.1f} | {r['ttft_ms'] / base:.2f}x | {r['ttft_ms_min']:.1f} | "
                f"{r['forward_ms']:.1f} | {r['forward_ms_min']:.1f} | {r['host_ms']:.1f} | {r['gpu_ms']:.1f} | "
                f"{r['kernels']:.0f} |"
            )
    lines += ["", "Timeline of one forward per arm (host ms / GPU ms between marks):", ""]
    for name, arms in results["models"].items():
        for arm, r in arms.items():
            parts = "; ".join(f"{k}: {h:.1f} / {g:.1f}" for k, (h, g) in r.get("timeline", {}).items())
            lines.append(f"- {name} {arm}: {parts}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["llava-1.5-7b", "qwen2-vl-2b"], choices=sorted(e2e.MODELS))
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per measurement (median)")
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds over all variants (interleaved; medians of rounds)"
    )
    parser.add_argument(
        "--variants",
        nargs="*",
        default=["jit-runner", "dense-linear"],
        choices=["jit-runner", "unplanned", "dense-linear", "nodefer", "no-wgmma"],
        help="GRACE with its eager INT4 linear path swapped (see Variant)",
    )
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
