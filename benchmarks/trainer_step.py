"""Cost of one GRACE optimizer step against a plain fine-tuning step of the same student, same batch.

Arms (fp32 master weights, bf16 autocast on CUDA, AdamW, one micro-batch per step):
  plain   - the full-precision student fine-tuned with cross-entropy (transformers.Trainer.training_step)
  grace   - QAT student + frozen teacher forward + gated DKD + RCKA + controller (GraceTrainer.training_step)
  no-kd   - as grace with kd_loss="none": the difference to grace is the KD loss's own memory
  qat     - QAT alone (no teacher, no KD, no RCKA): the cost of fake quantization itself
  plain+teacher - the plain step plus the teacher's forward (hidden states on, no loss): the floor any
            online-distillation step of this pair pays, whatever its losses cost
  grace+ffq, qat+ffq - grace / qat with the fused Triton fake-quantization kernels (GRACE_FUSED_FAKE_QUANT=1),
            with --fused-fake-quant (CUDA only)
Sizes: --size small (CPU: tiny Qwen2-VL pair) or --size 1b (GPU: ~1.4B Qwen2-VL-layout student, ~2.8B teacher,
vocabulary 151,936, random weights). Medians over --steps timed steps after warm-up.

    python benchmarks/trainer_step.py --size 1b --out benchmarks/results/trainer_step_h200.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import tempfile
import time

import torch
import transformers
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Trainer, TrainingArguments

import grace_quant
from grace_quant import GraceConfig, GraceTrainer, GraceTrainingArguments, quantize_model
from grace_quant.labels import IGNORE_INDEX, next_token_mask
from grace_quant.quant import fused_fake_quant

SIZES = {
    # name: (student hidden, layers, intermediate, heads, kv), teacher (...), vocab, vision depth/width, seq, batch
    "small": dict(student=(64, 2, 128, 4, 2), teacher=(96, 2, 192, 4, 2), vocab=320, vision=(2, 32), seq=192, batch=2),
    "1b": dict(
        student=(1536, 20, 8960, 12, 2),
        teacher=(2048, 28, 11008, 16, 2),
        vocab=151936,
        vision=(4, 640),
        seq=512,
        batch=4,
    ),
}
GRID = (1, 16, 16)  # t, h, w patches -> 64 visual tokens after the 2x2 merge


def build(size: dict, which: str) -> Qwen2VLForConditionalGeneration:
    hidden, layers, inter, heads, kv = size[which]
    half = hidden // heads // 2
    text = dict(
        vocab_size=size["vocab"], hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_parameters={"rope_type": "default", "mrope_section": [half // 4, half // 4, half - 2 * (half // 4)], "rope_theta": 1e6},
    )  # fmt: skip
    depth, width = size["vision"]
    vision = dict(depth=depth, embed_dim=width, hidden_size=hidden, num_heads=max(1, width // 64), mlp_ratio=4,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)  # fmt: skip
    vocab = size["vocab"]
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=vocab - 1, video_token_id=vocab - 2,
                           vision_start_token_id=vocab - 3)  # fmt: skip
    return Qwen2VLForConditionalGeneration(config)


def batch_for(model, size: dict, device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    config = model.config
    image_tokens = GRID[0] * GRID[1] * GRID[2] // 4
    b, seq = size["batch"], size["seq"]
    text = torch.randint(3, size["vocab"] - 8, (b, seq - image_tokens), generator=generator)
    ids = torch.cat([text[:, :4], torch.full((b, image_tokens), config.image_token_id), text[:, 4:]], dim=1)
    labels = ids.clone()
    labels[:, : seq // 2] = IGNORE_INDEX  # the second half is the answer
    patch_dim = 3 * 2 * 14 * 14
    pixels = torch.randn(b * GRID[0] * GRID[1] * GRID[2], patch_dim, generator=generator)
    batch = {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "pixel_values": pixels,
        "image_grid_thw": torch.tensor([GRID] * b), "mm_token_type_ids": (ids == config.image_token_id).long(),
    }  # fmt: skip
    return {k: v.to(device) for k, v in batch.items()}


def run_arm(arm: str, size: dict, device: torch.device, steps: int, warmup: int) -> dict:
    """One arm; a ``+ffq`` suffix runs it with the fused fake-quantization kernels switched on."""
    if arm.endswith("+ffq"):
        with fused_fake_quant():
            result = run_arm(arm.removesuffix("+ffq"), size, device, steps, warmup)
        return {**result, "arm": arm}
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: random init of billions of weights on CPU is slow
        student = build(size, "student")
    common = dict(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=device.type == "cpu", bf16=device.type == "cuda",
                  learning_rate=1e-5, per_device_train_batch_size=size["batch"], disable_tqdm=True)  # fmt: skip
    teacher = None
    if arm in ("plain", "plain+teacher"):
        trainer = Trainer(model=student, args=TrainingArguments(**common))
        if arm == "plain+teacher":
            with torch.device(device):
                teacher = build(size, "teacher").to(torch.bfloat16 if device.type == "cuda" else torch.float32)
            teacher.eval().requires_grad_(False)
    else:
        quantize_model(student, GraceConfig(group_size=128 if size["vocab"] > 1000 else 32))
        if arm != "qat":
            with torch.device(device):
                teacher = build(size, "teacher").to(torch.bfloat16 if device.type == "cuda" else torch.float32)
        knobs = {"no-kd": {"kd_loss": "none"}, "qat": {"kd_loss": "none", "rcka_weight": 0.0}}.get(arm, {})
        args = GraceTrainingArguments(**common, **knobs, rcka_warmup_steps=0)
        trainer = GraceTrainer(model=student, teacher_model=teacher, args=args)
    trainer.create_optimizer()
    batch = batch_for(student, size, device)
    num_items = next_token_mask(batch["labels"]).sum()
    student.train()
    times = []
    for step in range(warmup + steps):
        if step == warmup and device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        # training_step on an unprepared model gets no autocast from accelerate: apply bf16 autocast explicitly
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            trainer.training_step(student, batch, num_items_in_batch=num_items)
            if arm == "plain+teacher":
                with torch.no_grad():
                    teacher(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        if arm not in ("plain", "plain+teacher"):
            trainer._controller_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")
    result = {"arm": arm, "median_s": statistics.median(times), "peak_bytes": peak, "times": times}
    del trainer, student, batch, teacher
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per arm (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--fused-fake-quant", action="store_true",
                        help="add grace/qat arms with the fused Triton fake-quantization kernels (CUDA)")  # fmt: skip
    parser.add_argument("--out", help="markdown results file to write")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = SIZES[args.size]
    arms = ["plain", "grace", "no-kd", "qat", "plain+teacher"]
    if args.fused_fake_quant:
        arms += ["grace+ffq", "qat+ffq"]
    rows = [run_arm(arm, size, device, args.steps, args.warmup) for arm in arms]
    for row in rows:
        print(row["arm"], "step times (ms):", [round(t * 1e3, 1) for t in row["times"]])
    plain, grace, nokd, _, floor = rows[:5]
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = [
        f"# GRACE step vs plain fine-tuning step ({args.size})",
        "",
        f"{datetime.date.today()}, {gpu}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"grace_quant {grace_quant.__version__}. Student/teacher (hidden, layers, intermediate, heads, kv heads): "
        f"{size['student']} / {size['teacher']}, vocabulary {size['vocab']}, batch {size['batch']} x {size['seq']} tokens "
        f"(64 visual, half supervised). Median of {args.steps} steps after {args.warmup} warm-up steps.",
        "",
        "| arm | median step (ms) | ratio to plain | peak memory (GiB) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        memory = f"{row['peak_bytes'] / 2**30:.2f}" if device.type == "cuda" else "n/a (CPU)"
        ratio = row["median_s"] / plain["median_s"]
        lines.append(f"| {row['arm']} | {row['median_s'] * 1e3:.1f} | {ratio:.2f}x | {memory} |")
    if device.type == "cuda":
        kd_extra = (grace["peak_bytes"] - nokd["peak_bytes"]) / grace["peak_bytes"]
        lines += ["", f"KD loss extra memory (grace - no-kd) / grace peak: {kd_extra:.1%} (target < 10%).",
                  f"GRACE step / plain step: {grace['median_s'] / plain['median_s']:.2f}x (target <= 1.6x).",
                  f"Floor, plain step + teacher forward alone: {floor['median_s'] / plain['median_s']:.2f}x."]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
