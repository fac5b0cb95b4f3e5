"""Smoke runs of the GPU benchmarks on CPU, so that a GPU session does not find a crash on first contact."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """A benchmark script as a module (``benchmarks/`` is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trainer_step_smoke_runs_every_arm_and_writes_the_issue_json(tmp_path, monkeypatch):
    """``--smoke``: every arm that can run on CPU, one step each (the compiled-teacher arm on dynamo's eager
    backend: inductor would take ~30 s here); the JSON has exactly the issue's keys, computed from the arms."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="eager", **kw))
    script = load_script("trainer_step")
    out, summary = tmp_path / "step.md", tmp_path / "step.json"
    try:
        record = script.main(["--smoke", "--out", str(out), "--json", str(summary)])
    finally:
        torch._dynamo.reset()
    saved = json.loads(summary.read_text())
    assert saved == record
    assert list(saved) == ["date", "gpu", "plain_ms", "floor_ms", "qat_vs_plain", "grace_vs_floor", "grace_peak_vs_floor"]
    assert saved["gpu"] == "CPU" and saved["grace_peak_vs_floor"] is None  # no peak memory on CPU
    assert saved["plain_ms"] > 0 and saved["floor_ms"] > 0 and saved["qat_vs_plain"] > 0 and saved["grace_vs_floor"] > 0
    table = out.read_text()
    for arm in ("plain", "floor", "qat", "grace", "qat-torch", "grace-torch", "no-kd", "grace+tc"):
        assert f"| {arm} |" in table, arm
    assert "grace+liger not run: Liger Kernel's kernels need CUDA" in table


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
