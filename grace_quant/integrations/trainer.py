"""``GraceTrainer``: a ``transformers.Trainer`` that runs GRACE's QAT distillation.

``L = L_CE + beta * L_GDKD + omega * L_RCKA`` (METHOD.md section 3): cross-entropy on answer tokens, confidence-
gated decoupled KD from a frozen teacher, relational CKA between visual-token Grams, and a Lagrangian controller
that moves ``beta`` once per optimizer step. Trainer checkpoints hold master weights and scales (exact resume);
``save_model`` writes the packed INT4 model.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import warnings
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer, TrainerCallback

from grace_quant.checkpoint import QAT_MASTER, file_kind, saving_qat_master
from grace_quant.controller import FixedBeta, LagrangianController
from grace_quant.labels import IGNORE_INDEX, next_token_mask
from grace_quant.losses import gated_dkd_loss, image_token_id, kd_loss, relational_cka_loss, visual_tokens
from grace_quant.modules import GraceQATLinear, GraceQuantLinear, grouped_fake_quant, set_fake_quant_backend
from grace_quant.paths import source_problem
from grace_quant.quant import fake_quant_backend_problem
from grace_quant.surgery import grace_layers, set_vision_training

from .training_args import GraceTrainingArguments, planned_steps

CONTROLLER_FILE = "grace_controller.json"
#: the training arguments as JSON (tokens masked); transformers writes ``training_args.bin``, a pickle, which has no
#: place in a folder users publish
TRAINING_ARGS_NAME = "training_args.json"
#: model types whose forward takes the same inputs (pixel layout, image-token expansion): a teacher from the
#: student's input family can run on the student's batches; others cannot
INPUT_FAMILIES = {"qwen2_5_vl": "qwen2_vl"}
#: the teacher's sequence inputs that right padding extends, and the value each is padded with (None: the pad token)
TEACHER_PADDED_INPUTS = {"input_ids": None, "attention_mask": 0, "mm_token_type_ids": 0, "token_type_ids": 0}


def text_vocab_size(model: nn.Module) -> int:
    return model.config.get_text_config(decoder=True).vocab_size


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over supervised positions (fp32 on those rows only), and their count."""
    keep = next_token_mask(labels)
    rows = logits[..., :-1, :][keep]
    return F.cross_entropy(rows.float(), labels[..., 1:][keep], reduction="sum"), int(keep.sum())


def check_student(model: Any) -> None:
    """Refuse a student GraceTrainer cannot train as GRACE: without GRACE layers it would train in full precision
    and ``save_model`` would write a full-precision model; packed INT4 layers hold no trainable weights."""
    if not isinstance(model, nn.Module) or any(True for _ in grace_layers(model, GraceQATLinear)):
        return
    if any(True for _ in grace_layers(model, GraceQuantLinear)):
        raise ValueError(
            "GraceTrainer: the student holds packed INT4 layers, which do not train; call "
            "grace_quant.prepare_qat(model) first to get trainable QAT layers back."
        )
    raise ValueError(
        "GraceTrainer: the student has no GRACE layers (loaded without quantization_config), so it would train in "
        "full precision and save_model would write a full-precision model. Load it with from_pretrained(..., "
        "quantization_config=GraceConfig(bits=4, group_size=128)) or call grace_quant.quantize_model(model, "
        "GraceConfig(...)) first."
    )


def check_train_dataset(dataset: Any) -> None:
    """Refuse an empty training set before the Trainer's sampler fails on it (``num_samples=0``)."""
    if dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(
            "GraceTrainer: train_dataset is empty (0 examples); check the split, the path and any filtering that "
            "built it."
        )


