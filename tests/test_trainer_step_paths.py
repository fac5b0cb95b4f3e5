"""GraceTrainer's step paths: where fake quantization runs (``fake_quant_backend``) and how the frozen teacher runs
(eval mode, no autograd, optional right padding and ``torch.compile``). The fused kernels themselves are checked
against the torch path in ``test_fake_quant_interpret.py`` (a whole trainer step included)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from test_trainer import make_args, make_pair

from grace_quant import GraceTrainer, set_fake_quant_backend
from grace_quant import quant as quant_module
from grace_quant.modules import GraceQATLinear
from grace_quant.surgery import grace_layers
from grace_quant.testing import collate, tiny_dataset


def qat_backends(model) -> set[str]:
    return {layer.fake_quant_backend for _, layer in grace_layers(model, GraceQATLinear)}


def test_auto_runs_the_torch_path_on_cpu_and_the_choice_reaches_every_qat_layer(tmp_path, monkeypatch):
    decisions = []
    wants = quant_module._wants_kernels

    def recorded(weight, backend):
        decisions.append((backend, wants(weight, backend)))
        return decisions[-1][1]

    monkeypatch.setattr(quant_module, "_wants_kernels", recorded)
    student, teacher = make_pair("llava")
    trainer = GraceTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path))
    assert trainer.args.fake_quant_backend == "auto" and qat_backends(student) == {"auto"}
    batch = collate(tiny_dataset(student, 2))
    auto_loss = trainer.compute_loss(student, batch)
    layers = sum(1 for _ in grace_layers(student, GraceQATLinear))
    assert decisions == [("auto", False)] * layers  # every QAT linear asked once, each picked torch ops
    decisions.clear()
    GraceTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, fake_quant_backend="torch"))
    assert qat_backends(student) == {"torch"}
    assert torch.equal(trainer.compute_loss(student, batch), auto_loss)
    assert decisions == [("torch", False)] * layers


def test_bad_backend_values_are_one_line_errors_that_say_what_to_change(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"fake_quant_backend='fused' is unknown; use one of \('auto'") as unknown:
        make_args(tmp_path, fake_quant_backend="fused")
    student, teacher = make_pair("llava")
    with pytest.raises(ValueError, match=r"need CUDA .* this run is on cpu: use 'auto' .* or 'torch'") as on_cpu:
        GraceTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, fake_quant_backend="triton"))
    with pytest.raises(ValueError, match="teacher_pad_to_multiple_of must be a positive number") as pad:
        make_args(tmp_path, teacher_pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="is unknown") as setter:
        set_fake_quant_backend(student, "cuda")
    for error in (unknown, on_cpu, pad, setter):
        assert "\n" not in str(error.value), str(error.value)
    with pytest.raises(RuntimeError, match="need CUDA"):  # a layer forced onto the kernels where they cannot run
        set_fake_quant_backend(student, "triton")
        student(**collate(tiny_dataset(student, 1)))


def test_new_switches_are_saved_in_training_args_json(tmp_path):
    args = make_args(tmp_path, fake_quant_backend="torch", teacher_compile=True, teacher_pad_to_multiple_of=64)
    saved = json.loads(args.to_json_string())
    assert (saved["fake_quant_backend"], saved["teacher_compile"], saved["teacher_pad_to_multiple_of"]) == (
        "torch", True, 64
    )  # fmt: skip
    defaults = json.loads(make_args(tmp_path).to_json_string())
    assert (defaults["fake_quant_backend"], defaults["teacher_compile"], defaults["teacher_pad_to_multiple_of"]) == (
        "auto", False, None
    )  # fmt: skip


def test_deprecated_environment_variable_still_switches_auto_with_a_warning(monkeypatch):
    """``GRACE_FUSED_FAKE_QUANT`` (documented before the Trainer switch) overrides "auto" once per process with a
    FutureWarning; under the interpreter "1" picks the kernels for CPU tensors, "0" torch ops."""
    weight = torch.randn(4, 64)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # where the kernels "can run" on CPU tensors (nothing launches)
    monkeypatch.setattr(quant_module, "_warned_env", False)
    monkeypatch.setenv("GRACE_FUSED_FAKE_QUANT", "1")
    with pytest.warns(FutureWarning, match="GRACE_FUSED_FAKE_QUANT is deprecated.*fake_quant_backend"):
        assert quant_module._wants_kernels(weight, "auto") is True
    monkeypatch.setenv("GRACE_FUSED_FAKE_QUANT", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once already
        assert quant_module._wants_kernels(weight, "auto") is False
        assert quant_module._wants_kernels(weight, "triton") is True  # an explicit backend wins over it
    monkeypatch.delenv("GRACE_FUSED_FAKE_QUANT")
    assert quant_module._wants_kernels(weight, "auto") is False  # "auto": CPU tensors run torch ops


def test_teacher_runs_in_eval_mode_without_autograd(tmp_path):
    student, teacher = make_pair("llava")
    teacher.train()
    trainer = GraceTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    teacher.train()  # flipped by someone after the Trainer took it
    batch = collate(tiny_dataset(student, 2))
    student.train()
    out = trainer._teacher_forward({k: v for k, v in batch.items() if k != "labels"}, hidden=True)
    assert not teacher.training
    assert out.logits.grad_fn is None and all(h.grad_fn is None for h in out.hidden_states)


@pytest.mark.parametrize("name", ["llava", "qwen2-vl"])
def test_padding_the_teacher_keeps_the_real_tokens_outputs(name, tmp_path):
    student, teacher = make_pair(name)
    seen = []
    teacher.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[-1]), with_kwargs=True)
    trainer = GraceTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path))
    inputs = {k: v for k, v in collate(tiny_dataset(student, 2)).items() if k != "labels"}
    plain = trainer._teacher_forward(inputs, hidden=True)
    trainer.args.teacher_pad_to_multiple_of = 16
    padded = trainer._teacher_forward(inputs, hidden=True)
    length = inputs["input_ids"].shape[-1]
    assert seen == [length, 16 * math.ceil(length / 16)] and seen[1] > length, seen
    assert padded.logits.shape == plain.logits.shape
    # the same real tokens through matmuls of another shape: equal up to summation order
    torch.testing.assert_close(padded.logits, plain.logits, rtol=1e-5, atol=1e-5)
    for got, want in zip(padded.hidden_states, plain.hidden_states, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compiled_padded_teacher_gives_the_loss_of_the_eager_one(tmp_path, monkeypatch):
    """The Trainer compiles the teacher with dynamic=False; dynamo's "eager" backend keeps this test fast on CPU
    (inductor on the tiny pair took ~30 s; its loss agreed to 3e-7)."""
    requested = []
    real_compile = torch.compile

    def eager_compile(model, **kwargs):
        requested.append(kwargs)
        return real_compile(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    student, teacher = make_pair("llava")
    batch = collate(tiny_dataset(student, 2))
    eager = GraceTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path))
    assert eager._teacher_call is teacher and requested == []
    reference = eager.compute_loss(student, batch)
    args = make_args(tmp_path, teacher_compile=True, teacher_pad_to_multiple_of=16)
    compiled = GraceTrainer(model=student, teacher_model=teacher, args=args)
    try:
        assert requested == [{"dynamic": False}] and compiled._teacher_call is not teacher
        loss = compiled.compute_loss(student, batch)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA): the defaults as they run there
# ----------------------------------------------------------------------------------------------------------------


def cuda_step(tmp_path, **overrides):
    """Loss and gradients of one GRACE micro-batch on CUDA (fp32, tiny LLaVA pair), with the decisions taken."""
    student, teacher = make_pair("llava")
    args = make_args(tmp_path, use_cpu=False, **overrides)
    trainer = GraceTrainer(model=student.cuda(), teacher_model=teacher.cuda(), args=args)
    batch = {k: v.cuda() for k, v in collate(tiny_dataset(student, 2)).items()}
    student.train()
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in student.named_parameters() if p.grad is not None}


@pytest.mark.gpu
def test_auto_runs_the_kernels_on_cuda_with_the_torch_paths_loss_and_gradients(tmp_path, monkeypatch):
    decisions = []
    wants = quant_module._wants_kernels
    monkeypatch.setattr(quant_module, "_wants_kernels", lambda w, b: decisions.append(wants(w, b)) or decisions[-1])
    fused_loss, fused_grads = cuda_step(tmp_path)
    assert decisions and all(decisions)  # every QAT linear took the kernels
    torch_loss, torch_grads = cuda_step(tmp_path, fake_quant_backend="torch")
    torch.testing.assert_close(fused_loss, torch_loss, rtol=1e-6, atol=0)
    for name, grad in torch_grads.items():
        tolerance = 1e-5 if name.endswith("log_scale") else 1e-6  # log-scale sums run in another order
        torch.testing.assert_close(fused_grads[name], grad, rtol=tolerance, atol=1e-8, msg=name)


@pytest.mark.gpu
def test_compiled_padded_teacher_on_cuda_gives_the_eager_loss(tmp_path):
    """Inductor for real (the CPU test uses dynamo's eager backend)."""
    eager_loss, _ = cuda_step(tmp_path)
    try:
        compiled_loss, _ = cuda_step(tmp_path, teacher_compile=True, teacher_pad_to_multiple_of=64)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=0)


@pytest.mark.gpu
def test_grouped_fake_quant_on_cuda_gives_the_per_layer_loss_and_gradients_bit_for_bit(tmp_path, monkeypatch):
    """fake_quant_grouped (the default): one many-weight launch each way, the same loss and every gradient (log-scales
    included: the many-weight kernels reduce in the one-weight kernels' order) as one launch per layer."""
    from grace_quant.kernels import triton_fake_quant

    launches = []
    many = triton_fake_quant.launch_many_forward
    monkeypatch.setattr(triton_fake_quant, "launch_many_forward", lambda *a, **k: launches.append(1) or many(*a, **k))
    grouped_loss, grouped_grads = cuda_step(tmp_path)
    assert launches == [1]
    loss, grads = cuda_step(tmp_path, fake_quant_grouped=False)
    assert launches == [1] and torch.equal(grouped_loss, loss) and grouped_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grouped_grads[name], grad), name
