"""``GraceDataCollator``: image / question / answer examples -> a training batch, through the model's own processor.

What a VLM training batch needs and why it is easy to get wrong by hand: the prompt must be the one the model is
evaluated with (:func:`grace_quant.evaluation.format_prompt`: a ``template`` if given, else the processor's chat
template), the processor must expand each image placeholder into the right number of image tokens and produce the
pixel inputs (``pixel_values``; Qwen2-VL also ``image_grid_thw`` and ``mm_token_type_ids``), and the labels must
supervise the answer only (:data:`grace_quant.labels.IGNORE_INDEX` on the image tokens, the question and padding).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from grace_quant.collate import TOKEN_TYPE_KEYS, pad_tokens
from grace_quant.evaluation import format_prompt
from grace_quant.labels import IGNORE_INDEX

__all__ = ["GraceDataCollator"]


class GraceDataCollator:
    """Collate ``{"image", "question", "answer"}`` examples into a padded batch with labels on the answer only.

    ``processor`` is the model's ``AutoProcessor`` (LLaVA-1.5, Qwen2-VL, Qwen2.5-VL; any processor called as
    ``processor(images=..., text=...)`` with a ``tokenizer``). Per example:

    - prompt: ``format_prompt(processor, question, template, images=n)``, the prompt ``grace-quant eval`` and
      ``grace_quant.evaluation`` use, so a model is trained on the prompt it is scored with;
    - input ids: the processor's ids for the prompt and its images (image placeholders expanded, the tokenizer's
      special tokens such as BOS included), then the answer's tokens, then the tokenizer's EOS;
    - labels: ``IGNORE_INDEX`` on the prompt (image tokens included) and padding; the answer tokens **and the
      EOS** on the rest. The EOS is supervised so the model learns to stop where the answer ends (``generate``
      stops on it; for Qwen2-VL-Instruct it is ``<|im_end|>``, the end of the assistant turn);
    - the answer's tokens are those the tokenizer gives the whole text ``prompt + separator + answer`` after the
      prompt's own tokens, i.e. the answer as it reads in context (a SentencePiece tokenizer spells a leading
      space differently alone and in context). The separator is a space unless the prompt ends in whitespace (a
      chat template's ``"...assistant\\n"``), the convention of ``grace_quant.evaluation.answer_token_kl``.

    Columns: ``image`` (a PIL image, a list of images, or None / missing for text only), ``question``, and
    ``answer`` (a string) or else ``answers`` (a list whose first entry is trained, the layout ``grace-quant eval
    --dataset`` reads). Other keys are ignored, so rows of a ``datasets.Dataset`` work as they are (keep
    ``remove_unused_columns=False``, the ``GraceTrainingArguments`` default).

    Padding: to the longest example, on ``padding_side`` (default ``"right"``, the training convention: see
    :func:`grace_quant.collate.pad_tokens`; ``None`` takes the tokenizer's own side, which is often ``"left"``
    for generation). ``max_length`` cuts answer tokens (never the prompt or its image tokens; at least one
    answer token is kept) so that a row fits. Images pass through as the processor returns them.
    """

    def __init__(
        self,
        processor: Any,
        template: str | None = None,
        *,
        padding_side: str | None = "right",
        max_length: int | None = None,
        add_eos: bool = True,
        image_key: str = "image",
        question_key: str = "question",
        answer_key: str | None = None,
    ) -> None:
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("GraceDataCollator needs the model's processor (AutoProcessor.from_pretrained), which "
                             "holds a tokenizer; got an object without .tokenizer")  # fmt: skip
        if add_eos and tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token, so the answer's end cannot be supervised; set "
                             "tokenizer.eos_token or pass add_eos=False")  # fmt: skip
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be a positive number of tokens, got {max_length}")
        self.processor, self.tokenizer, self.template = processor, tokenizer, template
        self.padding_side = padding_side or tokenizer.padding_side
        self.max_length, self.add_eos = max_length, add_eos
        self.image_key, self.question_key, self.answer_key = image_key, question_key, answer_key
        self._warned_split = False

    # ------------------------------------------------------------------------------------------- one example
    def images(self, example: dict) -> list:
        """The example's images as a list (none, one, or several)."""
        image = example.get(self.image_key)
        if image is None:
            return []
        return list(image) if isinstance(image, (list, tuple)) else [image]

    def answer(self, example: dict) -> str:
        """The answer to train on: ``answer`` (or ``answer_key``), else the first of ``answers``."""
        keys = (self.answer_key,) if self.answer_key else ("answer", "answers")
        for key in keys:
            if key in example:
                value = example[key]
                if isinstance(value, (list, tuple)):
                    if not value:
                        raise ValueError(f"example has an empty {key!r} list; give at least one answer")
                    value = value[0]
                return str(value)
        raise ValueError(f"example has no answer: expected a column {' or '.join(map(repr, keys))}; "
                         f"it has {sorted(example)}")  # fmt: skip

    def prompt(self, example: dict) -> str:
        """The prompt text (image placeholders not yet expanded), as ``grace_quant.evaluation`` builds it."""
        return format_prompt(self.processor, example[self.question_key], self.template, images=len(self.images(example)))

    def answer_ids(self, prompts: Sequence[str], answers: Sequence[str]) -> list[list[int]]:
        """Tokens of each answer as it follows its prompt in the whole text, plus the EOS (see the class doc).

        One batched tokenizer call for the prompts and one for the whole texts (the collator runs every step)."""
        separators = ["" if prompt[-1:].isspace() else " " for prompt in prompts]
        wholes = [p + sep + a for p, sep, a in zip(prompts, separators, answers, strict=True)]
        heads = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        whole_ids = self.tokenizer(wholes, add_special_tokens=False)["input_ids"]
        eos = [self.tokenizer.eos_token_id] if self.add_eos else []
        return [
            list(self._after(head, whole, separator + answer)) + eos
            for head, whole, separator, answer in zip(heads, whole_ids, separators, answers, strict=True)
        ]

    def _after(self, head: list[int], whole: list[int], answer_text: str) -> list[int]:
        """``whole`` after its prefix ``head``; if the tokenizer merged across the prompt's end, the answer alone."""
        if whole[: len(head)] == head:
            return whole[len(head) :]
        if not self._warned_split:
            warnings.warn("the prompt's last token merges with the answer's first; answer tokens are taken from the "
                          "answer tokenised alone", stacklevel=4)  # fmt: skip
            self._warned_split = True
        return self.tokenizer(answer_text, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------------------------------------ batch
    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        prompts = [self.prompt(example) for example in examples]
        images = [image for example in examples for image in self.images(example)]
        encoded = self.processor(images=images or None, text=prompts, padding=True, return_tensors="pt")
        answers = self.answer_ids(prompts, [self.answer(example) for example in examples])
        rows = [self._row(encoded, index, answer) for index, answer in enumerate(answers)]
        batch = pad_tokens(rows, self.tokenizer.pad_token_id, self.padding_side)
        per_token = {"input_ids", "attention_mask", *TOKEN_TYPE_KEYS}
        batch.update({key: value for key, value in encoded.items() if key not in per_token})
        return batch

    def _row(self, encoded, index: int, answer: list[int]) -> dict[str, torch.Tensor]:
        """Example ``index`` of the processor's padded prompt batch, unpadded, with the answer appended."""
        keep = encoded["attention_mask"][index].bool()
        prompt_ids = encoded["input_ids"][index][keep]
        if self.max_length is not None:
            answer = answer[: max(1, self.max_length - len(prompt_ids))]
        answer_ids = torch.tensor(answer, dtype=prompt_ids.dtype)
        row = {
            "input_ids": torch.cat([prompt_ids, answer_ids]),
            "labels": torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), answer_ids]),
        }
        for key in TOKEN_TYPE_KEYS:  # text tokens: type 0
            if key in encoded:
                row[key] = torch.cat([encoded[key][index][keep], torch.zeros_like(answer_ids)])
        return row
