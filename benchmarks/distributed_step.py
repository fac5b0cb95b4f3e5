"""GRACE training step across GPUs: 1 GPU, DDP on 2 GPUs and FSDP2 on 2 GPUs, same per-GPU batch.

Each arm runs ``GraceTrainer.train()`` for ``--warmup + --steps`` optimizer steps on the student/teacher pair of
benchmarks/trainer_step.py (``--size 1b``: ~1.4B Qwen2-VL-layout student with fp32 master weights and INT4 QAT
linears, ~2.8B bf16 teacher, vocabulary 151,936, batch 4 x 512 tokens per GPU; random weights) with every GRACE
component on (gated DKD, RCKA, Lagrangian controller), AdamW, bf16 autocast. Reported per arm: median step time
(wall time between consecutive optimizer steps, so data, forward of both models, backward, gradient communication,
optimizer and controller all count), samples/s over all GPUs, and the peak memory of each GPU
(``torch.cuda.max_memory_allocated`` over the timed steps, and the reserved peak).

  single  one process, one GPU, no wrapping
  ddp     ``torchrun --nproc_per_node 2``: DistributedDataParallel (accelerate), teacher replicated
  fsdp2   ``torchrun --nproc_per_node 2``: FSDP2 (``fully_shard`` per decoder layer + root), teacher replicated and
          never wrapped; the parameters stay fp32 inside FSDP (bf16 autocast does the matmuls), so the fake-quant
          forward sees the fp32 master weights and log-scales exactly as in DDP and as in the INT4 export

    PYTHONSAFEPATH=1 PYTHONPATH=$PWD python benchmarks/distributed_step.py --size 1b \\
        --out benchmarks/results/distributed_h200x2.md
    PYTHONSAFEPATH=1 PYTHONPATH=$PWD python benchmarks/distributed_step.py --size small --cpu   # logic check, gloo

On CPU (``--cpu``, 2 gloo processes) the numbers mean nothing; it checks that every arm runs and that DDP and FSDP2
end on the same controller beta as one process would on the same data.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import TrainerCallback

import grace_quant
from benchmarks.trainer_step import SIZES, batch_for, build
from grace_quant import GraceConfig, GraceTrainer, GraceTrainingArguments, quantize_model
from grace_quant.integrations.trainer import close_process_group
from grace_quant.testing import collate

ARMS = ("single", "ddp", "fsdp2")


class StepClock(TrainerCallback):
    """Wall time at the end of every optimizer step (after a device sync); peak memory reset after the warm-up."""

    def __init__(self, device: torch.device, warmup: int):
        self.device, self.warmup = device, warmup
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ends.append(time.perf_counter())
        if state.global_step == self.warmup and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)


class BenchTrainer(GraceTrainer):
    """``GraceTrainer`` that keeps FSDP2 parameters in fp32 and, on CPU only, switches accelerate to FSDP.

    With ``bf16=True`` accelerate gives FSDP2 a bf16 ``MixedPrecisionPolicy``: the fake-quant forward would then see
    bf16 copies of the master weights and log-scales, not the fp32 values the INT4 export is computed from. Keeping
    ``param_dtype`` fp32 (autocast still runs the matmuls in bf16) trains exactly what is exported.
    accelerate enables FSDP only on accelerators; for the CPU logic check the state is switched by hand, as in
    tests/distributed_worker.py.
    """

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is None:
            return
        from accelerate import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
        from torch.distributed.fsdp import MixedPrecisionPolicy

        state = self.accelerator.state
        if not self.is_fsdp_enabled:  # CPU
            state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True
        state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
            param_dtype=torch.float32, reduce_dtype=torch.float32
        )


def samples(batch: dict[str, torch.Tensor], count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` single-sample examples cycling through the rows of ``batch`` (the layout ``collate`` expects)."""
    rows = batch["input_ids"].shape[0]
    patches = batch["pixel_values"].shape[0] // rows
    examples = []
    for index in range(count):
        row = index % rows
        example = {k: v[row] for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
        example["pixel_values"] = batch["pixel_values"][row * patches : (row + 1) * patches]
        example["image_grid_thw"] = batch["image_grid_thw"][row : row + 1]
        examples.append(example)
    return examples


def run_worker(arm: str, size_name: str, steps: int, warmup: int, cpu: bool, out: str) -> None:
    """One rank of one arm: build, train ``warmup + steps`` steps, write ``{arm}_rank{r}.json``."""
    size = SIZES[size_name]
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu") if cpu else torch.device("cuda", local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # every rank builds the same weights
    with torch.device(device):  # initialise on the device: random init of billions of weights on CPU is slow
        student = build(size, "student")
        teacher = build(size, "teacher").to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    quantize_model(student, GraceConfig(group_size=128 if size["vocab"] > 1000 else 32))
    total = warmup + steps
    dataset = samples(batch_for(student, size, "cpu"), total * size["batch"] * world)
    extra: dict[str, Any] = {}
    if arm == "fsdp2":
        extra = dict(
            fsdp="full_shard auto_wrap",
            fsdp_config={
                "version": 2,
                "transformer_layer_cls_to_wrap": ["Qwen2VLDecoderLayer"],
                "reshard_after_forward": True,
                "state_dict_type": "FULL_STATE_DICT",
            },
        )
    args = GraceTrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=size["batch"], max_steps=total,
        learning_rate=1e-5, bf16=device.type == "cuda", use_cpu=device.type == "cpu", report_to=[],
        save_strategy="no", logging_steps=total, disable_tqdm=True, dataloader_num_workers=0, seed=0, data_seed=0,
        rcka_warmup_steps=0, ddp_find_unused_parameters=False, **extra,
    )  # fmt: skip
    clock = StepClock(device, warmup)
    trainer = BenchTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, data_collator=collate, callbacks=[clock]
    )
    trainer.train()
    times = [b - a for a, b in zip(clock.ends[warmup - 1 : -1], clock.ends[warmup:], strict=True)]
    wrapped = type(trainer.model_wrapped).__name__
    sharded = sum(type(p).__name__ == "DTensor" for p in trainer.model.parameters())
    result = {
        "arm": arm, "rank": rank, "world": world, "times": times, "median_s": statistics.median(times),
        "peak_allocated": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "peak_reserved": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None,
        "beta": trainer.controller.beta, "controller_steps": trainer.controller.step, "wrapped": wrapped,
        "sharded_params": sharded, "batch_per_gpu": size["batch"],
        "loss": [e["loss"] for e in trainer.state.log_history if "loss" in e],
    }  # fmt: skip
    with open(os.path.join(out, f"{arm}_rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    trainer.accelerator.wait_for_everyone()


def launch(arm: str, options: argparse.Namespace, out: str) -> list[dict]:
    """Run one arm in fresh processes (torchrun for the 2-process arms) and read every rank's results."""
    script = [os.path.abspath(__file__), "--worker", arm, "--size", options.size, "--steps", str(options.steps),
              "--warmup", str(options.warmup), "--results", out] + (["--cpu"] if options.cpu else [])  # fmt: skip
    processes = 1 if arm == "single" else options.gpus
    if processes == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        command += script
    root = str(Path(__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "PYTHONSAFEPATH": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    if options.cpu:
        env["OMP_NUM_THREADS"] = "1"
    elif processes == 1:  # one GPU: with several visible the Trainer would fall back to nn.DataParallel
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    started = time.perf_counter()
    # a session of its own, so that a hung arm (torchrun and its workers) can be stopped as a whole
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=options.arm_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        print(f"{arm}: stopped after {options.arm_timeout} s", flush=True)
    print(f"{arm}: exit {process.returncode} after {time.perf_counter() - started:.0f} s", flush=True)
    if process.returncode != 0:
        print(stdout[-2000:], stderr[-6000:], sep="\n", flush=True)
        return []
    return [json.load(open(os.path.join(out, f"{arm}_rank{r}.json"))) for r in range(processes)]


def report(rows: dict[str, list[dict]], options: argparse.Namespace) -> str:
    """The markdown results file."""
    size = SIZES[options.size]
    gpu = "CPU (gloo, logic check only)" if options.cpu else torch.cuda.get_device_name()
    count = "" if options.cpu else f"{torch.cuda.device_count()} x "
    lines = [
        f"# GRACE step on 1 GPU, DDP and FSDP2 ({options.size})",
        "",
        f"{datetime.date.today()}, {count}{gpu}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"grace_quant {grace_quant.__version__}. Student/teacher (hidden, layers, intermediate, heads, kv heads): "
        f"{size['student']} / {size['teacher']}, vocabulary {size['vocab']}, {size['batch']} x {size['seq']} tokens "
        f"per GPU (64 visual, half supervised). GDKD + RCKA + Lagrangian controller, AdamW, fp32 master weights, "
        f"bf16 autocast, bf16 teacher. Median of {options.steps} steps after {options.warmup} warm-up steps.",
        "",
        "| arm | GPUs | median step (ms) | samples/s | speed-up vs 1 GPU | peak allocated per GPU (GiB) | "
        "peak reserved per GPU (GiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    base = None
    for arm in ARMS:
        ranks = rows.get(arm) or []
        if not ranks:
            lines.append(f"| {arm} | - | failed | | | | |")
            continue
        median = max(r["median_s"] for r in ranks)  # the slowest rank sets the pace
        throughput = ranks[0]["batch_per_gpu"] * len(ranks) / median
        base = throughput if arm == "single" else base
        speedup = f"{throughput / base:.2f}x" if base else "-"
        gib = [f"{r['peak_allocated'] / 2**30:.1f}" if r["peak_allocated"] else "-" for r in ranks]
        reserved = [f"{r['peak_reserved'] / 2**30:.1f}" if r["peak_reserved"] else "-" for r in ranks]
        lines.append(f"| {arm} | {len(ranks)} | {median * 1e3:.1f} | {throughput:.1f} | {speedup} | "
                     f"{' / '.join(gib)} | {' / '.join(reserved)} |")  # fmt: skip
    lines += ["", "Checks: wrapper, sharded parameters, controller beta after the run (equal on every rank):", ""]
    for arm in ARMS:
        for r in rows.get(arm) or []:
            lines.append(f"- {arm} rank {r['rank']}: {r['wrapped']}, {r['sharded_params']} DTensor parameters, "
                         f"beta {r['beta']:.6f} after {r['controller_steps']} steps")  # fmt: skip
    lines += ["", "Per-step times (ms):", "```"]
    for arm in ARMS:
        for r in rows.get(arm) or []:
            lines.append(f"{arm} rank {r['rank']}: {[round(t * 1e3, 1) for t in r['times']]}")
    lines.append("```")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per arm (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gpus", type=int, default=2, help="processes of the ddp and fsdp2 arms")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    parser.add_argument("--cpu", action="store_true", help="run on CPU with gloo (logic check)")
    parser.add_argument("--arm-timeout", type=float, default=600, help="seconds before an arm is stopped")
    parser.add_argument("--out", help="markdown results file to write")
    parser.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        run_worker(options.worker, options.size, options.steps, options.warmup, options.cpu, options.results)
        close_process_group()  # once the worker's Trainer is gone (see its docstring)
        return
    out = tempfile.mkdtemp(prefix="grace_dist_")
    rows = {arm: launch(arm, options, out) for arm in options.arms.split(",")}
    text = report(rows, options)
    print(text)
    if options.out:
        with open(options.out, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
