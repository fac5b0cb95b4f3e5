"""The offline demo: its task data, metrics, outlier injection, and a quick end-to-end run (structure only)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from grace_quant.demo.data import HARD_QUESTION_TYPES, POSITIONS, build_dataset, grid_image, load_mnist, split_pools


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


def test_mnist_pools_are_disjoint_and_balanced(mnist):
    images, labels = mnist
    assert images.shape == (5000, 28, 28) and np.bincount(labels).tolist() == [500] * 10
    train, held, test = split_pools(labels)
    assert not set(train.tolist()) & set(test.tolist()) and held.size == 0
    assert np.bincount(labels[train]).tolist() == [400] * 10 and np.bincount(labels[test]).tolist() == [100] * 10
    train, held, test = split_pools(labels, distill_per_class=150)
    pools = [set(pool.tolist()) for pool in (train, held, test)]
    assert not (pools[0] & pools[1] or pools[0] & pools[2] or pools[1] & pools[2])
    assert [np.bincount(labels[pool]).tolist() for pool in (train, held, test)] == [[250] * 10, [150] * 10, [100] * 10]
    with pytest.raises(ValueError, match="distill_per_class=400: choose 0 to 399"):
        split_pools(labels, distill_per_class=400)


def test_dataset_is_deterministic_and_test_digits_never_train(mnist):
    a, b = build_dataset(40, 12, seed=3), build_dataset(40, 12, seed=3)
    for split in ("train", "test"):
        assert a[split]["question"] == b[split]["question"] and a[split]["answers"] == b[split]["answers"]
        assert a[split]["digit_ids"] == b[split]["digit_ids"]
        assert np.array_equal(np.asarray(a[split][0]["image"]), np.asarray(b[split][0]["image"]))
    train_digits = {i for ids in a["train"]["digit_ids"] for i in ids}
    test_digits = {i for ids in a["test"]["digit_ids"] for i in ids}
    assert not train_digits & test_digits
    assert build_dataset(40, 12, seed=4)["train"]["digit_ids"] != a["train"]["digit_ids"]
    assert "distill" not in a
    c = build_dataset(40, 12, seed=3, distill_size=20)  # the distillation split's digits are in no other split
    digits = {split: {i for ids in c[split]["digit_ids"] for i in ids} for split in ("train", "distill", "test")}
    assert len(c["distill"]) == 20 and not digits["distill"] & (digits["train"] | digits["test"])
    assert c["test"]["digit_ids"] == a["test"]["digit_ids"]  # the test set does not depend on the split


def test_answers_and_images_match_the_digits(mnist):
    images, labels = mnist
    data = build_dataset(60, 4, seed=0, kinds=HARD_QUESTION_TYPES)["train"]
    assert set(data["kind"]) == set(HARD_QUESTION_TYPES)
    for row in data:
        digits = [int(labels[i]) for i in row["digit_ids"]]
        question, answer = row["question"], row["answers"][0]
        if row["kind"] == "read":
            expected = " ".join(map(str, digits))
        elif row["kind"] == "max":
            expected = str(max(digits))
        elif row["kind"] == "count":
            expected = str(len([d for d in digits if d >= 5]))
        elif row["kind"] == "sum":
            expected = str(digits[0] + digits[1] + digits[2] + digits[3])
        else:
            slot = [i for i, p in enumerate(POSITIONS) if f"the {p}?" in question]
            assert len(slot) == 1
            expected = str(digits[slot[0]])
        assert answer == expected, (question, digits)
        pixels = np.asarray(row["image"].convert("L"))
        assert np.array_equal(pixels[:28, 28:], images[row["digit_ids"][1]])  # top right
        assert np.array_equal(pixels[28:, :28], images[row["digit_ids"][2]])  # bottom left
    assert np.asarray(grid_image(images, np.array([0, 1, 2, 3]))).shape == (56, 56, 3)


def test_shipped_metrics_on_hand_worked_cases(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    from grace_quant.evaluation import load_metric

    exact = load_metric("exact_match")
    assert exact.compute(predictions=["7", " 1  2 3 4", "x"], references=[["7"], ["1 2 3 4"], ["y"]])[
        "exact_match"
    ] == pytest.approx(2 / 3)
    vqa = load_metric("vqa_accuracy")
    # 'Two' normalises to '2' (10/10 annotators); 'yes' has 2 of 10: leave-one-out mean = (2*(1/3) + 8*(2/3)) / 10
    result = vqa.compute(predictions=["Two", "yes"], references=[["2"] * 10, ["yes", "yes"] + ["no"] * 8])
    assert result["vqa_accuracy"] == pytest.approx((1.0 + 0.6) / 2)
    assert vqa.compute(predictions=["the cat."], references=[["cat"]])["vqa_accuracy"] == 1.0  # article, period
    with pytest.raises(ValueError, match="unknown metric"):
        load_metric("bleu")


def test_outlier_injection_preserves_the_function():
    from grace_quant.demo.pipeline import inject_outliers
    from grace_quant.testing import tiny_inputs, tiny_model

    model = tiny_model("llava-untied").double()
    inputs = tiny_inputs(model)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    with torch.no_grad():
        before = model(**inputs).logits
        counts = inject_outliers(model, 0.05, 30.0, seed=0)
        after = model(**inputs).logits
    assert counts == [3, 3]  # 5% of 64 channels, per layer
    assert model.model.language_model.layers[0].input_layernorm.weight.abs().max() > 10
    assert torch.allclose(before, after, atol=1e-9)


def test_paired_difference_on_hand_worked_cases():
    """Teacher-minus-student style differences: per-question hits averaged over runs, then a normal interval."""
    from grace_quant.demo.report import paired

    mean, half = paired([[1, 1, 0, 1]], [[1, 0, 0, 0]])  # differences 0, 1, 0, 1: mean 1/2, sd sqrt(1/3)
    assert mean == pytest.approx(0.5) and half == pytest.approx(1.96 * math.sqrt(1 / 3) / 2)
    assert paired([[1, 0, 1]], [[1, 0, 1]]) == (0.0, 0.0)
    mean, half = paired([[1, 0], [1, 1]], [[0, 0]])  # a's runs average to 1, 1/2: differences 1, 1/2
    assert mean == pytest.approx(0.75) and half == pytest.approx(1.96 * math.sqrt(0.125) / math.sqrt(2))


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    from grace_quant.demo.pipeline import PRESETS, Demo
    from grace_quant.demo.report import write_report

    workdir = str(tmp_path_factory.mktemp("demo"))
    settings = PRESETS["quick"]
    results = Demo(settings, workdir, device="cpu").run()
    report = write_report(results, workdir)
    return workdir, results, report


def test_quick_demo_runs_the_whole_pipeline(quick_demo):
    from grace_quant import AutoModelForVision2Seq, GraceQuantLinear
    from grace_quant.surgery import grace_layers

    workdir, results, report = quick_demo
    assert set(results["methods"]) == {"teacher", "fp_student", "rtn", "qat", "qat_kd", "grace"}
    for name, entry in results["methods"].items():
        for run in entry["runs"]:
            assert 0.0 <= run["exact_match"] <= 1.0 and set(run["per_type"]) == {"count", "max", "position", "read"}
            if name != "teacher":
                assert math.isfinite(run["token_kl"]) and run["token_kl"] >= 0 and 0 <= run["same_answer"] <= 1
    for name in ("rtn", "qat", "qat_kd", "grace"):
        path = results["methods"][name]["paths"][0]
        model = AutoModelForVision2Seq.from_pretrained(path)  # the deployment path the demo evaluated
        layers = dict(grace_layers(model))
        assert layers and all(isinstance(layer, GraceQuantLinear) for layer in layers.values())
        assert results["methods"][name]["runs"][0]["bytes"] < results["methods"]["fp_student"]["runs"][0]["bytes"]
    with open(os.path.join(workdir, "results.json")) as handle:
        saved = json.load(handle)
    assert set(saved["summary"]) == set(results["methods"]) and len(saved["targets"]) == 4
    assert all(os.path.getsize(os.path.join(workdir, p)) > 0 for p in ("accuracy.png", "grace_training.png"))
    assert "GRACE INT4" in report
    logs = json.load(open(os.path.join(results["methods"]["grace"]["paths"][0], "trainer_log.json")))
    assert all(math.isfinite(e["loss"]) and math.isfinite(e["beta"]) for e in logs if "loss" in e)


def test_second_run_reuses_finished_stages(quick_demo):
    from grace_quant.demo.pipeline import PRESETS, Demo

    workdir, results, _ = quick_demo
    stamp = {
        name: os.path.getmtime(os.path.join(p, "model.safetensors"))
        for name, e in results["methods"].items()
        for p in e["paths"]
    }
    again = Demo(PRESETS["quick"], workdir, device="cpu").run()
    assert again["methods"]["grace"]["runs"] == results["methods"]["grace"]["runs"]
    for name, entry in again["methods"].items():
        for p in entry["paths"]:
            assert os.path.getmtime(os.path.join(p, "model.safetensors")) == stamp[name]


def test_eval_command_scores_a_saved_model(quick_demo, capsys):
    from grace_quant.cli import main

    workdir, results, _ = quick_demo
    out = os.path.join(workdir, "eval.json")
    code = main(["eval", results["methods"]["grace"]["paths"][0], "--dataset", os.path.join(workdir, "data", "dataset"),
                 "--limit", "8", "--template", "<image>Q: {question} A:", "--output", out])  # fmt: skip
    assert code == 0
    saved = json.load(open(out))
    assert len(saved["predictions"]) == 8 and 0 <= saved["scores"]["vqa_accuracy"] <= 1
    assert "8 questions: exact match" in capsys.readouterr().out
    assert main(["eval", workdir, "--dataset", workdir]) == 2  # not a model folder: one-line error


def test_gpu_preset_models_build_and_answer_shapes():
    """The GPU preset's wider models and harder questions go through the same code (not trained here)."""
    from transformers import CLIPVisionModel

    from grace_quant.demo.models import (
        VISUAL_TOKENS,
        build_llava,
        build_processor,
        prompt,
        train_tokenizer,
        vision_config,
    )
    from grace_quant.demo.pipeline import PRESETS
    from grace_quant.demo.train import collator, training_rows

    settings = PRESETS["gpu"]
    data = build_dataset(8, 2, seed=0, kinds=settings.question_types)
    processor = build_processor(
        train_tokenizer(
            [prompt(q) + " " + a[0] for q, a in zip(data["train"]["question"], data["train"]["answers"], strict=True)]
        )
    )
    examples = training_rows(data["train"])
    tower = CLIPVisionModel(vision_config()).state_dict()
    batch = collator(processor)(examples[:2])
    for size in (settings.teacher_lm, settings.student_lm):
        model = build_llava(size, processor.tokenizer, tower, seed=0)
        text = model.config.text_config
        assert (text.hidden_size, text.num_hidden_layers) == size and text.hidden_size // text.num_attention_heads == 16
        out = model(**batch)
        assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.loss)
    assert (batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum(1).tolist() == [
        VISUAL_TOKENS
    ] * 2


# ------------------------------------------------------------------------------------------------- issue #13
def test_ctrl_c_during_the_teacher_keeps_finished_stages_only(tmp_path, monkeypatch, capsys):
    from grace_quant.cli import EXIT_INTERRUPTED, main
    from grace_quant.demo import pipeline

    tiny = pipeline.DemoSettings(train_size=24, test_size=4, vision_steps=2, teacher_steps=2, batch_size=4)
    monkeypatch.setitem(pipeline.PRESETS, "quick", tiny)
    monkeypatch.setattr(pipeline, "probe_seconds", lambda: pipeline.REFERENCE_PROBE_SECONDS)

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("grace_quant.demo.train.train_fp", ctrl_c)
    threads = torch.get_num_threads()
    try:
        code = main(["demo", "--preset", "quick", "--workdir", str(tmp_path), "--threads", "1", "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    assert code == EXIT_INTERRUPTED
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == (
        f"grace-quant demo: interrupted; the stage in progress was discarded; finished stages stay in {tmp_path} "
        "and a rerun resumes after them"
    )
    assert sorted(os.listdir(tmp_path)) == ["data", "vision"]  # no teacher.partial
    assert "preset 'quick' on 1 CPU thread(s): under a minute on this machine" in captured.out


def test_demo_threads_leave_busy_cores_to_other_jobs(monkeypatch):
    from grace_quant.demo import pipeline

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(pipeline.time, "sleep", lambda s: None)
    samples = iter([(1000, 5000), (1900, 6000)] * 2 + [(1000, 5000), (1000, 6000)])  # (busy, total) ticks
    monkeypatch.setattr(pipeline, "_cpu_times", lambda: next(samples))
    assert pipeline.busy_cores() == 4  # 900 of 1000 ticks busy: ~3.6 of 4 cores
    assert pipeline.cpu_threads() == 1  # never fewer than one
    assert pipeline.cpu_threads() == 4  # an idle machine: every core (a lagging load average does not count)
    monkeypatch.setattr(pipeline, "_cpu_times", lambda: None)  # no /proc/stat: the 1-minute load average
    monkeypatch.setattr(os, "getloadavg", lambda: (1.8, 1.0, 1.0))
    assert pipeline.cpu_threads() == 2


def test_demo_duration_scales_the_reference_by_this_machines_speed(monkeypatch):
    from grace_quant.demo import pipeline

    monkeypatch.setattr(pipeline, "probe_seconds", lambda: 2 * pipeline.REFERENCE_PROBE_SECONDS)  # half as fast
    message = pipeline.duration_message("default", 2, "cpu")
    assert message.startswith("preset 'default' on 2 CPU thread(s): about 18 min on this machine (9.2 min on")
    assert "no reference timing" in pipeline.duration_message("gpu", 2, "cuda")


def test_demo_help_and_readme_agree_on_the_duration():
    import re
    from pathlib import Path

    from grace_quant.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if a.dest == "command"]
    summary = next(a.help for a in sub._choices_actions if a.dest == "demo")
    preset_help = next(a.help for a in sub.choices["demo"]._actions if a.dest == "preset")
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    minutes = {
        "summary": re.findall(r"~(\d+) min", summary),
        "preset help (default)": re.findall(r"default: one seed \(~(\d+) min", preset_help),
        "README quickstart": re.findall(r"offline demo \(below: ~(\d+) minutes", readme),
    }
    assert all(found == ["9"] for found in minutes.values()), minutes
    from grace_quant.demo.pipeline import REFERENCE_MINUTES

    assert round(REFERENCE_MINUTES["default"]) == 9
