"""Host cost of one eager INT4 linear call on the GPU (what prefill and eager decode pay per layer).

A small layer (1536 x 1536) keeps the GPU work short, so back-to-back calls measure the host path: cuBLAS
``F.linear`` (bf16) against the ``grace_quant::w4a16_linear`` custom op, the Triton entry point with its dispatch
per call, ``eager_linear`` (the dispatch resolved once per call shape) and ``GraceQuantLinear`` (the module users
run), and the pieces of the prefill path (dequantize kernel, the dense weight's allocation, the tuned-table lookup).
Medians of 5 rounds of 300 calls; host CPU time of the calling thread; GPU time from CUDA events.

    python benchmarks/host_overhead.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from grace_quant.kernels import pack, triton_w4a16, w4a16_linear_op
from grace_quant.kernels.dispatch import config_for
from grace_quant.modules import GraceQuantLinear

N = K = 1536
GROUP = 128
CALLS = 300


def per_call_us(fn) -> tuple[float, float, float]:
    """(wall, host CPU, GPU) us per call for ``CALLS`` back-to-back calls, medians of 5 rounds. The host CPU time is
    the calling thread's (``time.thread_time``): what the call costs the host, steadier than wall time on a shared
    machine."""
    fn()
    torch.cuda.synchronize()
    walls, cpus, gpus = [], [], []
    for _ in range(5):
        start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start, cpu = time.perf_counter(), time.thread_time()
        start_event.record()
        for _ in range(CALLS):
            fn()
        end_event.record()
        cpus.append((time.thread_time() - cpu) / CALLS * 1e6)
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - start) / CALLS * 1e6)
        gpus.append(start_event.elapsed_time(end_event) / CALLS * 1e3)
    return statistics.median(walls), statistics.median(cpus), statistics.median(gpus)


def main() -> None:
    dense = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    packed = pack(torch.randint(-8, 8, (N, K), dtype=torch.int8, device="cuda"), 4)
    scales = (torch.rand(N, K // GROUP, device="cuda") * 0.01).to(torch.bfloat16)
    layer = GraceQuantLinear(K, N, bias=False, group_size=GROUP, device="cuda", dtype=torch.bfloat16)
    layer.weight, layer.scales = packed, scales
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {K}x{N}, eager, no grad")
    print("| M | arm | wall us/call | host CPU us/call | GPU us/call |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for m in (1, 16, 597):
            x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
            arms = {
                "F.linear bf16": lambda x=x: F.linear(x, dense),
                "custom op": lambda x=x: w4a16_linear_op(x, packed, scales, None, GROUP),
                "w4a16_linear (dispatch per call)": lambda x=x: triton_w4a16.w4a16_linear(
                    x, packed, scales, None, GROUP
                ),
                "eager_linear (dispatch once per call shape)": lambda x=x: triton_w4a16.eager_linear(
                    x, packed, scales, None, GROUP
                ),
                "GraceQuantLinear (the module: eager_linear)": lambda x=x: layer(x),
                "dequantize_w4 alone": lambda: triton_w4a16.dequantize_w4(packed, scales, GROUP, torch.bfloat16),
                "torch.empty of the dense weight": lambda: torch.empty(N, K, device="cuda", dtype=torch.bfloat16),
                "config_for (table lookup)": lambda x=x: config_for(x, N, GROUP),
            }
            if m >= 128 and torch.cuda.get_device_capability()[0] == 9:
                arms.update(_gluon_arms(x, packed, scales))
            for arm, fn in arms.items():
                wall, cpu, gpu = per_call_us(fn)
                print(f"| {m} | {arm} | {wall:.1f} | {cpu:.1f} | {gpu:.1f} |")


def _gluon_arms(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> dict:
    """The Gluon kernel (128-token pipelined tile) launched as the dispatch does, and through Triton's JIT."""
    import triton

    from grace_quant.kernels import gluon_w4a16 as gw
    from grace_quant.kernels.triton_w4a16 import _counters

    tile = (128, 128, 4, True)
    run = gw.plan(x.dtype, N, K, GROUP, False, tile)
    mma, dot, words, out = gw._layouts(128, 128)
    x_layout, w_layout = gw._shared_layouts(128, 128, x.dtype)
    counters = _counters(x.device)

    def jit() -> torch.Tensor:
        y = torch.empty(x.shape[0], N, device=x.device, dtype=x.dtype)
        gw._kernel[(triton.cdiv(x.shape[0], 128), N // 128, 1)](
            gw.TensorDescriptor.from_tensor(x, [128, 128], x_layout),
            gw.TensorDescriptor.from_tensor(packed, [128, 16], w_layout),
            scales, y, y, y, counters, x.shape[0], N, K // 8, K // GROUP, N, K // 128,
            BM=128, BK=128, GROUP=GROUP, STAGES=4, HAS_BIAS=False, PAIR=gw._BF16_PAIR, MMA=mma, DOT=dot, WORDS=words,
            OUT=out, PIPE=True, SPLIT=False, LANE_BITS=gw.LANE_BITS, num_warps=8,
        )  # fmt: skip
        return y

    return {
        "Gluon kernel, planned launch (the dispatch's)": lambda: run(x, packed, scales, None),
        "Gluon kernel through Triton's JIT": jit,
        "Gluon kernel, split K over 2": lambda: gw.wgmma_w4a16(x, packed, scales, None, GROUP, split=2),
    }


if __name__ == "__main__":
    main()
