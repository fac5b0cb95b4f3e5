"""Batching for causal VLM training: the one right-padding rule used by the demo and the examples."""

from __future__ import annotations

import torch

from grace_quant.labels import IGNORE_INDEX


def pad_tokens(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` (with ``pad_token_id``) and ``labels`` (with ``IGNORE_INDEX``); ``attention_mask`` marks tokens."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = example["input_ids"], example["labels"], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
