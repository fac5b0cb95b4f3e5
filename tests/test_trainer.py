"""GraceTrainer on tiny teacher/student pairs (CPU, deterministic)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import grace_quant
from grace_quant import AutoModelForVision2Seq, GraceConfig, GraceTrainer, GraceTrainingArguments, quantize_model
from grace_quant.controller import LagrangianController
from grace_quant.surgery import grace_layers
from grace_quant.testing import collate, tiny_dataset, tiny_model

LOG_KEYS = {
    "loss", "ce", "gdkd", "tckd", "nckd", "rcka", "gate", "gate_min", "gate_max", "gdkd_weighted", "rcka_weighted",
    "beta", "beta_bound", "gdkd_ema", "omega", "lr_weights", "lr_scales",
}  # fmt: skip


def make_args(tmp_path, **overrides) -> GraceTrainingArguments:
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=1, max_steps=3,
        logging_steps=1, learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", seed=0,
        rcka_warmup_steps=2, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    settings.update(overrides)
    return GraceTrainingArguments(**settings)


def make_pair(name: str, seed: int = 0):
    student = quantize_model(tiny_model(name, seed=seed), GraceConfig(group_size=32))
    teacher = tiny_model(name, seed=seed + 1, hidden=96)  # a wider teacher: RCKA compares different widths
    return student, teacher


def train(tmp_path, name="llava", dataset_size=8, resume=None, student=None, teacher=None, **overrides):
    if student is None:
        student, teacher = make_pair(name)
    args = make_args(tmp_path, **overrides)
    trainer = GraceTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=tiny_dataset(student, dataset_size),
        data_collator=collate,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("name", ["llava", "qwen2-vl"])
def test_all_components_train_and_log_finite_values(name, tmp_path):
    trainer = train(tmp_path, name, max_steps=3)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert LOG_KEYS <= set(entry), set(entry)
        assert all(math.isfinite(v) for k, v in entry.items() if isinstance(v, float)), entry
        assert entry["lr_scales"] == pytest.approx(10 * entry["lr_weights"])
        assert math.exp(-1) - 1e-6 <= entry["gate_min"] <= entry["gate"] <= entry["gate_max"] <= 1 + 1e-6
    assert logs[-1]["rcka"] > 0  # visual tokens were compared
    assert trainer.controller.step == 3  # one controller update per optimizer step
    assert trainer.nonfinite_steps == 0


def test_controller_is_fed_the_step_mean_of_gdkd(tmp_path):
    trainer = train(tmp_path, max_steps=2, gradient_accumulation_steps=2, ib_tau="0.01", ib_eta=0.5)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    reference = LagrangianController(tau=0.01, eta=0.5, beta0=0.5, beta_min=0.1, beta_max=1.0)
    for entry in logs:
        reference.update(entry["gdkd"])  # the logged gdkd is the mean over the step's micro-batches
        assert entry["beta"] == pytest.approx(reference.beta, rel=1e-6)
        assert entry["gdkd_ema"] == pytest.approx(reference.ema, rel=1e-6)
    assert logs[-1]["beta"] > 0.5  # GDKD above tau pushes beta up


def test_optimizer_groups_scale_learning_rate_and_no_decay(tmp_path):
    student, teacher = make_pair("llava")
    args = make_args(tmp_path, weight_decay=0.1, scale_lr_multiplier=10.0)
    trainer = GraceTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=tiny_dataset(student, 4), data_collator=collate
    )
    optimizer = trainer.create_optimizer()
    scales = {id(layer.log_scale) for _, layer in grace_layers(student)}
    scale_groups = [g for g in optimizer.param_groups if any(id(p) in scales for p in g["params"])]
    assert len(scale_groups) == 1 and all(id(p) in scales for p in scale_groups[0]["params"])
    assert scale_groups[0]["lr"] == pytest.approx(10 * args.learning_rate) and scale_groups[0]["weight_decay"] == 0
    assert len(scale_groups[0]["params"]) == len(scales)
    assert not any(id(p) in scales for g in optimizer.param_groups if g is not scale_groups[0] for p in g["params"])


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_continues_exactly(tmp_path):
    full = train(tmp_path / "full", max_steps=4, save_strategy="steps", save_steps=2, ib_tau="auto")
    expected = weights(full.model)
    resumed = train(
        tmp_path / "resumed", max_steps=4, save_strategy="steps", save_steps=2, ib_tau="auto",
        resume=str(tmp_path / "full" / "checkpoint-2"),
    )  # fmt: skip
    got = weights(resumed.model)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert resumed.controller.state_dict() == full.controller.state_dict()


def test_resume_refuses_a_packed_folder(tmp_path):
    trainer = train(tmp_path / "a", max_steps=1)
    trainer.save_model(str(tmp_path / "packed"))
    with pytest.raises(ValueError, match="not a GRACE Trainer checkpoint"):
        trainer._load_from_checkpoint(str(tmp_path / "packed"))


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """With the gate off, CE and KD normalised by num_items_in_batch make 2 x 2 micro-batches equal 1 x 4."""
    # SGD without clipping: the update is linear in the gradient (Adam would amplify float noise on zero-gradient
    # parameters, clipping would hide a wrong loss scale)
    common = dict(
        max_steps=1,
        confidence_gate=False,
        rcka_weight=0.0,
        learning_rate=0.1,
        controller="fixed",
        optim="sgd",
        max_grad_norm=0.0,
    )
    big = train(tmp_path / "big", per_device_train_batch_size=4, gradient_accumulation_steps=1, **common)
    small = train(tmp_path / "small", per_device_train_batch_size=2, gradient_accumulation_steps=2, **common)
    a, b = weights(big.model), weights(small.model)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key


def test_save_model_writes_int4_that_reloads_with_identical_logits(tmp_path):
    trainer = train(tmp_path, max_steps=2)
    student = trainer.model.eval()
    batch = collate(tiny_dataset(student, 2, seed=5))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = student(**inputs).logits
    trainer.save_model(str(tmp_path / "int4"))
    model = AutoModelForVision2Seq.from_pretrained(str(tmp_path / "int4"))
    assert all(isinstance(layer, grace_quant.GraceQuantLinear) for _, layer in grace_layers(model))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


def test_batches_without_images_skip_rcka(tmp_path):
    student, teacher = make_pair("llava")
    args = make_args(tmp_path, max_steps=2)
    trainer = GraceTrainer(
        model=student, teacher_model=teacher, args=args,
        train_dataset=tiny_dataset(student, 4, with_images=False), data_collator=collate,
    )  # fmt: skip
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(entry["rcka"] == 0.0 and math.isfinite(entry["loss"]) for entry in logs)


def test_nonfinite_component_is_skipped_and_counted(tmp_path):
    student, teacher = make_pair("llava")
    with torch.no_grad():
        teacher.lm_head.weight[0, 0] = float("nan")  # teacher logits (hence GDKD) become NaN
    with pytest.warns(RuntimeWarning, match="non-finite loss component"):
        trainer = train(tmp_path, student=student, teacher=teacher, max_steps=2, rcka_weight=0.0)
    assert trainer.nonfinite_steps == 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_ablations_run_without_teacher_when_nothing_needs_it(tmp_path):
    student = quantize_model(tiny_model("llava"), GraceConfig(group_size=32))
    trainer = train(tmp_path, student=student, teacher=None, kd_loss="none", rcka_weight=0.0, max_steps=2)
    assert trainer.controller.step == 0
    naive = train(tmp_path / "kd", kd_loss="kd", rcka_weight=0.0, controller="fixed", max_steps=2)
    logs = [entry for entry in naive.state.log_history if "loss" in entry]
    assert all(entry["beta"] == 0.5 and entry["kd"] > 0 for entry in logs)


def test_clear_errors(tmp_path):
    student = quantize_model(tiny_model("llava"), GraceConfig(group_size=32))
    with pytest.raises(ValueError, match="teacher_model is required"):
        GraceTrainer(model=student, args=make_args(tmp_path))
    other_vocab = tiny_model("llava", hidden=96)
    other_vocab.resize_token_embeddings(400)
    with pytest.raises(ValueError, match=r"vocabularies differ \(400 vs 320\)"):
        GraceTrainer(model=student, teacher_model=other_vocab, args=make_args(tmp_path))
    with pytest.raises(ValueError, match="kd_loss='kdd' is unknown"):
        make_args(tmp_path, kd_loss="kdd")
    with pytest.raises(ValueError, match="positive number or 'auto'"):
        make_args(tmp_path, ib_tau="soon")
    student, teacher = make_pair("llava")
    trainer = GraceTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path))
    batch = collate(tiny_dataset(student, 2))
    batch.pop("labels")
    with pytest.raises(ValueError, match="needs `labels`"):
        trainer.compute_loss(student, batch)


def test_mixin_brings_grace_to_another_trainer_subclass(tmp_path):
    from transformers import Trainer

    from grace_quant.integrations.trainer import GraceTrainerMixin

    class CountingTrainer(Trainer):  # stands in for a third-party Trainer such as TRL's SFTTrainer
        calls = 0

        def training_step(self, *args, **kwargs):
            CountingTrainer.calls += 1
            return super().training_step(*args, **kwargs)

    class GraceCounting(GraceTrainerMixin, CountingTrainer):
        pass

    student, teacher = make_pair("llava")
    trainer = GraceCounting(
        model=student, teacher_model=teacher, args=make_args(tmp_path, max_steps=2),
        train_dataset=tiny_dataset(student, 4), data_collator=collate,
    )  # fmt: skip
    trainer.train()
    assert CountingTrainer.calls == 2 and trainer.controller.step == 2
    assert all(math.isfinite(e["gdkd"]) and e["gdkd"] > 0 for e in trainer.state.log_history if "loss" in e)


# ------------------------------------------------------------------------------------------------- issue #13
def test_nan_weights_skip_the_step_without_crashing(tmp_path):
    """Every loss component is NaN: the micro-batch is skipped (no gradient, weights untouched) and counted."""
    student, teacher = make_pair("llava")
    layer = student.get_submodule("model.language_model.layers.0.mlp.down_proj")
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.warns(RuntimeWarning, match=r"non-finite loss component\(s\) \['ce', 'gdkd', 'rcka'\] skipped"):
        trainer = train(tmp_path, student=student, teacher=teacher, max_steps=2)
    assert trainer.nonfinite_steps == 2
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["nonfinite_steps"] for entry in logs] == [1, 2]
    assert all(entry["grad_norm"] == 0.0 and entry["loss"] == 0.0 for entry in logs)
    after = trainer.model.state_dict()  # skipped steps: every weight as it was, the NaN included
    assert all(torch.equal(after[k].isnan(), v.isnan()) for k, v in before.items())
    assert all(torch.equal(after[k].nan_to_num(), v.nan_to_num()) for k, v in before.items())


def test_full_precision_student_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"quantization_config=GraceConfig\(bits=4, group_size=128\)\)") as info:
        GraceTrainer(
            model=tiny_model("llava"), teacher_model=tiny_model("llava", 1, hidden=96), args=make_args(tmp_path)
        )
    assert "the student has no GRACE layers" in str(info.value) and "\n" not in str(info.value)
    packed = quantize_model(tiny_model("llava"), GraceConfig(group_size=32, mode="packed"))
    with pytest.raises(ValueError, match=r"packed INT4 layers, which do not train; call grace_quant.prepare_qat"):
        GraceTrainer(model=packed, teacher_model=tiny_model("llava", 1, hidden=96), args=make_args(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_empty_train_dataset_is_refused(tmp_path):
    student, teacher = make_pair("llava")
    with pytest.raises(ValueError, match=r"^GraceTrainer: train_dataset is empty \(0 examples\)"):
        GraceTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path), train_dataset=[])


def test_teacher_of_another_family_is_refused_and_a_compatible_one_accepted(tmp_path):
    student = quantize_model(tiny_model("llava"), GraceConfig(group_size=32))
    qwen = tiny_model("qwen2-vl", seed=1, hidden=96)  # same 320-token vocabulary, other inputs (patches + grid)
    with pytest.raises(ValueError, match=r"the teacher is a qwen2_vl model .* and the student a llava model") as info:
        GraceTrainer(model=student, teacher_model=qwen, args=make_args(tmp_path))
    assert "must take the student's inputs" in str(info.value)
    # Qwen2.5-VL takes Qwen2-VL's inputs: a Qwen2.5-VL teacher distils into a Qwen2-VL student, RCKA included
    student = quantize_model(tiny_model("qwen2-vl"), GraceConfig(group_size=32))
    teacher = tiny_model("qwen2.5-vl", seed=1, hidden=96)
    trainer = train(tmp_path, student=student, teacher=teacher, max_steps=2, rcka_warmup_steps=0)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(math.isfinite(e["loss"]) and e["rcka"] > 0 and e["gdkd"] > 0 for e in logs)


def test_saved_folders_hold_no_pickle(tmp_path):
    """save_model writes the folder users push: no pickle at all, the training arguments as JSON. Trainer checkpoints
    keep only the Trainer's own resume state (optimizer, scheduler, RNG: tensors, read back with weights_only=True)."""
    import json

    trainer = train(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=2)
    trainer.save_model(str(tmp_path / "int4"))
    resume_state = {"optimizer.pt", "scheduler.pt", "rng_state.pth"}
    for folder, allowed in ((tmp_path / "int4", set()), (tmp_path / "run" / "checkpoint-2", resume_state)):
        torch_files = set()
        for path in folder.iterdir():
            head = path.read_bytes()[:2] if path.is_file() else b""
            if head == b"PK" or head.startswith(b"\x80"):  # torch.save's zip, or a raw pickle
                torch_files.add(path.name)
        assert torch_files == allowed and not (folder / "training_args.bin").exists(), sorted(torch_files)
        assert json.loads((folder / "training_args.json").read_text())["max_steps"] == 2


