"""``deferred_stop_check``: transformers' ``generate`` on CUDA without a host sync per token (issue 16).

After every decoding step, transformers' sampling loop asks whether all sequences have finished
(``unfinished_sequences.max() == 0``), which makes the host wait until the GPU has finished that step: the host
cannot queue step ``t + 1`` while the GPU runs step ``t``, so every step pays the loop's host work (input
preparation, logits processors, stopping criteria; ~1.2-1.9 ms per step measured in ``benchmarks/results/e2e_h200.md``)
on top of the GPU's. transformers has the remedy, ``DeferredStopCheck`` (it reads the flag one step late through a
pinned copy and an event, runs one step too many at the end and undoes it), but turns it on for Apple's MPS only.
Within :func:`deferred_stop_check` it is on for CUDA too. Nothing changes outside the block, for any model, except
GRACE INT4 models loaded with ``GraceConfig(deferred_stop_check=True)`` (the default): their ``generate`` runs inside
the block (:func:`install_generate_defaults`) unless the caller's own ``deferred_stop_check(...)`` block says
otherwise. With ``GraceConfig(fast_generate=True)`` (the default) their greedy calls also decode through
:func:`~grace_quant.integrations.fast_decode.grace_greedy` (``generate(custom_generate=...)``, transformers' extension
point for the loop), which takes none of the loop's host work per token.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
from collections.abc import Iterator

import torch
from torch import nn

from .fast_decode import grace_greedy

__all__ = ["deferred_stop_check", "deferred_stop_check_available", "install_generate_defaults"]

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


_NOT_PASSED_ON = ("custom_generate", "assistant_model", "streamer", "synced_gpus", "tokenizer", "assistant_tokenizer")
"""``generate`` keywords that a callable ``custom_generate`` would lose (transformers 5.17-5.25 hand such a loop only
the keywords its signature adds to ``_sample``'s: a streamer would get the prompt and no tokens, stop strings would
miss their tokenizer), or that choose another loop."""


def _greedy_call(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether a ``generate`` call asks for greedy decoding (transformers' ``GREEDY_SEARCH`` mode: no beams, no
    sampling, no assistant, no custom loop of the caller's), read from its keywords over its generation config without
    validating or changing either. Calls with more than the input positionally are left to transformers, and so are
    calls with the keywords that ``generate`` does not hand to a ``custom_generate`` loop (:data:`_NOT_PASSED_ON`) and
    calls in a multi-process group (where ``generate`` may turn ``synced_gpus`` on by itself)."""
    from transformers.generation.configuration_utils import GenerationMode

    if len(args) > 1 or any(kwargs.get(key) not in (None, False) for key in _NOT_PASSED_ON):
        return False
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_world_size() > 1:
        return False  # generate picks synced_gpus itself under ZeRO-3 / FSDP, and would not hand it to a custom loop
    # transformers' precedence: keywords > the caller's generation config > the model's (for what the caller's leaves
    # unset, None)
    own = kwargs.get("generation_config")
    config = copy.copy(own if own is not None else model.generation_config)
    if own is not None:
        for key, value in vars(model.generation_config).items():
            if getattr(config, key, None) is None:
                setattr(config, key, value)
    for key, value in kwargs.items():
        if hasattr(config, key):
            setattr(config, key, value)
    try:
        return config.get_generation_mode() == GenerationMode.GREEDY_SEARCH
    except Exception:  # noqa: BLE001  (an inconsistent config: transformers' generate reports it)
        return False


class _GraceGenerate:
    """``model.generate`` of a GRACE INT4 model with its generation defaults (:func:`install_generate_defaults`):
    greedy calls decode through :func:`~grace_quant.integrations.fast_decode.grace_greedy` (``fast``), and the stop
    check is deferred on CUDA (``defer``) unless the caller's own :func:`deferred_stop_check` block says otherwise. An
    object, not a closure, so that ``copy.deepcopy(model)`` gets one bound to the copy."""

    def __init__(self, model: nn.Module, defer: bool, fast: bool):
        self.model = model
        self._grace_defers = defer
        self._grace_fast = fast
        functools.update_wrapper(self, type(model).generate)

    def __call__(self, *args, **kwargs):
        generate = type(self.model).generate.__get__(self.model)
        if self._grace_fast and _greedy_call(self.model, args, kwargs):
            kwargs["custom_generate"] = grace_greedy
        if not self._grace_defers or _ON_CUDA.get() is not None:  # off, or inside the caller's own block
            return generate(*args, **kwargs)
        with deferred_stop_check():
            return generate(*args, **kwargs)


def install_generate_defaults(model: nn.Module, defer: bool, fast: bool) -> _GraceGenerate | None:
    """``GraceConfig.deferred_stop_check`` / ``GraceConfig.fast_generate``: ``model.generate`` defers its stop check
    on CUDA (where this transformers has the deferred stop check) and decodes greedy calls through ``grace_greedy``.
    Once per model; a ``generate`` the caller already replaced on the instance is left alone. Returns the installed
    wrapper (None where neither applies)."""
    own = vars(model).get("generate")
    if own is not None:
        return own if isinstance(own, _GraceGenerate) else None
    defer = bool(defer) and deferred_stop_check_available()
    if not (defer or fast):
        return None
    model.generate = _GraceGenerate(model, defer, bool(fast))
    return model.generate
