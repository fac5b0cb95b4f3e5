"""Prefill lab: does a decoder layer's dequantization hide beside the previous layer's matmuls on a second stream?

Eager prefill of a GRACE INT4 model pays, on the GPU, a bf16 write and re-read of every weight (dequantize +
cuBLAS: ~+186 us per LLaVA-1.5-7B layer at 576 tokens, ``kernel_lab_h100.md``), which bounds its time to first token
above bf16's. cuBLAS's prefill GEMMs are compute-bound and leave most of the memory bandwidth unused; the dequantize
kernel is memory-bound. This lab times, on the GPU alone (the host queues everything ahead), a stand-in for the
decoder layers at prefill size (fused q|k|v, causal SDPA, o, fused gate|up, SiLU-gate, down):

- ``bf16``: dense bf16 weights (the fused shapes);
- ``serial``: each layer dequantizes its four weights (a launch each), then runs;
- ``overlap``: a side stream dequantizes layer i+1 while the main stream runs layer i (two layers' dense weights
  alive at a time);
- ``overlap-carveN``: ``overlap`` with cuBLAS told to leave N SMs free (``torch._C._set_sm_carveout_experimental``),
  so the side stream's dequantize kernels find SMs while the matmuls run;
- ``chunkedC-carveN``: within each linear, a side stream dequantizes the weight in C row chunks while the main
  stream multiplies the chunks already done into their columns of the output (cuBLAS leaving N SMs free): no
  weights held across linears;
- ``dequant-only`` and the per-layer sum of ``serial`` minus ``bf16`` for reference.

    python benchmarks/overlap_lab.py --models llava-1.5-7b qwen2-vl-2b --tokens 600
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from grace_quant.kernels import pack
from grace_quant.kernels import triton_w4a16 as tw

MODELS = {  # hidden, heads, kv heads, intermediate, layers
    "llava-1.5-7b": (4096, 32, 32, 11008, 32),
    "qwen2-vl-2b": (1536, 12, 2, 8960, 28),
}
GROUP = 128


def layer_weights(hidden: int, heads: int, kv: int, inter: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    head = hidden // heads
    shapes = [(hidden + 2 * kv * head, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter)]
    out = []
    for n, k in shapes:
        codes = torch.randint(-8, 8, (n, k), dtype=torch.int8, device="cuda")
        out.append((pack(codes, 4), (torch.rand(n, k // GROUP, device="cuda") * 0.02 + 0.001).to(torch.bfloat16)))
    return out


def dequantize_layer(weights: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """A layer's four dense weights, one dequantize launch each (what eager prefill runs)."""
    return [tw.dequantize_w4(packed, scales, GROUP, torch.bfloat16) for packed, scales in weights]


def chunked_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, chunks: int, side) -> torch.Tensor:
    """``x @ W^T``: ``side`` dequantizes W in ``chunks`` row blocks, the current stream multiplies each block as soon
    as it is ready into its columns of the output."""
    main = torch.cuda.current_stream()
    n = packed.shape[0]
    step = -(-n // chunks // 32) * 32
    y = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    side.wait_stream(main)
    ready = []
    with torch.cuda.stream(side):
        for a in range(0, n, step):
            w = tw.dequantize_w4(packed[a : a + step], scales[a : a + step], GROUP, x.dtype)
            event = torch.cuda.Event()
            event.record(side)
            ready.append((a, w, event))
    for a, w, event in ready:
        main.wait_event(event)
        w.record_stream(main)
        torch.mm(x, w.t(), out=y[:, a : a + w.shape[0]])
    return y


def run_layer(x: torch.Tensor, dense, heads: int, kv: int, linear=F.linear) -> torch.Tensor:
    hidden = x.shape[-1]
    head = hidden // heads
    t = x.shape[0]
    qkv = linear(F.rms_norm(x, (hidden,)), dense[0])
    q = qkv[:, :hidden].view(1, t, heads, head).transpose(1, 2)
    k = qkv[:, hidden : hidden + kv * head].view(1, t, kv, head).transpose(1, 2)
    v = qkv[:, hidden + kv * head :].view(1, t, kv, head).transpose(1, 2)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != heads)
    x = x + linear(a.transpose(1, 2).reshape(t, hidden), dense[1])
    gate, up = linear(F.rms_norm(x, (hidden,)), dense[2]).chunk(2, dim=-1)
    return x + linear(F.silu(gate) * up, dense[3])


