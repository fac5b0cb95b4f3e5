"""GRACE behind optimum's quantizer interface (optional extra: ``pip install grace-quant[optimum]``).

``GraceOptimumQuantizer.from_pretrained(fp_dir).quantize(out_dir)`` turns a full-precision model folder into
a packed GRACE INT4 folder (round-to-nearest on GRACE's MSE grid; QAT distillation is ``GraceTrainer``'s job).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

try:
    from optimum.quantization_base import OptimumQuantizer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("grace_quant.integrations.optimum needs optimum: pip install 'grace-quant[optimum]'") from exc

from grace_quant.config import GraceConfig

from .checkpoint_files import quantize_folder, read_config


class GraceOptimumQuantizer(OptimumQuantizer):
    """optimum ``OptimumQuantizer`` producing GRACE INT4 checkpoints from full-precision folders."""

    def __init__(self, model_path: str | os.PathLike, **load_kwargs: Any):
        self.model_path = Path(model_path)
        self.load_kwargs = load_kwargs

    @classmethod
    def from_pretrained(
        cls, model_or_path: str | os.PathLike, file_name: str | None = None, **load_kwargs: Any
    ) -> GraceOptimumQuantizer:
        """Point the quantizer at a full-precision model folder; ``load_kwargs`` go to ``from_pretrained``."""
        if file_name is not None:
            raise ValueError("GraceOptimumQuantizer reads whole model folders; file_name is not supported")
        read_config(model_or_path)  # a clear error now rather than at quantize time
        return cls(model_or_path, **load_kwargs)

    def quantize(
        self,
        save_dir: str | os.PathLike,
        file_prefix: str | None = None,
        quantization_config: GraceConfig | None = None,
        *,
        overwrite: bool = False,
        **kwargs: Any,
    ) -> Path:
        """Write the packed GRACE checkpoint to ``save_dir``; ``kwargs`` build a ``GraceConfig`` when none is given
        (e.g. ``bits=4, group_size=128``)."""
        if file_prefix is not None:
            raise ValueError("GraceOptimumQuantizer writes standard Hugging Face folders; file_prefix is not supported")
        if quantization_config is not None and kwargs:
            raise ValueError(f"pass either quantization_config or GraceConfig keywords, not both ({sorted(kwargs)})")
        config = quantization_config or GraceConfig(**kwargs)
        return quantize_folder(self.model_path, save_dir, config, overwrite=overwrite, **self.load_kwargs)


__all__ = ["GraceOptimumQuantizer"]