def test_output_dir_must_not_be_the_students_source(fp_checkpoint, tmp_path):
    student = AutoModelForVision2Seq.from_pretrained(
        fp_checkpoint("llava"), quantization_config=GraceConfig(group_size=32)
    )
    teacher = tiny_model("llava", 1, hidden=96)
    before = sorted(p.name for p in Path(fp_checkpoint("llava")).iterdir())
    for output_dir, phrase in (
        (fp_checkpoint("llava"), "is the source"),
        (f"{fp_checkpoint('llava')}/run", "lies inside"),
    ):
        with pytest.raises(ValueError, match=phrase):
            GraceTrainer(model=student, teacher_model=teacher, args=make_args(output_dir))
    trainer = GraceTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path))
    with pytest.raises(ValueError, match="is the source"):
        trainer.save_model(fp_checkpoint("llava"))  # would replace the fp source by INT4
    assert sorted(p.name for p in Path(fp_checkpoint("llava")).iterdir()) == before


# ------------------------------------------------------------------------------------------------- issue #14
#: the parts as written by hand per model (an independent reference for the structural rule in grace_quant.surgery)
VISION_TOWER = {"llava": "model.vision_tower.", "qwen2-vl": "model.visual.", "qwen2.5-vl": "model.visual."}
PROJECTOR = {"llava": "model.multi_modal_projector.", "qwen2-vl": "model.visual.merger.",
             "qwen2.5-vl": "model.visual.merger."}  # fmt: skip