def teacher_problem(student: nn.Module, teacher: nn.Module) -> str | None:
    """Why ``teacher`` cannot distil into ``student``, or None. GRACE runs the teacher on the student's own batches
    (same ``input_ids``, ``pixel_values``, visual-token positions): both need one tokenizer and one input family."""
    student_vocab, teacher_vocab = text_vocab_size(student), text_vocab_size(teacher)
    if student_vocab != teacher_vocab:
        return (
            f"Teacher and student vocabularies differ ({teacher_vocab} vs {student_vocab}): GRACE distils token "
            "distributions, so both must share one tokenizer (e.g. LLaVA-1.5-13B -> 7B, Qwen2-VL-7B -> 2B)."
        )
    kinds = [INPUT_FAMILIES.get(m.config.model_type, m.config.model_type) for m in (teacher, student)]
    tokens = [image_token_id(m.config) for m in (teacher, student)]
    if kinds[0] != kinds[1] or tokens[0] != tokens[1]:
        return (
            f"the teacher is a {teacher.config.model_type} model (image token {tokens[0]}) and the student a "
            f"{student.config.model_type} model (image token {tokens[1]}): GRACE runs the teacher on the student's "
            "batches (the same input_ids and pixel_values, visual tokens at the same positions), so the teacher "
            "must take the student's inputs. Use a teacher of the student's family (e.g. LLaVA-1.5-13B -> 7B, "
            "Qwen2-VL-7B -> 2B), or kd_loss='none' and rcka_weight=0 to train without one."
        )
    return None


