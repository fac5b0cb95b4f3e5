"""The ``grace-quant`` command line: each command end to end in-process, and every user mistake -> exit 2 with
a one-line message on stderr and nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from grace_quant import AutoModelForVision2Seq, GraceConfig, saving_qat_master
from grace_quant.cli import EXIT_USER_ERROR, build_parser, main
from grace_quant.testing import tiny_inputs

GROUP = "32"


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_inputs(model)).logits


@pytest.fixture(scope="module")
def folders(fp_checkpoint, tmp_path_factory):
    """fp, packed int4 (fp16) and int8 (via the CLI), AWQ and qat-master folders of the tiny LLaVA."""
    root = tmp_path_factory.mktemp("cli")
    fp = fp_checkpoint("llava")
    assert main(["quantize", fp, str(root / "int4"), "--group-size", GROUP, "--dtype", "float16"]) == 0
    assert main(["quantize", fp, str(root / "int8"), "--bits", "8", "--group-size", GROUP]) == 0
    assert main(["export", str(root / "int4"), str(root / "awq"), "--format", "awq"]) == 0
    qat = AutoModelForVision2Seq.from_pretrained(fp, quantization_config=GraceConfig(group_size=32))
    with saving_qat_master(qat):
        qat.save_pretrained(root / "qat")
    names = ("int4", "int8", "awq", "qat")
    return {"fp": fp, **{name: str(root / name) for name in names}}


def test_quantize_writes_what_from_pretrained_packs(folders):
    expected = AutoModelForVision2Seq.from_pretrained(
        folders["fp"], quantization_config=GraceConfig(group_size=32, mode="packed"), dtype=torch.float16
    )
    written = AutoModelForVision2Seq.from_pretrained(folders["int4"])
    assert written.config.quantization_config.group_size == 32
    assert torch.equal(logits(written), logits(expected))


def test_quantize_skip_options(fp_checkpoint, tmp_path):
    fp = fp_checkpoint("llava")
    argv = ["quantize", fp, str(tmp_path / "all"), "--group-size", GROUP, "--quantize-all", "--skip", "lm_head"]
    assert main(argv) == 0
    skip = json.loads((tmp_path / "all/config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert skip == ["lm_head"]
    tensors = load_file(tmp_path / "all/model.safetensors")
    assert any(k.startswith("vision_tower.") and k.endswith(".scales") for k in tensors)  # the tower is INT4 too


def test_export_and_import_awq_round_trip(folders, tmp_path, capsys):
    assert main(["import-awq", folders["awq"], str(tmp_path / "back")]) == 0
    a, b = load_file(f"{folders['int4']}/model.safetensors"), load_file(tmp_path / "back/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["export", folders["int4"], str(tmp_path / "ct"), "--format", "compressed-tensors"]) == 0
    config = json.loads((tmp_path / "ct/config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert "wrote compressed-tensors checkpoint" in capsys.readouterr().out


def test_lossy_awq_export_warns_on_one_line(fp_checkpoint, tmp_path, capsys):
    fp32 = tmp_path / "fp32-int4"
    assert main(["quantize", fp_checkpoint("llava"), str(fp32), "--group-size", GROUP]) == 0
    capsys.readouterr()
    assert main(["export", str(fp32), str(tmp_path / "awq"), "--format", "awq"]) == 0
    messages = [line for line in capsys.readouterr().err.splitlines() if line.startswith("grace-quant")]
    assert len(messages) == 1 and messages[0].startswith("grace-quant export: warning: AWQ stores scales in fp16")


def test_overwrite_replaces_the_output_folder(folders, tmp_path):
    out = tmp_path / "ct"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert main(["export", folders["int4"], str(out), "--format", "compressed-tensors", "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]  # no temp folders left behind


BAD_INPUTS = {
    "missing source folder": (["quantize", "{tmp}/nope", "{out}"], "is not a folder"),
    "source has no config.json": (["export", "{tmp}", "{out}", "--format", "awq"], "has no config.json"),
    "quantize an already quantized folder": (["quantize", "{int4}", "{out}"], "is already quantized"),
    "bad group size": (["quantize", "{fp}", "{out}", "--group-size", "12"], "must be a multiple of 8"),
    "group size that does not divide a layer": (["quantize", "{fp}", "{out}", "--group-size", "128"], "does not divide"),
    "export a full-precision folder": (["export", "{fp}", "{out}", "--format", "awq"], "is not a GRACE checkpoint"),
    "AWQ export of 8 bits": (["export", "{int8}", "{out}", "--format", "awq"], "needs a 4-bit"),
    "compressed-tensors export of 8 bits": (
        ["export", "{int8}", "{out}", "--format", "compressed-tensors"],
        "needs a 4-bit",
    ),
    "export a training checkpoint": (["export", "{qat}", "{out}", "--format", "awq"], "training checkpoint"),
    "output exists": (["export", "{int4}", "{int8}", "--format", "awq"], "already exists"),
    "output parent missing": (["export", "{int4}", "{tmp}/a/b", "--format", "awq"], "parent folder"),
    "import-awq of a GRACE folder": (["import-awq", "{int4}", "{out}"], "is not an AWQ checkpoint"),
    "push a full-precision folder": (["push", "{fp}", "org/x"], "is not a GRACE checkpoint"),
    "push with an unset token variable": (["push", "{int4}", "org/x", "--token-env", "GQ_UNSET_VAR"], "is not set"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_user_mistakes_exit_2_with_one_line(case, folders, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GQ_UNSET_VAR", raising=False)
    argv, phrase = BAD_INPUTS[case]
    before = {p.name for p in tmp_path.iterdir()}
    argv = [a.format(tmp=tmp_path, out=tmp_path / "out", **folders) for a in argv]
    assert main(argv) == EXIT_USER_ERROR
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"grace-quant {argv[0]}: error: "), captured.err
    assert phrase in lines[0] and "Traceback" not in captured.err
    assert {p.name for p in tmp_path.iterdir()} == before  # nothing written, no temp folder left


def test_warnings_print_as_one_line_each(folders, tmp_path, capsys):
    assert main(["quantize", folders["fp"], str(tmp_path / "g16"), "--group-size", "16"]) == 0
    err = capsys.readouterr().err  # progress bars share stderr
    lines = [line for line in err.replace("\r", "\n").splitlines() if "warning" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("grace-quant quantize: warning: GraceConfig(group_size=16)"), err
    assert "(32, 64, 128)" in lines[0] and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a GPU")
def test_tune_without_a_gpu_says_where_to_run_it(folders, capsys):
    assert main(["tune", folders["int4"]]) == EXIT_USER_ERROR
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("grace-quant tune: error: ") and "CUDA GPU" in line and "serve the model" in line


@pytest.mark.gpu
def test_tune_fills_this_gpus_table_once(folders, tmp_path, monkeypatch, capsys):
    from grace_quant.kernels import tables

    monkeypatch.setenv(tables.CACHE_ENV, str(tmp_path / "cache"))
    tables.reset()
    assert main(["tune", folders["fp"]]) == EXIT_USER_ERROR  # nothing to tune in a full-precision folder
    assert "no packed INT4 layers" in capsys.readouterr().err
    assert main(["tune", folders["int4"]]) == 0
    first = capsys.readouterr().out
    table = json.loads(next((tmp_path / "cache" / "kernels").glob("*.json")).read_text())
    assert table["configs"] and str(len(table["configs"])) in first
    assert main(["tune", folders["int4"]]) == 0 and capsys.readouterr().out.startswith("0 new kernel configurations")
    tables.reset()


def test_usage_errors_exit_2(capsys):
    assert main(["export", "a", "b"]) == EXIT_USER_ERROR  # --format missing: argparse's own message
    assert "--format" in capsys.readouterr().err
    assert main([]) == EXIT_USER_ERROR


def test_parser_has_one_subcommand_per_function():
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if a.dest == "command"]
    assert set(subparsers.choices) == {"quantize", "export", "import-awq", "push", "demo", "eval", "tune"}
    for name, sub in subparsers.choices.items():
        assert sub.get_default("func").__name__ == f"run_{name.replace('-', '_')}"
        assert "example:" in sub.format_help()


def test_python_m_grace_quant_help():
    result = subprocess.run(
        [sys.executable, "-m", "grace_quant", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for command in ("quantize", "export", "import-awq", "push"):
        assert command in result.stdout
    assert "examples:" in result.stdout


def test_eval_lmms_without_the_extra_names_the_install_command(folders, capsys, monkeypatch):
    """Where lmms-eval is not installed (simulated here, so the check runs in every environment)."""
    import grace_quant.integrations

    for name in ["lmms_eval", *(n for n in sys.modules if n.startswith("lmms_eval."))]:
        monkeypatch.setitem(sys.modules, name, None)  # import lmms_eval(.x) -> ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "grace_quant.integrations.lmms", raising=False)
    monkeypatch.delattr(grace_quant.integrations, "lmms", raising=False)
    assert main(["eval", folders["int4"], "--lmms-tasks", "mme"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'grace-quant[lmms]'" in err, err


def test_eval_needs_a_dataset_or_lmms_tasks(folders, capsys):
    assert main(["eval", folders["int4"]]) == EXIT_USER_ERROR
    assert "--dataset" in capsys.readouterr().err
    assert main(["eval", folders["int4"], "--dataset", folders["int4"], "--lmms-include", "x"]) == EXIT_USER_ERROR
    assert "give --lmms-tasks too" in capsys.readouterr().err
