"""Tuned launch configurations on disk, per exact GPU name: the table shipped in ``configs/`` and the user's cache.

Two JSON files are named after the exact GPU name (``torch.cuda.get_device_name``; no substring matching): the one
shipped in ``grace_quant/kernels/configs/`` and the user's cache (``$GRACE_QUANT_CACHE`` or ``~/.cache/grace_quant``),
which wins. Tables are read once per process and written atomically (temporary file, then rename).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import tempfile
from pathlib import Path

import torch

Config = dict[str, int]
SHIPPED_DIR = Path(__file__).with_name("configs")
CACHE_ENV = "GRACE_QUANT_CACHE"
INTERPRETER_DEVICE = "triton-interpreter"
GENERATION = 2
"""Kernel generation the tables are tuned for: a file of another generation names other kernels' configurations
and is ignored (re-tune with ``grace-quant tune``)."""

__all__ = ["CACHE_ENV", "GENERATION", "Config", "ConfigTable", "cache_dir", "device_name", "reset", "table"]


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
    if not isinstance(data, dict) or data.get("generation", 1) != GENERATION:
        return {}
    configs = data.get("configs", {})
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
        global EDITS
        self.configs[key] = dict(config)
        EDITS += 1

    def save(self, path: Path | None = None) -> Path:
        """Write every configuration to ``path`` (default: the user's cache) through a temporary file + rename."""
        path = path or self.user_path
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"device": self.device, "generation": GENERATION, "configs": dict(sorted(self.configs.items()))}
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
EDITS = 0
"""Changes to any table in this process (``put``, :func:`reset`): callers that keep what a lookup returned (the eager
plans of ``triton_w4a16.eager_linear``) look again when it moves."""


def table(device: str) -> ConfigTable:
    """The (cached) configuration table of ``device``; :func:`reset` forgets loaded tables."""
    if device not in _TABLES:
        _TABLES[device] = ConfigTable(device)
    return _TABLES[device]


def reset() -> None:
    """Forget loaded tables (the next lookup re-reads the files)."""
    global EDITS
    _TABLES.clear()
    EDITS += 1
