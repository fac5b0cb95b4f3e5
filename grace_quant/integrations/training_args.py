"""``GraceTrainingArguments``: ``TrainingArguments`` plus GRACE's knobs, with the defaults of METHOD.md."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from grace_quant.quant import FAKE_QUANT_BACKENDS, fake_quant_backend_problem

KD_LOSSES = ("gdkd", "kd", "none")
CONTROLLERS = ("lagrangian", "fixed")


def steps_problem(name: str, value: float) -> str | None:
    """Why ``value`` is not a length in transformers' ``warmup_steps`` convention, or None: a fraction of the
    planned optimizer steps in ``[0, 1)``, or a whole number of steps ``>= 1``."""
    if not math.isfinite(value) or value < 0 or (value >= 1 and value != int(value)):
        return (
            f"{name}={value!r} must be a fraction of the planned optimizer steps in [0, 1) (e.g. 0.1) or a whole "
            "number of steps >= 1 (e.g. 400)"
        )
    return None


def planned_steps(value: float, total_steps: int) -> int:
    """``value`` in optimizer steps, transformers' ``get_warmup_steps`` rule: below 1 a fraction of ``total_steps``
    (rounded up), else a number of steps."""
    return int(value) if value >= 1 else math.ceil(total_steps * value)


@dataclass
class GraceTrainingArguments(TrainingArguments):
    """Every GRACE component can be switched off, so the paper's ablations are runs of the same trainer:
    QAT only (``kd_loss="none", rcka_weight=0``), QAT + naive KD (``kd_loss="kd", rcka_weight=0,
    controller="fixed"``), or GRACE with one component removed.

    Defaults are the paper's recipe (METHOD.md sections 1 and 3): vision tower frozen, projector trained, decoder
    quantized and trained. Two departures are ours, so the recipe carries over to other models and run lengths:
    the RCKA warm-up is a fraction of the run (``rcka_warmup_steps=0.1``; ``400`` is the paper's absolute ramp),
    and the controller's budget is scale-free (``ib_tau="auto"``; ``ib_tau="3.0"`` is the paper's absolute
    budget)."""

    kd_loss: str = field(
        default="gdkd", metadata={"help": "Distillation loss: 'gdkd' (decoupled, GRACE), 'kd' (plain KL) or 'none'."}
    )
    kd_temperature: float = field(default=2.0, metadata={"help": "Temperature T of the distillation softmax."})
    dkd_alpha: float = field(default=1.0, metadata={"help": "Weight of the target-class term (TCKD)."})
    dkd_beta: float = field(default=4.0, metadata={"help": "Weight of the non-target-class term (NCKD)."})
    confidence_gate: bool = field(
        default=True, metadata={"help": "Weight tokens by the teacher-entropy gate exp(-H/log|V|)."}
    )
    kd_chunk_size: int = field(
        default=256, metadata={"help": "Tokens per chunk of the KD loss (bounds its memory at large vocabularies)."}
    )
    rcka_weight: float = field(
        default=3.0, metadata={"help": "omega: weight of relational CKA on visual tokens (0 turns it off)."}
    )
    rcka_warmup_steps: float = field(
        default=0.1,
        metadata={
            "help": "Optimizer steps over which omega ramps linearly from 0: a fraction of the planned steps in "
            "[0, 1) (default 0.1) or a whole number of steps (the paper: 400), as transformers' warmup_steps."
        },
    )
    rcka_layer: int = field(
        default=-2, metadata={"help": "hidden_states index used for RCKA (-2: output of the penultimate layer)."}
    )
    controller: str = field(
        default="lagrangian", metadata={"help": "'lagrangian' (adaptive beta, GRACE) or 'fixed' (beta = beta_init)."}
    )
    ib_tau: str = field(
        default="auto",
        metadata={
            "help": "GDKD budget tau of the controller: 'auto' (default; tau = the mean GDKD of the first "
            "ib_calibration_steps, dual steps on the relative violation, so beta ignores the loss scale) or a "
            "number (an absolute budget with absolute dual steps; the paper's value is 3.0)."
        },
    )
    ib_eta: float | None = field(
        default=None,
        metadata={
            "help": "Dual step size of the controller. Default: 0.003 (the paper's) with a numeric ib_tau, 0.009 "
            "(0.003 x 3.0: the paper's step at its budget) per unit of relative violation with ib_tau='auto'."
        },
    )
    ib_calibration_steps: float = field(
        default=0.05,
        metadata={
            "help": "With ib_tau='auto': steps that only observe the GDKD to set tau, a fraction of the planned "
            "steps in [0, 1) or a whole number of steps (at least 1 step either way)."
        },
    )
    beta_init: float = field(default=0.5, metadata={"help": "Initial (or fixed) distillation weight beta."})
    beta_min: float = field(default=0.1, metadata={"help": "Lower clip of beta."})
    beta_max: float = field(default=1.0, metadata={"help": "Upper clip of beta."})
    ib_ema_decay: float = field(default=0.99, metadata={"help": "EMA decay of the GDKD fed to the controller."})
    scale_lr_multiplier: float = field(
        default=10.0, metadata={"help": "Learning-rate multiplier of the quantizer log-scales (weight decay 0)."}
    )
    freeze_vision_tower: bool = field(
        default=True,
        metadata={
            "help": "Freeze the student's vision encoder (requires_grad False, left out of the optimizer), as the "
            "paper does; False trains it too."
        },
    )
    train_projector: bool = field(
        default=True,
        metadata={"help": "Train the projector / merger that maps vision features into the decoder (the paper's)."},
    )
    fake_quant_backend: str = field(
        default="auto",
        metadata={
            "help": f"Where the student's QAT fake quantization runs, one of {FAKE_QUANT_BACKENDS}: 'auto' (fused "
            "Triton kernels on CUDA, torch ops on CPU), 'triton' (the fused kernels; CUDA, or TRITON_INTERPRET=1), "
            "'torch' (torch ops, the reference). Same forward and weight gradients bit for bit. 'triton_linear' "
            "(experimental, untimed): fake quantization inside the QAT linears' matmul kernels (bf16/fp16 "
            "activations; equal up to summation order)."
        },
    )
    fake_quant_grouped: bool = field(
        default=True,
        metadata={
            "help": "On the fused kernels ('auto' on CUDA, 'triton'), fake-quantize all trainable QAT linears in one "
            "kernel launch per forward and one per backward instead of two per layer (the same values bit for bit; "
            "a QAT step launching per layer is bound by the host). Applies to one process without gradient "
            "checkpointing, FSDP or DeepSpeed; elsewhere, and with False, each layer quantizes in its own forward."
        },
    )
    teacher_compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the teacher's forward (dynamic=False: one graph per input shape; pair it with "
            "teacher_pad_to_multiple_of so that few shapes occur)."
        },
    )
    teacher_pad_to_multiple_of: int | None = field(
        default=None,
        metadata={
            "help": "Pad the teacher's input sequence on the right to a multiple of this many tokens (masked; the "
            "outputs are cut back), so a compiled teacher sees few shapes. Real tokens' logits do not change."
        },
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep pixel_values and friends (VLM batches)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.kd_loss not in KD_LOSSES:
            raise ValueError(f"kd_loss={self.kd_loss!r} is unknown; use one of {KD_LOSSES}.")
        if self.controller not in CONTROLLERS:
            raise ValueError(f"controller={self.controller!r} is unknown; use one of {CONTROLLERS}.")
        self.ib_tau = str(self.ib_tau)
        if self.ib_tau != "auto":
            try:
                tau = float(self.ib_tau)
            except ValueError:
                raise ValueError(f"ib_tau={self.ib_tau!r} must be a positive number or 'auto'.") from None
            if not (math.isfinite(tau) and tau > 0):
                raise ValueError(f"ib_tau={self.ib_tau!r} must be a positive number or 'auto'.")
        for name in ("kd_temperature", "kd_chunk_size", "scale_lr_multiplier"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.ib_eta is not None and not (math.isfinite(self.ib_eta) and self.ib_eta > 0):
            raise ValueError(f"ib_eta must be a positive number (or None for the default), got {self.ib_eta!r}.")
        if self.rcka_weight < 0:
            raise ValueError(f"rcka_weight must be >= 0, got {self.rcka_weight!r}.")
        if (problem := fake_quant_backend_problem(self.fake_quant_backend)) is not None:
            raise ValueError(f"{problem}.")
        if self.teacher_pad_to_multiple_of is not None and self.teacher_pad_to_multiple_of < 1:
            raise ValueError(
                f"teacher_pad_to_multiple_of must be a positive number of tokens (or None: no padding), got "
                f"{self.teacher_pad_to_multiple_of!r}."
            )
        for name in ("rcka_warmup_steps", "ib_calibration_steps"):
            if (problem := steps_problem(name, getattr(self, name))) is not None:
                raise ValueError(f"{problem}.")

    @property
    def tau(self) -> float | str:
        """``ib_tau`` as the controller takes it: a float or ``"auto"``."""
        return "auto" if self.ib_tau == "auto" else float(self.ib_tau)

    @property
    def uses_teacher(self) -> bool:
        return self.kd_loss != "none" or self.rcka_weight > 0