TRAINER_KEYS = {"loss", "grad_norm", "learning_rate", "epoch", "step", "lr_weights", "lr_scales"}


def parts(model, name: str) -> dict[str, list[torch.nn.Parameter]]:
    """The student's parameters split into vision tower (projector excluded), projector and the rest."""
    split: dict[str, list[torch.nn.Parameter]] = {"tower": [], "projector": [], "rest": []}
    for key, param in model.named_parameters():
        part = "projector" if key.startswith(PROJECTOR[name]) else "tower" if key.startswith(VISION_TOWER[name]) else "rest"
        split[part].append(param)
    return split


def optimized(trainer) -> set[int]:
    return {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}


@pytest.mark.parametrize("name", ["llava", "qwen2-vl", "qwen2.5-vl"])
def test_vision_tower_is_frozen_and_kept_out_of_the_optimizer_by_default(name, tmp_path):
    student, teacher = make_pair(name)
    trainer = GraceTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path))
    split, in_optimizer = parts(student, name), optimized(trainer)
    assert split["tower"] and split["projector"]
    assert not any(p.requires_grad or id(p) in in_optimizer for p in split["tower"])
    assert all(p.requires_grad and id(p) in in_optimizer for p in split["projector"] + split["rest"])
    assert all(id(layer.log_scale) in in_optimizer for _, layer in grace_layers(student))  # decoder: quantized, trained


