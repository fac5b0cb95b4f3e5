"""Which W4A16 kernel serves a call, and with which tuned launch configuration: from shapes alone.

A call of ``M`` tokens takes path ``gemv`` (``M <= GEMV_MAX_M``), ``tc`` (the split-K tensor-core kernel, up to
``TC_MAX_M``) or ``large`` (dequantize + cuBLAS races the tensor-core kernel). Its configuration is filed under the
key ``(path, M bucket, N, K, group, dtype)`` in this GPU's table (:mod:`.tables`), and names the kernel that won
there (``"tc": 1`` the tensor-core kernel, ``"step_k"`` / ``"block_j"`` the Triton GEMVs, ``"gemv4": 1`` the Gluon
GEMV, ``"wgmma": 1`` the Gluon Hopper kernel, ``"tc": 0`` dequantize + cuBLAS); a key without an entry runs the path's built-in heuristic. Lookups are
dictionary reads on the host: safe under CUDA graphs and ``torch.compile`` (no syncs), and nothing is ever tuned here
(tuning is :mod:`.tuner`'s job, ahead of time).
"""

from __future__ import annotations

import bisect

import torch

from .tables import Config, device_name, table

M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
"""Token counts with their own configuration; M above the last bucket shares its entry (compute-bound alike)."""
GEMV_MAX_M = 2
"""Rows routed to the GEMV when the GPU's table has no entry (a tuned entry may pick either kernel up to
``GEMV_ROWS``)."""
GEMV_ROWS = 4
"""Rows the CUDA-core GEMV kernel accepts."""
TC_MAX_M = 64
"""Rows served by the split-K tensor-core kernel; above, dequantize + cuBLAS unless a tuned entry says otherwise."""
SUPPORTED_GROUPS = (32, 64, 128)
"""Group sizes the W4A16 Triton kernels implement; other sizes run dequantize + matmul (the torch reference)."""

__all__ = [
    "GEMV_MAX_M",
    "GEMV_ROWS",
    "M_BUCKETS",
    "SUPPORTED_GROUPS",
    "TC_MAX_M",
    "config_for",
    "key_for",
    "m_bucket",
    "path_for",
]


def m_bucket(m: int) -> int:
    """The smallest bucket of :data:`M_BUCKETS` that holds ``m`` tokens; the last bucket for larger ``m``."""
    if m < 1:
        raise ValueError(f"m must be at least 1 token, got {m}")
    return M_BUCKETS[min(bisect.bisect_left(M_BUCKETS, m), len(M_BUCKETS) - 1)]


def path_for(m: int) -> str:
    """The kernel that serves ``m`` tokens: ``gemv`` (M <= 2), ``tc`` (M <= 64) or the ``large`` race."""
    return "gemv" if m <= GEMV_MAX_M else "tc" if m <= TC_MAX_M else "large"


def key_for(m: int, n: int, k: int, group: int, dtype: torch.dtype) -> str:
    """``"path|bucket|N|K|group|dtype"``: the JSON key of one tuned configuration."""
    return f"{path_for(m)}|{m_bucket(m)}|{n}|{k}|{group}|{str(dtype).removeprefix('torch.')}"


def config_for(x2: torch.Tensor, n: int, group: int) -> Config | None:
    """The tuned configuration for this call, or None (the kernel's heuristic then decides)."""
    m, k = x2.shape
    return table(device_name(x2.device)).get(key_for(m, n, k, group, x2.dtype))
