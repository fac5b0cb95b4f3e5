"""Tuning the W4A16 kernels ahead of time: time each candidate launch configuration, file the fastest.

Works on matmul shapes ``(N, K, group, dtype, device)``, never on model modules (``grace_quant.tune_model``
collects a model's shapes and calls :func:`tune_shapes`). Candidates are timed as a decode step runs them: CUDA-graph
replay over weight copies cycled past L2 (:mod:`.timing`). Refused during graph capture; results go to the
user's cache (:mod:`.tables`), so later processes start with them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .dispatch import GEMV_ROWS, M_BUCKETS, TC_MAX_M, key_for, m_bucket, path_for
from .reference import quant_linear_reference
from .tables import Config, ConfigTable, device_name, table
from .timing import graph_time_us, w4_copies

GEMV_SPACE: tuple[Config, ...] = tuple(
    {"block_n": bn, "step_k": sk, "num_warps": 4, "target_programs_per_sm": tp}
    for bn in (4, 8, 16)
    for sk in (512, 1024)
    for tp in (0, 4)
)
"""Candidates for the CUDA-core GEMV, M <= 4 (``target_programs_per_sm`` 0: no split-K)."""

PIPE_SPACE: tuple[Config, ...] = tuple(
    {"block_n": bn, "block_j": bj, "num_warps": nw, "num_stages": ns, "target_programs_per_sm": tp}
    for bn, bj, nw, ns, tp in (
        (8, 64, 2, 4, 8), (8, 128, 4, 3, 4), (16, 64, 4, 4, 4), (8, 64, 4, 6, 4),
        (32, 32, 4, 4, 2), (8, 32, 4, 4, 4), (4, 32, 2, 4, 8), (16, 32, 4, 6, 4),
    )
)  # fmt: skip
"""Candidates for the pipelined GEMV, M <= 4: the H100 lab's winners (benchmarks/results/kernel_lab_h100.md); a
candidate whose step does not tile the shape's K is skipped."""

GEMV4_SPACE: tuple[Config, ...] = tuple(
    {"gemv4": 1, "rows": rows, "cols": cols, "warps": 4, "split": split}
    for rows, cols in ((2, 4), (4, 4), (8, 2), (4, 2), (8, 1), (2, 2))
    for split in (1, 4)
) + (
    {"gemv4": 1, "rows": 4, "cols": 4, "warps": 4, "split": 8},
    {"gemv4": 1, "rows": 2, "cols": 2, "warps": 4, "split": 2},
)
"""Candidates for the Gluon GEMV (:mod:`.gluon_gemv`), M <= 4: every checked ``(rows, cols, warps)`` shape, whole K
or split over 4 programs, and the two other splits that won a shape in the H100 lab (``benchmarks/gemv_lab.py``:
K = 8960-11008 wants splits of 4-8); a configuration the call's K or group does not fit is skipped."""

TC_SMALL_SPACE: tuple[Config, ...] = tuple(
    {"tc": 1, "block_m": 16, "block_n": bn, "block_k": bk, "num_warps": 4, "num_stages": ns,
     "target_programs_per_sm": tp, "prefetch": pf}
    for bn, bk, ns, tp in ((64, 128, 3, 4), (128, 128, 3, 2), (64, 64, 3, 4), (64, 128, 5, 2), (128, 64, 3, 2))
    for pf in (0, 1)
)  # fmt: skip
"""Candidates for the tensor-core kernel at M <= 16 (a 16-token tile; split-K aims at ``tp`` programs per SM): the
H200 sweep's winners (benchmarks/results/sweep_h200.json), with and without prefetching the next tile's words."""

TC_SPACE: tuple[Config, ...] = tuple(
    {"tc": 1, "block_n": 64, "block_k": bk, "num_warps": nw, "num_stages": ns, "target_programs_per_sm": 2,
     "prefetch": pf}
    for bk, nw, ns in ((128, 4, 3), (64, 8, 4), (128, 8, 3), (64, 8, 3))
    for pf in (0, 1)
)  # fmt: skip
"""Candidates for the tensor-core kernel at 16 < M <= ``TC_MAX_M`` (its token tile follows the M bucket)."""

LARGE_SPACE: tuple[Config, ...] = ({"tc": 0},) + tuple(
    {"tc": 1, "block_m": bm, "block_n": 128, "block_k": 64, "num_warps": 8, "num_stages": ns}
    for bm, ns in ((128, 3), (256, 4))
)
"""The race above ``TC_MAX_M``: dequantize + cuBLAS (``tc`` 0, the fallback) against the tensor-core kernel's tiles
(no split-K: large M has tiles enough; on the H200 dequantize + cuBLAS won every shape from M = 256 on)."""

