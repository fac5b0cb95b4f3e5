"""Cost of one GRACE optimizer step against a plain fine-tuning step of the same student, same batch (issue 17).

Arms (fp32 master weights, bf16 autocast on CUDA, AdamW, one micro-batch per step):
  plain        the full-precision student fine-tuned with cross-entropy (transformers.Trainer.training_step)
  floor        plain + the teacher's forward (hidden states on, no loss): what any online distillation of this
               pair pays, whatever its losses cost
  qat          QAT alone (no teacher, no KD, no RCKA), fake quantization on the default backend ("auto": the fused
               Triton kernels on CUDA, torch ops on CPU)
  grace        QAT student + frozen teacher + gated DKD + RCKA + controller (GraceTrainer.training_step), default
               backend
  qat-torch, grace-torch   the same on the torch fake-quant path (the reference)
  qat-per-layer, grace-per-layer   the same with fake_quant_grouped=False: two fake-quant launches per layer
               instead of one many-weight launch each way for the whole student (the default on CUDA)
  no-kd        grace with kd_loss="none": the difference to grace is the KD loss's own cost
  grace+tc     grace with teacher_compile=True, teacher_pad_to_multiple_of=64 (compile time is in the warm-up)
  qat+linear, grace+linear   qat / grace with fake_quant_backend="triton_linear" (experimental: fake quantization
               inside the QAT linears' matmul kernels)
  grace+liger  grace with Liger Kernel's RMSNorm / RoPE / SwiGLU on student and teacher (fused linear CE off: it
               does not fit GRACE's loss); CUDA with liger_kernel importable only; always run last (Liger patches
               module-wide functions that would leak into later arms)
Sizes: --size small (CPU: tiny Qwen2-VL pair) or --size 1b (GPU: ~1.4B Qwen2-VL-layout student, ~2.8B teacher,
vocabulary 151,936, random weights). Medians over --steps timed steps after --warmup; peak memory per arm.
Writes the markdown table (--out) and, for the issue's targets, a JSON summary (--json; on CUDA with --size 1b it
defaults to benchmarks/results/trainer_step_h200.json): date, gpu, plain_ms, floor_ms, qat_vs_plain (qat / plain),
grace_vs_floor (grace / floor), grace_peak_vs_floor (peak memory, grace / floor). --profile ARM... adds, per named
arm, one more step under torch.profiler: the step's wall time against the time the GPU was busy (a step whose
kernels fill less of its wall time is bound by the host's launches), and the operators and kernels that cost most.

    python benchmarks/trainer_step.py --size 1b --out benchmarks/results/trainer_step_h200.md
    python benchmarks/trainer_step.py --smoke          # seconds on a CPU: every arm that can run here, 1 step
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Trainer, TrainingArguments

import grace_quant
from grace_quant import GraceConfig, GraceTrainer, GraceTrainingArguments, quantize_model
from grace_quant.labels import IGNORE_INDEX, next_token_mask

DEFAULT_ARMS = ("plain", "floor", "qat", "grace", "qat-per-layer", "grace-per-layer", "qat-torch", "grace-torch")
ALL_ARMS = (*DEFAULT_ARMS, "no-kd", "grace+tc", "qat+linear", "grace+linear", "grace+liger")
#: arms whose failure is noted in the results instead of ending the run (optional peers, experimental kernels)
FALLIBLE_ARMS = ("qat+linear", "grace+linear", "grace+liger")
H200_JSON = Path(__file__).resolve().parent / "results" / "trainer_step_h200.json"
#: GraceTrainingArguments overrides per GRACE arm (the plain arms use transformers' Trainer)
GRACE_KNOBS = {
    "qat": {"kd_loss": "none", "rcka_weight": 0.0},
    "qat-torch": {"kd_loss": "none", "rcka_weight": 0.0, "fake_quant_backend": "torch"},
    "grace": {},
    "grace-torch": {"fake_quant_backend": "torch"},
    "qat-per-layer": {"kd_loss": "none", "rcka_weight": 0.0, "fake_quant_grouped": False},
    "grace-per-layer": {"fake_quant_grouped": False},
    "no-kd": {"kd_loss": "none"},
    "grace+tc": {"teacher_compile": True, "teacher_pad_to_multiple_of": 64},
    "qat+linear": {"kd_loss": "none", "rcka_weight": 0.0, "fake_quant_backend": "triton_linear"},
    "grace+linear": {"fake_quant_backend": "triton_linear"},
    "grace+liger": {},
}
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


def arm_problem(arm: str, device: torch.device) -> str | None:
    """Why ``arm`` cannot run here, or None: the Liger and fused-linear arms need CUDA (and Liger its package)."""
    if arm in ("qat+linear", "grace+linear") and device.type != "cuda":
        return "the fused QAT-linear kernels need CUDA"
    if arm != "grace+liger":
        return None
    if device.type != "cuda":
        return "Liger Kernel's kernels need CUDA"
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return "liger_kernel is not installed (carry its wheel in .whl/, see benchmarks/h200_session.sh)"
    return None


def apply_liger(*models: torch.nn.Module) -> None:
    """Liger's RMSNorm / RoPE / SwiGLU on each model, as transformers' ``use_liger_kernel`` applies them (fused
    linear cross-entropy off: GRACE needs the logits)."""
    from transformers.integrations.liger import apply_liger_kernel

    for model in models:
        apply_liger_kernel(model, {"fused_linear_cross_entropy": False})


def make_trainer(arm: str, size: dict, device: torch.device):
    """``(trainer, student, teacher or None)`` for one arm, models built on ``device``."""
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: random init of billions of weights on CPU is slow
        student = build(size, "student")
    common = dict(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=device.type == "cpu", bf16=device.type == "cuda",
                  learning_rate=1e-5, per_device_train_batch_size=size["batch"], disable_tqdm=True)  # fmt: skip
    teacher = None
    if arm not in ("plain", "qat", "qat-torch", "qat-per-layer", "qat+linear"):
        with torch.device(device):
            teacher = build(size, "teacher").to(torch.bfloat16 if device.type == "cuda" else torch.float32)
        teacher.eval().requires_grad_(False)
    if arm in ("plain", "floor"):
        return Trainer(model=student, args=TrainingArguments(**common)), student, teacher
    quantize_model(student, GraceConfig(group_size=128 if size["vocab"] > 1000 else 32))
    if arm == "grace+liger":
        apply_liger(student, teacher)
    args = GraceTrainingArguments(**common, **GRACE_KNOBS[arm], rcka_warmup_steps=0)
    return GraceTrainer(model=student, teacher_model=teacher, args=args), student, teacher


def timed_step(arm, trainer, student, teacher, batch, teacher_inputs, num_items, device: torch.device) -> float:
    """Seconds of one optimizer step of ``arm`` (forward, backward, optimizer, controller; synchronized on CUDA)."""
    start = time.perf_counter()
    # training_step on an unprepared model gets no autocast from accelerate: apply bf16 autocast explicitly
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        trainer.training_step(student, batch, num_items_in_batch=num_items)
        if arm == "floor":
            with torch.no_grad():
                teacher(**teacher_inputs, output_hidden_states=True)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    if isinstance(trainer, GraceTrainer):
        trainer._controller_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_arm(arm: str, size: dict, device: torch.device, steps: int, warmup: int, profile: bool = False) -> dict:
    """Median step time and peak memory of one arm (and, with ``profile``, one more step under torch.profiler)."""
    trainer, student, teacher = make_trainer(arm, size, device)
    trainer.create_optimizer()
    batch = batch_for(student, size, device)
    teacher_inputs = {k: v for k, v in batch.items() if k != "labels"}
    num_items = next_token_mask(batch["labels"]).sum()
    student.train()
    times = []
    one_step = functools.partial(timed_step, arm, trainer, student, teacher, batch, teacher_inputs, num_items, device)
    for step in range(warmup + steps):
        if step == warmup and device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elapsed = one_step()
        if step >= warmup:
            times.append(elapsed)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    profiled = profile_step(one_step, device) if profile else None
    del one_step, trainer, student, batch, teacher, teacher_inputs
    gc.collect()
    torch._dynamo.reset()  # the compiled-teacher arm's graphs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"arm": arm, "median_s": statistics.median(times), "peak_bytes": peak, "times": times, "profile": profiled}


def profile_step(one_step, device: torch.device, rows: int = 20) -> dict:
    """One step under torch.profiler: its wall time, the summed device time of its kernels (CUDA; None on CPU)
    and the operators/kernels that cost most, as a text table."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        wall = one_step()
    averages = prof.key_averages()
    busy_us = None
    if device.type == "cuda":
        busy_us = sum(
            e.self_device_time_total for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
        )
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return {
        "wall_s": wall,
        "device_busy_s": None if busy_us is None else busy_us / 1e6,
        "table": averages.table(sort_by=sort_by, row_limit=rows, max_name_column_width=70),
        # a host-bound step's time is the host's: on a GPU, the operators that cost most host time too
        "host_table": averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=70)
        if device.type == "cuda"
        else None,
    }


