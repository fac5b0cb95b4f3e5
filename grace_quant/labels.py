"""Which tokens are supervised: the one rule for labels in causal VLM training.

``labels[b, t] == IGNORE_INDEX`` (-100, transformers' convention) marks a token no loss looks at (prompt, image,
padding). The logits at position ``t`` predict token ``t + 1``, so the loss rows are the logits ``[:, :-1]`` whose
shifted label ``labels[:, 1:]`` is supervised; every loss (CE, GDKD, KD) and every token count uses these rows.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "next_token_mask", "supervised_rows"]


def next_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """``[..., L-1]`` bool: the logits at position ``t`` have a supervised next token ``labels[..., t + 1]``.

    Its sum is the token count transformers passes as ``num_items_in_batch``."""
    return labels[..., 1:] != IGNORE_INDEX


def supervised_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the flattened logits ``[B * L, V]`` that predict a supervised token, and those tokens."""
    b, t = next_token_mask(labels).nonzero(as_tuple=True)
    return b * labels.shape[-1] + t, labels[b, t + 1]
