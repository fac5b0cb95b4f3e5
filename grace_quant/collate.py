"""Batching for causal VLM training: the one padding rule used by :class:`~grace_quant.GraceDataCollator`, the demo
and the examples.

``pad_tokens`` takes already tokenised examples (1-D ``input_ids`` and ``labels`` of any lengths, optionally 1-D
per-token ``mm_token_type_ids`` / ``token_type_ids``) and pads them to one width: ``input_ids`` with the pad id,
``labels`` with ``IGNORE_INDEX`` (no loss on padding), the per-token type ids with 0, and builds the
``attention_mask`` (1 on real tokens). Images are not its business: the caller stacks or concatenates them.
"""

from __future__ import annotations

import torch

from grace_quant.labels import IGNORE_INDEX

#: per-token keys besides input_ids / labels that are padded with 0 when examples carry them (Qwen2-VL needs
#: ``mm_token_type_ids`` whenever ``image_grid_thw`` is passed)
TOKEN_TYPE_KEYS = ("mm_token_type_ids", "token_type_ids")
PADDING_SIDES = ("right", "left")


def pad_tokens(examples: list[dict], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad ``input_ids`` (``pad_token_id``), ``labels`` (``IGNORE_INDEX``) and the keys of ``TOKEN_TYPE_KEYS`` the
    examples carry (0) to the longest example, on ``padding_side``; ``attention_mask`` marks the real tokens.

    Right padding (the default) is the training convention: Llama-family forwards number positions from the first
    column whatever the mask says, so a left-padded row would be trained at shifted positions."""
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side={padding_side!r}; use one of {PADDING_SIDES}")
    width = max(len(e["input_ids"]) for e in examples)
    fills = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}
    fills.update({key: 0 for key in TOKEN_TYPE_KEYS if key in examples[0]})
    batch = {key: torch.full((len(examples), width), fill, dtype=torch.long) for key, fill in fills.items()}
    batch["attention_mask"] = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        columns = slice(0, n) if padding_side == "right" else slice(width - n, width)
        for key in fills:
            batch[key][row, columns] = torch.as_tensor(example[key])
        batch["attention_mask"][row, columns] = 1
    return batch
