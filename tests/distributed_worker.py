"""One GRACE training run of a tiny teacher/student pair, as a single process or one rank of a 2-process job.

Launched by ``tests/test_distributed.py`` (never collected by pytest: the name does not start with ``test_``)::

    python tests/distributed_worker.py --layout single --per-device-batch 4 --out DIR
    torchrun --nproc_per_node 2 tests/distributed_worker.py --layout ddp --per-device-batch 2 --out DIR
    torchrun --nproc_per_node 2 tests/distributed_worker.py --layout fsdp2 --per-device-batch 1 --accumulation 2 --out DIR
    torchrun --nproc_per_node 2 tests/distributed_worker.py --layout zero2 --per-device-batch 2 --out DIR  # deepspeed

Every component of GRACE is on (gated-DKD loss with the gate off, RCKA with its ramp, the Lagrangian controller).
Each rank writes ``rank{r}.pt`` under ``--out`` with what the test compares against the single-process run: the
final weights, the controller state, the input ids of every micro-batch it trained on, the ``num_items_in_batch``
it was given, and its training logs. With ``--save-int4`` every rank then calls ``trainer.save_model`` on a folder
of its own (``int4_rank{r}``): only the main process may write one.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from grace_quant import GraceConfig, GraceTrainer, GraceTrainingArguments, quantize_model
from grace_quant.integrations.trainer import close_process_group
from grace_quant.testing import collate, tiny_dataset, tiny_model

# Decoder layer classes FSDP2 shards one by one (each becomes one all-gather unit).
DECODER_LAYERS = {"llava": "LlamaDecoderLayer", "qwen2-vl": "Qwen2VLDecoderLayer"}


class RecordingTrainer(GraceTrainer):
    """``GraceTrainer`` that also records which samples each micro-batch held and the token count it was given."""

    fsdp_forced = False  # set when accelerate dropped the FSDP plugin (CPU) and the state was switched by hand

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.seen: list[list[list[int]]] = []  # per optimizer step: input ids of every sample trained on
        self.items: list[int] = []  # num_items_in_batch of every micro-batch

    def create_accelerator_and_postprocess(self) -> None:
        """On CPU, switch accelerate to FSDP by hand: accelerate 1.15 enables FSDP only for MULTI_GPU/NPU/XPU/...
        and otherwise drops the plugin without a word (the Trainer would run DDP). torch's ``fully_shard`` works with
        gloo, so the Trainer's real FSDP2 path then runs as on GPUs. ``PartialState``'s shared copy must be set too:
        with only ``AcceleratorState`` changed, the type read back as MULTI_CPU by the time ``save_model`` ran."""
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
            from accelerate import PartialState
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            state = self.accelerator.state
            state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = self.fsdp_forced = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            while len(self.seen) <= self.state.global_step:
                self.seen.append([])
            self.seen[self.state.global_step].extend(inputs["input_ids"].tolist())
            self.items.append(int(num_items_in_batch))
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


def training_args(
    layout: str, out: str, per_device_batch: int, accumulation: int, steps: int, model: str
) -> GraceTrainingArguments:
    """Arguments that make one optimizer step a linear function of the global batch's gradient (see the test)."""
    extra: dict[str, Any] = {}
    if layout == "fsdp2":
        extra = dict(
            fsdp="full_shard auto_wrap",
            fsdp_config={
                "fsdp_version": 2,
                "transformer_layer_cls_to_wrap": [DECODER_LAYERS[model]],
                "reshard_after_forward": True,
                "state_dict_type": "FULL_STATE_DICT",
            },
        )
    if layout == "zero2":  # DeepSpeed ZeRO-2 (optimizer states and gradients partitioned, weights replicated)
        extra = dict(
            deepspeed={
                "zero_optimization": {"stage": 2},
                "zero_allow_untested_optimizer": True,  # the Trainer's SGD with GRACE's three parameter groups
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
            }
        )
    return GraceTrainingArguments(
        output_dir=out, per_device_train_batch_size=per_device_batch, gradient_accumulation_steps=accumulation,
        max_steps=steps, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
        # SGD without clipping: the update is linear in the gradient (clipping would hide a wrong loss scale and
        # Adam would turn float noise on near-zero gradients into full-size steps)
        optim="sgd", learning_rate=0.1, max_grad_norm=0.0, lr_scheduler_type="constant",
        # the confidence gate makes GDKD a ratio of sums per micro-batch (sum g L / sum g): the mean of two ranks'
        # ratios is not the ratio over the union, so only the ungated loss can match the single process exactly
        kd_loss="gdkd", confidence_gate=False,
        rcka_weight=3.0, rcka_warmup_steps=2,
        # a small tau and a large dual step make beta move visibly at every step
        controller="lagrangian", ib_tau="0.01", ib_eta=0.5,
        **extra,
    )  # fmt: skip


def is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor"


def full_state_dict(trainer: GraceTrainer) -> dict[str, torch.Tensor]:
    """The whole model's weights on every rank (FSDP2 all-gathers its shards; DDP replicas are already whole)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    state = {}
    for key, value in model.state_dict().items():
        if hasattr(value, "full_tensor"):  # a DTensor shard (FSDP2): gather it, a collective on every rank
            value = value.full_tensor()
        state[key] = value.detach().cpu().clone()
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=("single", "ddp", "fsdp2", "zero2"), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", choices=sorted(DECODER_LAYERS), default="llava")
    parser.add_argument("--per-device-batch", type=int, required=True)
    parser.add_argument("--accumulation", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dataset-size", type=int, default=12)
    parser.add_argument("--save-int4", action="store_true")
    options = parser.parse_args()

    torch.use_deterministic_algorithms(True)
    student = quantize_model(tiny_model(options.model, seed=0), GraceConfig(group_size=32))
    teacher = tiny_model(options.model, seed=1, hidden=96)  # wider than the student, as in tests/test_trainer.py
    initial = {key: value.detach().clone() for key, value in student.state_dict().items()}
    args = training_args(
        options.layout, options.out, options.per_device_batch, options.accumulation, options.steps, options.model
    )
    trainer = RecordingTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=tiny_dataset(student, options.dataset_size),
        data_collator=collate,
    )
    trainer.train()
    rank = trainer.args.process_index
    result = {
        "world_size": trainer.args.world_size,
        "fsdp": trainer.is_fsdp_enabled,
        "fsdp_forced": trainer.fsdp_forced,
        "sharded": sum(is_dtensor(param) for param in trainer.model.parameters()),
        "log_scales": sum(name.endswith("log_scale") for name, _ in trainer.model.named_parameters()),
        "sharded_log_scales": sum(
            name.endswith("log_scale") and is_dtensor(param) for name, param in trainer.model.named_parameters()
        ),
        "initial": initial,
        "weights": full_state_dict(trainer),
        "controller": trainer.controller.state_dict(),
        "seen": trainer.seen,
        "items": trainer.items,
        "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
    }
    torch.save(result, os.path.join(options.out, f"rank{rank}.pt"))
    if options.save_int4:
        trainer.save_model(os.path.join(options.out, f"int4_rank{rank}"))
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
    close_process_group()  # once main's Trainer is gone (see its docstring)
