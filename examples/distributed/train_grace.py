"""Train an INT4 GRACE student from a larger frozen teacher, on one GPU or many (accelerate: DDP or FSDP2).

The paper's pairs are LLaVA-1.5-7B <- LLaVA-1.5-13B and Qwen2-VL-2B <- Qwen2-VL-7B; any student/teacher of one
family that share a tokenizer work. --student and --teacher are local folders holding Hugging Face checkpoints
(fetch them once, e.g. `hf download llava-hf/llava-1.5-7b-hf --local-dir /models/llava-1.5-7b-hf`): this script
never downloads anything unless you add --allow-download.

Data: a JSON Lines file, one example per line; image paths are relative to --image-root (default: the file's folder).
    {"image": "images/0001.jpg", "question": "What is on the table?", "answer": "A red cup."}
GraceDataCollator builds the batches: the student's chat template, the loss on the answer tokens (and EOS) only.

Launch (examples/distributed/README.md says which layout fits on which GPUs):
    # Qwen2-VL-2B <- 7B, data parallel on 2 GPUs
    accelerate launch --config_file examples/distributed/ddp.yaml --num_processes 2 \\
        examples/distributed/train_grace.py --student /models/Qwen2-VL-2B-Instruct \\
        --teacher /models/Qwen2-VL-7B-Instruct --data train.jsonl --output-dir runs/qwen2vl-2b-w4
    # LLaVA-1.5-7B <- 13B, student sharded with FSDP2 over 8 GPUs
    accelerate launch --config_file examples/distributed/fsdp2.yaml --num_processes 8 \\
        examples/distributed/train_grace.py --student /models/llava-1.5-7b-hf \\
        --teacher /models/llava-1.5-13b-hf --data train.jsonl --output-dir runs/llava-7b-w4 --gradient-checkpointing
    # check the wiring in seconds on CPU with tiny random models (no files, no GPU, nothing downloaded)
    python examples/distributed/train_grace.py --dry-run

What you get: OUTPUT_DIR/checkpoint-*/ (master weights + scales + controller, for --resume-from-checkpoint) and
OUTPUT_DIR/int4/ (the packed INT4 model and the processor; load it with
grace_quant.AutoModelForVision2Seq.from_pretrained after `import grace_quant`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

import grace_quant
from grace_quant import (
    AutoModelForVision2Seq,
    GraceConfig,
    GraceDataCollator,
    GraceTrainer,
    GraceTrainingArguments,
    quantize_model,
)  # fmt: skip
from grace_quant.integrations.trainer import close_process_group
from grace_quant.surgery import grace_layers, set_vision_training


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--help`` prints them with the examples above)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    models = parser.add_argument_group("models")
    models.add_argument("--student", help="folder of the smaller model to quantize (e.g. /models/llava-1.5-7b-hf)")
    models.add_argument("--teacher", help="folder of the larger frozen teacher (e.g. /models/llava-1.5-13b-hf)")
    models.add_argument("--allow-download", action="store_true",
                        help="let --student/--teacher be Hub ids fetched over the network (default: local only)")  # fmt: skip
    models.add_argument("--bits", type=int, default=4, choices=(4, 8), help="weight bits (default 4)")
    models.add_argument("--group-size", type=int, default=128, help="input features per scale (default 128)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", help="JSON Lines file of {image, question, answer}")
    data.add_argument("--image-root", help="folder the image paths are relative to (default: the data file's folder)")
    data.add_argument("--max-length", type=int, default=2048, help="tokens per example, answers cut to fit")
    train = parser.add_argument_group("training")
    train.add_argument("--output-dir", help="where checkpoints and the INT4 model go (default runs/grace)")
    train.add_argument("--max-steps", type=int, default=1000, help="optimizer steps (default 1000)")
    train.add_argument("--per-device-batch-size", type=int, default=4, help="examples per GPU and micro-batch")
    train.add_argument("--gradient-accumulation-steps", type=int, default=4,
                       help="micro-batches per optimizer step; global batch = this x batch size x GPUs")  # fmt: skip
    train.add_argument("--learning-rate", type=float, default=2e-5, help="weights; log-scales get 10x (default 2e-5)")
    train.add_argument("--tau", default="auto", help="GDKD budget of the controller: a number or 'auto' (default)")
    train.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute each decoder layer in backward: much less memory (see README), ~30%% slower")  # fmt: skip
    train.add_argument("--save-steps", type=int, default=250, help="checkpoint every N optimizer steps")
    train.add_argument("--resume-from-checkpoint", help="a OUTPUT_DIR/checkpoint-N folder to continue from")
    train.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny random models and data on CPU, 2 steps, INT4 export and reload: checks the wiring")  # fmt: skip
    parser.add_argument("--dry-run-model", choices=("llava", "qwen2-vl"), default="llava",
                        help="model family of the --dry-run (default llava)")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.dry_run and not (args.student and args.teacher and args.data):
        parser.error("--student, --teacher and --data are required (or use --dry-run to try the script)")
    return args


# ------------------------------------------------------------------------------------------------------- data
class JsonlVQA(Dataset):
    """The JSON Lines rows as ``{"image", "question", "answer"}`` with the image opened on access; the library's
    ``GraceDataCollator`` turns them into batches (the student's chat template, labels on the answer tokens)."""

    def __init__(self, path: str, image_root: str | None = None):
        with open(path) as handle:
            self.rows = [json.loads(line) for line in handle if line.strip()]
        self.root = Path(image_root or os.path.dirname(os.path.abspath(path)))
        for number, row in enumerate(self.rows, 1):
            missing = {"image", "question", "answer"} - set(row)
            if missing:
                raise SystemExit(
                    f"{path}, line {number}: missing {sorted(missing)}; each line needs image, question, answer"
                )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        row = self.rows[index]
        return {"image": Image.open(self.root / row["image"]).convert("RGB"), "question": row["question"],
                "answer": row["answer"]}  # fmt: skip


# ----------------------------------------------------------------------------------------------------- models
def decoder_layer_class(model: torch.nn.Module) -> str:
    """Class name of the language model's decoder layers: the unit FSDP2 shards (one all-gather per layer)."""
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            return type(module).__name__
    raise ValueError(f"no decoder layer found in {type(model).__name__}")


def load_pair(args: argparse.Namespace):
    """QAT student (fp32 master weights, fake-quant linears), bf16 teacher and the student's processor."""
    from transformers import AutoProcessor

    local = not args.allow_download
    config = GraceConfig(bits=args.bits, group_size=args.group_size)
    student = AutoModelForVision2Seq.from_pretrained(
        args.student, quantization_config=config, dtype=torch.float32, local_files_only=local
    )
    teacher = AutoModelForVision2Seq.from_pretrained(args.teacher, dtype=torch.bfloat16, local_files_only=local)
    processor = AutoProcessor.from_pretrained(args.student, local_files_only=local)
    return student, teacher, processor


def tiny_pair(family: str):
    """Random tiny student/teacher of the real architectures, their processor and image/question/answer rows (for
    --dry-run): the same collator path as a real run."""
    from grace_quant.testing import tiny_model, tiny_processor, tiny_vqa

    student = quantize_model(tiny_model(family, seed=0), GraceConfig(group_size=32))
    teacher = tiny_model(family, seed=1, hidden=96)
    image_size = 56 if family.startswith("qwen") else 28  # what the tiny processors turn into 4 image tokens
    return student, teacher, tiny_processor(family), tiny_vqa(16, image_size=image_size)


# ---------------------------------------------------------------------------------------------- distribution
def shard_decoder_layers(model: torch.nn.Module) -> None:
    """Tell an FSDP launch (accelerate config with ``distributed_type: FSDP``) which layers to shard, unless set.

    One accelerate config then serves LLaVA (``LlamaDecoderLayer``) and Qwen2-VL (``Qwen2VLDecoderLayer``).
    Must run before the Trainer builds its Accelerator.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        os.environ.setdefault("FSDP_TRANSFORMER_CLS_TO_WRAP", decoder_layer_class(model))


def keep_fsdp_params_fp32(trainer: GraceTrainer) -> None:
    """Under FSDP2, keep the gathered parameters fp32 (bf16 autocast still runs the matmuls in bf16).

    With ``mixed_precision: bf16`` accelerate gives FSDP2 a bf16 parameter policy: the fake-quant forward would then
    round bf16 copies of the master weights and log-scales, and the INT4 model exported from the fp32 masters would
    not be the model that was trained. DDP is unaffected (its parameters are never cast).
    """
    if getattr(trainer, "is_fsdp_enabled", False):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        trainer.accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
            param_dtype=torch.float32, reduce_dtype=torch.float32
        )


def checkpointing(enabled: bool) -> dict[str, bool]:
    """The training argument that recomputes layers in backward (renamed in transformers 5.23)."""
    if not enabled:
        return {}
    fields = GraceTrainingArguments.__dataclass_fields__
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": True}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        student, teacher, processor, dataset = tiny_pair(args.dry_run_model)
        output_dir = args.output_dir or os.path.join(tempfile.gettempdir(), "grace_dry_run")  # same on every rank
    else:
        student, teacher, processor = load_pair(args)
        dataset = JsonlVQA(args.data, args.image_root)
        output_dir = args.output_dir or "runs/grace"
    # the prompt is the processor's chat template (what `grace-quant eval` scores); labels on the answer + EOS only
    collator = GraceDataCollator(processor, max_length=args.max_length)
    # GraceTrainer freezes the vision tower and trains the projector/merger by default (freeze_vision_tower,
    # train_projector); do it here already, before FSDP2 shards the parameters
    set_vision_training(student, train_vision_tower=False, train_projector=True)
    shard_decoder_layers(student)
    cuda = torch.cuda.is_available() and not args.dry_run
    training_args = GraceTrainingArguments(
        output_dir=output_dir, max_steps=2 if args.dry_run else args.max_steps,
        per_device_train_batch_size=2 if args.dry_run else args.per_device_batch_size,
        gradient_accumulation_steps=1 if args.dry_run else args.gradient_accumulation_steps,
        learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0,
        bf16=cuda, use_cpu=not cuda, **checkpointing(args.gradient_checkpointing),
        logging_steps=1 if args.dry_run else 10, save_strategy="no" if args.dry_run else "steps",
        save_steps=args.save_steps, save_total_limit=2, report_to=[], seed=args.seed, data_seed=args.seed,
        dataloader_num_workers=0 if args.dry_run else 2, disable_tqdm=args.dry_run,
        ib_tau=args.tau,
    )  # fmt: skip
    trainer = GraceTrainer(
        model=student, teacher_model=teacher, args=training_args, train_dataset=dataset, data_collator=collator,
        processing_class=processor,
    )  # fmt: skip
    keep_fsdp_params_fp32(trainer)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    int4_dir = os.path.join(output_dir, "int4")
    trainer.save_model(int4_dir)  # every rank calls it; the main process writes the packed INT4 model
    if trainer.is_world_process_zero():
        beta = trainer.controller.beta
        print(f"GRACE done: {trainer.state.global_step} steps on {trainer.args.world_size} process(es), beta {beta:.4f}; "
              f"INT4 model in {int4_dir}")  # fmt: skip
        if args.dry_run:
            reloaded = AutoModelForVision2Seq.from_pretrained(int4_dir)
            packed = sum(isinstance(layer, grace_quant.GraceQuantLinear) for _, layer in grace_layers(reloaded))
            print(f"dry run: reloaded {type(reloaded).__name__} with {packed} packed INT4 linears")
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
    close_process_group()  # once main's Trainer is gone: a live DDP model keeps the group's threads running
