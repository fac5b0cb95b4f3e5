"""lmms-eval bridge, end to end and offline: a tiny GRACE INT4 LLaVA (with a real tokenizer and processor) is
evaluated by lmms-eval's own evaluator on the shipped local task, through ``grace-quant eval --lmms-tasks``, and
every number it reports is recomputed here from the model's own ``generate`` / forward outputs.

Skipped where lmms-eval is not installed (``pip install 'grace-quant[lmms]'``); CI installs it (``.ci/run``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lmms_eval", reason="needs the lmms extra: pip install 'grace-quant[lmms]'")

from grace_quant.integrations import lmms as bridge  # noqa: E402
from grace_quant.integrations.lmms import SAMPLE_TASK, TASKS_DIR  # noqa: E402

TASK_DIR = os.path.join(TASKS_DIR, SAMPLE_TASK)
MAX_NEW_TOKENS = 8  # the task's generation_kwargs


def task_utils():
    """The task's own ``utils.py`` (loaded from its file, as lmms-eval loads it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("grace_sample_vqa_utils", os.path.join(TASK_DIR, "utils.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def task_docs(parquet: str) -> list[dict]:
    from datasets import load_dataset

    return list(load_dataset("parquet", data_files={"test": parquet}, cache_dir=None)["test"])


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    """lmms-eval and datasets cache the parquet's Arrow form: keep that in a temporary folder."""
    folder = str(tmp_path_factory.mktemp("datasets_cache"))
    saved = {key: os.environ.get(key) for key in ("HF_DATASETS_CACHE", "LMMS_EVAL_DATASETS_CACHE")}
    os.environ["HF_DATASETS_CACHE"] = os.environ["LMMS_EVAL_DATASETS_CACHE"] = folder
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def grace_dir(tmp_path_factory) -> str:
    """A packed GRACE INT4 checkpoint of a tiny LLaVA, saved with its processor (nothing downloaded)."""
    from transformers import LlavaForConditionalGeneration

    from grace_quant import AutoModelForVision2Seq, GraceConfig
    from grace_quant.demo.models import build_processor, llava_config, train_tokenizer

    rows = task_utils().samples()
    tokenizer = train_tokenizer([f"Q: {row['question']} A: {row['answer']}" for row in rows] * 4, vocab_size=320)
    processor = build_processor(tokenizer)
    torch.manual_seed(0)
    fp_dir, grace = tmp_path_factory.mktemp("fp"), tmp_path_factory.mktemp("grace")
    LlavaForConditionalGeneration(llava_config((64, 2), tokenizer)).save_pretrained(fp_dir)
    model = AutoModelForVision2Seq.from_pretrained(fp_dir, quantization_config=GraceConfig(group_size=32, mode="packed"))
    model.save_pretrained(grace)
    processor.save_pretrained(grace)
    return str(grace)