def logged_terms(args: GraceTrainingArguments) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The per-micro-batch loss terms a run logs: those averaged over the logging window, and the gate's extremes
    (``gate_min``, ``gate_max``: the minimum and maximum over it). Only terms that run are named: no distillation
    term with ``kd_loss="none"``, plain KD as ``kd``, no gate with ``confidence_gate=False``, no RCKA with
    ``rcka_weight=0``. ``*_weighted`` is the term as it enters the loss (``beta * gdkd``, ``omega * rcka``), to
    compare with ``ce`` (METHOD.md section 3.5)."""
    means, extremes = ["ce"], []
    if args.kd_loss != "none":
        means += [args.kd_loss, f"{args.kd_loss}_weighted"]
        if args.kd_loss == "gdkd":
            means += ["tckd", "nckd"]
            if args.confidence_gate:
                means.append("gate")
                extremes += ["gate_min", "gate_max"]
    if args.rcka_weight > 0:
        means += ["rcka", "rcka_weighted"]
    return tuple(means), tuple(extremes)


def local_sources(*models: nn.Module | None) -> list[str]:
    """The local folders the models were loaded from (``config._name_or_path``), for the output-path rule."""
    paths = [getattr(getattr(m, "config", None), "_name_or_path", "") or "" for m in models if m is not None]
    return [path for path in paths if os.path.isdir(path)]


class _ControllerStep(TrainerCallback):
    """Sizes the controller's calibration once the run's length is known, then steps the controller once per
    optimizer step, after gradient accumulation."""

    def __init__(self, trainer: GraceTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        controller = self.trainer.controller
        if getattr(controller, "auto_tau", False):
            controller.set_calibration_steps(max(1, planned_steps(args.ib_calibration_steps, state.max_steps)))

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._controller_step()


class GraceTrainerMixin:
    """GRACE's loss, controller, optimizer groups and checkpointing for any ``transformers.Trainer`` subclass.

    Put it first in the bases (``class MyTrainer(GraceTrainerMixin, SFTTrainer)``) with arguments that are also
    ``GraceTrainingArguments``. A ``TrainerCallback`` cannot do this job: callbacks see no inputs and cannot
    change the loss, and the teacher forward needs both.
    The teacher stays outside accelerate's wrapping (no DDP/FSDP gradients, never checkpointed); it runs on the
    student's device unless you placed it elsewhere (then inputs travel to it and logits travel back).
    """

    loss_is_scaled_for_ga = True  # transformers >= 5.23: compute_loss normalises by num_items_in_batch

    def __init__(
        self, model=None, args: GraceTrainingArguments | None = None, teacher_model: nn.Module | None = None, **kwargs
    ):
        if args is None:
            raise ValueError("GraceTrainer needs args=GraceTrainingArguments(output_dir=...).")
        if not isinstance(args, GraceTrainingArguments):
            raise TypeError(f"GraceTrainer needs GraceTrainingArguments, got {type(args).__name__}.")
        check_student(model)
        check_train_dataset(kwargs.get("train_dataset"))
        check_output_dir(args.output_dir, local_sources(model, teacher_model))
        if (problem := fake_quant_backend_problem(args.fake_quant_backend, args.device)) is not None:
            raise ValueError(f"GraceTrainer: {problem}.")
        if isinstance(model, nn.Module):  # before the optimizer exists, so frozen parameters stay out of it
            set_vision_training(model, not args.freeze_vision_tower, args.train_projector)
            set_fake_quant_backend(model, args.fake_quant_backend)
        super().__init__(model=model, args=args, **kwargs)
        self.model_accepts_loss_kwargs = True  # transformers 5.17: the loss is already normalised, do not divide by GA
        self.teacher_model = self._prepare_teacher(teacher_model)
        self._teacher_call = self._teacher_callable(self.teacher_model)
        if args.controller == "lagrangian":
            self.controller = LagrangianController(
                tau=args.tau, eta=args.ib_eta, beta0=args.beta_init, beta_min=args.beta_min,
                beta_max=args.beta_max, ema_decay=args.ib_ema_decay,
            )  # fmt: skip
        else:
            self.controller = FixedBeta(beta=args.beta_init, ema_decay=args.ib_ema_decay)
        self._step_gdkd: list[torch.Tensor] = []
        self._metrics: dict[str, list[torch.Tensor]] = defaultdict(list)  # per micro-batch, on device
        self._mean_terms, self._extreme_terms = logged_terms(args)
        self.nonfinite_steps = 0
        self._writing_checkpoint = False
        self.add_callback(_ControllerStep(self))

    # ----------------------------------------------------------------------------------------------- teacher
    def _prepare_teacher(self, teacher: nn.Module | None) -> nn.Module | None:
        if teacher is None:
            if self.args.uses_teacher:
                raise ValueError(
                    "GraceTrainer: teacher_model is required for kd_loss/rcka; pass teacher_model=..., or set "
                    "kd_loss='none' and rcka_weight=0 for QAT without distillation."
                )
            return None
        if (problem := teacher_problem(self.model, teacher)) is not None:
            raise ValueError(f"GraceTrainer: {problem}")
        teacher.eval()
        teacher.requires_grad_(False)
        device = next(teacher.parameters()).device
        if getattr(teacher, "hf_device_map", None) is None and device.type == "cpu" and self.args.device.type != "cpu":
            teacher.to(self.args.device)
        return teacher

    def _teacher_callable(self, teacher: nn.Module | None):
        """The teacher's forward, compiled when ``teacher_compile`` is set (``dynamic=False``: one graph per input
        shape, which ``teacher_pad_to_multiple_of`` keeps few; past torch's recompile limit it runs eagerly)."""
        if teacher is None or not self.args.teacher_compile:
            return teacher
        return torch.compile(teacher, dynamic=False)

    def _teacher_forward(self, inputs: dict[str, Any], hidden: bool):
        """The frozen teacher on the student's inputs: eval mode, no autograd graph (``no_grad``, not
        ``inference_mode``: the KD loss saves the teacher's logits for its backward, which inference tensors
        refuse), inputs right-padded to ``teacher_pad_to_multiple_of`` and outputs cut back to the real length."""
        if self.teacher_model.training:  # someone called .train() on it; the teacher never trains (no dropout)
            self.teacher_model.eval()
        device = next(self.teacher_model.parameters()).device
        dtype = self.teacher_model.dtype
        moved = {
            k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
            if torch.is_tensor(v)
            else v
            for k, v in inputs.items()
        }
        multiple = self.args.teacher_pad_to_multiple_of
        length = moved["input_ids"].shape[-1] if "input_ids" in moved else None
        if multiple and length is not None:
            moved = pad_teacher_inputs(moved, multiple, teacher_pad_id(self.teacher_model.config))
        with torch.no_grad():
            outputs = self._teacher_call(**moved, output_hidden_states=hidden, return_dict=True)
        if length is not None and outputs.logits.shape[-2] != length:
            outputs.logits = outputs.logits[..., :length, :]
            if outputs.hidden_states is not None:
                outputs.hidden_states = tuple(h[..., :length, :] for h in outputs.hidden_states)
        return outputs

    # ------------------------------------------------------------------------------------------- optimizer
    def create_optimizer(self, model=None):
        """Three parameter groups: decayed weights, undecayed weights, and log-scales (LR x multiplier, WD 0)."""
        if self.optimizer is not None:
            return self.optimizer
        model = model if model is not None else self.model
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "scales": []}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            key = "scales" if name.endswith("log_scale") else ("decay" if name in decay else "no_decay")
            groups[key].append(param)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        lr = optimizer_kwargs.pop("lr", self.args.learning_rate)
        param_groups = [
            {"params": groups["decay"], "weight_decay": self.args.weight_decay, "lr": lr},
            {"params": groups["no_decay"], "weight_decay": 0.0, "lr": lr},
            {"params": groups["scales"], "weight_decay": 0.0, "lr": lr * self.args.scale_lr_multiplier},
        ]
        self.optimizer = optimizer_cls([g for g in param_groups if g["params"]], lr=lr, **optimizer_kwargs)
        return self.optimizer

    # ------------------------------------------------------------------------------------------------ loss
    def rcka_warmup_length(self) -> int:
        """``rcka_warmup_steps`` in optimizer steps: a fraction (< 1) of the run's planned steps, or a number of
        steps (transformers' ``warmup_steps`` rule); 0 before training, when the run's length is not known."""
        return planned_steps(self.args.rcka_warmup_steps, self.state.max_steps)

    def rcka_weight_now(self) -> float:
        """omega, ramped linearly from 0 over :meth:`rcka_warmup_length` optimizer steps."""
        warmup = self.rcka_warmup_length()
        ramp = 1.0 if warmup == 0 else min(1.0, self.state.global_step / warmup)
        return self.args.rcka_weight * ramp

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError(
                f"GraceTrainer needs `labels` in every batch (answer tokens; {IGNORE_INDEX} elsewhere): the collator must add them."
            )
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        use_rcka = args.rcka_weight > 0
        with self._grouped_fake_quant(model):
            outputs = model(**model_inputs, output_hidden_states=use_rcka, return_dict=True)
        # queue the teacher's forward before anything that waits for the GPU (the CE's supervised-row count): the
        # host launches it while the GPU still runs the student's forward
        teacher_out = self._teacher_forward(model_inputs, hidden=use_rcka) if args.uses_teacher else None
        ce_sum, local_tokens = cross_entropy_sum(outputs.logits, labels)
        zero = outputs.logits.new_zeros((), dtype=torch.float32)
        gdkd, gdkd_logged = zero, {}  # gdkd: the distillation term, whichever kd_loss computes it
        if args.kd_loss != "none":
            teacher_logits = teacher_out.logits.to(outputs.logits.device)
            if args.kd_loss == "gdkd":
                result = gated_dkd_loss(
                    outputs.logits, teacher_logits, labels, temperature=args.kd_temperature, alpha=args.dkd_alpha,
                    beta_dkd=args.dkd_beta, gate=args.confidence_gate, chunk_size=args.kd_chunk_size,
                )  # fmt: skip
                gdkd = result.loss
                gdkd_logged = {"tckd": result.tckd, "nckd": result.nckd}
                if result.num_tokens:  # no gate without supervised tokens
                    gdkd_logged.update(gate=result.gate_mean, gate_min=result.gate_min, gate_max=result.gate_max)
            else:
                keep = next_token_mask(labels)
                per_token = kd_loss(
                    outputs.logits[..., :-1, :][keep], teacher_logits[..., :-1, :][keep], args.kd_temperature
                )
                gdkd = per_token.sum() / max(local_tokens, 1)
        rcka = zero
        if use_rcka:
            # `model` may be wrapped (DDP, FSDP): the config lives on the unwrapped model
            mask, sizes = visual_tokens(self.accelerator.unwrap_model(model).config, model_inputs)
            if mask is not None and sizes:
                student_hidden = outputs.hidden_states[args.rcka_layer]
                teacher_hidden = teacher_out.hidden_states[args.rcka_layer].to(student_hidden.device)
                rcka, _ = relational_cka_loss(student_hidden, teacher_hidden, mask, sizes)

        ce, gdkd, rcka = self._drop_nonfinite(ce_sum, gdkd, rcka)
        beta, omega = self.controller.beta, self.rcka_weight_now()
        if num_items_in_batch is not None:
            # sums over this micro-batch / tokens of the whole accumulated (and, if averaged, global) batch
            items = float(num_items_in_batch)
            world = self.accelerator.num_processes if args.average_tokens_across_devices else 1
            accumulation = getattr(self, "current_gradient_accumulation_steps", args.gradient_accumulation_steps)
            loss = (ce + beta * gdkd * local_tokens) * (world / items) + omega * rcka / accumulation
            self.loss_is_scaled_for_ga = True
        else:  # the Trainer divides by the accumulation steps itself
            loss = (ce + beta * gdkd * local_tokens) / max(local_tokens, 1) + omega * rcka
            self.loss_is_scaled_for_ga = False

        if not loss.requires_grad and model.training and torch.is_grad_enabled():
            loss = self._skipped_loss(model, loss)  # every component was non-finite: this micro-batch is skipped
        if model.training:
            self._step_gdkd.append(gdkd.detach().float())
            kd = {args.kd_loss: gdkd.detach(), f"{args.kd_loss}_weighted": beta * gdkd.detach()}
            self._record(
                ce=ce.detach() / max(local_tokens, 1), rcka=rcka.detach(), rcka_weighted=omega * rcka.detach(),
                **kd, **gdkd_logged,
            )  # fmt: skip
        return (loss, outputs) if return_outputs else loss

    def _grouped_fake_quant(self, model: nn.Module):
        """:func:`grouped_fake_quant` around the student's forward where ``fake_quant_grouped`` applies: training,
        one process, no gradient checkpointing (recomputed layers would quantize again), FSDP or DeepSpeed (they
        gather each layer's weights in its own forward)."""
        unwrapped = self.accelerator.unwrap_model(model)
        if (
            not self.args.fake_quant_grouped
            or not model.training
            or self.accelerator.num_processes > 1
            or self.is_fsdp_enabled
            or self.is_deepspeed_enabled
            or activation_checkpointing(unwrapped)
        ):
            return contextlib.nullcontext()
        return grouped_fake_quant(unwrapped)

    def _drop_nonfinite(self, *components: torch.Tensor) -> list[torch.Tensor]:
        """Replace non-finite loss components by 0 for this step and count the step (one host sync)."""
        finite = torch.stack([c.detach().float() for c in components]).isfinite().tolist()
        if all(finite):
            return list(components)
        self.nonfinite_steps += 1
        warnings.warn(
            f"GraceTrainer: non-finite loss component(s) {[n for n, ok in zip(('ce', 'gdkd', 'rcka'), finite, strict=True) if not ok]} "
            f"skipped at step {self.state.global_step} ({self.nonfinite_steps} step(s) so far).",
            RuntimeWarning,
            stacklevel=2,
        )
        return [c if ok else c.new_zeros(()) for c, ok in zip(components, finite, strict=True)]

    def _skipped_loss(self, model: nn.Module, zero: torch.Tensor) -> torch.Tensor:
        """A zero loss whose backward works (the Trainer calls it on every micro-batch) and adds no gradient.

        One process: a fresh leaf, so the weights' gradients stay untouched and the optimizer leaves them as they
        are. Several: zero through every trainable weight (NaNs masked), so DDP's gradient hooks fire as usual.
        """
        if self.accelerator.num_processes == 1:
            return zero.detach().requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        return zero + sum(torch.where(p.isfinite(), p, 0).sum() for p in params) * 0.0

    def _record(self, **values: torch.Tensor | float) -> None:
        """Keep this micro-batch's loss terms that this run logs (:func:`logged_terms`) as detached device scalars:
        no host sync per micro-batch."""
        for name, value in values.items():
            if name in self._mean_terms or name in self._extreme_terms:
                self._metrics[name].append(value.detach().float() if torch.is_tensor(value) else torch.tensor(value))

    def _logged_means(self) -> dict[str, float]:
        """The recorded terms since the last log, over micro-batches and ranks: means, and the gate's extremes.

        Every rank logs training steps (the Trainer gathers the loss on all of them), and every rank names the same
        terms (:func:`logged_terms`), so one all-reduce of (sum, count) per term gives each rank the all-rank mean,
        and one gather the extremes; one host sync per log.
        """
        device = self.accelerator.device
        means, extremes = self._mean_terms, self._extreme_terms
        sums = torch.zeros(len(means), device=device)
        counts = torch.zeros(len(means), device=device)
        for i, name in enumerate(means):
            values = self._metrics.pop(name, [])
            if values:
                sums[i] = torch.stack([v.to(device) for v in values]).sum()
                counts[i] = len(values)
        # extremes as maxima (a minimum as the maximum of its negation); -inf where nothing was recorded
        signs = [-1.0 if name.endswith("_min") else 1.0 for name in extremes]
        peaks = torch.full((len(extremes),), -math.inf, device=device)
        for i, (name, sign) in enumerate(zip(extremes, signs, strict=True)):
            values = self._metrics.pop(name, [])
            if values:
                peaks[i] = (sign * torch.stack([v.to(device) for v in values])).max()
        totals = torch.cat([sums, counts])
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
            if extremes:
                peaks = self.accelerator.gather(peaks[None]).amax(0)
        totals, peaks = totals.tolist(), peaks.tolist()
        n = len(means)
        logged = {name: totals[i] / totals[n + i] for i, name in enumerate(means) if totals[n + i] > 0}
        logged.update({name: sign * peak for name, sign, peak in zip(extremes, signs, peaks, strict=True)
                       if math.isfinite(peak)})  # fmt: skip
        return logged

    # ------------------------------------------------------------------------------------------ controller
    def _controller_logs(self) -> dict[str, float]:
        """``beta``, the EMA the controller sees (``gdkd_ema`` / ``kd_ema``), and for the Lagrangian controller
        ``beta_bound`` (+1 at ``beta_max``, -1 at ``beta_min``, 0 between) and ``tau`` once known; nothing when no
        distillation term runs."""
        if self.args.kd_loss == "none":
            return {}
        controller = self.controller
        logs = {"beta": controller.beta}
        if controller.ema is not None:
            logs[f"{self.args.kd_loss}_ema"] = controller.ema
        if isinstance(controller, LagrangianController):
            logs["beta_bound"] = controller.at_bound
            if controller.tau is not None:
                logs["tau"] = controller.tau
        return logs

    def _controller_step(self) -> None:
        """Feed the GDKD averaged over this step's micro-batches (and ranks) to the controller."""
        if not self._step_gdkd or self.args.kd_loss == "none":
            self._step_gdkd.clear()
            return
        mean = torch.stack(self._step_gdkd).mean()
        if self.accelerator.num_processes > 1:
            mean = self.accelerator.reduce(mean.to(self.accelerator.device), reduction="mean")
        self._step_gdkd.clear()
        value = float(mean)
        if math.isfinite(value):
            self.controller.update(value)

    # --------------------------------------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # training logs: add the means since the last log
            logs.update(self._logged_means())
            logs.update(self._controller_logs())
            if self.args.rcka_weight > 0:
                logs["omega"] = self.rcka_weight_now()
            if self.optimizer is not None:
                groups = self.optimizer.param_groups
                logs["lr_weights"] = groups[0]["lr"]
                logs["lr_scales"] = groups[-1]["lr"]
            if self.nonfinite_steps:
                logs["nonfinite_steps"] = self.nonfinite_steps
        if start_time is None:
            super().log(logs)
        else:
            super().log(logs, start_time)

    # ------------------------------------------------------------------------------------ saving / resume
    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's own checkpoints (checkpoint-N) hold qat-master weights and the controller: exact resume.

        Every other save (``save_model``, ``push_to_hub``) writes the packed INT4 model.
        """
        self._writing_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._writing_checkpoint = False

    def create_model_card(self, *args: Any, finetuned_from: str | None = None, **kwargs: Any) -> None:
        """README.md for ``push_to_hub``: the GRACE model card (settings, teacher, final beta, how to load)."""
        if not self.is_world_process_zero():
            return
        from grace_quant.integrations.hub import grace_model_card

        model = self.accelerator.unwrap_model(self.model)
        knobs = ("kd_loss", "kd_temperature", "dkd_alpha", "dkd_beta", "confidence_gate", "rcka_weight",
                 "rcka_warmup_steps", "controller", "ib_tau", "ib_eta", "scale_lr_multiplier", "learning_rate",
                 "freeze_vision_tower", "train_projector")  # fmt: skip
        settings = {name: getattr(self.args, name) for name in knobs}
        if isinstance(self.controller, LagrangianController):
            settings["ib_eta"] = self.controller.eta  # the step in force (None picks the mode's default)
        settings.update({"optimizer steps": self.state.global_step, "final beta": round(self.controller.beta, 6)})
        teacher = getattr(getattr(self.teacher_model, "config", None), "_name_or_path", None) or None
        base = finetuned_from or getattr(model.config, "_name_or_path", None) or None
        card = grace_model_card(model, base_model=base, teacher=teacher, training_settings=settings,
                                repo_id=self.hub_model_id)  # fmt: skip
        path = os.path.join(self.args.output_dir, "README.md")
        with open(path + ".tmp", "w") as handle:
            handle.write(card)
        os.replace(path + ".tmp", path)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:  # transformers >= 5.23 calls _save on every rank; only the writer may write
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if not self._writing_checkpoint:
            check_output_dir(output_dir, local_sources(model, self.teacher_model))
        os.makedirs(output_dir, exist_ok=True)
        if state_dict is not None and is_sharded(model):  # FSDP2: the Trainer gathered the full weights for us
            model = unsharded_copy(model, state_dict)
        if self._writing_checkpoint:
            with saving_qat_master(model):
                model.save_pretrained(output_dir, save_original_format=False)
            with open(os.path.join(output_dir, CONTROLLER_FILE), "w") as handle:
                json.dump({"controller": self.controller.state_dict(), "nonfinite_steps": self.nonfinite_steps}, handle)
        else:
            model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        with open(os.path.join(output_dir, TRAINING_ARGS_NAME), "w") as handle:  # JSON, not transformers' pickle
            handle.write(self.args.to_json_string())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Restore master weights, log-scales and the controller exactly (strict; keys as in memory)."""
        model = model if model is not None else self.model
        state = load_qat_master(resume_from_checkpoint)
        result = self.accelerator.unwrap_model(model).load_state_dict(state, strict=False)
        tied = set(getattr(self.accelerator.unwrap_model(model), "all_tied_weights_keys", {}) or {})
        missing = [k for k in result.missing_keys if k not in tied]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"Checkpoint {resume_from_checkpoint} does not match the model: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}."
            )
        path = os.path.join(resume_from_checkpoint, CONTROLLER_FILE)
        if os.path.exists(path):
            with open(path) as handle:
                saved = json.load(handle)
            self.controller.load_state_dict(saved["controller"])
            self.nonfinite_steps = saved.get("nonfinite_steps", 0)


