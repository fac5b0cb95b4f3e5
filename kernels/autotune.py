"""Tuned launch configurations for the W4A16 kernels, per exact GPU name, never tuned behind the caller's back.

A configuration is chosen per key ``(path, M bucket, N, K, group, dtype)``: ``path`` is the kernel (``gemv`` for
M <= 2, ``tc`` up to M = 64, ``large`` above, where dequantize + cuBLAS races the tensor-core kernel), the M bucket
the smallest of :data:`M_BUCKETS` that holds the token count (the last one holds every larger M). Lookups
are dictionary reads on the host (safe under CUDA graphs and ``torch.compile``: shapes only, no syncs); a key
without an entry runs the built-in heuristic. Configurations come from two JSON files named after the exact GPU
name (``torch.cuda.get_device_name``; no substring matching): the one shipped in ``kernels/configs/`` and the
user's cache (``$GRACE_QUANT_CACHE`` or ``~/.cache/grace_quant``), which wins. Only :func:`tune_model` (or
:func:`tune_key`) times candidates, ahead of time and outside graph capture, and writes the user's cache
atomically.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
"""Token counts with their own configuration; M above the last bucket shares its entry (compute-bound alike)."""
GEMV_MAX_M = 2
"""Rows served by the GEMV: on the H200 the tensor-core kernel wins from M = 3 (see benchmarks/bench_kernels.py)."""
TC_MAX_M = 64
"""Rows served by the split-K tensor-core kernel; above, dequantize + cuBLAS unless a tuned entry says otherwise."""

GEMV_SPACE: tuple[dict[str, int], ...] = tuple(
    {"block_n": bn, "step_k": sk, "num_warps": nw, "target_programs_per_sm": tp}
    for bn in (4, 8, 16)
    for sk in (512, 1024, 2048)
    for nw in (2, 4)
    for tp in (0, 4)
)
"""Candidates for the GEMV (``target_programs_per_sm`` 0: no split-K)."""

TC_SPACE: tuple[dict[str, int], ...] = tuple(
    {"block_n": bn, "num_warps": nw, "num_stages": ns, "target_programs_per_sm": tp}
    for bn in (32, 64, 128)
    for nw in (4, 8)
    for ns in (2, 3)
    for tp in (2, 4)
)
"""Candidates for the split-K tensor-core kernel (its ``block_m`` follows the M bucket)."""

LARGE_SPACE: tuple[dict[str, int], ...] = ({"tc": 0},) + tuple(
    {"tc": 1, "block_m": bm, "block_n": bn, "num_warps": nw, "num_stages": ns}
    for bm in (64, 128)
    for bn in (64, 128)
    for nw in (4, 8)
    for ns in (2, 3)
)
"""The race above ``TC_MAX_M``: dequantize + cuBLAS (``tc`` 0, the fallback) against the tensor-core kernel's tiles
(no split-K: large M has tiles enough)."""

Config = dict[str, int]
SHIPPED_DIR = Path(__file__).with_name("configs")
CACHE_ENV = "GRACE_QUANT_CACHE"
INTERPRETER_DEVICE = "triton-interpreter"

__all__ = [
    "GEMV_MAX_M",
    "GEMV_SPACE",
    "LARGE_SPACE",
    "M_BUCKETS",
    "TC_MAX_M",
    "TC_SPACE",
    "ConfigTable",
    "config_for",
    "device_name",
    "key_for",
    "matmul_shapes",
    "m_bucket",
    "table",
    "tune_key",
    "tune_model",
]


def m_bucket(m: int) -> int:
    """The smallest bucket of :data:`M_BUCKETS` that holds ``m`` tokens; the last bucket for larger ``m``."""
    if m < 1:
        raise ValueError(f"m must be at least 1 token, got {m}")
    return next((bucket for bucket in M_BUCKETS if m <= bucket), M_BUCKETS[-1])


def path_for(m: int) -> str:
    """The kernel that serves ``m`` tokens: ``gemv`` (M <= 2), ``tc`` (M <= 64) or the ``large`` race."""
    return "gemv" if m <= GEMV_MAX_M else "tc" if m <= TC_MAX_M else "large"


def space_for(m: int) -> tuple[Config, ...]:
    """The candidate configurations of ``m``'s path."""
    return {"gemv": GEMV_SPACE, "tc": TC_SPACE, "large": LARGE_SPACE}[path_for(m)]


def key_for(m: int, n: int, k: int, group: int, dtype: torch.dtype) -> str:
    """``"path|bucket|N|K|group|dtype"``: the JSON key of one tuned configuration."""
    return f"{path_for(m)}|{m_bucket(m)}|{n}|{k}|{group}|{str(dtype).removeprefix('torch.')}"


def device_name(device: torch.device | None = None) -> str:
    """The exact GPU name configurations are filed under (the interpreter has its own name)."""
    if device is None or device.type != "cuda":
        return INTERPRETER_DEVICE
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _file_name(device: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", device).strip("_") + ".json"


def cache_dir() -> Path:
    """Where tuned configurations are written: ``$GRACE_QUANT_CACHE`` or ``~/.cache/grace_quant``, then ``kernels``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "grace_quant")
    return Path(root) / "kernels"


def _read(path: Path) -> dict[str, Config]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RuntimeError(f"cannot read tuned kernel configs {path}: {exc}; delete the file to re-tune") from exc
    configs = data.get("configs", {}) if isinstance(data, dict) else {}
    return {str(k): {str(a): int(b) for a, b in v.items()} for k, v in configs.items()}


class ConfigTable:
    """Tuned configurations of one GPU: shipped ones, overridden by the user's cache."""

    def __init__(self, device: str, shipped_dir: Path = SHIPPED_DIR, user_dir: Path | None = None):
        self.device = device
        self.shipped_path = shipped_dir / _file_name(device)
        self.user_path = (user_dir or cache_dir()) / _file_name(device)
        self.configs: dict[str, Config] = {**_read(self.shipped_path), **_read(self.user_path)}

    def get(self, key: str) -> Config | None:
        return self.configs.get(key)

    def put(self, key: str, config: Config) -> None:
        self.configs[key] = dict(config)

    def save(self, path: Path | None = None) -> Path:
        """Write every configuration to ``path`` (default: the user's cache) through a temporary file + rename."""
        path = path or self.user_path
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"device": self.device, "configs": dict(sorted(self.configs.items()))}
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as stream:
                json.dump(payload, stream, indent=1)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path