@pytest.fixture(scope="module")
def reference(grace_dir):
    """The checkpoint as loaded without lmms-eval, and its greedy answer to each shipped document, one
    ``generate`` call per document (no padding), cut at the task's stop string."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(grace_dir)
    model = AutoModelForImageTextToText.from_pretrained(grace_dir).eval()
    assert any(type(m).__name__ == "GraceQuantLinear" for m in model.modules())  # really an INT4 checkpoint
    answers = []
    for doc in task_docs(os.path.join(TASK_DIR, "test.parquet")):
        inputs = processor(images=[doc["image"].convert("RGB")], text=f"<image>Q: {doc['question']} A:", return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answers.append(text.split("\n", 1)[0].strip())
    return model, processor, answers


def lmms_answers(results: dict, task: str) -> dict[int, str]:
    return {sample["doc_id"]: sample["filtered_resps"][0] for sample in results["samples"][task]}


def test_shipped_task_data_is_what_its_generator_draws(tmp_path):
    utils = task_utils()
    utils.write_data(str(tmp_path / "fresh.parquet"))
    shipped, fresh = task_docs(os.path.join(TASK_DIR, "test.parquet")), task_docs(str(tmp_path / "fresh.parquet"))
    assert len(shipped) == 16
    for a, b in zip(shipped, fresh, strict=True):
        assert (a["question"], a["answer"]) == (b["question"], b["answer"])
        assert a["image"].tobytes() == b["image"].tobytes()


def test_cli_scores_the_shipped_task_as_the_model_answers_it(grace_dir, reference, tmp_path, capsys):
    from grace_quant.cli import main

    out = tmp_path / "lmms.json"
    code = main(["eval", grace_dir, "--lmms-tasks", SAMPLE_TASK, "--batch-size", "1", "--output", str(out)])
    printed, errors = capsys.readouterr()
    assert code == 0, errors[-3000:]
    results = json.loads(out.read_text())
    _, _, answers = reference
    assert lmms_answers(results, SAMPLE_TASK) == dict(enumerate(answers))
    normalise = task_utils().normalise
    docs = task_docs(os.path.join(TASK_DIR, "test.parquet"))
    expected = sum(normalise(a) == normalise(d["answer"]) for a, d in zip(answers, docs, strict=True)) / len(docs)
    assert results["results"][SAMPLE_TASK]["exact_match,none"] == pytest.approx(expected)
    assert f"{SAMPLE_TASK}: exact_match {expected:.4f} (16 samples)" in printed


def test_reported_accuracy_follows_the_answers_document_by_document(grace_dir, reference, tmp_path):
    """A copy of the task whose references are the model's own answers on the even documents: lmms-eval must
    report exactly 0.5 (batched, left-padded generation over a local --lmms-include folder)."""
    _, _, answers = reference
    task = tmp_path / "tasks" / "rigged_vqa"
    shutil.copytree(TASK_DIR, task)
    (task / "grace_sample_vqa.yaml").rename(task / "rigged_vqa.yaml")
    config = (task / "rigged_vqa.yaml").read_text().replace("task: grace_sample_vqa", "task: rigged_vqa")
    (task / "rigged_vqa.yaml").write_text(config)
    docs = task_docs(os.path.join(TASK_DIR, "test.parquet"))
    rows = [{**doc, "answer": answers[i] if i % 2 == 0 else answers[i] + " not"} for i, doc in enumerate(docs)]
    from datasets import Dataset, Image

    columns = {key: [row[key] for row in rows] for key in ("image", "question", "answer")}
    Dataset.from_dict(columns).cast_column("image", Image()).to_parquet(str(task / "test.parquet"))

    results = bridge.evaluate_with_lmms(grace_dir, ["rigged_vqa"], include_paths=[str(tmp_path / "tasks")], batch_size=4)
    assert lmms_answers(results, "rigged_vqa") == dict(enumerate(answers))
    assert bridge.summary(results) == {"rigged_vqa": {"exact_match": 0.5}}


def test_loglikelihood_is_the_forward_pass_log_probability(grace_dir, reference):
    """Multiple-choice requests: the summed log-probability of the continuation tokens, and whether each is
    the argmax, checked against one teacher-forced forward pass over prompt + continuation."""
    from lmms_eval.api.instance import Instance

    model, processor, _ = reference
    docs = task_docs(os.path.join(TASK_DIR, "test.parquet"))
    lm = bridge.GraceLMM(grace_dir, device="cpu")
    lm.task_dict = {"t": {"test": docs}}
    image = docs[0]["image"].convert("RGB")

    def forward(context: str, continuation: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits predicting each continuation token, and those tokens (continuation encoded on its own)."""
        prompt = processor(images=[image], text=f"<image>Q: {context} A:", return_tensors="pt")
        tokens = processor.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = torch.cat([prompt["input_ids"], tokens], dim=1)
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=prompt["pixel_values"]).logits[0, -tokens.shape[1] - 1 : -1]
        return logits, tokens[0]

    cases = [("x", " red"), ("What colour?", " blue"), ("Is it left?", " left")]
    for context in ("x", "What colour is the square?", "Is the square on the left or the right?", "a", "b"):
        best = int(forward(context, " ")[0][0].argmax())  # the model's first greedy token after this prompt
        text = processor.tokenizer.decode([best])
        if processor.tokenizer(text, add_special_tokens=False)["input_ids"] == [best]:  # survives a text round trip
            cases.append((context, text))
            break
    assert len(cases) == 4, "no prompt whose greedy token is plain text; change the prompts"
    requests = [
        Instance(
            "loglikelihood", (context, continuation, lambda doc: [doc["image"]], 0, "t", "test"), idx=i,
            metadata={"task": "t", "doc_id": 0, "repeats": 1},
        )  # fmt: skip
        for i, (context, continuation) in enumerate(cases)
    ]
    results = lm.loglikelihood(requests)
    for (context, continuation), (logprob, is_greedy) in zip(cases, results, strict=True):
        logits, tokens = forward(context, continuation)
        assert logprob == pytest.approx(float(logits.log_softmax(-1).gather(-1, tokens[:, None]).sum()), abs=1e-4)
        assert is_greedy == bool((logits.argmax(-1) == tokens).all())
    assert [greedy for _, greedy in results] == [False, False, False, True]


def test_lmms_eval_finds_the_grace_model_by_name():
    from lmms_eval.models import get_model

    assert get_model("grace") is bridge.GraceLMM


def test_unknown_task_and_missing_folder_are_one_line_errors(grace_dir, tmp_path, capsys):
    from grace_quant.cli import main

    assert main(["eval", grace_dir, "--lmms-tasks", "no_such_task_xyz"]) == 2
    assert "unknown lmms-eval task(s) ['no_such_task_xyz']" in capsys.readouterr().err
    assert main(["eval", grace_dir, "--lmms-tasks", SAMPLE_TASK, "--lmms-include", str(tmp_path / "nope")]) == 2
    assert "is not a folder of lmms-eval task YAMLs" in capsys.readouterr().err
    assert main(["eval", grace_dir, "--dataset", str(tmp_path), "--lmms-tasks", SAMPLE_TASK]) == 2  # one or other


def test_the_cli_imports_lmms_eval_only_when_asked():
    code = "import sys; from grace_quant.cli import main; main(['--help'])"
    code += "\nprint([m for m in sys.modules if m.split('.')[0] in ('lmms_eval', 'torch')])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stderr[-2000:]
