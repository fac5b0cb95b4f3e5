"""Smoke runs of the GPU benchmarks on CPU, so that a GPU session does not find a crash on first contact."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """A benchmark script as a module (``benchmarks/`` is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


def test_trainer_step_smoke_runs_every_arm_and_writes_the_issue_json(tmp_path):
    """What ``--smoke`` runs, one step each, minus the compiled-teacher arm (dynamo alone takes ~12 s on this
    Qwen2-VL pair; test_trainer_step_paths.py compiles a teacher); the JSON has exactly the issue's keys."""
    script = load_script("trainer_step")
    smoke = script.parse_args(["--smoke"])
    assert (smoke.size, smoke.steps, smoke.warmup, smoke.arms) == ("small", 1, 1, list(script.ALL_ARMS))
    arms = [arm for arm in script.ALL_ARMS if arm != "grace+tc"]
    out, summary = tmp_path / "step.md", tmp_path / "step.json"
    argv = ["--size", "small", "--steps", "1", "--warmup", "1", "--out", str(out), "--json", str(summary)]
    record = script.main([*argv, "--arms", *arms])
    saved = json.loads(summary.read_text())
    assert saved == record
    assert list(saved) == ["date", "gpu", "plain_ms", "floor_ms", "qat_vs_plain", "grace_vs_floor", "grace_peak_vs_floor"]
    assert saved["gpu"] == "CPU" and saved["grace_peak_vs_floor"] is None  # no peak memory on CPU
    assert saved["plain_ms"] > 0 and saved["floor_ms"] > 0 and saved["qat_vs_plain"] > 0 and saved["grace_vs_floor"] > 0
    table = out.read_text()
    for arm in ("plain", "floor", "qat", "grace", "qat-torch", "grace-torch", "no-kd"):
        assert f"| {arm} |" in table, arm
    assert "grace+liger not run: Liger Kernel's kernels need CUDA" in table
    assert "qat+linear not run: the fused QAT-linear kernels need CUDA" in table and "failed" not in table


def test_trainer_step_profile_adds_one_profiled_step_of_the_named_arm(tmp_path):
    """--profile runs one extra step of the arm under torch.profiler and reports its wall time and heaviest operators
    (on CPU: no device timeline); arms not named get no profile."""
    script = load_script("trainer_step")
    out = tmp_path / "step.md"
    argv = ["--size", "small", "--steps", "1", "--warmup", "0", "--arms", "plain", "qat", "--profile", "qat"]
    script.main([*argv, "--out", str(out), "--json", "none"])
    table = out.read_text()
    assert "## Profile of one qat step" in table and "## Profile of one plain step" not in table
    section = table.split("## Profile of one qat step", 1)[1]
    assert "no device timeline (CPU run)" in section
    assert "aten::" in section and "Self CPU" in section  # torch.profiler's operator table


def test_trainer_step_summary_ratios():
    script = load_script("trainer_step")
    rows = {
        "plain": {"median_s": 0.100, "peak_bytes": 10.0}, "floor": {"median_s": 0.160, "peak_bytes": 20.0},
        "qat": {"median_s": 0.110, "peak_bytes": 9.0}, "grace": {"median_s": 0.200, "peak_bytes": 22.0},
    }  # fmt: skip
    record = script.summary(rows, "GPU X")
    assert record["plain_ms"] == 100.0 and record["floor_ms"] == 160.0
    assert (record["qat_vs_plain"], record["grace_vs_floor"], record["grace_peak_vs_floor"]) == (1.1, 1.25, 1.1)
    assert script.summary({"plain": rows["plain"]}, "GPU X")["grace_vs_floor"] is None


def test_bench_kernels_names_the_kernel_each_tuned_entry_picks(monkeypatch):
    """The per-linear table's "ours path" column names the kernel of the GPU table's entry for the call (a Gluon entry
    was reported as dequantize + cuBLAS before), and the path's heuristic where there is none."""
    import torch

    from grace_quant.kernels import dispatch

    bench = load_script("bench_kernels")
    entries = {
        (600, 22016, 4096): {"wgmma": 1, "block_m": 128, "block_k": 128, "stages": 4, "pipe": 2, "split": 1},
        (256, 4096, 4096): {"wgmma": 1, "block_m": 256, "block_k": 128, "stages": 3, "pipe": 1, "split": 1},
        (2048, 4096, 4096): {"tc": 0},
        (512, 4096, 4096): {"tc": 1, "block_m": 128, "block_n": 128, "block_k": 64, "num_warps": 8, "num_stages": 3},
        (1, 4096, 4096): {"gemv4": 1, "rows": 2, "cols": 4, "warps": 4, "split": 1},
        (2, 4096, 4096): {"block_n": 4, "step_k": 1024, "num_warps": 4, "target_programs_per_sm": 0},
    }
    table = {dispatch.key_for(m, n, k, bench.GROUP, torch.bfloat16): c for (m, n, k), c in entries.items()}
    monkeypatch.setattr(bench.tables, "device_name", lambda device=None: "a GPU")
    monkeypatch.setattr(bench.tables, "table", lambda name: table if name == "a GPU" else {})
    assert bench.path_of(600, 22016, 4096) == "gluon 128-token tile, warp-specialized"
    assert bench.path_of(256, 4096, 4096) == "gluon 256-token tile"
    assert bench.path_of(2048, 4096, 4096) == "deq+cuBLAS"
    assert bench.path_of(512, 4096, 4096) == "tc (tuned)"
    assert bench.path_of(1, 4096, 4096) == "gluon gemv"
    assert bench.path_of(2, 4096, 4096) == "gemv (tuned)"
    assert bench.path_of(1024, 4096, 4096) == "deq+cuBLAS"  # no entry: the large path's heuristic
    assert bench.path_of(16, 4096, 4096) == "tc"


def test_fake_quant_benchmark_runs_both_tables_on_cpu(tmp_path):
    """The per-weight table and the whole-linear table (CUDA-only arms absent on CPU), one call per arm."""
    report = load_script("fake_quant").main(["--steps", "1", "--warmup", "0", "--tokens", "4", "--out", str(tmp_path / "fq.md")])
    assert (tmp_path / "fq.md").read_text() == report
    assert "| weight (out x in) | cast | torch |" in report
    assert "## The whole linear, forward + backward, 4 tokens" in report and "| weight (out x in) | plain | torch |" in report
    assert report.count("| all four |") == 2


@pytest.mark.gpu
def test_trainer_step_runs_every_arm_on_cuda_at_the_small_size(tmp_path):
    """Before the 1b stages: every arm once on the tiny pair (fused fake quant, the fused QAT linear, the
    inductor-compiled teacher, Liger where installed), none failing; in a child process, because Liger patches
    transformers module-wide."""
    out, summary = tmp_path / "step.md", tmp_path / "s.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "trainer_step.py"), "--smoke", "--out", str(out),
               "--json", str(summary)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "failed" not in out.read_text(), out.read_text()
    record = json.loads(summary.read_text())
    assert record["grace_peak_vs_floor"] is not None and record["gpu"] != "CPU"


def test_prefill_benchmark_smoke_run_reports_every_arm(tmp_path):
    """``benchmarks/prefill.py --device cpu --tiny``: both arms and every variant of GRACE's eager path, the report,
    the JSON and the cProfile tables, so the script does not crash on its first GPU contact."""
    command = [
        sys.executable, str(ROOT / "benchmarks" / "prefill.py"), "--device", "cpu", "--tiny", "--models", "llava-1.5-7b",
        "--repeats", "1", "--rounds", "1", "--rows", "5", "--out", str(tmp_path / "p.md"),
        "--json", str(tmp_path / "p.json"), "--log-dir", str(tmp_path),
        "--variants", "jit-runner", "unplanned", "dense-linear", "nodefer",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    arms = json.loads((tmp_path / "p.json").read_text())["models"]["llava-1.5-7b"]
    variants = ("jit-runner", "unplanned", "dense-linear", "nodefer")
    assert set(arms) == {"bf16", "grace", *(f"grace-{kind}" for kind in variants)}
    for r in arms.values():
        assert r["ttft_ms"] > 0 and 0 < r["host_ms"] <= r["forward_ms"]
    assert "generate" in (tmp_path / "prefill_cprofile_llava-1.5-7b_grace.txt").read_text()
    assert "| llava-1.5-7b | grace |" in (tmp_path / "p.md").read_text()


GLUON_BUILDS = (
    ["wgmma", "--block-m", "256", "--stages", "3"],
    ["wgmma", "--block-m", "16", "--stages", "4", "--split"],
    ["wgmma", "--block-m", "128", "--stages", "5", "--ws"],
    ["gemv4", "--tokens", "4", "--split"],
)


@pytest.mark.parametrize("argv", GLUON_BUILDS, ids=[" ".join(a) for a in GLUON_BUILDS])
def test_gluon_kernels_compile_for_hopper_with_the_installed_triton(argv, tmp_path, monkeypatch):
    """The Gluon kernels have no CPU interpreter, and Gluon's API moves between Triton releases (the GPU machine runs
    3.6; ``pip install torch`` brings 3.7-3.9): each compiles for sm_90 with the installed Triton (its own ``ptxas``,
    no GPU), the tile kernels with their ``wgmma`` instructions and without spills."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile now, not a cached binary of other code
    sass_lab = load_script("sass_lab")
    kernel = sass_lab.compile_kernel(sass_lab.parse(argv))
    sass, _ = sass_lab.sass_of(kernel)
    assert "HGMMA" in sass if argv[0] == "wgmma" else "FFMA" in sass
    assert not re.search(r"\b(?:STL|LDL)\b", sass)
