"""Fused gated-DKD Triton kernel on CPU under Triton's interpreter, checked against fp64 references.

``TRITON_INTERPRET=1`` must be set before triton is imported, so the kernel runs in a subprocess that executes
this file as a script; the tests read its per-case results. The reference is the torch ``decoupled_kd`` and
``entropy_gate`` in fp64 with autograd gradients, on the same (rounded) logits. A GPU test at the bottom compares
the fused and torch paths of ``gated_dkd_loss`` at Qwen's vocabulary size.
"""

from __future__ import annotations

import importlib
import math
import os
from pathlib import Path

import pytest
import torch
from interpreter_harness import result_for, run_interpreted, run_jobs

ROOT = Path(__file__).resolve().parents[1]
# relative L2 error of the gradient: fp32 maths, rounded once to the gradient's dtype (the interpreter
# truncates fp32 -> bf16 where the GPU rounds to nearest, hence bf16's looser bound)
GRAD_TOL = {"float32": 2e-5, "float16": 1e-3, "bfloat16": 1e-2}
TERM_RTOL, TERM_ATOL = 1e-5, 1e-6  # per-row L, TCKD, NCKD, g: fp32 maths on inputs that are exact in fp64


# (id, vocab, student dtype, teacher dtype, temperature, gate, block_v, special)
KERNEL_CASES = [
    ("v1000-fp32-T2-gate-b256", 1000, "float32", "float32", 2.0, True, 256, None),
    ("v4099-fp32-T1-nogate-b1024", 4099, "float32", "float32", 1.0, False, 1024, None),
    ("v4099-fp16-T2-gate-b512", 4099, "float16", "float16", 2.0, True, 512, None),
    ("v1000-fp16-fp32teacher-T1-gate", 1000, "float16", "float32", 1.0, True, 256, None),
    ("v4099-bf16-T2-gate", 4099, "bfloat16", "bfloat16", 2.0, True, 1024, None),
    ("v1000-bf16-fp16teacher-T2-nogate", 1000, "bfloat16", "float16", 2.0, False, 128, None),
    ("v1000-fp32-T1-peaked-gate", 1000, "float32", "float32", 1.0, True, 256, "peaked"),
    ("v4099-fp32-T2-peaked-nogate", 4099, "float32", "float32", 2.0, False, 1024, "peaked"),
    ("v1000-fp16-T1-peaked-gate", 1000, "float16", "float16", 1.0, True, 512, "peaked"),
    ("v1000-fp32-T2-neginf-gate", 1000, "float32", "float32", 2.0, True, 256, "neginf"),
]
NUM_ROWS, NUM_SELECTED = 16, 9
NAN_ROW = 2  # index into the selected rows of the NaN-teacher case