def summary(rows: dict[str, dict], gpu: str) -> dict:
    """The issue's JSON record from the plain, floor, qat and grace arms (None where an arm or a peak is missing)."""

    def ratio(a: str, b: str, key: str = "median_s") -> float | None:
        if a not in rows or b not in rows or rows[a][key] is None or rows[b][key] is None:
            return None
        return round(rows[a][key] / rows[b][key], 4)

    def ms(arm: str) -> float | None:
        return round(rows[arm]["median_s"] * 1e3, 2) if arm in rows else None

    return {
        "date": str(datetime.date.today()), "gpu": gpu, "plain_ms": ms("plain"), "floor_ms": ms("floor"),
        "qat_vs_plain": ratio("qat", "plain"), "grace_vs_floor": ratio("grace", "floor"),
        "grace_peak_vs_floor": ratio("grace", "floor", "peak_bytes"),
    }  # fmt: skip


def markdown(rows: dict[str, dict], record: dict, size_name: str, args: argparse.Namespace, notes: list[str]) -> str:
    """The results table: per arm the median step, its ratio to plain and to the floor, and the peak memory."""
    size = SIZES[size_name]
    plain, floor = rows.get("plain"), rows.get("floor")
    lines = [
        f"# GRACE step vs plain fine-tuning step ({size_name})",
        "",
        f"{record['date']}, {record['gpu']}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"grace_quant {grace_quant.__version__}. Student/teacher (hidden, layers, intermediate, heads, kv heads): "
        f"{size['student']} / {size['teacher']}, vocabulary {size['vocab']}, batch {size['batch']} x {size['seq']} "
        f"tokens (64 visual, half supervised). Median of {args.steps} steps after {args.warmup} warm-up steps.",
        "",
        "| arm | median step (ms) | ratio to plain | ratio to floor | peak memory (GiB) |",
        "|---|---|---|---|---|",
    ]
    for row in rows.values():
        to_plain = f"{row['median_s'] / plain['median_s']:.2f}x" if plain else "-"
        to_floor = f"{row['median_s'] / floor['median_s']:.2f}x" if floor else "-"
        memory = f"{row['peak_bytes'] / 2**30:.2f}" if row["peak_bytes"] is not None else "n/a (CPU)"
        lines.append(f"| {row['arm']} | {row['median_s'] * 1e3:.1f} | {to_plain} | {to_floor} | {memory} |")
    lines += ["", "Issue 17 targets: GRACE / floor <= 1.10x (floor 1.20x), QAT / plain <= 1.10x (1.25x), GRACE peak / "
              "floor peak <= 1.10x (1.15x).", "", "```", json.dumps(record), "```"]  # fmt: skip
    lines += [f"- {note}" for note in notes]
    for row in rows.values():
        if row.get("profile"):
            lines += profile_lines(row["arm"], row["profile"])
    return "\n".join(lines) + "\n"


