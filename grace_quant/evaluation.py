"""Evaluation through the deployment path: batched greedy ``generate`` on any image-text-to-text model, the
metric modules shipped in this package (loaded with ``evaluate.load`` from a local path, no network), and
agreement with a teacher (token KL on the teacher's answer, same-answer rate)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

METRICS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics")
DEFAULT_TEMPLATE = "{image}Q: {question} A:"


def load_metric(name: str):
    """One of the metrics shipped with grace_quant (``exact_match``, ``vqa_accuracy``) as an ``evaluate`` module."""
    import evaluate

    path = os.path.join(METRICS_DIR, name)
    if not os.path.isdir(path):
        raise ValueError(f"unknown metric {name!r}; shipped metrics: {sorted(os.listdir(METRICS_DIR))}")
    return evaluate.load(path)


#: the per-question function of each shipped metric (the metric's value is their mean)
PER_QUESTION = {"exact_match": "exact_match_score", "vqa_accuracy": "vqa_score"}


def question_scores(name: str, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """Each question's score under the shipped metric ``name``, for intervals over questions; their mean equals
    ``load_metric(name).compute(...)[name]``."""
    score = getattr(sys.modules[type(load_metric(name)).__module__], PER_QUESTION[name])
    return [score(p, list(r)) for p, r in zip(predictions, references, strict=True)]


def format_prompt(processor, question: str, template: str | None, images: int = 1) -> str:
    """The model's prompt for ``images`` images and a question: ``template`` if given, else the processor's chat
    template, else the demo's template (``{image}`` stands for the image tokens, one per image)."""
    if template is not None:
        return template.format(question=question, image=getattr(processor, "image_token", "<image>") * images)
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return DEFAULT_TEMPLATE.format(question=question, image="<image>" * images)


def _batches(count: int, batch_size: int, desc: str, progress: bool):
    starts = range(0, count, batch_size)
    return tqdm(starts, desc=desc, leave=False, disable=not progress, total=len(starts))


@torch.no_grad()
def generate_answers(
    model,
    processor,
    images: Sequence,
    questions: Sequence[str],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 16,
    template: str | None = None,
    progress: bool = True,
) -> list[str]:
    """Greedy answers for (image, question) pairs, generated in left-padded batches."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    model.eval()
    answers: list[str] = []
    for start in _batches(len(questions), batch_size, "generate", progress):
        texts = [format_prompt(processor, q, template) for q in questions[start : start + batch_size]]
        batch = processor(
            images=list(images[start : start + batch_size]), text=texts, return_tensors="pt", padding=True
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        answers += [a.strip() for a in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


@torch.no_grad()
def answer_token_kl(
    model,
    teacher,
    processor,
    images: Sequence,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 64,
    template: str | None = None,
    progress: bool = True,
) -> float:
    """Mean over answer tokens of ``KL(p_teacher || p_model)`` (temperature 1), teacher-forced on ``answers``."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for start in _batches(len(questions), batch_size, "token KL", progress):
        prompts = [format_prompt(processor, q, template) for q in questions[start : start + batch_size]]
        texts = [
            p + " " + a + tokenizer.eos_token for p, a in zip(prompts, answers[start : start + batch_size], strict=True)
        ]
        batch = processor(
            images=list(images[start : start + batch_size]), text=texts, return_tensors="pt", padding=True
        )
        prompt_lengths = [
            len(ids) for ids in processor(images=list(images[start : start + batch_size]), text=prompts)["input_ids"]
        ]
        batch = {k: v.to(device) for k, v in batch.items()}
        mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        width = batch["input_ids"].shape[1]
        for row, prompt_length in enumerate(prompt_lengths):
            answer_length = int(batch["attention_mask"][row].sum()) - prompt_length
            mask[row, width - answer_length - 1 : width - 1] = True  # logits that predict the answer tokens
        logits = {}
        for name, net in (("model", model), ("teacher", teacher)):
            inputs = dict(batch)
            inputs["pixel_values"] = inputs["pixel_values"].to(net.dtype)
            logits[name] = net(**inputs).logits[mask].float().log_softmax(-1)
        p_teacher = logits["teacher"].exp()
        total += float((p_teacher * (logits["teacher"] - logits["model"])).sum())
        tokens += int(mask.sum())
    return total / max(tokens, 1)


def same_answer_rate(answers: Sequence[str], teacher_answers: Sequence[str]) -> float:
    """Fraction of questions where the model's generated answer equals the teacher's."""
    return sum(a == b for a, b in zip(answers, teacher_answers, strict=True)) / max(len(answers), 1)
