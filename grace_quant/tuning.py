"""Tune the INT4 kernels for a model's matmuls on this GPU, ahead of serving (``grace-quant tune`` calls this).

The kernels' tuner works on shapes; this module knows which modules run an INT4 matmul: every fused group
(``q|k|v``, ``gate|up``) once, and every 4-bit layer that is not a member of one.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from grace_quant.fusion import FusedProjection
from grace_quant.kernels.dispatch import M_BUCKETS
from grace_quant.kernels.tables import Config
from grace_quant.kernels.tuner import MeasureFactory, Shape, tune_shapes
from grace_quant.modules import GraceQuantLinear

__all__ = ["matmul_shapes", "tune_model"]


def matmul_shapes(model: nn.Module) -> set[Shape]:
    """(N, K, group, scales dtype, device) of every 4-bit matmul the model runs (fused groups, not their members)."""
    return {
        (m.out_features, m.in_features, m.group_size, m.scales.dtype, m.scales.device)
        for m in model.modules()
        if (isinstance(m, FusedProjection) or (isinstance(m, GraceQuantLinear) and m._fusion is None)) and m.bits == 4
    }


def tune_model(
    model: nn.Module,
    m_values: Iterable[int] = M_BUCKETS,
    *,
    measure_factory: MeasureFactory | None = None,
    save: bool = True,
    retune: bool = False,
) -> dict[str, Config]:
    """Tune every (M bucket, shape) of ``model``'s INT4 matmuls that has no configuration yet; returns the new ones.

    Run it once per GPU model ahead of serving (a few seconds per shape and bucket); the results go to the user's
    cache, so later processes start with them. See ``grace_quant.kernels.tuner.tune_shapes`` for the arguments.
    """
    return tune_shapes(matmul_shapes(model), m_values, measure_factory=measure_factory, save=save, retune=retune)
