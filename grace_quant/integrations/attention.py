"""``attn_implementation="grace_decode"``: split-KV decode attention inside transformers, through its own extension
points (``AttentionInterface`` for the attention function, ``AttentionMaskInterface`` for the mask it receives).

Decode steps under a mask (a few query tokens, no gradient, CUDA) go to ``grace_quant.kernels.decode_attention``, which
reads only the cache slots the mask keeps: with a static cache (whose decode mask transformers always builds) that is
the written part of the cache, minus left padding. The mask is transformers' own sdpa mask (boolean, True = attend),
so padded batches are handled, not refused. Everything else (prefill, no mask, i.e. a dynamic cache without padding,
float masks, sliding windows, softcap, dropout, attention weights requested, gradients) runs transformers' sdpa
function unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from grace_quant.kernels import decode_attention
from grace_quant.kernels.triton_decode_attention import unsupported_reason

NAME = "grace_decode"
MAX_DECODE_TOKENS = 8  # query tokens per step routed to the decode kernel (1 for plain decoding)

_FORCE_KERNEL = False  # tests: take the kernel path on CPU too (the interpreter, or the op's torch implementation)

__all__ = ["MAX_DECODE_TOKENS", "NAME", "force_kernel", "grace_decode_attention", "register", "use_decode_attention"]


@contextlib.contextmanager
def force_kernel() -> Iterator[None]:
    """Route eligible CPU calls to the kernel path as well (tests; on CPU the kernel runs in Triton's interpreter when
    ``TRITON_INTERPRET=1``, else the op's torch implementation)."""
    global _FORCE_KERNEL
    previous, _FORCE_KERNEL = _FORCE_KERNEL, True
    try:
        yield
    finally:
        _FORCE_KERNEL = previous


def _takes_kernel(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, dropout: float, kwargs
) -> bool:
    """Whether this call is a decode step the kernel computes exactly as sdpa would (shape and dtype checks only)."""
    if not (query.is_cuda or _FORCE_KERNEL) or query.shape[2] > MAX_DECODE_TOKENS:
        return False
    if dropout or kwargs.get("output_attentions") or kwargs.get("softcap") is not None:
        return False
    if kwargs.get("sliding_window") is not None or kwargs.get("position_bias") is not None:
        return False
    if mask is None:  # no masked slots to skip (dynamic cache, no padding): sdpa's flash kernel reads just the keys
        return False
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return False
    return unsupported_reason(query, key, value, mask) is None


def grace_decode_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: the split-KV kernel for decode steps, ``sdpa_attention_forward`` otherwise.
    Returns ``([B, Q, H, D], None)`` like every transformers attention function."""
    if _takes_kernel(module, query, key, value, attention_mask, dropout, kwargs):
        return decode_attention(query, key, value, attention_mask, None, scaling), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def register() -> None:
    """Make ``attn_implementation="grace_decode"`` known to transformers, with sdpa's masks (idempotent)."""
    AttentionInterface.register(NAME, grace_decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_decode_attention(model: nn.Module) -> bool:
    """Set the language model's attention to ``grace_decode`` (the vision tower keeps its own); ``False`` (and no
    change) when the model's text config does not use sdpa, whose semantics the fallback keeps."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else None
    if text is None or getattr(text, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    text._attn_implementation = NAME
    for sub in model.modules():  # a sub-model holding a copy of the text config (transformers shares one today)
        sub_config = getattr(sub, "config", None)
        if type(sub_config) is type(text) and sub_config is not text and sub_config is not config:
            sub_config._attn_implementation = NAME
    return True


register()
