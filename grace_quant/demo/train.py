"""Turning the demo dataset into model inputs, and the training runs (plain Trainer for fp models, GraceTrainer
for the INT4 students)."""

from __future__ import annotations

import json
import os

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from grace_quant.collate import pad_tokens
from grace_quant.integrations.training_args import GraceTrainingArguments
from grace_quant.labels import IGNORE_INDEX
from grace_quant.surgery import set_vision_training

from .models import VISUAL_TOKENS, prompt


def encode(dataset, processor) -> list[dict[str, torch.Tensor]]:
    """Tokenised examples: ``<image> Q: ... A: answer</s>`` with labels on the answer and end token only."""
    tokenizer = processor.tokenizer
    image_token = processor.image_token
    pixel_values = processor.image_processor(list(dataset["image"]), return_tensors="pt")["pixel_values"]
    examples = []
    for i, (question, answers) in enumerate(zip(dataset["question"], dataset["answers"], strict=True)):
        # what the processor produces for "<image>" + prompt once it has expanded the image token
        prompt_ids = tokenizer(image_token * VISUAL_TOKENS + prompt(question), add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(" " + answers[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor(prompt_ids + answer_ids)
        labels = ids.clone()
        labels[: len(prompt_ids)] = IGNORE_INDEX
        examples.append({"input_ids": ids, "labels": labels, "pixel_values": pixel_values[i]})
    return examples


class QuietProgress(ProgressCallback):
    """The Trainer's progress bar without a printed dict per log line (the demo reports at the end)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None


def quiet(trainer: Trainer) -> Trainer:
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress)
    return trainer


class Collator:
    """Right-pads token sequences (pad id / label ``IGNORE_INDEX``) and stacks images."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([e["pixel_values"] for e in examples])
        return {**pad_tokens(examples, self.pad_token_id), "pixel_values": pixels}


def common_arguments(output_dir: str, steps: int, batch_size: int, lr: float, seed: int, device: str) -> dict:
    return dict(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.01, logging_steps=max(1, steps // 50),
        save_strategy="no", report_to=[], seed=seed, data_seed=seed, use_cpu=device == "cpu",
        bf16=device == "cuda", disable_tqdm=False, dataloader_num_workers=0, remove_unused_columns=False,
    )  # fmt: skip


def train_fp(
    model, examples, collator, output_dir: str, steps: int, batch_size: int, lr: float, seed: int, device: str
):
    """Plain cross-entropy fine-tuning of a full-precision model (teacher or fp student); vision tower frozen and
    projector trained, by the rule GraceTrainer applies to the INT4 students (``set_vision_training``)."""
    set_vision_training(model, train_vision_tower=False, train_projector=True)
    args = TrainingArguments(**common_arguments(output_dir, steps, batch_size, lr, seed, device))
    trainer = quiet(Trainer(model=model, args=args, train_dataset=examples, data_collator=collator))
    trainer.train()
    return trainer


METHODS = {
    # name: GraceTrainingArguments overrides (the paper's ablation ladder)
    "qat": dict(kd_loss="none", rcka_weight=0.0),
    "qat_kd": dict(kd_loss="kd", rcka_weight=0.0, controller="fixed", beta_init=1.0),
    "grace": dict(kd_loss="gdkd", rcka_weight=3.0, controller="lagrangian", ib_tau="auto"),
}


def train_qat(student, teacher, method, examples, collator, output_dir, steps, batch_size, lr, seed, device):
    """QAT of the quantized student with the method's losses (GraceTrainer's defaults freeze the vision tower and
    train the projector); writes the packed INT4 model and its log."""
    settings = common_arguments(output_dir, steps, batch_size, lr, seed, device)
    args = GraceTrainingArguments(**settings, **METHODS[method], rcka_warmup_steps=max(1, steps // 5))
    from grace_quant.integrations.trainer import GraceTrainer

    trainer = GraceTrainer(
        model=student, teacher_model=teacher if args.uses_teacher else None, args=args,
        train_dataset=examples, data_collator=collator,
    )  # fmt: skip
    quiet(trainer).train()
    trainer.save_model(output_dir)
    with open(os.path.join(output_dir, "trainer_log.json"), "w") as handle:
        json.dump(trainer.state.log_history, handle)
    return trainer
