"""``deferred_stop_check``: transformers' ``generate`` on CUDA without a host sync per token (issue 16).

After every decoding step, transformers' sampling loop asks whether all sequences have finished
(``unfinished_sequences.max() == 0``), which makes the host wait until the GPU has finished that step: the host
cannot queue step ``t + 1`` while the GPU runs step ``t``, so every step pays the loop's host work (input
preparation, logits processors, stopping criteria; ~1.2-1.9 ms per step measured in ``benchmarks/results/e2e_h200.md``)
on top of the GPU's. transformers has the remedy, ``DeferredStopCheck`` (it reads the flag one step late through a
pinned copy and an event, runs one step too many at the end and undoes it), but turns it on for Apple's MPS only.
Within :func:`deferred_stop_check` it is on for CUDA too. Nothing changes outside the block, for any model, except
GRACE INT4 models loaded with ``GraceConfig(deferred_stop_check=True)`` (the default): their ``generate`` runs inside
the block (:func:`defer_by_default`) unless the caller's own ``deferred_stop_check(...)`` block says otherwise.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["defer_by_default", "deferred_stop_check", "deferred_stop_check_available"]

_ON_CUDA: contextvars.ContextVar[bool | None] = contextvars.ContextVar("grace_deferred_stop_check", default=None)
"""True / False inside a :func:`deferred_stop_check` block; None outside any (a model's default then decides)."""


def _stop_check_class():
    """transformers' ``DeferredStopCheck``, or None where this transformers has none."""
    from transformers.generation import utils as generation_utils

    check = getattr(generation_utils, "DeferredStopCheck", None)
    return check if check is not None and hasattr(check, "is_supported") else None


def deferred_stop_check_available() -> bool:
    """Whether this transformers has the deferred stop check that :func:`deferred_stop_check` turns on."""
    return _stop_check_class() is not None


def _install() -> bool:
    """Wrap ``DeferredStopCheck.is_supported`` once: CUDA counts as MPS while :data:`_ON_CUDA` is set in this context,
    everything else is asked of transformers' own rule (so a returned, non-croppable cache still opts out)."""
    check = _stop_check_class()
    if check is None:
        return False
    if getattr(check.is_supported, "_grace_wrapper", False):
        return True
    original = check.is_supported

    def is_supported(device: torch.device, *args, **kwargs) -> bool:
        if _ON_CUDA.get() is True and device.type == "cuda":
            device = torch.device("mps")  # transformers' rule, as it applies to MPS
        return original(device, *args, **kwargs)

    is_supported._grace_wrapper = True
    check.is_supported = staticmethod(is_supported)
    return True


@contextlib.contextmanager
def deferred_stop_check(enabled: bool = True) -> Iterator[bool]:
    """Within the block (this thread / task only), ``generate`` on CUDA reads its "all sequences finished" flag one
    step late, as transformers does on MPS: the host queues the next step while the GPU runs the current one. The
    tokens are the same; at the end one extra step runs and is undone. Yields whether it is on (False where this
    transformers has no deferred stop check, or with ``enabled=False``)::

        with deferred_stop_check():
            out = model.generate(**inputs, max_new_tokens=256, cache_implementation="static")
    """
    active = bool(enabled) and _install()
    token = _ON_CUDA.set(active)
    try:
        yield active
    finally:
        _ON_CUDA.reset(token)


class _DeferringGenerate:
    """``model.generate`` of a model that defers its stop check by default (:func:`defer_by_default`). An object, not a
    closure, so that ``copy.deepcopy(model)`` gets one bound to the copy."""

    _grace_defers = True

    def __init__(self, model: nn.Module):
        self.model = model
        functools.update_wrapper(self, type(model).generate)

    def __call__(self, *args, **kwargs):
        generate = type(self.model).generate.__get__(self.model)
        if _ON_CUDA.get() is not None:  # inside the caller's own deferred_stop_check(...) block
            return generate(*args, **kwargs)
        with deferred_stop_check():
            return generate(*args, **kwargs)


def defer_by_default(model: nn.Module) -> bool:
    """``GraceConfig.deferred_stop_check``: ``model.generate`` runs inside :func:`deferred_stop_check` unless the
    caller's own block (on or off) decides. Once per model; returns whether ``generate`` now defers on CUDA (False
    where this transformers has no deferred stop check, or where the model's ``generate`` was already replaced on
    the instance, which is left alone)."""
    own = vars(model).get("generate")
    if own is not None:
        return isinstance(own, _DeferringGenerate)
    if not deferred_stop_check_available():
        return False
    model.generate = _DeferringGenerate(model)
    return True