_TABLES: dict[str, ConfigTable] = {}


def table(device: str) -> ConfigTable:
    """The (cached) configuration table of ``device``; :func:`reset` forgets loaded tables."""
    if device not in _TABLES:
        _TABLES[device] = ConfigTable(device)
    return _TABLES[device]


def reset() -> None:
    """Forget loaded tables (the next lookup re-reads the files)."""
    _TABLES.clear()


def config_for(x2: torch.Tensor, n: int, group: int) -> Config | None:
    """The tuned configuration for this call, or None (the kernel's heuristic then decides)."""
    m, k = x2.shape
    return table(device_name(x2.device)).get(key_for(m, n, k, group, x2.dtype))


# ----------------------------------------------------------------------------------------------------------------
# tuning (ahead of time, never during capture)
# ----------------------------------------------------------------------------------------------------------------


def tune_key(
    key: str, candidates: Sequence[Config], measure: Callable[[Config], float], table_: ConfigTable
) -> tuple[Config, float]:
    """Time every candidate with ``measure`` (seconds; failures are skipped) and file the fastest under ``key``."""
    best: tuple[Config, float] | None = None
    errors = []
    for config in candidates:
        try:
            seconds = measure(config)
        except Exception as exc:  # noqa: BLE001  (a config the kernel or the GPU rejects is just not a candidate)
            errors.append(f"{config}: {type(exc).__name__}: {exc}")
            continue
        if best is None or seconds < best[1]:
            best = (config, seconds)
    if best is None:
        raise RuntimeError(f"no candidate config ran for {key}: " + "; ".join(errors[:3]))
    table_.put(key, best[0])
    return best


def matmul_shapes(model: torch.nn.Module) -> set[tuple[int, int, int, torch.dtype, torch.device]]:
    """(N, K, group, scales dtype, device) of every 4-bit matmul the model runs (fused groups, not their members)."""
    from grace_quant.fusion import FusedProjection
    from grace_quant.modules import GraceQuantLinear

    return {
        (m.out_features, m.in_features, m.group_size, m.scales.dtype, m.scales.device)
        for m in model.modules()
        if (isinstance(m, FusedProjection) or (isinstance(m, GraceQuantLinear) and m._fusion is None)) and m.bits == 4
    }


def _cuda_measure(m: int, n: int, k: int, group: int, dtype: torch.dtype, device: torch.device):
    """A ``measure(config)`` timing the kernel as a decode step runs it: CUDA-graph replay of one call per weight
    copy, copies cycled past L2 (``kernels.timing``); returns seconds per call."""
    from . import triton_w4a16 as tw
    from .timing import graph_time_us, w4_copies

    x = torch.randn(m, k, device=device, dtype=dtype)
    copies = w4_copies(n, k, group, dtype, device)

    def run(config: Config, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return tw.linear_with_config(x, packed, scales, None, group, path_for(m), config)

    def measure(config: Config) -> float:
        return graph_time_us([lambda p=p, s=s: run(config, p, s) for p, s in copies], replays=10) * 1e-6

    return measure


def tune_model(
    model: torch.nn.Module,
    m_values: Iterable[int] = M_BUCKETS,
    *,
    measure_factory: Callable[..., Callable[[Config], float]] | None = None,
    save: bool = True,
    retune: bool = False,
) -> dict[str, Config]:
    """Tune every (M bucket, shape) of ``model``'s INT4 matmuls that has no configuration yet; returns the new ones.

    Run it once per GPU model ahead of serving (it times each candidate on the GPU, a few seconds per shape and
    bucket); the results go to the user's cache, so later processes start with them. ``measure_factory(m, n, k,
    group, dtype, device)`` replaces the CUDA timer (tests).
    """
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("tune_model cannot run during CUDA graph capture: call it before capturing")
    factory = measure_factory or _cuda_measure
    shapes = sorted(matmul_shapes(model), key=str)
    if measure_factory is None:
        for *_, device in shapes:
            if device.type != "cuda":
                raise RuntimeError(f"tune_model needs the model on a CUDA GPU; its INT4 layers are on {device}")
    keyed = [(m, shape, key_for(m, *shape[:4])) for shape in shapes for m in sorted(set(m_values))]
    todo = [(m, shape, key) for m, shape, key in keyed if retune or table(device_name(shape[4])).get(key) is None]
    tuned: dict[str, Config] = {}
    tables = set()
    for m, (n, k, group, dtype, device), key in tqdm(todo, desc="tuning W4A16 kernels", unit="shape", disable=not todo):
        table_ = table(device_name(device))
        tables.add(table_.device)
        config, _ = tune_key(key, space_for(m), factory(m, n, k, group, dtype, device), table_)
        tuned[key] = config
    if save and tuned:
        for device in tables:
            table(device).save()
    return tuned
