"""Turning the demo dataset into model inputs (``GraceDataCollator``), and the training runs (plain Trainer for fp
models, GraceTrainer for the INT4 students)."""

from __future__ import annotations

import json
import os

from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from grace_quant.integrations.collator import GraceDataCollator
from grace_quant.integrations.training_args import GraceTrainingArguments
from grace_quant.surgery import set_vision_training

from .models import prompt

#: the demo's prompt, in training and in evaluation: "<image>Q: {question} A:" (the model answers after "A:")
TEMPLATE = "{image}" + prompt("{question}")


def training_rows(dataset) -> list[dict]:
    """The training split as image / question / answers rows, images decoded once (the Trainer reads them often)."""
    columns = zip(dataset["image"], dataset["question"], dataset["answers"], strict=True)
    return [{"image": image, "question": question, "answers": answers} for image, question, answers in columns]


def collator(processor) -> GraceDataCollator:
    """``<image>`` expanded to the visual tokens, ``Q: ... A:``, then `` answer</s>``; labels on the answer and end
    token only; right padding."""
    return GraceDataCollator(processor, template=TEMPLATE, padding_side="right")


class QuietProgress(ProgressCallback):
    """The Trainer's progress bar without a printed dict per log line (the demo reports at the end)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None


def quiet(trainer: Trainer) -> Trainer:
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress)
    return trainer


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
    # name: GraceTrainingArguments overrides of the library defaults (the paper's ablation ladder); GRACE runs the
    # defaults as they are, so the demo's GRACE is what a user's GraceTrainer(...) runs
    "qat": dict(kd_loss="none", rcka_weight=0.0),
    "qat_kd": dict(kd_loss="kd", rcka_weight=0.0, controller="fixed", beta_init=1.0),
    "grace": dict(),
}


def train_qat(student, teacher, method, examples, collator, output_dir, steps, batch_size, lr, seed, device):
    """QAT of the quantized student with the method's losses (GraceTrainer's defaults freeze the vision tower and
    train the projector); writes the packed INT4 model and its log."""
    settings = common_arguments(output_dir, steps, batch_size, lr, seed, device)
    args = GraceTrainingArguments(**settings, **METHODS[method])
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
