"""Time every candidate configuration of the W4A16 tuner's space against cuBLAS bf16, shape by shape and M by M.

What the tuner does (same candidates, same timer: CUDA-graph replay over weight copies cycled past L2), but every
candidate's time is kept, next to cuBLAS bf16 `F.linear` in the same process, so a kernel change can be judged
by the whole space rather than by the winner alone. Writes ``sweep.json`` (every candidate) and prints per shape and
M the best candidate of each kernel; the best overall goes to the user's tuning cache unless ``--no-save``.

    python benchmarks/sweep_kernels.py --models llava-1.5-7b --ms 1,16,64 --out /tmp/sweep
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from grace_quant.kernels import tables, tuner
from grace_quant.kernels.dispatch import key_for
from grace_quant.kernels.timing import dense_time_us

SHAPES = {  # (K, N) of one decoder layer's linears, with how many times each appears (the unfused layer)
    "llava-1.5-7b": [((4096, 4096), 4), ((4096, 11008), 2), ((11008, 4096), 1)],
    "qwen2-vl-2b": [((1536, 1536), 2), ((1536, 256), 2), ((1536, 8960), 2), ((8960, 1536), 1)],
}


def kernel_of(config: dict[str, int]) -> str:
    return "tc" if config.get("tc") else "gemv" if "step_k" in config else "deq+cuBLAS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--ms", default="1,2,4,16,64,256,2048", help="comma-separated token counts")
    parser.add_argument("--out", default="benchmarks/results", help="folder for sweep.json")
    parser.add_argument("--deadline-s", type=float, default=1e9, help="stop starting new shapes after this long")
    parser.add_argument("--no-save", action="store_true", help="do not write the winners to the tuning cache")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sweep_kernels.py times kernels on a CUDA GPU; none is available here.")
    torch.manual_seed(0)
    cuda = torch.device("cuda", torch.cuda.current_device())
    device = tables.device_name(cuda)
    table = tables.table(device)
    ms = [int(v) for v in args.ms.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = []
    best: dict[tuple[str, int], dict[tuple[int, int], tuple[float, float]]] = {}
    for model in args.models:
        for (k, n), _ in SHAPES[model]:
            if time.perf_counter() - start > args.deadline_s:
                print(f"deadline: {model} {k}x{n} and later shapes skipped", flush=True)
                continue
            for m in ms:
                base = dense_time_us(n, k, m, torch.bfloat16)
                measure = tuner.cuda_measure(m, n, k, 128, torch.bfloat16, cuda)
                found: list[dict] = []

                def record(config, seconds, error, found=found, model=model, m=m, k=k, n=n, base=base):
                    us = None if seconds is None else seconds * 1e6
                    found.append({"kernel": kernel_of(config), "config": config, "us": us, "error": error})
                    rows.append({"model": model, "k": k, "n": n, "m": m, "bf16_us": base, **found[-1]})

                key = key_for(m, n, k, 128, torch.bfloat16)
                config, seconds = tuner.tune_key(key, tuner.space_for(m), measure, table, on_result=record)
                best.setdefault((model, m), {})[(k, n)] = (base, seconds * 1e6)
                per_kernel = {}
                for r in found:
                    if r["us"] is not None and (
                        r["kernel"] not in per_kernel or r["us"] < per_kernel[r["kernel"]]["us"]
                    ):
                        per_kernel[r["kernel"]] = r
                errors = [r["error"] for r in found if r["error"]]
                cells = "  ".join(f"{name} {r['us']:.1f} {r['config']}" for name, r in sorted(per_kernel.items()))
                print(f"{model} {k}x{n} M={m}: bf16 {base:.1f} us | best {seconds * 1e6:.1f} us "
                      f"({base / (seconds * 1e6):.2f}x) | {cells} | {len(errors)} failed"
                      + (f": {errors[0][:200]}" if errors else ""), flush=True)  # fmt: skip
                del measure
                torch.cuda.empty_cache()
            (out / "sweep.json").write_text(json.dumps({"device": device, "rows": rows}, indent=0))
    print(f"\nlayer sums (7 linears, best candidate per shape), {time.perf_counter() - start:.0f} s:")
    for (model, m), shapes in best.items():
        counts = dict(SHAPES[model])
        if len(shapes) == len(counts):
            b = sum(shapes[s][0] * counts[s] for s in shapes)
            o = sum(shapes[s][1] * counts[s] for s in shapes)
            print(f"  {model} M={m}: bf16 {b:.1f} us, ours {o:.1f} us, {b / o:.2f}x")
    stamp = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"
    summary = {"date": stamp, "device": device, "torch": torch.__version__, "rows": rows}
    (out / "sweep.json").write_text(json.dumps(summary, indent=0))
    if not args.no_save:
        print(f"winners saved to {table.save()}")


if __name__ == "__main__":
    main()
