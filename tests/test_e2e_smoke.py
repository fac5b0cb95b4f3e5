"""``benchmarks/e2e.py --device cpu --tiny``: every code path of the end-to-end benchmark (arms, eager checks, the
tight loop, the host tweaks, the markdown and the JSON in the issue's format) on tiny models, so the script does not
crash on its first GPU contact."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"model", "arm", "batch", "decode_vs_bf16", "ttft_vs_bf16", "peak_vs_bf16"}


def test_e2e_smoke_run_writes_the_issue_format(tmp_path):
    command = [
        sys.executable, str(ROOT / "benchmarks" / "e2e.py"), "--device", "cpu", "--tiny", "--new-tokens", "4",
        "--repeats", "1", "--arms", "bf16", "bf16-grace-attn", "grace", "grace-loop", "grace-nodefer", "--batches", "1", "2", "--host-tweaks",
        "--out", str(tmp_path / "e2e.md"), "--json", str(tmp_path / "e2e.json"), "--log-dir", str(tmp_path),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "e2e.json").read_text())
    assert set(summary) == {"date", "gpu", "rows"} and summary["gpu"].startswith("cpu")
    assert len(summary["rows"]) == 2 * 5 * 2 and all(set(row) == ROW_KEYS for row in summary["rows"])
    for row in summary["rows"]:
        if row["arm"] == "bf16":
            assert row["decode_vs_bf16"] == row["ttft_vs_bf16"] == 1.0
        assert row["decode_vs_bf16"] is not None and row["ttft_vs_bf16"] is not None  # CPU timings: noise
    raw = json.loads((tmp_path / "e2e_raw.json").read_text())
    for name, per_arm in raw["models"].items():
        for arm, rows in per_arm.items():
            for r in rows["batches"]:
                assert "error" not in r and "eager_error" not in r and "tight_error" not in r, (name, arm, r)
                assert r["attention"] == ("sdpa" if arm == "bf16" else "grace_decode"), (name, arm, r)
                # tokens: compiled (here: the static-cache run) = eager, and our tight loop = generate
                assert r["first_mismatch_eager_static"] is None and r["tight_first_mismatch"] is None, (name, arm, r)
    assert "| llava-1.5-7b | grace | grace_decode | 2 |" in (tmp_path / "e2e.md").read_text()
    merged = tmp_path / "merged.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "e2e.py"), "--merge-json", str(merged)]
    proc = subprocess.run(
        [*command, str(tmp_path / "e2e.json"), str(tmp_path / "e2e.json")], cwd=tmp_path, env=env, capture_output=True
    )
    assert proc.returncode == 0 and len(json.loads(merged.read_text())["rows"]) == 2 * len(summary["rows"])


def _e2e_module():
    spec = importlib.util.spec_from_file_location("bench_e2e", ROOT / "benchmarks" / "e2e.py")  # a script, no package
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_timed_calls_alternate_the_calls_round_by_round_after_a_collection():
    e2e = _e2e_module()
    e2e.Setup.device = "cpu"
    order, collected = [], []
    gc.callbacks.append(lambda phase, info: collected.append(phase == "start" and info["generation"] == 2))
    try:
        times, gc_ms = e2e.timed_calls({key: (lambda key=key: order.append(key)) for key in ("a", "b", "c")}, 3)
    finally:
        gc.callbacks.pop()
    assert order == ["a", "b", "c"] * 3  # round by round, never one series after another
    assert sum(collected) >= 9  # a full collection before each timed call
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3} and set(gc_ms) == {"a", "b", "c"}


def test_e2e_interleaved_run_measures_every_arm_and_batch(tmp_path):
    command = [
        sys.executable, str(ROOT / "benchmarks" / "e2e.py"), "--device", "cpu", "--tiny", "--new-tokens", "4",
        "--repeats", "2", "--arms", "bf16", "grace", "grace-loop", "--batches", "1", "2", "--interleave",
        "--models", "qwen2-vl-2b", "--out", str(tmp_path / "e2e.md"), "--json", str(tmp_path / "e2e.json"),
        "--log-dir", str(tmp_path),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "e2e.json").read_text())["rows"]
    assert sorted((r["arm"], r["batch"]) for r in rows) == sorted(
        (arm, batch) for arm in ("bf16", "grace", "grace-loop") for batch in (1, 2)
    )
    assert all(r["decode_vs_bf16"] is not None for r in rows)  # peak: CUDA's allocator only (none here)
    raw = json.loads((tmp_path / "e2e_raw.json").read_text())["models"]["qwen2-vl-2b"]
    for arm, per in raw.items():
        for r in per["batches"]:
            assert "error" not in r and "eager_error" not in r and "tight_error" not in r, (arm, r)
            assert len(r["full_calls_ms"]) == len(r["ttft_calls_ms"]) == 2 and r["first_mismatch_eager_static"] is None


class FakeAllocator:
    """CUDA's allocator counters for arms that hold and allocate known byte counts."""

    def __init__(self):
        self.now = self.peak = 0

    def take(self, n: int) -> None:
        self.now += n
        self.peak = max(self.peak, self.now)

    def reset(self) -> None:
        self.peak = self.now


def test_interleaved_peak_is_what_a_process_with_that_arm_alone_would_report(monkeypatch):
    """Arm A holds 100 bytes of weights, its warm-up adds a 10-byte cache, each call peaks 50 bytes above; arm B:
    30, 5, 7. Alone, a process would peak at 160 and 42 bytes; both resident, the interleaved run must say the same."""
    e2e = _e2e_module()
    e2e.Setup.device = "cpu"  # no CUDA synchronisation; the allocator's counters are faked below
    mem = FakeAllocator()
    cost = {"A": (10, 50), "B": (5, 7)}
    monkeypatch.setattr(e2e, "allocated_bytes", lambda: mem.now)
    monkeypatch.setattr(e2e, "peak_bytes", lambda: mem.peak)
    monkeypatch.setattr(e2e, "reset_peak", mem.reset)
    monkeypatch.setattr(e2e, "warm_up", lambda arm, batch, new: (mem.take(cost[arm][0]), None, None))

    def generate(arm, inputs, new_tokens):
        mem.take(cost[arm][1])  # activations, freed when the call returns
        mem.now -= cost[arm][1]

    monkeypatch.setattr(e2e, "generate", generate)
    monkeypatch.setattr(e2e, "timing_row", lambda *args: {})
    monkeypatch.setattr(e2e, "add_checks", lambda row, *args: row)
    mem.take(100)
    mem.take(30)
    resident = {"A": 100, "B": 30}
    rows = e2e.measure_interleaved({"A": "A", "B": "B"}, resident, 1, 4, 2)
    assert {arm: row["peak_gib"] * 2**30 for arm, row in rows.items()} == {"A": 160, "B": 42}
    assert resident == {"A": 110, "B": 35}


def test_ttft_lab_cpu_smoke_run_reports_both_loops():
    """``benchmarks/ttft_lab.py`` runs on e2e.py's helpers: a tiny CPU run prints both loops' one-token calls."""
    command = [sys.executable, str(ROOT / "benchmarks" / "ttft_lab.py"), "--device", "cpu", "--quick", "--rounds", "2"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("nothing compiled:", "after "))]
    assert len(lines) == 2 and all("'loop': 'median" in line and "'fast': 'median" in line for line in lines), lines