def timed(fn, repeats: int) -> float:
    """Median ms of ``fn`` on the GPU (events on the current stream, host queue filled ahead)."""
    times = []
    for _ in range(repeats + 2):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[2:])


def carved(fn, sms: int):
    """``fn`` run with cuBLAS leaving ``sms`` SMs free."""

    def run():
        torch._C._set_sm_carveout_experimental(sms)
        try:
            return fn()
        finally:
            torch._C._set_sm_carveout_experimental(None)

    return run


def lab(name: str, tokens: int, repeats: int, carveouts: list[int], chunks: list[int]) -> dict:
    hidden, heads, kv, inter, layers = MODELS[name]
    torch.manual_seed(0)
    packed = [layer_weights(hidden, heads, kv, inter) for _ in range(layers)]
    dense = [dequantize_layer(w) for w in packed]
    x0 = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16) * 0.1
    side = torch.cuda.Stream()

    def bf16():
        x = x0
        for d in dense:
            x = run_layer(x, d, heads, kv)
        return x

    def serial():
        x = x0
        for w in packed:
            x = run_layer(x, dequantize_layer(w), heads, kv)
        return x

    def overlap():
        main = torch.cuda.current_stream()
        x = x0
        ready = [None] * layers
        side.wait_stream(main)
        with torch.cuda.stream(side):
            ready[0] = (dequantize_layer(packed[0]), torch.cuda.Event())
            ready[0][1].record(side)
        for i in range(layers):
            if i + 1 < layers:
                with torch.cuda.stream(side):
                    ready[i + 1] = (dequantize_layer(packed[i + 1]), torch.cuda.Event())
                    ready[i + 1][1].record(side)
            weights, event = ready[i]
            main.wait_event(event)
            for w in weights:
                w.record_stream(main)
            x = run_layer(x, weights, heads, kv)
            ready[i] = None
        return x

    def chunked(c: int):
        def run():
            x = x0
            for w in packed:
                x = run_layer(x, w, heads, kv, lambda x, pw, c=c: chunked_linear(x, *pw, c, side))
            return x

        return run

    def dequant_only():
        for w in packed:
            dequantize_layer(w)

    out = {}
    arms = [("bf16", bf16), ("serial", serial), ("overlap", overlap), ("dequant-only", dequant_only)]
    arms += [(f"overlap-carve{n}", carved(overlap, n)) for n in carveouts]
    arms += [(f"bf16-carve{n}", carved(bf16, n)) for n in carveouts]
    arms += [(f"chunked{c}-carve{n}", carved(chunked(c), n)) for c in chunks for n in [0, *carveouts]]
    for arm, fn in arms:
        fn()
        out[arm] = timed(fn, repeats)
    out["equal"] = bool(torch.equal(bf16(), serial()) and torch.equal(serial(), overlap()))  # the same bits
    # a carved-out matmul may take another cuBLAS algorithm: compare with fp tolerance, not bits
    out["chunked_equal"] = all(torch.equal(chunked(c)(), serial()) for c in chunks)  # bits: cuBLAS may differ
    out["carved_close"] = all(
        torch.allclose(carved(overlap, n)().float(), serial().float(), rtol=2e-2, atol=2e-2) for n in carveouts
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--tokens", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default="overlap_lab.json")
    parser.add_argument("--carveouts", default="", help="comma-separated SM counts cuBLAS leaves free, e.g. 16,32")
    parser.add_argument("--chunks", default="", help="comma-separated row-chunk counts for the chunked arms, e.g. 2,4")
    args = parser.parse_args()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens, "models": {}}
    for name in args.models:
        ints = lambda text: [int(v) for v in text.split(",") if v]  # noqa: E731
        r = lab(name, args.tokens, args.repeats, ints(args.carveouts), ints(args.chunks))
        results["models"][name] = r
        print(
            f"{name} M={args.tokens}: bf16 {r['bf16']:.2f} ms, serial {r['serial']:.2f} ({r['serial'] / r['bf16']:.3f}x),"
            f" overlap {r['overlap']:.2f} ({r['overlap'] / r['bf16']:.3f}x), dequant only {r['dequant-only']:.2f},"
            f" equal {r['equal']}; "
            + ", ".join(f"{a} {t:.2f}" for a, t in r.items() if "carve" in a and isinstance(t, float))
            + f"; chunked equal {r['chunked_equal']}",
            flush=True,
        )
        torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
