"""Where ``generate(custom_generate=grace_greedy)``'s time to first token goes, against transformers' own loop.

e2e run J (H100, LLaVA-1.5-7B GRACE INT4, batch 1) measured TTFT 103.5 ms through ``grace_greedy`` against 52.5 ms
through transformers' loop in run I, with batch 8 unchanged (170 ms): an extra cost that the batch-8 prefill's GPU
time hides. This lab times one-token ``generate`` calls of one GRACE model through both loops, interleaved, before any
decode compile, after transformers' compiled decode ran, and after ``grace_greedy``'s ran; then splits one call of
each into host time and GPU time (torch profiler) and prints the host's heaviest Python functions (cProfile).

    python benchmarks/ttft_lab.py --model llava-1.5-7b > ttft_lab.txt
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import pstats
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from grace_quant import grace_greedy

_E2E = importlib.util.spec_from_file_location("bench_e2e", Path(__file__).with_name("e2e.py"))  # scripts, no package
e2e = importlib.util.module_from_spec(_E2E)  # models, inputs, arms, generate
_E2E.loader.exec_module(e2e)


def one_token(model, inputs, fast: bool, new_tokens: int = 1) -> torch.Tensor:
    """``new_tokens`` greedy tokens (one: the time to first token) through grace_greedy or transformers' loop."""
    return e2e.generate(model, inputs, new_tokens, **({"custom_generate": grace_greedy} if fast else {}))


def interleaved(model, inputs, rounds: int) -> dict[str, str]:
    """Each loop's one-token calls, the two alternating call by call: median ms, every call's ms, and the garbage
    collector's ms inside its timed calls."""
    times, gc_ms = e2e.timed_calls(
        {key: partial(one_token, model, inputs, key == "fast") for key in ("loop", "fast")}, rounds
    )
    return {
        k: f"median {statistics.median(v) * 1e3:.1f} ms, calls {[round(t * 1e3, 1) for t in v]}, gc {gc_ms[k]:.1f} ms"
        for k, v in times.items()
    }


def host_and_gpu(model, inputs, fast: bool) -> str:
    """One call under the torch profiler: wall, summed GPU kernel time, and the ten heaviest CPU ops."""
    from torch.profiler import ProfilerActivity, profile

    e2e.sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        one_token(model, inputs, fast)
        e2e.sync()
        wall = (time.perf_counter() - start) * 1e3
    events = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in events) / 1e3
    table = events.table(sort_by="self_cpu_time_total", row_limit=12)
    return f"wall {wall:.1f} ms, GPU kernels {gpu:.1f} ms\n{table}"


def python_profile(model, inputs, fast: bool) -> str:
    e2e.sync()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(3):
        one_token(model, inputs, fast)
        e2e.sync()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llava-1.5-7b", choices=sorted(e2e.MODELS) + sorted(e2e.TINY_MODELS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64, help="length of the decode runs that compile each loop")
    parser.add_argument("--quick", action="store_true", help="compile grace_greedy's decode only, profile it only")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run on tiny stand-ins of the models")
    args = parser.parse_args()
    e2e.Setup.device, e2e.Setup.tiny = args.device, args.device == "cpu"
    if args.device == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
        print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    model = e2e.make_arm(args.model, "grace-loop")  # transformers' loop unless custom_generate says otherwise
    inputs = e2e.inputs_for(model, args.batch)
    for _ in range(2):
        one_token(model, inputs, False)
        one_token(model, inputs, True)
    print("nothing compiled:", interleaved(model, inputs, args.rounds), flush=True)
    phases = (("grace_greedy", True),) if args.quick else (("transformers' loop", False), ("grace_greedy", True))
    for label, fast in phases:
        for _ in range(2):
            one_token(model, inputs, fast, args.new_tokens)
        print(f"after {label}'s compiled decode:", interleaved(model, inputs, args.rounds), flush=True)
    for fast in (True,) if args.quick else (False, True):
        print(f"\n== {'grace_greedy' if fast else 'loop'}: torch profiler\n{host_and_gpu(model, inputs, fast)}")
        print(
            f"== {'grace_greedy' if fast else 'loop'}: cProfile of 3 calls (tottime)\n{python_profile(model, inputs, fast)}"
        )


if __name__ == "__main__":
    main()
