"""One dequantize launch for the INT4 linears of a decoder layer at eager prefill.

Eager prefill is host-bound (``benchmarks/results/prefill_h100.md``): every INT4 linear on the dequantize + cuBLAS
path pays one more kernel launch and allocation on the host than bf16's matmul. The linears of one layer see the
same token count, so the first of them to need its dense weight dequantizes every member on that path with one
launch (:func:`triton_w4a16.dequantize_many`) and each member takes its view once; the buffer is let go when all
have taken theirs. A member that asks twice, whose tensors were replaced or written in place since the launch, or
that runs in another dtype or on another stream, starts a new launch: results never depend on call order.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch

from . import tables
from .dispatch import m_bucket

__all__ = ["SharedDequant"]


class _Launch:
    """One shared launch: the members it dequantized (weakly, with their tensors' versions) and their views."""

    __slots__ = ("dtype", "left", "sources", "stream", "views")

    def __init__(
        self, slots: Sequence[int], tensors: Sequence[tuple[torch.Tensor, torch.Tensor]], views, dtype, stream
    ):
        self.dtype, self.stream = dtype, stream
        self.views = dict(zip(slots, views, strict=True))
        self.sources = {
            slot: (weakref.ref(p), weakref.ref(s), p._version, s._version)
            for slot, (p, s) in zip(slots, tensors, strict=True)
        }
        self.left = len(self.views)

    def serves(self, slot: int, packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, stream) -> bool:
        source = self.sources.get(slot)
        if source is None or slot not in self.views or dtype != self.dtype or stream != self.stream:
            return False
        p, s, p_version, s_version = source
        return p() is packed and s() is scales and packed._version == p_version and scales._version == s_version


class SharedDequant:
    """The dense weights of sibling INT4 linears (``members``: objects with ``weight`` (packed) and ``scales``,
    read at every launch, so moving the model is seen) made by one launch per prefill (see the module docstring)."""

    def __init__(self, members: Sequence[Any], group_size: int):
        self.members = tuple(members)
        self.group_size = group_size
        self.pending: _Launch | None = None
        self._slots: dict[tuple, tuple[int, ...]] = {}

    def weight(
        self, slot: int, packed: torch.Tensor, scales: torch.Tensor, m: int, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """Member ``slot``'s dense weight (``packed`` / ``scales`` are its tensors) for a call of ``m`` tokens on the
        dequantize + cuBLAS path, or None where no shared launch serves it (the caller then dequantizes its own)."""
        stream = torch._C._cuda_getCurrentRawStream(packed.get_device()) if packed.is_cuda else None
        pending = self.pending
        if pending is None or not pending.serves(slot, packed, scales, dtype, stream):
            pending = self.pending = self._launch(m, dtype, stream)
            if pending is None or not pending.serves(slot, packed, scales, dtype, stream):
                self.pending = None
                return None
        view = pending.views.pop(slot)
        pending.left -= 1
        if not pending.left:
            self.pending = None  # every member served: hold no dense weight between calls
        return view

    def release(self) -> None:
        """Drop a launch's views not yet taken (a forward that stopped midway, a model being moved)."""
        self.pending = None

    def _launch(self, m: int, dtype: torch.dtype, stream) -> _Launch | None:
        from .triton_w4a16 import _many_plan

        tensors = [(member.weight, member.scales) for member in self.members]
        slots = self._dense_slots(m, dtype, tensors)
        if len(slots) < 2:
            return None  # nothing to share
        chosen = [tensors[i] for i in slots]
        plan = _many_plan(chosen, self.group_size, dtype)
        if plan is None:
            return None
        return _Launch(slots, chosen, plan(chosen), dtype, stream)

    def _dense_slots(self, m: int, dtype: torch.dtype, tensors) -> tuple[int, ...]:
        """The members whose calls of ``m`` tokens run dequantize + cuBLAS (fixed per M bucket and table state)."""
        from .triton_w4a16 import dense_path

        device = tensors[0][0].device
        key = (m_bucket(m), dtype, device, tables.EDITS)
        if key not in self._slots:
            self._slots[key] = tuple(
                i
                for i, (packed, _) in enumerate(tensors)
                if packed.dim() == 2
                and dense_path(m, packed.shape[0], packed.shape[1] * 8, self.group_size, dtype, device)
            )
        return self._slots[key]
