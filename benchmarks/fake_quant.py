"""Cost of QAT fake quantization per weight, forward + backward, against the cast a plain autocast step pays.

A plain bf16-autocast fine-tuning step casts each fp32 master weight to bf16 for its matmul and casts the gradient
back; a GRACE QAT step replaces that cast with ``fake_quantize`` (``grace_quant.quant``). Arms, in one process:
  cast   - ``w.to(bf16)`` forward, its gradient backward (the plain step's own per-weight work: the baseline)
  torch  - ``fake_quantize(w, log_scale, 128, 4, bf16)`` on torch ops
  fused  - the same through the fused Triton kernels (the default on CUDA; CUDA only)
Reported: median milliseconds of forward + backward per shape and the ratio to ``cast``. Shapes are the
~1.4B student's of benchmarks/trainer_step.py (Qwen2-VL layout): q|o 1536x1536, k|v 256x1536, gate|up 8960x1536,
down 1536x8960.

A host table gives each arm's wall time per call over many back-to-back calls on the small k|v weight, one GPU
sync at the end: a GPU finishes those kernels in a few microseconds, so this is the Python + launch cost per weight
that a host-bound QAT step pays (``--host-calls 0`` skips it); the fused arm is split into its parts.

A second table times the whole linear, forward + backward on ``--tokens`` rows (bf16 autocast, ``x`` and the weight
both needing gradients), the choice issue 17 asks a profile to make:
  plain   - ``F.linear`` on the fp32 master weight (what plain fine-tuning runs)
  torch / fused - ``GraceQATLinear`` on the torch fake-quant path / the fused fake-quant kernels, then cuBLAS
  linear BMxBN - ``fake_quant_backend="triton_linear"``: fake quantization inside the matmul kernels, with the
            ``--linear-blocks`` tiles (CUDA only; experimental)

    python benchmarks/fake_quant.py --out benchmarks/results/fake_quant_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import grace_quant
from grace_quant.modules import GraceQATLinear
from grace_quant.quant import fake_quantize, fused_fake_quant, mse_scales

SHAPES = [(1536, 1536), (256, 1536), (8960, 1536), (1536, 8960)]  # (out, in)
GROUP, BITS = 128, 4


def median_ms(fn: Callable[[], None], steps: int, warmup: int) -> float:
    """Median wall time (ms) of ``fn`` after ``warmup`` calls, synchronising the GPU around each call."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def arms(out_f: int, in_f: int, device: str) -> dict[str, Callable[[], None]]:
    """One forward + backward per arm on the same fp32 master weight and bf16 upstream gradient."""
    weight = (torch.randn(out_f, in_f, device=device) * 0.02).requires_grad_()
    log_scale = torch.log(mse_scales(weight.detach(), GROUP, BITS)).requires_grad_()
    upstream = torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16)

    def cast() -> None:
        weight.to(torch.bfloat16).backward(upstream)

    def torch_path() -> None:
        with fused_fake_quant(False):
            fake_quantize(weight, log_scale, GROUP, BITS, torch.bfloat16).backward(upstream)

    def fused() -> None:
        with fused_fake_quant(True):
            fake_quantize(weight, log_scale, GROUP, BITS, torch.bfloat16).backward(upstream)

    found = {"cast": cast, "torch": torch_path}
    if device == "cuda":
        found["fused"] = fused
    return found


def linear_arms(out_f: int, in_f: int, device: str, tokens: int, blocks: list[tuple[int, int]]):
    """One forward + backward of the whole linear per arm: bf16 autocast, ``x`` and the weight needing gradients."""
    layer = GraceQATLinear.from_linear(torch.nn.Linear(in_f, out_f, bias=False, device=device), group_size=GROUP,
                                       bits=BITS)  # fmt: skip
    x = torch.randn(tokens, in_f, device=device, requires_grad=True)
    upstream = torch.randn(tokens, out_f, device=device, dtype=torch.bfloat16)

    def step(forward: Callable[[], torch.Tensor]) -> None:
        x.grad = layer.weight.grad = layer.log_scale.grad = None
        with torch.autocast(device, dtype=torch.bfloat16):
            y = forward()
        y.backward(upstream)

    def qat(backend: str, tiles: tuple[int, int] | None = None) -> Callable[[], None]:
        def run() -> None:
            if tiles is not None:
                from grace_quant.kernels import triton_qat_linear

                triton_qat_linear.BLOCK_M, triton_qat_linear.BLOCK_N = tiles
            layer.fake_quant_backend = backend
            step(lambda: layer(x))

        return run

    found = {"plain": lambda: step(lambda: F.linear(x, layer.weight)), "torch": qat("torch")}
    if device == "cuda":
        found["fused"] = qat("triton")
        found.update({f"linear {bm}x{bn}": qat("triton_linear", (bm, bn)) for bm, bn in blocks})
    return found


