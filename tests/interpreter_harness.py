"""Shared plumbing of the ``*_interpret`` tests: kernel cases run under Triton's CPU interpreter in a child process.

``TRITON_INTERPRET=1`` has to be set before triton is imported, so each test file runs itself as a script in a
child process with the variable set; the child prints one ``RESULT {json}`` line per case and the tests read them.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def emit(case_id: str, result: dict) -> None:
    """Report one case from the child process."""
    print("RESULT " + json.dumps({"id": case_id, **result}), flush=True)


def run_jobs(jobs: list[tuple[str, Callable[[], dict]]]) -> None:
    """In the child: run each ``(case id, job)`` and report its result, or the error it raised (the test then
    fails with that message instead of the whole child dying at the first failing case)."""
    for case_id, job in jobs:
        try:
            result = job()
        except Exception as exc:  # noqa: BLE001
            result = {"error": f"{type(exc).__name__}: {exc}"}
        emit(case_id, result)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2] if part.isdigit())


def skip_unless_interpreter_works() -> None:
    """Skip (with the fix) where Triton's interpreter cannot run loops over runtime integers: triton 3.6 with
    NumPy >= 2.3 raises "only 0-dimensional arrays can be converted to Python scalars" (triton 3.9 is fine)."""
    pytest = importlib.import_module("pytest")
    triton = pytest.importorskip("triton")
    numpy = importlib.import_module("numpy")
    if _version(triton.__version__) < (3, 9) and _version(numpy.__version__) >= (2, 3):
        pytest.skip(
            f"Triton {triton.__version__}'s interpreter fails on NumPy {numpy.__version__}: "
            "use triton>=3.9 or numpy<2.3 to run the interpreter tests"
        )


def run_interpreted(test_file: str, **extra_env: str) -> dict[str, dict]:
    """Run ``test_file`` as a script under the interpreter; ``{case id: result}`` from its ``RESULT`` lines."""
    skip_unless_interpreter_works()
    env = dict(
        os.environ,
        TRITON_INTERPRET="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        **extra_env,
    )
    proc = subprocess.run(
        [sys.executable, "-W", "ignore::RuntimeWarning", str(Path(test_file).resolve())],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            record = json.loads(line[len("RESULT ") :])
            results[record.pop("id")] = record
    return results


def result_for(results: dict[str, dict], case_id: str) -> dict:
    """One case's result; fails with the child's error message if the case raised."""
    record = results.get(case_id)
    assert record is not None, f"no result for {case_id}"
    assert "error" not in record, record.get("error")
    return record


def grace_step(name: str, backend: str, autocast: bool = False, grouped: bool = False) -> tuple[Any, dict[str, Any]]:
    """``(loss, {parameter: gradient})`` of one ``GraceTrainer`` micro-batch (CE, gated DKD, RCKA from the first step)
    on the tiny ``name`` pair (student seed 0, 96-wide teacher seed 1) with ``fake_quant_backend=backend`` and
    ``fake_quant_grouped=grouped``, under CPU bf16 autocast when ``autocast``: the same weights and batch for every
    backend."""
    import tempfile

    import torch

    from grace_quant import GraceConfig, GraceTrainer, GraceTrainingArguments, quantize_model
    from grace_quant.labels import next_token_mask
    from grace_quant.testing import collate, tiny_dataset, tiny_model

    student = quantize_model(tiny_model(name), GraceConfig(group_size=32))
    args = GraceTrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to=[], rcka_warmup_steps=0,
                                  fake_quant_backend=backend, fake_quant_grouped=grouped)  # fmt: skip
    trainer = GraceTrainer(model=student, teacher_model=tiny_model(name, seed=1, hidden=96), args=args)
    batch = collate(tiny_dataset(student, 2))
    student.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = trainer.compute_loss(student, batch, num_items_in_batch=next_token_mask(batch["labels"]).sum())
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
