"""Fused sibling projections for INT4 inference: one kernel launch for q|k|v and one for gate|up.

A decoder layer calls ``q_proj``, ``k_proj`` and ``v_proj`` (and ``gate_proj``, ``up_proj``) on the same
input one after another. :func:`fuse_projections` concatenates their packed weights, scales and biases into
one :class:`FusedProjection` per group (rows stacked, so the packed format is unchanged) and turns each member's
tensors into views of the fused ones. The first member called with an input runs the single fused matmul;
the others take their column slice of that output, as long as they receive the very same input tensor.
A member called with another input, or twice, starts a new fused matmul, so results never depend on call
order; once every member has its slice, the fused output is released. The checkpoint keeps the unfused names: fusion exists only in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import accumulate

import torch
from torch import nn

from grace_quant.kernels import quant_linear
from grace_quant.modules import GraceQuantLinear

SIBLING_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Names of sibling projections that read one input in the decoder layers of LLaMA/LLaVA and Qwen2(-VL)."""

__all__ = ["SIBLING_GROUPS", "FusedProjection", "fuse_projections", "fused_groups", "unfuse_projections"]


class _PendingOutput:
    """The fused output waiting to be sliced by the members still to be called on the same input."""

    __slots__ = ("input", "output", "taken")

    def __init__(self) -> None:
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.taken = 0  # bit i set: member i has taken its slice


class FusedProjection(nn.Module):
    """Packed INT4 weights of sibling projections stacked along the output dimension.

    Its tensors are non-persistent buffers (the members' state-dict entries are views of them), so it adds
    nothing to a checkpoint; moving the model re-points the members at the moved tensors.
    """

    def __init__(self, members: Sequence[GraceQuantLinear], names: Sequence[str]):
        super().__init__()
        first = members[0]
        self.names = tuple(names)
        self.in_features = first.in_features
        self.group_size = first.group_size
        self.bits = first.bits
        self.backend = first.backend
        ends = list(accumulate(m.out_features for m in members))
        self.bounds = tuple(zip([0, *ends[:-1]], ends, strict=True))
        self.out_features = ends[-1]
        self.register_buffer("weight", torch.cat([m.weight for m in members]), persistent=False)
        self.register_buffer("scales", torch.cat([m.scales for m in members]), persistent=False)
        has_bias = first.bias is not None
        bias = torch.cat([m.bias.detach() for m in members]) if has_bias else None
        self.register_buffer("bias", bias, persistent=False)
        self._all_taken = (1 << len(members)) - 1
        self._pending = _PendingOutput()
        # plain attribute (not a registered child): the members stay where the model has them
        self._members = tuple(members)
        self._point_members()

    def _point_members(self) -> None:
        """Make every member's ``weight``, ``scales`` and ``bias`` views of the fused tensors."""
        for slot, member in enumerate(self._members):
            start, end = self.bounds[slot]
            member.weight = self.weight[start:end]
            member.scales = self.scales[start:end]
            if self.bias is not None:
                member.bias = nn.Parameter(self.bias[start:end], requires_grad=False)
            member._fusion = (self, slot)  # a tuple: not registered as a child

    def _apply(self, fn, recurse: bool = True):
        # `model.to(...)`, `.half()`, ...: the members were moved as separate copies; share storage again.
        result = super()._apply(fn, recurse)
        self._point_members()
        return result

    def project(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """Member ``slot``'s output: a slice of one fused matmul shared by all members called on ``x``."""
        pending = self._pending
        if pending.input is not x or (pending.taken >> slot) & 1:
            pending.input = x
            pending.output = quant_linear(
                x, self.weight, self.scales, self.bias, group_size=self.group_size, bits=self.bits, backend=self.backend
            )
            pending.taken = 0
        start, end = self.bounds[slot]
        y = pending.output[..., start:end]
        pending.taken |= 1 << slot
        if pending.taken == self._all_taken:  # everyone served: hold no activation between calls
            pending.input = pending.output = None
        return y

    def extra_repr(self) -> str:
        return f"{'|'.join(self.names)}, in_features={self.in_features}, out_features={self.out_features}"


def _fusable(members: Sequence[nn.Module]) -> bool:
    if not all(type(m) is GraceQuantLinear and getattr(m, "_fusion", None) is None for m in members):
        return False
    first = members[0]
    same = ("in_features", "group_size", "bits", "backend")
    if any(getattr(m, key) != getattr(first, key) for m in members for key in same):
        return False
    if any((m.bias is None) != (first.bias is None) for m in members):
        return False
    tensors = [t for m in members for t in (m.weight, m.scales, *(() if m.bias is None else (m.bias,)))]
    return (
        len({t.device for t in tensors}) == 1
        and len({m.scales.dtype for m in members}) == 1
        and all(t.device.type != "meta" for t in tensors)
    )


def fuse_projections(model: nn.Module, groups: Sequence[Sequence[str]] = SIBLING_GROUPS) -> int:
    """Fuse each group of sibling packed projections (``q|k|v``, ``gate|up``) in place; returns how many.

    Only packed INT4/INT8 layers on one device with equal settings are fused; others are left alone. Outputs
    equal the unfused model's up to the summation order of the kernels (exactly on the reference path).
    """
    fused = 0
    for parent in list(model.modules()):
        for names in groups:
            members = [getattr(parent, name, None) for name in names]
            if any(m is None for m in members) or not _fusable(members):
                continue
            with torch.no_grad():
                holder = FusedProjection(members, names)
            parent.add_module(_holder_name(names), holder)
            fused += 1
    return fused


def _holder_name(names: Sequence[str]) -> str:
    return "grace_fused_" + "_".join(name.removesuffix("_proj") for name in names)


def fused_groups(model: nn.Module) -> Iterator[tuple[str, FusedProjection]]:
    """``(name, FusedProjection)`` for every fused group of the model."""
    for name, module in model.named_modules():
        if isinstance(module, FusedProjection):
            yield name, module


def unfuse_projections(model: nn.Module) -> int:
    """Undo :func:`fuse_projections` in place: each member gets its own contiguous tensors back."""
    undone = 0
    for name, holder in list(fused_groups(model)):
        for member in holder._members:
            member._fusion = None
            member.weight = member.weight.clone()
            member.scales = member.scales.clone()
            if member.bias is not None:
                member.bias = nn.Parameter(member.bias.detach().clone(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        delattr(model.get_submodule(parent_name) if parent_name else model, child)
        undone += 1
    return undone
