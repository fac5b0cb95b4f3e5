"""The ``grace-quant`` command line: each command end to end in-process, and every user mistake -> exit 2 with
a one-line message on stderr and nothing written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from grace_quant import AutoModelForVision2Seq, GraceConfig, saving_qat_master
from grace_quant.cli import EXIT_INTERRUPTED, EXIT_USER_ERROR, build_parser, main
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
    (root / "empty").mkdir()
    damaged_copies(Path(fp), root)
    names = ("int4", "int8", "awq", "qat", "empty", "trunc", "badheader", "nan", "zero")
    return {"fp": fp, **{name: str(root / name) for name in names}}


NAN_LAYER = "model.language_model.layers.0.self_attn.q_proj"


def damaged_copies(fp: Path, root: Path) -> None:
    """Copies of the fp folder whose model.safetensors is truncated, has a corrupted header, or holds a NaN weight."""
    for name in ("trunc", "badheader", "nan", "zero"):
        shutil.copytree(fp, root / name)
    data = (fp / "model.safetensors").read_bytes()
    (root / "trunc/model.safetensors").write_bytes(data[: len(data) // 2])
    (root / "badheader/model.safetensors").write_bytes(data[:8] + b"{garbage" + data[16:])
    with safe_open(fp / "model.safetensors", framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(fp / "model.safetensors")
    key = next(k for k in tensors if k.endswith("layers.0.self_attn.q_proj.weight"))
    tensors[key][3, 40] = 0.0  # the reference for --allow-nonfinite
    save_file(tensors, root / "zero/model.safetensors", metadata=metadata)
    tensors[key][3, 40] = float("nan")  # row 3, group 1 of 2 (group size 32)
    save_file(tensors, root / "nan/model.safetensors", metadata=metadata)


def digest(folders: dict[str, str]) -> str:
    """One hash over every file of every fixture folder: a command that fails must change none of them."""
    sha = hashlib.sha256()
    for folder in sorted(set(folders.values())):
        for path in sorted(Path(folder).rglob("*")):
            sha.update(str(path).encode() + (path.read_bytes() if path.is_file() else b"/"))
    return sha.hexdigest()


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
    "source has no config.json": (["export", "{empty}", "{out}", "--format", "awq"], "has no config.json"),
    "quantize an already quantized folder": (["quantize", "{int4}", "{out}"], "is already quantized"),
    "bad group size": (["quantize", "{fp}", "{out}", "--group-size", "12"], "must be a multiple of 8"),
    "group size that does not divide a layer": (
        ["quantize", "{fp}", "{out}", "--group-size", "128"],
        "does not divide",
    ),
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
    # issue #13
    "truncated safetensors": (
        ["quantize", "{trunc}", "{out}", "--group-size", "32"],
        "trunc/model.safetensors is not a readable safetensors file (Error while deserializing header: incomplete "
        "metadata, file not fully covered): it is truncated or corrupted",
    ),
    "header-corrupted safetensors": (
        ["quantize", "{badheader}", "{out}", "--group-size", "32"],
        "badheader/model.safetensors is not a readable safetensors file (Error while deserializing header: invalid "
        "JSON in header",
    ),
    "eval --limit -1": (
        ["eval", "{int4}", "--dataset", "{empty}", "--limit", "-1"],
        "argument --limit: must be a positive integer (1 or more), got -1 (see 'grace-quant eval --help')",
    ),
    "eval --limit 0": (["eval", "{int4}", "--dataset", "{empty}", "--limit", "0"], "--limit: must be a positive"),
    "eval --batch-size 0": (
        ["eval", "{int4}", "--dataset", "{empty}", "--batch-size", "0"],
        "argument --batch-size: must be a positive integer (1 or more), got 0",
    ),
    "eval --output in a missing folder": (
        ["eval", "{int4}", "--dataset", "{empty}", "--output", "{tmp}/missing/dir/res.json"],
        "the parent folder of {tmp}/missing/dir/res.json does not exist",
    ),
    "eval --output inside the model folder": (
        ["eval", "{int4}", "--dataset", "{empty}", "--output", "{int4}/res.json"],
        "the output {int4}/res.json lies inside the source {int4}",
    ),
    "NaN weights": (
        ["quantize", "{nan}", "{out}", "--group-size", "32"],
        f"layer '{NAN_LAYER}': its weight holds 1 NaN/inf value(s) of 4096",
    ),
    "--skip of a module that does not exist": (
        ["quantize", "{fp}", "{out}", "--group-size", "32", "--skip", "no.such.module"],
        "modules_to_not_convert (--skip) entry 'no.such.module' matches no module of LlavaForConditionalGeneration",
    ),
    "quantize OUT onto its own source": (
        ["quantize", "{fp}", "{fp}", "--group-size", "32", "--overwrite"],
        "the output {fp} is the source {fp} itself",
    ),
    "quantize OUT inside its source": (
        ["quantize", "{fp}", "{fp}/sub", "--group-size", "32"],
        "the output {fp}/sub lies inside the source {fp}",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_user_mistakes_exit_2_with_one_line(case, folders, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GQ_UNSET_VAR", raising=False)
    argv, phrase = BAD_INPUTS[case]
    before, sources = {p.name for p in tmp_path.iterdir()}, digest(folders)
    argv = [a.format(tmp=tmp_path, out=tmp_path / "out", **folders) for a in argv]
    assert main(argv) == EXIT_USER_ERROR
    captured = capsys.readouterr()
    lines = [line for line in captured.err.strip().splitlines() if "it/s]" not in line]  # progress bars share stderr
    assert len(lines) == 1 and lines[0].startswith(f"grace-quant {argv[0]}: error: "), captured.err
    assert phrase.format(tmp=tmp_path, **folders) in lines[0] and "Traceback" not in captured.err
    assert {p.name for p in tmp_path.iterdir()} == before  # nothing written, no temp folder left
    assert digest(folders) == sources  # no source folder changed either


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
    assert main(["tune", folders["int4"], "--tokens", "1,16,100"]) == 0  # three buckets: every path, quickly
    first = capsys.readouterr().out
    cached = next((tmp_path / "cache" / "kernels").glob("*.json"))
    shipped = tables.SHIPPED_DIR / cached.name  # the cache holds this GPU's shipped table too, where one exists
    shipped_keys = set(json.loads(shipped.read_text())["configs"]) if shipped.exists() else set()
    new = set(json.loads(cached.read_text())["configs"]) - shipped_keys
    assert new and first.startswith(f"{len(new)} new kernel configurations")
    assert {key.split("|")[1] for key in new} == {"1", "16", "128"}
    again = main(["tune", folders["int4"], "--tokens", "1,16,100"])
    assert again == 0 and capsys.readouterr().out.startswith("0 new kernel configurations")
    tables.reset()


def test_tune_tokens_must_be_positive_counts(capsys):
    assert main(["tune", "x", "--tokens", "1,0"]) == EXIT_USER_ERROR
    assert "must be a positive integer (1 or more), got 0" in capsys.readouterr().err
    (sub,) = [a for a in build_parser()._actions if a.dest == "command"]
    assert sub.choices["tune"].parse_args(["x", "--tokens", "1, 8,512"]).tokens == [1, 8, 512]


def test_usage_errors_exit_2(capsys):
    assert main(["export", "a", "b"]) == EXIT_USER_ERROR  # --format missing: argparse's own message
    assert "--format" in capsys.readouterr().err
    assert main([]) == EXIT_USER_ERROR


def test_parser_has_one_subcommand_per_function():
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if a.dest == "command"]
    assert set(subparsers.choices) == {"quantize", "export", "import-awq", "push", "demo", "eval", "ablate", "tune"}
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


# ------------------------------------------------------------------------------------------------- issue #13
def test_overwrite_never_replaces_a_folder_around_the_source(folders, tmp_path, capsys):
    outer = tmp_path / "outer"
    shutil.copytree(folders["int4"], outer / "src")
    before = digest({"outer": str(outer)})
    assert main(["export", str(outer / "src"), str(outer), "--format", "awq", "--overwrite"]) == EXIT_USER_ERROR
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"grace-quant export: error: the output {outer} contains the source {outer / 'src'}; replacing it would "
        f"delete the source; choose an output outside {outer / 'src'}"
    )
    assert digest({"outer": str(outer)}) == before


def test_allow_nonfinite_quantizes_nan_as_zero(folders, tmp_path):
    assert main(["quantize", folders["nan"], str(tmp_path / "nan"), "--group-size", GROUP, "--allow-nonfinite"]) == 0
    assert main(["quantize", folders["zero"], str(tmp_path / "zero"), "--group-size", GROUP]) == 0
    config = json.loads((tmp_path / "nan/config.json").read_text())["quantization_config"]
    assert "allow_nonfinite" not in config  # a loading policy, not a property of the checkpoint
    nan, zero = (load_file(tmp_path / name / "model.safetensors") for name in ("nan", "zero"))
    assert nan.keys() == zero.keys() and all(torch.equal(nan[k], zero[k]) for k in nan)  # as if the NaN were 0


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_folders_get_the_umask_permissions(folders, tmp_path, umask):
    previous = os.umask(umask)
    try:
        assert main(["export", folders["int4"], str(tmp_path / "ct"), "--format", "compressed-tensors"]) == 0
        assert main(["quantize", folders["fp"], str(tmp_path / "q"), "--group-size", GROUP]) == 0
    finally:
        os.umask(previous)
    for name in ("ct", "q"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o777 & ~umask  # as save_pretrained's own folders


def test_ctrl_c_during_export_leaves_the_old_output_as_it_was(folders, tmp_path, capsys, monkeypatch):
    from grace_quant.integrations import awq

    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(awq, "convert_shards", interrupted)
    code = main(["export", folders["int4"], str(out), "--format", "awq", "--overwrite"])
    assert code == EXIT_INTERRUPTED
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"grace-quant export: interrupted; nothing was written to {out}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "mine.txt").read_text() == "keep me"
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


INTERRUPT_SCRIPT = """
import importlib.abc, os, signal, sys
# Ctrl-C as in a terminal: a child of a background job starts with SIGINT ignored, and Python then leaves it so
signal.signal(signal.SIGINT, signal.default_int_handler)
class CtrlC(importlib.abc.MetaPathFinder):  # presses Ctrl-C the moment the command starts importing torch
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, CtrlC())
from grace_quant.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", ["quantize", "export"])
def test_ctrl_c_while_the_command_imports_torch(folders, tmp_path, command):
    """A real SIGINT while torch loads (the first seconds of every command): one line, exit 130, nothing written."""
    src, extra = (
        (folders["fp"], ["--group-size", GROUP]) if command == "quantize" else (folders["int4"], ["--format", "awq"])
    )
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-c", INTERRUPT_SCRIPT, command, src, str(out), *extra],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == EXIT_INTERRUPTED, result.stderr
    assert result.stderr.strip().splitlines() == [f"grace-quant {command}: interrupted; nothing was written to {out}"]
    assert list(tmp_path.iterdir()) == []


HELP_SCRIPT = """
import contextlib, io, json, sys
from grace_quant.cli import COMMANDS, build_parser, main
(sub,) = [a for a in build_parser()._actions if a.dest == "command"]
codes = []
for argv in [["--help"], ["--version"], *[[name, "--help"] for name in sub.choices]]:
    with contextlib.redirect_stdout(io.StringIO()):
        codes.append(main(argv))
print(json.dumps({"codes": codes, "commands": len(sub.choices),
                  "heavy": sorted(m for m in ("torch", "transformers", "safetensors", "datasets") if m in sys.modules)}))
"""


def test_help_imports_neither_torch_nor_transformers():
    """``--help`` of every command answers at once: parsing imports none of the heavy packages."""
    result = subprocess.run([sys.executable, "-c", HELP_SCRIPT], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["codes"] == [0] * (2 + report["commands"]) and report["commands"] == 8
    assert report["heavy"] == []


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
