"""``grace-quant ablate`` end to end on tiny LLaVA models and a tiny dataset: the arms of the table, the same samples
for every arm, the table's numbers against an independent ``grace-quant eval`` of each saved arm, and one-line
errors for bad inputs."""

from __future__ import annotations

import json

import pytest

from grace_quant.ablation import ARMS, FP_ROW
from grace_quant.cli import main

STEPS, BATCH = 2, 2


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Teacher and student folders (with the tiny processor) and a DatasetDict folder (train 6, test 5)."""
    from datasets import Dataset, DatasetDict

    from grace_quant.testing import tiny_model, tiny_processor, tiny_vqa

    root = tmp_path_factory.mktemp("ablate")
    processor = tiny_processor("llava")
    for name, model in (("teacher", tiny_model("llava", seed=1, hidden=96)), ("student", tiny_model("llava"))):
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)

    def split(size: int, seed: int) -> Dataset:
        rows = tiny_vqa(size, seed=seed)
        return Dataset.from_dict({"image": [r["image"] for r in rows], "question": [r["question"] for r in rows],
                                  "answers": [[r["answer"], "blue"] for r in rows]})  # fmt: skip

    DatasetDict(train=split(6, 0), test=split(5, 1)).save_to_disk(str(root / "data"))
    return {name: str(root / name) for name in ("teacher", "student", "data")}


def ablate_args(inputs, output, *extra: str) -> list[str]:
    return [
        "ablate", "--teacher", inputs["teacher"], "--student", inputs["student"], "--dataset", inputs["data"],
        "--output", str(output), "--steps", str(STEPS), "--batch-size", str(BATCH), "--lr", "1e-3",
        "--group-size", "32", "--eval-batch-size", "8", "--max-new-tokens", "4", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def ablation(inputs, tmp_path_factory):
    output = tmp_path_factory.mktemp("runs") / "ablation"
    assert main(ablate_args(inputs, output)) == 0
    return output, json.loads((output / "results.json").read_text())


def test_table_lists_every_arm_and_the_fp_reference(ablation, capsys):
    output, results = ablation
    assert list(results["summary"]) == [FP_ROW, *ARMS]
    table = (output / "results.md").read_text()
    for arm, (description, _) in ARMS.items():
        assert f"| {arm} | {description} |" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "±" in line]
    assert len(rows) == len(ARMS) + 1 and all(row.count(" ± ") == 2 for row in rows)
    assert "binomial over questions" in table


def test_every_trained_arm_saw_the_same_samples_in_the_same_order(ablation):
    _, results = ablation
    orders = {arm: results["arms"][arm]["runs"][0]["sample_ids"] for arm in ARMS if ARMS[arm][1] is not None}
    first = next(iter(orders.values()))
    assert len(first) == STEPS * BATCH and set(first) <= set(range(6))
    assert all(order == first for order in orders.values()), orders
    assert results["arms"]["rtn"]["runs"][0]["sample_ids"] == []


def test_table_numbers_equal_an_independent_evaluation_of_each_saved_arm(ablation, inputs, tmp_path):
    output, results = ablation
    for arm in ARMS:
        (run,) = results["arms"][arm]["runs"]
        folder = output / run["path"]
        assert (folder / "config.json").exists()
        config = json.loads((folder / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "grace"
        scores_file = tmp_path / f"{arm}.json"
        code = main(["eval", str(folder), "--dataset", inputs["data"], "--split", "test", "--batch-size", "8",
                     "--max-new-tokens", "4", "--output", str(scores_file)])  # fmt: skip
        assert code == 0
        independent = json.loads(scores_file.read_text())
        assert independent["predictions"] == run["answers"], arm
        for metric in ("exact_match", "vqa_accuracy"):
            assert results["summary"][arm][metric] == pytest.approx(independent["scores"][metric], abs=1e-12)


def test_trained_arms_differ_from_rtn(ablation):
    """The training really ran: every trained arm's saved weights differ from RTN's (a test that can fail)."""
    from safetensors.torch import load_file

    output, results = ablation
    weights = {arm: load_file(str(output / results["arms"][arm]["runs"][0]["path"] / "model.safetensors"))
               for arm in ARMS}  # fmt: skip
    rtn = weights.pop("rtn")
    for arm, tensors in weights.items():
        assert any(not (tensors[k] == rtn[k]).all() for k in rtn if k in tensors), arm


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("--steps", "0"), "--steps: must be a positive integer"),
        (("--lr", "-1"), "--lr: must be a positive number"),
        (("--arms", "grace,bogus"), "unknown arm(s) ['bogus']"),
        (("--teacher", "/nonexistent/teacher"), "--teacher /nonexistent/teacher is not a model folder"),
        (("--dataset", "/nonexistent/data"), "--dataset /nonexistent/data is not a folder"),
    ],
)
def test_bad_inputs_fail_with_one_line(change, message, inputs, tmp_path, capsys):
    args = ablate_args(inputs, tmp_path / "out")
    flag, value = change
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_refused_before_any_work(inputs, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert main(ablate_args(inputs, tmp_path / "out")) == 2
    assert "already exists" in capsys.readouterr().err
