"""How the W4A16 kernels are timed on a GPU, for the tuner and the benchmarks alike (one rule, one implementation).

A decode step replays a CUDA graph whose weights come from HBM, not L2. Timing one eager call measures neither: the
host's launch cost (tens of microseconds for a Triton kernel) can exceed the kernel, and a weight read twice sits in
L2 (50 MB on an H200). So a measurement captures one call per weight *copy* into a CUDA graph, with enough copies
that together they exceed L2 several times, and reports the median per-call time over graph replays.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch

from .packing import pack

ROTATE_BYTES = 128 * 2**20
"""Bytes of weight copies one measurement cycles through (> 2x the L2 of every current NVIDIA data-centre GPU)."""
MAX_COPIES = 512
"""Cap on copies per measurement: tiny weights would otherwise need thousands of graph nodes."""

__all__ = [
    "MAX_COPIES",
    "ROTATE_BYTES",
    "copies_for",
    "dense_time_us",
    "graph_time_us",
    "random_w4",
    "w4_bytes",
    "w4_copies",
]


def copies_for(bytes_per_copy: int, rotate_bytes: int = ROTATE_BYTES) -> int:
    """How many copies of a ``bytes_per_copy`` operand keep one measurement out of L2 (at least 2, at most
    :data:`MAX_COPIES`)."""
    if bytes_per_copy <= 0:
        raise ValueError(f"bytes_per_copy must be positive, got {bytes_per_copy}")
    return min(MAX_COPIES, max(2, math.ceil(rotate_bytes / bytes_per_copy)))


def w4_bytes(n: int, k: int, group: int, scale_bytes: int = 2) -> int:
    """Bytes an INT4 ``[n, k]`` weight moves per call: the packed codes and one ``scale_bytes`` scale per group."""
    return n * k // 2 + n * (k // group) * scale_bytes


def random_w4(
    n: int, k: int, group: int, dtype: torch.dtype, device: str | torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random INT4 weight in GRACE's packed format (codes packed on ``device``) and positive ``dtype`` scales."""
    packed = pack(torch.randint(-8, 8, (n, k), dtype=torch.int8, device=device), 4)
    scales = (torch.rand(n, k // group, device=device) * 0.02 + 0.002).to(dtype)
    return packed, scales


def w4_copies(
    n: int, k: int, group: int, dtype: torch.dtype, device: str | torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """As many random INT4 weights (:func:`random_w4`) as one measurement cycles through to stay out of L2."""
    bytes_per_copy = w4_bytes(n, k, group, torch.empty((), dtype=dtype).element_size())
    return [random_w4(n, k, group, dtype, device) for _ in range(copies_for(bytes_per_copy))]


def graph_time_us(calls: list[Callable[[], object]], replays: int = 15) -> float:
    """Median per-call time (us) of a CUDA graph that runs every call in ``calls`` once, after an eager warm-up on a
    side stream (compiles kernels, fills allocator pools)."""
    if not calls:
        raise ValueError("graph_time_us needs at least one call")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fn() for fn in calls]
    del outs
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def dense_time_us(n: int, k: int, m: int, dtype: torch.dtype, device: str | torch.device = "cuda") -> float:
    """The dense baseline the W4A16 kernels are judged against: ``F.linear`` of ``m`` tokens by an ``[n, k]`` weight
    in ``dtype`` (cuBLAS), timed as :func:`graph_time_us` times the kernels, over weight copies cycled past L2."""
    weights = [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(copies_for(n * k * 2))]
    x = torch.randn(m, k, device=device, dtype=dtype)
    return graph_time_us([lambda w=w: torch.nn.functional.linear(x, w) for w in weights])