def host_arms(device: str) -> dict[str, Callable[[], None]]:
    """Per-call host work on the small k|v weight: the plain cast, the fake-quant paths, and the fused path's parts."""
    out_f, in_f = SHAPES[1]
    found = arms(out_f, in_f, device)
    if device != "cuda":
        return found
    from grace_quant.kernels import triton_fake_quant

    weight = torch.randn(out_f, in_f, device=device) * 0.02
    log_scale = torch.log(mse_scales(weight, GROUP, BITS))
    exp_log_scale = torch.exp(log_scale)
    grad = torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16)

    def forward_no_grad() -> None:
        with torch.no_grad(), fused_fake_quant(True):
            fake_quantize(weight, log_scale, GROUP, BITS, torch.bfloat16)

    found.update({
        "fused fwd, no grad": forward_no_grad,
        "exp(log_scale)": lambda: torch.exp(log_scale),
        "fwd kernel launch": lambda: triton_fake_quant.launch_forward(weight, exp_log_scale, GROUP, BITS, torch.bfloat16),
        "bwd kernel launch": lambda: triton_fake_quant.launch_backward(weight, exp_log_scale, grad, GROUP, BITS),
    })  # fmt: skip
    return found


def host_table(device: str, calls: int) -> list[str]:
    """Markdown rows: microseconds per call of each host arm, ``calls`` calls back to back, one sync at the end."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for name, fn in host_arms(device).items():
        for _ in range(10):
            fn()
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        rows.append(f"| {name} | {(time.perf_counter() - start) * 1e6 / calls:.1f} |")
    return ["| arm | us per call |", "|---|---|", *rows]


def table(arms_for: Callable[[int, int], dict[str, Callable[[], None]]], steps: int, warmup: int) -> list[str]:
    """Markdown rows: per shape (and summed over the four) each arm's median ms and its ratio to the first arm."""
    rows, totals = [], {}
    for out_f, in_f in SHAPES:
        times = {name: median_ms(fn, steps, warmup) for name, fn in arms_for(out_f, in_f).items()}
        for name, ms in times.items():
            totals[name] = totals.get(name, 0.0) + ms
        base = next(iter(times.values()))
        rows.append(f"| {out_f}x{in_f} | " + " | ".join(f"{ms:.2f} ({ms / base:.1f}x)" for ms in times.values()) + " |")
    names, base = list(totals), next(iter(totals.values()))
    return [
        "| weight (out x in) | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        *rows,
        "| all four | " + " | ".join(f"{totals[n]:.2f} ({totals[n] / base:.1f}x)" for n in names) + " |",
    ]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15, help="timed calls per arm and shape (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=2048, help="rows of x for the whole-linear table (0: skip it)")
    parser.add_argument("--linear-blocks", default="64x64,128x64,128x128",
                        help="BLOCK_MxBLOCK_N tiles of the fused QAT linear to time (CUDA)")  # fmt: skip
    parser.add_argument("--host-calls", type=int, default=300, help="calls per arm of the host table (0: skip it)")
    parser.add_argument("--out", help="markdown results file to write")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    lines = [
        "# QAT fake quantization vs the plain step's weight cast (forward + backward)",
        "",
        f"{datetime.date.today()}, {where}, torch {torch.__version__}, grace_quant {grace_quant.__version__}; fp32 "
        f"master weights, bf16 output and upstream gradient, INT4 g{GROUP}; median of {args.steps} calls after "
        f"{args.warmup} warm-up calls; ms (ratio to cast).",
        "",
        *table(lambda out_f, in_f: arms(out_f, in_f, device), args.steps, args.warmup),
    ]
    if args.host_calls > 0:
        out_f, in_f = SHAPES[1]
        lines += ["", f"## Host cost per call ({out_f}x{in_f}, {args.host_calls} calls back to back, one sync)", "",
                  *host_table(device, args.host_calls)]  # fmt: skip
    if args.tokens > 0:
        blocks = [tuple(int(v) for v in tile.split("x")) for tile in args.linear_blocks.split(",") if tile]
        lines += [
            "",
            f"## The whole linear, forward + backward, {args.tokens} tokens (ms, ratio to plain)",
            "",
            *table(lambda out_f, in_f: linear_arms(out_f, in_f, device, args.tokens, blocks), args.steps, args.warmup),
        ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return report


if __name__ == "__main__":
    main()