def _selection(gen: torch.Generator, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scattered, unordered rows (not contiguous) and their targets."""
    rows = torch.randperm(NUM_ROWS, generator=gen)[:NUM_SELECTED]
    return rows, torch.randint(0, vocab, (NUM_SELECTED,), generator=gen)


def _logits(gen, vocab, s_dtype, t_dtype, rows, target, special):
    s = 3 * torch.randn(NUM_ROWS, vocab, generator=gen, dtype=torch.float64)
    t = 3 * torch.randn(NUM_ROWS, vocab, generator=gen, dtype=torch.float64)
    if special == "peaked":  # p_y -> 1 for the student, the teacher, both; a teacher certain of another class
        r, y = rows, target
        s[r[0], y[0]] += 40.0
        t[r[1], y[1]] += 40.0
        s[r[2], y[2]] += 40.0
        t[r[2], y[2]] += 40.0
        t[r[3], (y[3] + 1) % vocab] += 40.0
        s[r[4], (y[4] + 7) % vocab] += 40.0
        t[r[5], y[5]] += 200.0  # pT(y) == 1 in fp32: 1 - pT(y) underflows
    if special == "neginf":  # padded vocabulary entries at -inf in both
        t[:, -37:] = float("-inf")
        s[:, -37:] = float("-inf")
        target = target % (vocab - 37)
    return s.to(getattr(torch, s_dtype)), t.to(getattr(torch, t_dtype)), target


def _reference(s_rows: torch.Tensor, t_rows: torch.Tensor, target, temperature, gate):
    """fp64 per-row (L, TCKD, NCKD, g) and d(g L)/ds by autograd, from the torch losses."""
    from grace_quant.losses import decoupled_kd, entropy_gate

    s64 = s_rows.double().requires_grad_()
    t64 = t_rows.double()
    tckd, nckd, loss = decoupled_kd(s64, t64, target, temperature, 1.0, 4.0)
    g = entropy_gate(t64) if gate else torch.ones_like(loss)
    (grad,) = torch.autograd.grad((g * loss).sum(), s64)
    return torch.stack([loss.detach(), tckd.detach(), nckd.detach(), g], 1), grad


def _term_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max over entries of |got - ref| / (TERM_ATOL + TERM_RTOL |ref|): <= 1 passes."""
    err = (got.double() - ref).abs() / (TERM_ATOL + TERM_RTOL * ref.abs())
    return float(err.max()) if torch.isfinite(err).all() else float("inf")


def _rel_l2(got: torch.Tensor, ref: torch.Tensor) -> float:
    err = float((got.double() - ref).norm() / ref.norm())
    return err if math.isfinite(err) else float("inf")


def _run_kernel_case(td, case) -> dict:
    name, vocab, s_dtype, t_dtype, temperature, gate, block_v, special = case
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    rows, target = _selection(gen, vocab)
    s, t, target = _logits(gen, vocab, s_dtype, t_dtype, rows, target, special)
    grad = torch.full_like(s, float("nan"))  # selected rows must be overwritten entirely, the others untouched
    out = td.gated_dkd_rows(s, t, rows, target, temperature, 1.0, 4.0, gate, grad, block_v=block_v)
    ref, ref_grad = _reference(s[rows], t[rows], target, temperature, gate)
    others = torch.ones(NUM_ROWS, dtype=torch.bool)
    others[rows] = False
    return {
        "shape_ok": tuple(out.shape) == (NUM_SELECTED, 4) and out.dtype == torch.float32 and grad.dtype == s.dtype,
        "term_err": _term_err(out, ref),
        "grad_err": _rel_l2(grad[rows], ref_grad),
        "grad_rows_written": bool(torch.isfinite(grad[rows]).all()),
        "other_rows_untouched": bool(grad[others].isnan().all()),
        "grad_dtype": s_dtype,
    }


def _run_nan_case(td) -> dict:
    """A NaN in one teacher row: that row's outputs are non-finite, every other row still matches."""
    gen = torch.Generator().manual_seed(99)
    vocab = 1000
    rows, target = _selection(gen, vocab)
    s, t, target = _logits(gen, vocab, "float32", "float32", rows, target, None)
    t[rows[NAN_ROW], 123] = float("nan")
    grad = torch.zeros_like(s)
    out = td.gated_dkd_rows(s, t, rows, target, 2.0, 1.0, 4.0, True, grad, block_v=256)
    ref, ref_grad = _reference(s[rows], t[rows], target, 2.0, True)
    keep = torch.arange(NUM_SELECTED) != NAN_ROW
    return {
        "nan_row_outputs_nonfinite": [not math.isfinite(float(v)) for v in out[NAN_ROW]],
        "nan_row_grad_nonfinite": bool(~torch.isfinite(grad[rows[NAN_ROW]]).all()),
        "other_rows_term_err": _term_err(out[keep], ref[keep]),
        "other_rows_grad_err": _rel_l2(grad[rows[keep]], ref_grad[keep]),
    }


# (id, dtype, temperature, gate, chunk_size, grad)
LOSS_CASES = [
    ("fp32-T2-gate-chunk3", "float32", 2.0, True, 3, True),
    ("fp32-T1-nogate-chunk1024", "float32", 1.0, False, 1024, True),
    ("bf16-T2-gate-chunk4", "bfloat16", 2.0, True, 4, True),
    ("fp16-T2-gate-nograd", "float16", 2.0, True, 5, False),
]


def _run_loss_case(case) -> dict:
    """The whole ``gated_dkd_loss`` on the fused path vs its torch path on the same logits in fp64."""
    from grace_quant import losses

    td = importlib.import_module("grace_quant.kernels.triton_dkd")  # the module the losses dispatch to

    name, dtype_name, temperature, gate, chunk_size, with_grad = case
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    batch, seq, vocab = 2, 7, 1500
    s = (3 * torch.randn(batch, seq, vocab, generator=gen)).to(getattr(torch, dtype_name))
    t = (3 * torch.randn(batch, seq, vocab, generator=gen)).to(getattr(torch, dtype_name))
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[0, 2] = labels[1, 4] = labels[1, 5] = -100
    s[0, 3, labels[0, 4]] += 40.0  # a confident student token
    kwargs = dict(temperature=temperature, alpha=1.0, beta_dkd=4.0, gate=gate, chunk_size=chunk_size)

    calls = []
    original = td.gated_dkd_rows

    def counted(*args, **kw):
        calls.append(1)
        return original(*args, **kw)

    td.gated_dkd_rows = counted
    try:
        s_leaf = s.clone().requires_grad_()
        if with_grad:
            out = losses.gated_dkd_loss(s_leaf, t, labels, **kwargs)
            out.loss.backward()
        else:
            with torch.no_grad():
                out = losses.gated_dkd_loss(s_leaf, t, labels, **kwargs)
    finally:
        td.gated_dkd_rows = original
    s_ref = s.double().requires_grad_()
    ref = losses.gated_dkd_loss(s_ref, t.double(), labels, **kwargs)  # fp64: the torch path
    ref.loss.backward()
    result = {
        "fused_launches": len(calls),
        "expected_launches": math.ceil(int((labels[:, 1:] != -100).sum()) / chunk_size),
        "num_tokens_equal": out.num_tokens == ref.num_tokens,
        "loss_requires_grad": bool(out.loss.requires_grad),
        "expected_requires_grad": with_grad,
        "loss_dtype": str(out.loss.dtype),
    }
    for field in ("loss", "tckd", "nckd", "gate_mean", "weighted_sum", "gate_sum"):
        got, want = getattr(out, field).detach().double(), getattr(ref, field).detach()
        result[field + "_rel"] = float((got - want).abs() / want.abs())
    if with_grad:
        result["grad_err"] = _rel_l2(s_leaf.grad, s_ref.grad)
        result["grad_dtype_ok"] = s_leaf.grad.dtype == s.dtype
    return result


def _main() -> None:
    """Subprocess entry: run every case under the interpreter and print one JSON line per result."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    from grace_quant.kernels import triton_dkd as td

    assert td.INTERPRET
    jobs = [(case[0], lambda case=case: _run_kernel_case(td, case)) for case in KERNEL_CASES]
    jobs += [("nan-teacher-row", lambda: _run_nan_case(td))]
    jobs += [(case[0], lambda case=case: _run_loss_case(case)) for case in LOSS_CASES]
    run_jobs(jobs)


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict]:
    pytest.importorskip("triton")
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
def test_rows_kernel_matches_fp64_reference(interpreted, case):
    rec = result_for(interpreted, case[0])
    assert rec["shape_ok"], rec
    assert rec["term_err"] <= 1.0, f"per-row terms off by {rec['term_err']:.3g} x tolerance: {rec}"
    assert rec["grad_rows_written"] and rec["other_rows_untouched"], rec
    tol = GRAD_TOL[rec["grad_dtype"]]
    assert rec["grad_err"] < tol, f"gradient relative L2 error {rec['grad_err']:.3e} >= {tol}"


def test_nan_teacher_row_is_nonfinite_for_that_row_only(interpreted):
    rec = result_for(interpreted, "nan-teacher-row")
    # L, TCKD, NCKD and the gate all see the NaN
    assert rec["nan_row_outputs_nonfinite"] == [True, True, True, True], rec
    assert rec["nan_row_grad_nonfinite"], rec
    assert rec["other_rows_term_err"] <= 1.0, rec
    assert rec["other_rows_grad_err"] < GRAD_TOL["float32"], rec


@pytest.mark.parametrize("case", LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
def test_gated_dkd_loss_fused_path_matches_torch_path(interpreted, case):
    rec = result_for(interpreted, case[0])
    assert rec["fused_launches"] == rec["expected_launches"] > 0, rec
    assert rec["num_tokens_equal"] and rec["loss_dtype"] == "torch.float32", rec
    assert rec["loss_requires_grad"] == rec["expected_requires_grad"], rec
    for field in ("loss", "tckd", "nckd", "gate_mean", "weighted_sum", "gate_sum"):
        assert rec[field + "_rel"] < 1e-5, f"{field}: relative error {rec[field + '_rel']:.3e}"
    if case[5]:
        assert rec["grad_dtype_ok"], rec
        tol = GRAD_TOL[case[1]]
        assert rec["grad_err"] < tol, f"gradient relative L2 error {rec['grad_err']:.3e} >= {tol}"


def test_cpu_path_does_not_need_triton():
    """Without CUDA and without the interpreter, the torch path runs (fp64 stays fp64) and triton is not needed."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("the interpreter routes CPU tensors to the kernel")
    from grace_quant.losses import _fused_dkd_kernels

    s = torch.randn(4, 10)
    assert _fused_dkd_kernels(s, s) is None


if __name__ == "__main__":
    _main()


# ----------------------------------------------------------------------------------------------------------------
# GPU: fused vs torch path at Qwen's vocabulary (skipped without CUDA)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("gate", [True, False])
def test_fused_matches_torch_path_on_cuda_at_qwen_vocab(monkeypatch, gate):
    from grace_quant import losses

    gen = torch.Generator(device="cuda").manual_seed(7)
    batch, seq, vocab = 2, 257, 151936  # 512 supervised rows
    s = (3 * torch.randn(batch, seq, vocab, device="cuda", generator=gen)).to(torch.bfloat16)
    t = (3 * torch.randn(batch, seq, vocab, device="cuda", generator=gen)).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (batch, seq), device="cuda", generator=gen)
    s[0, :16].view(-1, vocab)[torch.arange(16), labels[0, 1:17]] += 40.0  # confident student tokens
    t[1, :16].view(-1, vocab)[torch.arange(16), labels[1, 1:17]] += 40.0  # confident teacher tokens
    kwargs = dict(temperature=2.0, alpha=1.0, beta_dkd=4.0, gate=gate, chunk_size=256)
    assert losses._fused_dkd_kernels(s.view(-1, vocab), t.view(-1, vocab)) is not None

    results = []
    for fused in (True, False):
        with monkeypatch.context() as m:
            if not fused:
                m.setattr(losses, "_fused_dkd_kernels", lambda *a: None)
            s_leaf = s.clone().requires_grad_()
            out = losses.gated_dkd_loss(s_leaf, t, labels, **kwargs)
            out.loss.backward()
        assert out.num_tokens == 512 and s_leaf.grad.dtype == torch.bfloat16
        results.append((out, s_leaf.grad))
    (fused_out, fused_grad), (torch_out, torch_grad) = results
    for field in ("loss", "tckd", "nckd", "gate_mean"):
        got, want = getattr(fused_out, field).detach().double(), getattr(torch_out, field).detach().double()
        assert float((got - want).abs() / want.abs()) < 1e-4, (field, float(got), float(want))
    grad_err = float((fused_grad.double() - torch_grad.double()).norm() / torch_grad.double().norm())
    assert grad_err < 1e-3, grad_err


@pytest.mark.gpu
def test_rows_kernel_replays_in_a_cuda_graph():
    """No host syncs: the launch captures into a CUDA graph and replays on new inputs."""
    from grace_quant.kernels import triton_dkd as td

    vocab = 32000
    s = torch.randn(64, vocab, device="cuda", dtype=torch.bfloat16)
    t = torch.randn(64, vocab, device="cuda", dtype=torch.bfloat16)
    rows = torch.randperm(64, device="cuda")[:40]
    target = torch.randint(0, vocab, (40,), device="cuda")
    grad = torch.zeros_like(s)
    out = torch.empty(40, 4, device="cuda")
    td.gated_dkd_rows(s, t, rows, target, 2.0, 1.0, 4.0, True, grad, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        td.gated_dkd_rows(s, t, rows, target, 2.0, 1.0, 4.0, True, grad, out=out)
    s.copy_(torch.randn_like(s))
    graph.replay()
    expected_grad = torch.zeros_like(s)
    expected = td.gated_dkd_rows(s, t, rows, target, 2.0, 1.0, 4.0, True, expected_grad)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
