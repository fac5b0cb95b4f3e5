"""``grace-quant ablate``: what GRACE gives on your data, arm by arm, with the same samples and steps everywhere.

Arms (:data:`ARMS`): RTN (no training), QAT only, QAT + naive KD, GRACE with the library defaults, and the paper's
component ablations (GRACE without the confidence gate, without relational CKA, without the Lagrangian
controller). Every trained arm starts from the same fp student quantized on load, reads the same training rows in
the same order (the Trainer's sampler is seeded by the run's seed; the ids each arm's collator received are
recorded and compared) for the same number of steps, and is saved as a packed INT4 folder, reloaded with
``from_pretrained`` and scored with :mod:`grace_quant.evaluation` (exact match, VQA accuracy, token KL to the
teacher on the reference answers). The table gives 95% intervals: binomial over questions for one seed, t over
seeds for several (:func:`grace_quant.demo.report.interval`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# no torch at import time: `grace-quant ablate --help` reads ARMS

#: arm name -> (what it changes, GraceTrainingArguments overrides; None: no training)
ARMS: dict[str, tuple[str, dict | None]] = {
    "rtn": ("round to nearest on the MSE grid, no training", None),
    "qat": ("QAT only: cross-entropy, no teacher", dict(kd_loss="none", rcka_weight=0.0)),
    "qat+kd": ("QAT + naive KD: plain KL at fixed weight 1, no gate, no RCKA",
               dict(kd_loss="kd", rcka_weight=0.0, controller="fixed", beta_init=1.0)),
    "grace": ("GRACE: library defaults (gated DKD + RCKA + Lagrangian controller)", {}),
    "grace-no-gate": ("GRACE without the confidence gate (every token weighs 1)", dict(confidence_gate=False)),
    "grace-no-rcka": ("GRACE without relational CKA on visual tokens", dict(rcka_weight=0.0)),
    "grace-no-controller": ("GRACE with beta fixed at beta_init (no Lagrangian controller)",
                            dict(controller="fixed")),
}  # fmt: skip
FP_ROW = "fp-student"


@dataclass
class AblationSettings:
    """Inputs of one ablation run (the command's arguments)."""

    teacher: str
    student: str
    dataset: str
    output: str
    steps: int = 200
    batch_size: int = 8
    lr: float = 2e-5
    seeds: list[int] = field(default_factory=lambda: [0])
    group_size: int = 128
    bits: int = 4
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    train_split: str = "train"
    eval_split: str = "test"
    eval_limit: int | None = None
    eval_batch_size: int = 32
    max_new_tokens: int = 16
    template: str | None = None
    overwrite: bool = False


def unknown_arms(names: Sequence[str]) -> list[str]:
    return [name for name in names if name not in ARMS]


# ----------------------------------------------------------------------------------------------------- data
def load_splits(settings: AblationSettings):
    """The training rows (decoded once, with their row ``id``) and the evaluation split."""
    from datasets import DatasetDict, load_from_disk

    data = load_from_disk(settings.dataset)
    if not isinstance(data, DatasetDict):
        raise ValueError(f"{settings.dataset} holds one split; ablate needs a DatasetDict with a training and an "
                         f"evaluation split (save DatasetDict(train=..., test=...) with save_to_disk)")  # fmt: skip
    for split in (settings.train_split, settings.eval_split):
        if split not in data:
            raise ValueError(f"split {split!r} not in {settings.dataset}; it has {sorted(data)} "
                             "(choose with --train-split / --eval-split)")  # fmt: skip
        missing = {"image", "question", "answers"} - set(data[split].column_names)
        if missing:
            raise ValueError(f"split {split!r} lacks column(s) {sorted(missing)}; it has {data[split].column_names}")
    train, test = data[settings.train_split], data[settings.eval_split]
    if settings.eval_limit is not None:
        test = test.select(range(min(settings.eval_limit, len(test))))
    columns = zip(train["image"], train["question"], train["answers"], strict=True)
    rows = [{"id": i, "image": im, "question": q, "answers": a} for i, (im, q, a) in enumerate(columns)]
    return rows, test


class RecordingCollator:
    """``GraceDataCollator`` that also records the row ``id`` s of every batch it builds, in order."""

    def __init__(self, collator):
        self.collator, self.batches = collator, []

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        self.batches.append([example["id"] for example in examples])
        return self.collator(examples)

    def trained_ids(self, steps: int) -> list[int]:
        """The ids of the first ``steps`` batches: the loader builds a batch ahead of the one being trained, so
        the last batch collated was never trained on (one process, no gradient accumulation)."""
        return [i for batch in self.batches[:steps] for i in batch]


# ------------------------------------------------------------------------------------------------- training
def training_arguments(settings: AblationSettings, overrides: dict, seed: int, scratch: str):
    import torch

    from grace_quant.integrations.training_args import GraceTrainingArguments

    cuda = torch.cuda.is_available()
    return GraceTrainingArguments(
        output_dir=scratch, max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.lr, seed=seed, data_seed=seed, save_strategy="no", report_to=[],
        logging_steps=max(1, settings.steps // 10), use_cpu=not cuda, bf16=cuda and torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0, disable_tqdm=False, **overrides,
    )  # fmt: skip


def train_arm(settings, arm: str, seed: int, teacher, rows, collator, folder: str) -> list[int]:
    """Quantize the fp student on load, train it as ``arm`` prescribes (RTN: not at all) and save packed INT4 to
    ``folder``; returns the row ids the arm trained on, in order."""
    from transformers import AutoModelForImageTextToText

    from grace_quant.config import GraceConfig
    from grace_quant.demo.train import quiet
    from grace_quant.integrations.trainer import GraceTrainer

    overrides = ARMS[arm][1]
    mode = "packed" if overrides is None else "qat"
    config = GraceConfig(bits=settings.bits, group_size=settings.group_size, mode=mode)
    student = AutoModelForImageTextToText.from_pretrained(settings.student, quantization_config=config)
    if overrides is None:
        student.save_pretrained(folder)
        return []
    recorder = RecordingCollator(collator)
    with tempfile.TemporaryDirectory(prefix="grace-ablate-") as scratch:
        args = training_arguments(settings, overrides, seed, scratch)
        trainer = GraceTrainer(model=student, teacher_model=teacher if args.uses_teacher else None, args=args,
                               train_dataset=rows, data_collator=recorder)  # fmt: skip
        quiet(trainer).train()
        trainer.save_model(folder)
    return recorder.trained_ids(settings.steps)


# ----------------------------------------------------------------------------------------------- evaluation
def evaluate_folder(folder: str, teacher, processor, test, settings: AblationSettings) -> dict:
    """Exact match and VQA accuracy (per question, for the intervals) of the model saved in ``folder``, and its
    token KL to the teacher on the reference answers (teacher-forced)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from grace_quant.evaluation import answer_token_kl, generate_answers, question_scores

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(folder).to(device).eval()
    images, questions = list(test["image"]), list(test["question"])
    references = [list(a) for a in test["answers"]]
    common = dict(batch_size=settings.eval_batch_size, template=settings.template)
    answers = generate_answers(model, processor, images, questions, max_new_tokens=settings.max_new_tokens, **common)
    result = {"answers": answers}
    for metric in ("exact_match", "vqa_accuracy"):
        scores = question_scores(metric, answers, references)
        result[metric], result[f"{metric}_per_question"] = sum(scores) / max(len(scores), 1), scores
    result["token_kl"] = answer_token_kl(model, teacher.to(device), processor, images, questions,
                                         [r[0] for r in references], **common)  # fmt: skip
    return result


# -------------------------------------------------------------------------------------------------- the table
def summarise(arms: dict[str, dict]) -> dict[str, dict]:
    """Per arm: mean and 95% half-width of exact match and VQA accuracy (t over seeds, else binomial over
    questions: for VQA accuracy's fractional scores the binomial variance m(1-m) is an upper bound), mean KL."""
    from grace_quant.demo.report import interval

    rows = {}
    for name, entry in arms.items():
        runs = entry["runs"]
        row = {"description": entry["description"], "runs": len(runs)}
        for metric in ("exact_match", "vqa_accuracy"):
            row[metric], row[f"{metric}_ci"] = interval([r[metric] for r in runs],
                                                        [r[f"{metric}_per_question"] for r in runs])  # fmt: skip
        row["token_kl"] = sum(r["token_kl"] for r in runs) / len(runs)
        rows[name] = row
    return rows


def markdown_table(rows: dict[str, dict], questions: int, seeds: Sequence[int]) -> str:
    how = f"t over {len(seeds)} seeds" if len(seeds) > 1 else "binomial over questions"
    lines = [
        "| arm | what it changes | exact match % | VQA accuracy % | token KL vs teacher | runs |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        em = f"{100 * row['exact_match']:.2f} ± {100 * row['exact_match_ci']:.2f}"
        vqa = f"{100 * row['vqa_accuracy']:.2f} ± {100 * row['vqa_accuracy_ci']:.2f}"
        lines.append(f"| {name} | {row['description']} | {em} | {vqa} | {row['token_kl']:.4f} | {row['runs']} |")
    lines.append("")
    lines.append(f"{questions} evaluation questions; ± is a 95% interval ({how}; single runs such as RTN and the "
                 "fp student: binomial). Token KL: KL(teacher || model) per reference-answer token.")  # fmt: skip
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------- run
def say(message: str) -> None:
    print(f"[grace-quant ablate] {message}", flush=True)


def check_same_samples(arms: dict[str, dict]) -> None:
    """Every trained arm of one seed must have read the same rows in the same order; fail loudly otherwise."""
    by_seed: dict[int, list[int]] = {}
    for name, entry in arms.items():
        for run in entry["runs"]:
            if run.get("sample_ids"):
                reference = by_seed.setdefault(run["seed"], run["sample_ids"])
                if run["sample_ids"] != reference:
                    raise RuntimeError(f"arm {name} (seed {run['seed']}) trained on other samples than the first arm")


def run_ablation(settings: AblationSettings) -> dict:
    """Train, save and evaluate every arm; writes ``results.md``, ``results.json`` and ``models/<arm>-seed<s>/``
    into ``settings.output`` atomically (a temporary folder renamed at the end). Returns the results."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from grace_quant.integrations.checkpoint_files import atomic_output_dir
    from grace_quant.integrations.collator import GraceDataCollator

    rows, test = load_splits(settings)
    processor = AutoProcessor.from_pretrained(settings.student)
    teacher = AutoModelForImageTextToText.from_pretrained(settings.teacher).eval()
    collator = GraceDataCollator(processor, template=settings.template)
    sources = (settings.teacher, settings.student, settings.dataset)
    arms: dict[str, dict] = {}
    with atomic_output_dir(settings.output, settings.overwrite, sources=sources) as tmp:
        say(f"{FP_ROW}: evaluating the full-precision student as the reference")
        arms[FP_ROW] = {"description": "full-precision student (reference, not INT4)",
                        "runs": [{"seed": None, **evaluate_folder(settings.student, teacher, processor, test, settings)}]}  # fmt: skip
        for index, arm in enumerate(settings.arms, 1):
            seeds = [settings.seeds[0]] if ARMS[arm][1] is None else settings.seeds
            arms[arm] = {"description": ARMS[arm][0], "runs": []}
            for seed in seeds:
                name = f"{arm}-seed{seed}"
                say(f"arm {index}/{len(settings.arms)} {name}: {ARMS[arm][0]} ({settings.steps} steps)"
                    if ARMS[arm][1] is not None else f"arm {index}/{len(settings.arms)} {name}: {ARMS[arm][0]}")  # fmt: skip
                folder = os.path.join(tmp, "models", name)
                ids = train_arm(settings, arm, seed, teacher, rows, collator, folder)
                processor.save_pretrained(folder)
                result = evaluate_folder(folder, teacher, processor, test, settings)
                path = os.path.join("models", name)
                arms[arm]["runs"].append({"seed": seed, "path": path, "sample_ids": ids, **result})
        check_same_samples(arms)
        summary = summarise(arms)
        table = markdown_table(summary, len(test), settings.seeds)
        results = {"settings": dataclasses.asdict(settings), "questions": len(test), "summary": summary, "arms": arms}
        with open(os.path.join(tmp, "results.md"), "w") as handle:
            handle.write(table + "\n")
        with open(os.path.join(tmp, "results.json"), "w") as handle:
            json.dump(results, handle, indent=1)
    print(table)
    return results
