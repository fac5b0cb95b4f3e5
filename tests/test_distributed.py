"""GRACE across processes: DDP and FSDP2 on 2 CPU processes (gloo) against one process with the same global batch.

Every run is a subprocess of ``tests/distributed_worker.py`` (the single-process reference too, so all three share
one thread count and start from the same seeds), ``OMP_NUM_THREADS=1``. The last tests run the launch script of
examples/distributed. About 60 s on 2 cores (the optional DeepSpeed test adds about 2 minutes where it runs).

Why the comparison can be exact up to float rounding:
* data: Trainer + accelerate draw one seeded permutation (``data_seed``) on every rank and deal consecutive
  per-device batches to the ranks in turn, so with 2 ranks x 2 samples (or 2 ranks x 1 sample x 2 accumulation
  steps) the samples of each optimizer step are the single process's 4; the test checks this from the recorded
  input ids rather than assuming it;
* loss: CE and KD are token sums over ``num_items_in_batch`` (counted over all ranks) times the world size, which
  DDP/FSDP's gradient averaging cancels; RCKA is a per-image mean and every rank holds the same number of images;
* controller: beta moves once per step on the GDKD averaged over micro-batches and ranks; every sample has the
  same number of answer tokens, so that mean of means equals the single process's token mean;
* the confidence gate is off: gated GDKD is ``sum g L / sum g`` per micro-batch, and a mean of two ranks' ratios is
  not the ratio over their union (by definition, not by rounding), so with the gate on beta and the weights would
  differ slightly from the single process;
* SGD without clipping: the update is linear in the gradient.
What remains is the order of float32 sums (per-rank partial gradients all-reduced, or accumulated, vs one batch of
4), measured after 3 steps at <= 8.4e-7 absolute (weights up to 5.8 in magnitude, moved by up to 0.125 by training);
the tolerance below (2e-6 + 1e-5 relative) leaves a margin of about 4. Replicas on different ranks hold bit-identical
weights and controller states (one all-reduce result, one update). Reverting either the world-size factor of the loss
or the cross-rank GDKD reduction in ``_controller_step`` makes these tests fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grace_quant import AutoModelForVision2Seq, GraceConfig, GraceQuantLinear, quantize_model
from grace_quant.surgery import grace_layers
from grace_quant.testing import collate, tiny_dataset, tiny_model

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("distributed_worker.py")
ATOL, RTOL = 2e-6, 1e-5
BETA0 = 0.5


def launch(out: Path, layout: str, per_device: int, accumulation: int = 1, save_int4: bool = False) -> list[dict]:
    """Run the worker (``torchrun --standalone --nproc_per_node 2`` for ddp/fsdp2) and load each rank's results."""
    out.mkdir(parents=True, exist_ok=True)
    processes = 1 if layout == "single" else 2
    script = [str(WORKER), "--layout", layout, "--out", str(out), "--per-device-batch", str(per_device),
              "--accumulation", str(accumulation)] + (["--save-int4"] if save_int4 else [])  # fmt: skip
    if processes == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    if done.returncode != 0:
        pytest.fail(f"{layout} run failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(processes)]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """The reference: one process, per-device batch 4, no accumulation."""
    (result,) = launch(tmp_path_factory.mktemp("single"), "single", per_device=4)
    return result


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("ddp")
    return out, launch(out, "ddp", per_device=2, save_int4=True)


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("fsdp2")
    return out, launch(out, "fsdp2", per_device=1, accumulation=2, save_int4=True)


def assert_same_run(ranks: list[dict], single: dict) -> None:
    """The distributed run trained on the single run's samples and reached its weights and beta."""
    assert all(r["world_size"] == 2 for r in ranks) and single["world_size"] == 1
    steps = len(single["seen"])
    assert steps == 3 and all(len(r["seen"]) == steps for r in ranks)
    for step in range(steps):  # each optimizer step saw the same 4 samples, split over ranks (and micro-batches)
        union = sorted(sample for r in ranks for sample in r["seen"][step])
        assert union == sorted(single["seen"][step]), step
    # every micro-batch is normalised by the answer tokens of the whole global batch (4 samples x 5 tokens)
    assert {n for r in ranks for n in r["items"]} == set(single["items"]) == {20}

    first, second = ranks
    for key, expected in single["weights"].items():
        assert torch.equal(first["weights"][key], second["weights"][key]), key  # replicas agree bit for bit
        torch.testing.assert_close(first["weights"][key], expected, atol=ATOL, rtol=RTOL, msg=key)
    moved = max((single["weights"][k] - single["initial"][k]).abs().max().item() for k in single["weights"])
    assert moved > 1e3 * ATOL  # training moved the weights far beyond the tolerance

    assert first["controller"] == second["controller"]  # same beta, ema and step on every rank
    assert first["controller"]["step"] == single["controller"]["step"] == 3
    # GDKD is a KL of nearly equal distributions (cancellation): float32 noise in the logits reaches it amplified,
    # measured at 2.2e-6 relative in the EMA (FSDP2 + accumulation) and 1.6e-7 (DDP)
    assert first["controller"]["ema"] == pytest.approx(single["controller"]["ema"], rel=1e-5, abs=0)
    assert first["controller"]["beta"] == pytest.approx(single["controller"]["beta"], rel=1e-5, abs=0)
    assert single["controller"]["beta"] > BETA0 + 0.1  # beta did move, so a wrong GDKD reduction would show

    # logged loss components are all-rank means: identical on every rank and equal to the single process's (every
    # rank holds the same number of answer tokens and images, so the mean of rank means is the global mean)
    assert len(single["logs"]) == steps and all(len(r["logs"]) == steps for r in ranks)
    # TCKD and NCKD are KLs of nearly equal distributions (values ~1e-5) summed from O(1) float32 terms: their
    # absolute noise is a few float32 ulps of those terms (1.2e-7 measured on TCKD in one CI run, FSDP2 +
    # accumulation), far below a wrong reduction's error (of the order of the value itself)
    for name in ("ce", "gdkd", "tckd", "nckd", "rcka"):
        per_rank = [[entry[name] for entry in r["logs"]] for r in ranks]
        assert per_rank[0] == per_rank[1], name
        assert per_rank[0] == pytest.approx([entry[name] for entry in single["logs"]], rel=1e-4, abs=1e-6), name


def assert_int4_export(out: Path, ranks: list[dict]) -> None:
    """rank 0 alone wrote a packed INT4 folder, and it reloads with the trained QAT student's exact logits."""
    assert (out / "int4_rank0" / "config.json").exists()
    assert not (out / "int4_rank1").exists(), "a non-main rank wrote a checkpoint"
    student = quantize_model(tiny_model("llava"), GraceConfig(group_size=32))
    student.load_state_dict(ranks[0]["weights"], strict=True)
    student.eval()
    inputs = collate(tiny_dataset(student, 2, seed=5))
    inputs.pop("labels")
    packed = AutoModelForVision2Seq.from_pretrained(str(out / "int4_rank0"))
    layers = list(grace_layers(packed))
    assert layers and all(isinstance(layer, GraceQuantLinear) for _, layer in layers)
    with torch.no_grad():
        assert torch.equal(packed(**inputs).logits, student(**inputs).logits)


def test_ddp_matches_single_process(ddp, single):
    assert_same_run(ddp[1], single)
    assert not any(r["fsdp"] for r in ddp[1])


def test_ddp_save_model_writes_int4_on_rank0_only(ddp):
    assert_int4_export(*ddp)


def test_fsdp2_with_accumulation_matches_single_process(fsdp2, single):
    """FSDP2 (student sharded per decoder layer, teacher replicated), 1 sample x 2 accumulation steps per rank.

    accelerate 1.15 enables FSDP only on accelerators: on CPU ``AcceleratorState`` keeps ``MULTI_CPU`` and drops the
    plugin without a word, so the Trainer would silently fall back to DDP. torch's ``fully_shard`` itself works on
    CPU with gloo, so the worker switches the state to FSDP after the Trainer built its Accelerator; the Trainer's
    real FSDP2 path (accelerate's ``fsdp2_prepare_model``, the optimizer's switch to the sharded parameters, the
    FULL_STATE_DICT save) then runs as it does on GPUs.
    """
    out, ranks = fsdp2
    for r in ranks:
        assert r["fsdp"] and r["sharded"], "the student was not sharded"
        # QAT master weights and their log-scales are DTensor shards like every other parameter
        assert r["sharded_log_scales"] == r["log_scales"] > 0
    assert_same_run(ranks, single)


def test_fsdp2_save_model_gathers_and_writes_int4_on_rank0_only(fsdp2):
    assert_int4_export(*fsdp2)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (optional)")
def test_deepspeed_zero2_matches_single_process(tmp_path, single):
    """ZeRO-2 through the Trainer's ``deepspeed=`` config (DeepSpeed's CPU accelerator uses gloo). About 2 min.

    ZeRO-3 is not covered: it trains, but ``save_model`` cannot pack its partitioned parameters (see
    examples/distributed/README.md).
    """
    ranks = launch(tmp_path, "zero2", per_device=2, save_int4=True)
    assert_same_run(ranks, single)
    assert_int4_export(tmp_path, ranks)


# ----------------------------------------------------------------------------------------- examples/distributed
EXAMPLE = ROOT / "examples" / "distributed"


def example_env() -> dict[str, str]:
    """Offline: any attempt to download would fail the run."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip


def test_example_help_and_required_arguments():
    script = str(EXAMPLE / "train_grace.py")
    done = subprocess.run([sys.executable, script, "--help"], env=example_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for text in ("--student", "--teacher", "--data", "--dry-run", "LLaVA-1.5-7B <- LLaVA-1.5-13B", "fsdp2.yaml"):
        assert text in done.stdout, text
    done = subprocess.run([sys.executable, script], env=example_env(), capture_output=True, text=True)
    assert done.returncode == 2 and "--student, --teacher and --data are required" in done.stderr


def test_example_dry_run_on_two_processes(tmp_path):
    """The launch script end to end under DDP (2 gloo processes): tiny Qwen2-VL pair, gradient checkpointing on."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(EXAMPLE / "train_grace.py"), "--dry-run", "--dry-run-model", "qwen2-vl", "--gradient-checkpointing",
               "--output-dir", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, env=example_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "2 steps on 2 process(es)" in done.stdout
    assert "reloaded Qwen2VLForConditionalGeneration with 14 packed INT4 linears" in done.stdout
    assert (tmp_path / "int4" / "config.json").exists()


def test_example_accelerate_configs_and_fsdp_layer_choice(monkeypatch):
    """Both configs load with accelerate; under an FSDP launch the script names the student's decoder layer class."""
    import importlib.util

    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    ddp_config = load_config_from_file(str(EXAMPLE / "ddp.yaml"))
    fsdp_config = load_config_from_file(str(EXAMPLE / "fsdp2.yaml"))
    assert ddp_config.distributed_type == DistributedType.MULTI_GPU and ddp_config.mixed_precision == "bf16"
    assert fsdp_config.distributed_type == DistributedType.FSDP
    assert fsdp_config.fsdp_config["fsdp_version"] == 2
    assert fsdp_config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"

    spec = importlib.util.spec_from_file_location("train_grace", EXAMPLE / "train_grace.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "False")  # the plugin writes it back to os.environ
    for family, layer in (("llava", "LlamaDecoderLayer"), ("qwen2-vl", "Qwen2VLDecoderLayer")):
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for fsdp2.yaml
        monkeypatch.setenv("FSDP_VERSION", "2")
        monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
        monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP", raising=False)
        example.shard_decoder_layers(tiny_model(family))
        assert FullyShardedDataParallelPlugin().transformer_cls_names_to_wrap == [layer]
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP")
    example.shard_decoder_layers(tiny_model("llava"))  # a DDP launch leaves FSDP settings alone
    assert "FSDP_TRANSFORMER_CLS_TO_WRAP" not in os.environ


def test_example_reads_jsonl_rows_for_the_library_collator(tmp_path):
    """The example's data path: JSON Lines rows with relative image paths -> GraceDataCollator batches whose labels
    are exactly the collated answer rows; a row without an answer is refused with its line number."""
    from grace_quant import GraceDataCollator
    from grace_quant.testing import tiny_processor, tiny_vqa

    spec = importlib.util.spec_from_file_location("train_grace", EXAMPLE / "train_grace.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rows = tiny_vqa(3)
    (tmp_path / "images").mkdir()
    with open(tmp_path / "train.jsonl", "w") as handle:
        for index, row in enumerate(rows):
            row["image"].save(tmp_path / "images" / f"{index}.png")
            handle.write(json.dumps({"image": f"images/{index}.png", "question": row["question"],
                                     "answer": row["answer"]}) + "\n")  # fmt: skip
    dataset = example.JsonlVQA(str(tmp_path / "train.jsonl"))
    collator = GraceDataCollator(tiny_processor("llava"))
    from_file, direct = collator([dataset[i] for i in range(3)]), collator(rows)
    assert from_file.keys() == direct.keys()
    for key in from_file:
        assert torch.equal(from_file[key], direct[key]), key
    (tmp_path / "bad.jsonl").write_text('{"image": "images/0.png", "question": "q"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl, line 1: missing \['answer'\]"):
        example.JsonlVQA(str(tmp_path / "bad.jsonl"))