def activation_checkpointing(model: nn.Module) -> bool:
    """Whether gradient (activation) checkpointing is on: ``is_activation_checkpointing`` from transformers 5.25
    (``is_gradient_checkpointing``, which 5.17 has, warns there)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def teacher_pad_id(config: Any) -> int:
    """The token right padding feeds the teacher: the text config's pad token, else 0 (masked either way)."""
    pad = getattr(config.get_text_config(decoder=True), "pad_token_id", None)
    return 0 if pad is None else int(pad)


def pad_teacher_inputs(inputs: dict[str, Any], multiple: int, pad_id: int) -> dict[str, Any]:
    """``inputs`` with the sequence inputs of :data:`TEACHER_PADDED_INPUTS` right-padded to a multiple of
    ``multiple`` tokens, the new columns masked out (an all-ones mask is made when there is none).

    Causal attention never lets a real token see a later column, and positions of earlier columns do not depend
    on later ones, so the real tokens' outputs are unchanged. Inputs with ``position_ids`` or ``inputs_embeds``
    (positions or embeddings this cannot extend) are returned unpadded.
    """
    ids = inputs["input_ids"]
    extra = -ids.shape[-1] % multiple
    if extra == 0 or "position_ids" in inputs or "inputs_embeds" in inputs:
        return inputs
    padded = dict(inputs)
    if padded.get("attention_mask") is None:
        padded["attention_mask"] = torch.ones_like(ids)
    for key, value in TEACHER_PADDED_INPUTS.items():
        tensor = padded.get(key)
        if torch.is_tensor(tensor) and tensor.shape == ids.shape:
            padded[key] = F.pad(tensor, (0, extra), value=pad_id if value is None else value)
    return padded