def profile_lines(arm: str, profile: dict) -> list[str]:
    """The markdown section of one arm's profiled step."""
    wall_ms = profile["wall_s"] * 1e3
    if profile["device_busy_s"] is None:
        busy = "no device timeline (CPU run)"
    else:
        busy = f"kernels busy {profile['device_busy_s'] * 1e3:.1f} ms ({profile['device_busy_s'] * 1e3 / wall_ms:.0%} of it)"
    lines = ["", f"## Profile of one {arm} step", "", f"Wall {wall_ms:.1f} ms under the profiler; {busy}.", "",
             "```", profile["table"].rstrip(), "```"]  # fmt: skip
    if profile.get("host_table"):
        lines += ["", "By host time:", "", "```", profile["host_table"].rstrip(), "```"]
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per arm (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--arms", nargs="+", choices=ALL_ARMS, default=list(DEFAULT_ARMS),
                        help=f"arms to run (default {' '.join(DEFAULT_ARMS)}; 'grace+liger' always runs last)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true",
                        help="quick check that every arm runs: --size small, 1 step after 1 warm-up, all arms")  # fmt: skip
    parser.add_argument("--profile", nargs="+", default=[], choices=ALL_ARMS, metavar="ARM",
                        help="profile one extra step of these arms (operators, kernels, GPU busy vs wall time)")  # fmt: skip
    parser.add_argument("--out", help="markdown results file to write")
    parser.add_argument("--json", help="JSON summary to write (default on CUDA with --size 1b: "
                        "benchmarks/results/trainer_step_h200.json; 'none' writes none)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.steps, args.warmup, args.arms = "small", 1, 1, list(ALL_ARMS)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arms = sorted(dict.fromkeys(args.arms), key=lambda arm: arm == "grace+liger")  # Liger last
    notes = [f"{arm} not run: {problem}." for arm in arms if (problem := arm_problem(arm, device)) is not None]
    arms = [arm for arm in arms if arm_problem(arm, device) is None]
    rows = {}
    for arm in arms:
        try:
            rows[arm] = run_arm(arm, SIZES[args.size], device, args.steps, args.warmup, arm in args.profile)
        except Exception as exc:  # an optional peer or an experimental kernel: note it, keep the other arms
            if arm not in FALLIBLE_ARMS:
                raise
            notes.append(f"{arm} failed: {type(exc).__name__}: {str(exc)[:300]}")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for row in rows.values():
        print(row["arm"], "step times (ms):", [round(t * 1e3, 1) for t in row["times"]])
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    record = summary(rows, gpu)
    text = markdown(rows, record, args.size, args, notes)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    json_path = args.json or (str(H200_JSON) if device.type == "cuda" and args.size == "1b" else None)
    if json_path and json_path != "none":
        Path(json_path).write_text(json.dumps(record, indent=1) + "\n")
        print("wrote", json_path)
    return record


if __name__ == "__main__":
    main()