WGMMA_SPACE: tuple[Config, ...] = tuple(
    {"wgmma": 1, "block_m": bm, "block_k": bk, "stages": st, "pipe": pipe, "split": split}
    for bm, bk, st, pipe in ((128, 128, 4, 1), (256, 128, 3, 1), (128, 64, 4, 0))
    for split in (1, 2, 4)
) + tuple(
    {"wgmma": 1, "block_m": bm, "block_k": 128, "stages": st, "pipe": 2, "split": 1}
    for bm, st in ((128, 4), (128, 5), (256, 2), (256, 3))
)
"""Candidates for the Gluon Hopper kernel (:mod:`.gluon_w4a16`), the H100 lab's winners, each also with K split
over 2 and 4 programs (shapes with few output tiles: N = 4096 at a few hundred tokens fills barely more than one
wave of 132 SMs), and the warp-specialized persistent kernel (``pipe`` 2, no split) on its tiles, raced in the large
buckets up to :data:`WGMMA_MAX_M`; on other GPUs they do not run and drop out of the race."""

WGMMA_SMALL_SPACE: dict[int, tuple[Config, ...]] = {
    bucket: tuple(
        {"wgmma": 1, "block_m": bm, "block_k": 128, "stages": st, "pipe": 1, "split": split}
        for bm, st in (((16, 4), (16, 8)) if bucket <= 16 else ((bucket, 4), (bucket // 2, 4)))
        for split in (1, 2, 4, 8)
    )
    for bucket in M_BUCKETS
    if bucket <= TC_MAX_M
}
"""Candidates for the Gluon kernel at M <= 64 per bucket: token tiles of 16-64 that cover the bucket in one or two
tiles (the weight is streamed once or twice), K split over 1-8 programs to fill the GPU (an H200 probe,
``benchmarks/gluon_profile.py --small``, do_bench timing: 1.7x cuBLAS bf16 on LLaVA-1.5-7B's gate|up and down at
M = 4-16 where the shipped tensor-core kernel gave 1.05-1.48x). Hopper only, like :data:`WGMMA_SPACE`."""

WGMMA_MAX_M = 2048
"""The largest M bucket where the Gluon kernel races (every large bucket). Large buckets are timed at both ends
(:func:`bucket_ms`): timed at its top M alone, bucket 1024 picked 256-token tiles that pad LLaVA-1.5-7B's
~600-token prefill to 768, and its GPU time grew (29.0 vs 27.9 ms on an H100: benchmarks/results/prefill_h100.md,
run 14)."""


def bucket_ms(m: int) -> tuple[int, ...]:
    """The token counts a bucket's candidates are timed at: on the ``large`` path both ends of the bucket (its top M,
    and 8 tokens above the bucket below, where large tiles pad most), elsewhere its top M."""
    if path_for(m) != "large" or m_bucket(m) != m:
        return (m,)
    return (m // 2 + 8, m)


Shape = tuple[int, int, int, torch.dtype, torch.device]
"""``(N, K, group, scales dtype, device)`` of one INT4 matmul."""
MeasureFactory = Callable[[int, int, int, int, torch.dtype, torch.device], Callable[[Config], float]]

__all__ = [
    "GEMV4_SPACE",
    "GEMV_SPACE",
    "LARGE_SPACE",
    "PIPE_SPACE",
    "TC_SMALL_SPACE",
    "TC_SPACE",
    "WGMMA_MAX_M",
    "WGMMA_SMALL_SPACE",
    "WGMMA_SPACE",
    "MeasureFactory",
    "bucket_ms",
    "Shape",
    "space_for",
    "tune_key",
    "tune_shapes",
]


def space_for(m: int) -> tuple[Config, ...]:
    """The candidate configurations for ``m`` tokens: the GEMVs race the tensor-core kernel up to their 4 rows, the
    Gluon kernel races them at M <= 64 and dequantize + cuBLAS above, up to :data:`WGMMA_MAX_M`."""
    path = path_for(m)
    if path == "large":
        return LARGE_SPACE + WGMMA_SPACE if m_bucket(m) <= WGMMA_MAX_M else LARGE_SPACE
    small = (TC_SMALL_SPACE if m <= 16 else TC_SPACE) + WGMMA_SMALL_SPACE[m_bucket(m)]
    return (GEMV_SPACE + PIPE_SPACE + GEMV4_SPACE + small) if m <= GEMV_ROWS else small


def tune_key(
    key: str,
    candidates: Sequence[Config],
    measure: Callable[[Config], float],
    table_: ConfigTable,
    on_result: Callable[[Config, float | None, str], None] | None = None,
) -> tuple[Config, float]:
    """Time every candidate with ``measure`` (seconds; failures are skipped) and file the fastest under ``key``;
    ``on_result(config, seconds or None, error)`` sees every candidate (sweeps record them all)."""
    best: tuple[Config, float] | None = None
    errors = []
    for config in candidates:
        try:
            seconds = measure(config)
        except Exception as exc:  # noqa: BLE001  (a config the kernel or the GPU rejects is just not a candidate)
            errors.append(f"{config}: {type(exc).__name__}: {exc}")
            if on_result is not None:
                on_result(config, None, errors[-1][:300])
            continue
        if on_result is not None:
            on_result(config, seconds, "")
        if best is None or seconds < best[1]:
            best = (config, seconds)
    if best is None:
        raise RuntimeError(f"no candidate config ran for {key}: " + "; ".join(errors[:3]))
    table_.put(key, best[0])
    return best


def cuda_measure(m: int, n: int, k: int, group: int, dtype: torch.dtype, device: torch.device):
    """A ``measure(config)`` timing the kernel as a decode step runs it: CUDA-graph replay of one call per weight
    copy, copies cycled past L2. Returns seconds per call at ``m`` tokens; where the bucket is timed at both ends
    (:func:`bucket_ms`), the mean of the two timings, each scaled to ``m`` tokens (so padding at the bucket's low
    end counts as much as speed at its top). Triton is imported here, on the GPU path only."""
    from . import triton_w4a16

    xs = {rows: torch.randn(rows, k, device=device, dtype=dtype) for rows in bucket_ms(m)}
    copies = w4_copies(n, k, group, dtype, device)
    # what every candidate must give (dequantize in torch + cuBLAS): a kernel that is fast but wrong is not a candidate
    expected = {rows: quant_linear_reference(x, *copies[0], None, group, 4).float() for rows, x in xs.items()}

    def run(x: torch.Tensor, config: Config, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return triton_w4a16.linear_with_config(x, packed, scales, None, group, path_for(m), config)

    def measure(config: Config) -> float:
        x = xs[m]
        if "block_j" in config and not triton_w4a16.supports_pipe(x, copies[0][1], group, config["block_j"]):
            raise ValueError(f"a step of {config['block_j']} words does not tile K = {k} in group pairs")
        gluon = config.get("wgmma") or config.get("gemv4")
        if gluon and triton_w4a16._gluon_launch(x, *copies[0], None, group, config) is None:
            raise ValueError(f"the Gluon kernel of {config} does not take this call (GPU, shape or K tiling)")
        for rows, x in xs.items():
            err = ((run(x, config, *copies[0]).float() - expected[rows]).norm() / expected[rows].norm()).item()
            if not err < 1e-2:  # the kernels agree with it to ~2e-3 (bf16) or better
                raise ValueError(
                    f"{config} is wrong at {rows} tokens (relative error {err:.1e} vs dequantize + matmul)"
                )
        seconds = [
            graph_time_us([lambda x=x, p=p, s=s: run(x, config, p, s) for p, s in copies], replays=10) * 1e-6 * m / rows
            for rows, x in xs.items()
        ]
        return sum(seconds) / len(seconds)

    return measure


def tune_shapes(
    shapes: Iterable[Shape],
    m_values: Iterable[int] = M_BUCKETS,
    *,
    measure_factory: MeasureFactory | None = None,
    save: bool = True,
    retune: bool = False,
) -> dict[str, Config]:
    """Tune every (M bucket, shape) that has no configuration yet (all of them with ``retune``); returns the new ones.

    A few seconds per shape and bucket on the GPU. ``measure_factory(m, n, k, group, dtype, device)`` replaces the
    CUDA timer (tests). The tables touched are saved to the user's cache unless ``save=False``.
    """
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("tuning cannot run during CUDA graph capture: tune before capturing")
    shapes = sorted(set(shapes), key=str)
    if measure_factory is None:
        for *_, device in shapes:
            if device.type != "cuda":
                raise RuntimeError(f"tuning needs the INT4 layers on a CUDA GPU; they are on {device}")
    factory = measure_factory or cuda_measure
    keyed = [(m, shape, key_for(m, *shape[:4])) for shape in shapes for m in sorted(set(m_values))]
    todo = [(m, shape, key) for m, shape, key in keyed if retune or table(device_name(shape[4])).get(key) is None]
    tuned: dict[str, Config] = {}
    for m, (n, k, group, dtype, device), key in tqdm(todo, desc="tuning W4A16 kernels", unit="shape", disable=not todo):
        table_ = table(device_name(device))
        config, _ = tune_key(key, space_for(m), factory(m, n, k, group, dtype, device), table_)
        tuned[key] = config
        if save:  # after every key: a run stopped part-way keeps what it timed
            table_.save()
    return tuned