def check_output_dir(output_dir: str, sources: list[str]) -> None:
    """The output-path rule for ``output_dir`` and ``save_model``: never the folder a model was loaded from, nor
    inside or around it (``save_model`` there would replace the full-precision source by INT4)."""
    for source in sources:
        if (problem := source_problem(output_dir, source)) is not None:
            raise ValueError(f"GraceTrainer: {problem}; choose an output_dir outside {source}")


def close_process_group() -> None:
    """Destroy torch.distributed's process group once nothing holds it; call it after every ``Trainer`` is out of
    scope (and after the ranks' last barrier).

    A DDP model still alive keeps the process group's threads (gloo's) running past ``destroy_process_group``; they
    are then torn down during interpreter exit, which aborts a rank now and then ("terminate called without an
    active exception"). Collecting first (the Trainer and its callbacks form reference cycles) ends them cleanly.
    """
    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_sharded(model: nn.Module) -> bool:
    """True when ``model``'s parameters are FSDP2 shards (DTensors) rather than whole tensors."""
    return any(type(param).__name__ == "DTensor" for param in model.parameters())


def unsharded_copy(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """A plain copy of an FSDP2-sharded GRACE student that holds the gathered full ``state_dict``.

    Each FSDP2 rank holds DTensor shards, which can be neither packed nor written as one checkpoint. The Trainer
    gathers the full weights on the writer (``accelerator.get_state_dict``); this rebuilds the same modules on the
    meta device and assigns those tensors (no second copy), so ``save_pretrained`` packs and writes as usual.
    """
    from torch.distributed.fsdp import FSDPModule

    from grace_quant.surgery import set_submodule

    base = next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))  # FSDP2 subclasses the model
    with torch.device("meta"):
        plain = base(model.config)
        for name, layer in grace_layers(model, GraceQATLinear):
            bias = layer.bias is not None
            qat = GraceQATLinear(
                layer.in_features, layer.out_features, bias, group_size=layer.group_size, bits=layer.bits
            )
            set_submodule(plain, name, qat)
    result = plain.load_state_dict(state_dict, strict=False, assign=True)
    plain.tie_weights()
    tied = set(getattr(plain, "all_tied_weights_keys", {}) or {})
    missing = [key for key in result.missing_keys if key not in tied]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"Gathered FSDP state dict does not fit the model: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}.")  # fmt: skip
    for attribute in ("hf_quantizer", "is_quantized", "quantization_method"):
        if hasattr(model, attribute):
            setattr(plain, attribute, getattr(model, attribute))
    return plain


class GraceTrainer(GraceTrainerMixin, Trainer):
    """Trainer for GRACE: pass the QAT student as ``model`` and a frozen larger model as ``teacher_model``."""


def load_qat_master(folder: str) -> dict[str, torch.Tensor]:
    """All tensors of a qat-master checkpoint folder (one file or shards); refuses other kinds."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors file to resume from.")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        path = os.path.join(folder, name)
        kind = file_kind(path)
        if kind != QAT_MASTER:
            raise ValueError(
                f"{path} is not a GRACE Trainer checkpoint (kind {kind!r}); resume needs the qat-master checkpoints "
                "that GraceTrainer writes under output_dir/checkpoint-*."
            )
        state.update(load_file(path))
    return state