@pytest.mark.parametrize("name", ["llava", "qwen2-vl"])
def test_switches_train_the_vision_tower_or_freeze_the_projector(name, tmp_path):
    student, teacher = make_pair(name)
    args = make_args(tmp_path, freeze_vision_tower=False, train_projector=False)
    trainer = GraceTrainer(model=student, teacher_model=teacher, args=args)
    split, in_optimizer = parts(student, name), optimized(trainer)
    assert all(p.requires_grad and id(p) in in_optimizer for p in split["tower"] + split["rest"])
    assert not any(p.requires_grad or id(p) in in_optimizer for p in split["projector"])


def test_training_leaves_the_frozen_vision_tower_untouched(tmp_path):
    student, teacher = make_pair("llava")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = train(tmp_path, student=student, teacher=teacher, max_steps=2)
    after = trainer.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith(VISION_TOWER["llava"]))
    assert not torch.equal(after["model.multi_modal_projector.linear_1.weight"],
                           before["model.multi_modal_projector.linear_1.weight"])  # fmt: skip


def omegas(trainer) -> list[float]:
    return [entry["omega"] for entry in trainer.state.log_history if "loss" in entry]


def test_rcka_warmup_fraction_scales_with_max_steps_and_an_int_stays_absolute(tmp_path):
    """omega logged after optimizer step k is rcka_weight * min(1, k / W): W = ceil(fraction * max_steps)."""
    runs = {steps: train(tmp_path / str(steps), max_steps=steps, rcka_warmup_steps=0.5, kd_loss="none",
                         dataset_size=16) for steps in (4, 8)}  # fmt: skip
    assert {steps: run.rcka_warmup_length() for steps, run in runs.items()} == {4: 2, 8: 4}
    for steps, run in runs.items():
        assert omegas(run) == pytest.approx([3.0 * min(1.0, k / (steps // 2)) for k in range(1, steps + 1)])
    fixed = train(tmp_path / "int", max_steps=4, rcka_warmup_steps=3, kd_loss="none")
    assert fixed.rcka_warmup_length() == 3 and omegas(fixed) == pytest.approx([1.0, 2.0, 3.0, 3.0])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rcka_warmup_steps": 1.5}, r"^rcka_warmup_steps=1\.5 must be a fraction of the planned optimizer steps in \[0, 1\)"),
        ({"rcka_warmup_steps": -0.1}, r"^rcka_warmup_steps=-0\.1 must be a fraction"),
        ({"ib_calibration_steps": 2.5}, r"^ib_calibration_steps=2\.5 must be a fraction"),
        ({"ib_eta": 0.0}, r"^ib_eta must be a positive number"),
    ],
)
def test_bad_schedule_arguments_say_what_to_change(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message) as info:
        make_args(tmp_path, **overrides)
    assert "\n" not in str(info.value)


def betas(trainer) -> list[float]:
    return [entry["beta"] for entry in trainer.state.log_history if "loss" in entry]


def test_default_controller_ignores_the_loss_scale_and_the_papers_absolute_tau_does_not(tmp_path):
    """alpha and beta_dkd x4 multiply every GDKD value by exactly 4 (weights frozen by lr=0, so the data alone
    moves the GDKD): beta's trajectory is unchanged under the default tau='auto', changed under ib_tau='3.0'."""
    common = dict(max_steps=6, learning_rate=0.0, rcka_weight=0.0, ib_calibration_steps=2, ib_eta=0.5,
                  dataset_size=12)  # fmt: skip
    scaled = dict(dkd_alpha=4.0, dkd_beta=16.0)
    base = train(tmp_path / "a", **common)
    assert base.args.ib_tau == "auto" and base.controller.auto_tau
    assert betas(base) == betas(train(tmp_path / "b", **common, **scaled))
    assert len(set(betas(base))) > 2  # beta moved after calibration
    paper = dict(common, ib_tau="3.0", ib_eta=0.05)
    assert betas(train(tmp_path / "c", **paper)) != betas(train(tmp_path / "d", **paper, **scaled))


def logged(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_logs_name_only_the_terms_that_run(tmp_path):
    student = quantize_model(tiny_model("llava"), GraceConfig(group_size=32))
    qat = train(tmp_path / "qat", student=student, teacher=None, kd_loss="none", rcka_weight=0.0, max_steps=2)
    assert all(set(entry) == TRAINER_KEYS | {"ce"} for entry in logged(qat))
    kd = train(tmp_path / "kd", kd_loss="kd", rcka_weight=0.0, controller="fixed", max_steps=2)
    assert all(set(entry) == TRAINER_KEYS | {"ce", "kd", "kd_weighted", "kd_ema", "beta"} for entry in logged(kd))
    ungated = train(tmp_path / "ungated", confidence_gate=False, max_steps=2)
    assert all(not {"gate", "gate_min", "gate_max", "kd"} & set(entry) for entry in logged(ungated))
    assert all({"gdkd", "rcka", "omega", "beta_bound", "tau"} <= set(entry) for entry in logged(ungated))


def test_weighted_terms_are_the_terms_times_the_weights_in_force(tmp_path):
    """gdkd_weighted = beta * gdkd and rcka_weighted = omega * rcka with the beta and omega of the step (the values
    logged one step earlier; beta_init and 0 for the first step)."""
    trainer = train(tmp_path, max_steps=4, rcka_warmup_steps=2, ib_tau="0.01", ib_eta=50.0)
    entries = logged(trainer)
    beta, omega = 0.5, 0.0
    for entry in entries:
        assert entry["gdkd_weighted"] == pytest.approx(beta * entry["gdkd"], rel=1e-5)
        assert entry["rcka_weighted"] == pytest.approx(omega * entry["rcka"], rel=1e-5, abs=1e-12)
        beta, omega = entry["beta"], entry["omega"]
    assert entries[-1]["beta_bound"] == 1 and entries[-1]["beta"] == 1.0  # GDKD far above tau: pinned at beta_max
    assert all(entry["tau"] == 0.01 for entry in entries)


def test_packed_checkpoints_say_packed_and_trainer_checkpoints_say_qat(tmp_path):
    import json

    trainer = train(tmp_path / "run", max_steps=1, save_strategy="steps", save_steps=1)
    trainer.save_model(str(tmp_path / "int4"))
    mode = lambda folder: json.loads((folder / "config.json").read_text())["quantization_config"]["mode"]  # noqa: E731
    assert mode(tmp_path / "int4") == "packed" and mode(tmp_path / "run" / "checkpoint-1") == "qat"


def test_grouped_fake_quant_wraps_the_forward_only_where_it_applies(tmp_path):
    """fake_quant_grouped: the student's forward is wrapped while training in one process; not with the switch off,
    in eval mode or with gradient checkpointing (recomputed layers would quantize again)."""
    import contextlib

    student, teacher = make_pair("llava")
    trainer = GraceTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path))
    student.train()
    assert not isinstance(trainer._grouped_fake_quant(student), contextlib.nullcontext)
    student.eval()
    assert isinstance(trainer._grouped_fake_quant(student), contextlib.nullcontext)
    student.train()
    on, off = (("activation_checkpointing_enable", "activation_checkpointing_disable")
               if hasattr(student, "activation_checkpointing_enable")
               else ("gradient_checkpointing_enable", "gradient_checkpointing_disable"))  # transformers 5.17  # fmt: skip
    getattr(student, on)()
    assert isinstance(trainer._grouped_fake_quant(student), contextlib.nullcontext)
    getattr(student, off)()
    assert not isinstance(trainer._grouped_fake_quant(student), contextlib.nullcontext)
    switched_off = GraceTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, fake_quant_grouped=False))
    assert isinstance(switched_off._grouped_fake_quant(student), contextlib.nullcontext)
