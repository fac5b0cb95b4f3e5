"""The fused QAT-linear kernels (``grace_quant.kernels.triton_qat_linear``: fake quantization inside the matmul) on
CPU under Triton's interpreter, against fp64 references.

Each case draws a fresh weight with outliers far outside the code range (so some codes clamp) and checks:

* ``y = x @ w_hat^T + bias`` and ``grad_input = g @ w_hat`` within the rounding of their bf16/fp16 output
  (``|err| <= u * |ref| + 2e-5 * (|a| @ |b|)``, ``u`` the unit roundoff), ``w_hat`` from the torch fake-quant path;
* ``grad_weight`` (straight-through mask on ``dW_hat = g^T @ x``) and ``grad_log_scale`` (LSQ) within ``1e-5`` of
  the fp64 formulas' magnitudes, the mask and step taken on the fp32 ratio ``w / s`` as the semantics say;
* ``GraceQATLinear`` with ``fake_quant_backend="triton_linear"`` under bf16 autocast against ``"torch"``: one launch
  of each kernel, output and gradients equal up to the matmul's summation order.
"""

from __future__ import annotations

import os

import pytest
import torch
from interpreter_harness import grace_step, result_for, run_interpreted, run_jobs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
GRAD_RTOL = 1e-5

# (id, M, N, K, group, bits, activation dtype, weight dtype): tails in every dimension, several K tiles
CASES = [
    ("bf16-fp32w-g64-tails", 37, 45, 192, 64, 4, "bfloat16", "float32"),
    ("fp16-fp32w-g128", 5, 20, 256, 128, 4, "float16", "float32"),
    ("bf16-bf16w-g32-b8", 33, 16, 96, 32, 8, "bfloat16", "bfloat16"),
    ("bf16-fp32w-g32-full-tiles", 64, 64, 128, 32, 4, "bfloat16", "float32"),
    ("fp16-fp16w-g16-one-row", 1, 40, 80, 16, 4, "float16", "float16"),
]


def _inputs(case):
    from grace_quant.quant import mse_scales

    name, m, n, k, group, bits, x_name, w_name = case
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    w = torch.randn(n, k, generator=gen) * 0.05
    w = torch.where(torch.rand(n, k, generator=gen) < 0.03, w * 30, w).to(DTYPES[w_name])
    log_scale = torch.log(mse_scales(w, group, bits)) + 0.2 * torch.randn(n, k // group, generator=gen)
    x = torch.randn(m, k, generator=gen).to(DTYPES[x_name])
    g = torch.randn(m, n, generator=gen).to(DTYPES[x_name])
    bias = torch.randn(n, generator=gen)  # fp32, as a layer holds it; the kernel takes it in x's dtype
    return w, log_scale, x, g, bias


def _rounding_err(got: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor, unit: float) -> float:
    """max |got - ref| / (unit * |ref| + 2e-5 * magnitude): <= 1 is the output's one rounding plus the fp32
    accumulation's worst case over K <= 256 terms (K * 2**-24 <= 1.6e-5 of sum |a b|)."""
    return float(((got.double() - ref).abs() / (unit * ref.abs() + 2e-5 * magnitude + 1e-30)).max())


def _grad_err(got: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor) -> float:
    return float(((got.double() - ref).abs() / (GRAD_RTOL * magnitude + 1e-30)).max())


def _run_case(case) -> dict:
    from grace_quant.kernels import code_range
    from grace_quant.kernels import triton_qat_linear as kernels
    from grace_quant.quant import fake_quantize, scale_from_log

    _, _, n, _, group, bits, _, _ = case
    w, log_scale, x, g, bias = _inputs(case)
    e = torch.exp(log_scale)
    y = kernels.qat_linear_forward(x, w, e, group, bits, bias)
    dx = kernels.qat_linear_grad_input(g, w, e, group, bits)
    dw, dls = kernels.qat_linear_grad_weight(g, x, w, e, group, bits)

    w_hat = fake_quantize(w, log_scale, group, bits, backend="torch").to(x.dtype).double()
    xd, gd = x.double(), g.double()
    lo, hi = code_range(bits)
    ratio = (w.float() / scale_from_log(log_scale, w.dtype).float().repeat_interleave(group, dim=1)).double()
    rounded = ratio.round()
    inside = (rounded >= lo) & (rounded <= hi)
    dw_hat = gd.T @ xd
    if w.dtype != torch.float32:
        dw_hat = dw_hat.to(w.dtype).double()  # the gradient reaches the weight dtype
    step = torch.where(inside, rounded - ratio, rounded.clamp(lo, hi))
    e64 = torch.exp(log_scale.double())
    per_group = lambda t: t.reshape(n, -1, group).sum(-1) * e64  # noqa: E731
    unit = UNIT_ROUNDOFF[x.dtype]
    return {
        "dtypes_ok": y.dtype == dx.dtype == x.dtype and dw.dtype == w.dtype and dls.dtype == torch.float32,
        "y_err": _rounding_err(y, xd @ w_hat.T + bias.to(x.dtype).double(), xd.abs() @ w_hat.abs().T, unit),
        "no_bias_err": _rounding_err(
            kernels.qat_linear_forward(x, w, e, group, bits), xd @ w_hat.T, xd.abs() @ w_hat.abs().T, unit
        ),
        "dx_err": _rounding_err(dx, gd @ w_hat, gd.abs() @ w_hat.abs(), unit),
        "dw_err": _grad_err(dw, torch.where(inside, dw_hat, 0.0), gd.abs().T @ xd.abs()),
        "dw_zero_where_clamped": bool((dw[~inside] == 0).all()),
        "dls_err": _grad_err(dls, per_group(dw_hat * step), per_group((gd.abs().T @ xd.abs()) * step.abs())),
        "num_clamped": int((~inside).sum()),
    }


def _run_module_case() -> dict:
    """``GraceQATLinear`` (fp32 master, bias) under bf16 autocast: "triton_linear" against "torch"."""
    from grace_quant.kernels import triton_qat_linear as kernels
    from grace_quant.modules import GraceQATLinear

    torch.manual_seed(3)
    layer = GraceQATLinear.from_linear(torch.nn.Linear(128, 48), group_size=32, bits=4)
    x = torch.randn(2, 7, 128, requires_grad=True)
    calls = {"forward": 0, "grad_input": 0, "grad_weight": 0}
    originals = {key: getattr(kernels, f"qat_linear_{key}") for key in calls}

    def counted(key):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return originals[key](*args, **kwargs)

        return wrapper

    results = {}
    for backend in ("triton_linear", "torch"):
        for key in calls:
            setattr(kernels, f"qat_linear_{key}", counted(key))
        layer.fake_quant_backend = backend
        layer.zero_grad()
        x.grad = None
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(x)
            (y.float() ** 2).sum().backward()
        finally:
            for key, fn in originals.items():
                setattr(kernels, f"qat_linear_{key}", fn)
        grads = [x.grad.clone()] + [p.grad.clone() for p in (layer.weight, layer.log_scale, layer.bias)]
        results[backend] = (y.detach(), *grads, dict(calls))
    (y_f, gx_f, gw_f, gls_f, gb_f, after_fused), (y_t, gx_t, gw_t, gls_t, gb_t, after_torch) = results.values()
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    return {
        "launches": [after_fused, after_torch],
        "y_dtype": str(y_f.dtype),
        "y_rel": rel(y_f, y_t),
        "grad_x_rel": rel(gx_f, gx_t),
        "grad_weight_rel": rel(gw_f, gw_t),
        "grad_log_scale_rel": rel(gls_f, gls_t),
        "grad_bias_rel": rel(gb_f, gb_t),
    }


def _run_trainer_step_case() -> dict:
    """One ``GraceTrainer`` loss + backward under CPU bf16 autocast on a tiny Qwen2-VL pair (q|k|v carry biases),
    ``fake_quant_backend="triton_linear"`` against ``"torch"``, from the same weights."""
    from grace_quant.kernels import triton_fake_quant, triton_qat_linear

    launches = {"linear": 0, "fake_quant": 0}
    originals = triton_qat_linear.qat_linear_forward, triton_fake_quant.fake_quant_forward

    def counted(key, fn):
        def wrapper(*args, **kwargs):
            launches[key] += 1
            return fn(*args, **kwargs)

        return wrapper

    triton_qat_linear.qat_linear_forward = counted("linear", originals[0])
    triton_fake_quant.fake_quant_forward = counted("fake_quant", originals[1])
    runs = {}
    try:
        for backend in ("triton_linear", "torch"):
            loss, grads = grace_step("qwen2-vl", backend, autocast=True)
            runs[backend] = (loss.float(), {name: g.float() for name, g in grads.items()}, dict(launches))
    finally:
        triton_qat_linear.qat_linear_forward, triton_fake_quant.fake_quant_forward = originals
    (loss_f, grads_f, after_fused), (loss_t, grads_t, after_torch) = runs["triton_linear"], runs["torch"]
    rel = {name: float((grads_f[name] - g).norm() / g.norm()) for name, g in grads_t.items() if g.norm() > 0}
    return {
        "launches": [after_fused, after_torch],
        "num_qat_layers": sum(1 for name in grads_t if name.endswith("log_scale")),
        "has_biases": any(name.endswith("q_proj.bias") for name in grads_t),
        "loss_rel": float((loss_f - loss_t).abs() / loss_t.abs()),
        "worst_grad": max(rel, key=rel.get),
        "worst_grad_rel": max(rel.values()),
    }


def _main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    jobs = [(case[0], lambda case=case: _run_case(case)) for case in CASES]
    jobs += [("module", _run_module_case), ("trainer-step", _run_trainer_step_case)]
    run_jobs(jobs)


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict]:
    pytest.importorskip("triton")
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fused_qat_linear_matches_fp64_references(interpreted, case):
    rec = result_for(interpreted, case[0])
    assert rec["dtypes_ok"] and rec["num_clamped"] > 0, rec
    for key in ("y_err", "no_bias_err", "dx_err", "dw_err", "dls_err"):
        assert rec[key] <= 1.0, f"{key}: {rec[key]:.3g} x tolerance; {rec}"
    assert rec["dw_zero_where_clamped"], rec


def test_qat_linear_layer_on_the_fused_matmul_matches_the_torch_path(interpreted):
    rec = result_for(interpreted, "module")
    fused, torch_path = rec["launches"]
    assert fused == {"forward": 1, "grad_input": 1, "grad_weight": 1} and torch_path == fused, rec
    assert rec["y_dtype"] == "torch.bfloat16", rec
    # bf16 outputs one rounding apart at most (other summation order); the weight and bias gradients of the torch
    # path are rounded to bf16 by its matmul and its sum, ours are not
    assert rec["y_rel"] < 4e-3 and rec["grad_x_rel"] < 4e-3, rec
    assert rec["grad_weight_rel"] < 4e-3 and rec["grad_log_scale_rel"] < 4e-3 and rec["grad_bias_rel"] < 4e-3, rec


def test_trainer_step_on_the_fused_matmul_matches_the_torch_path(interpreted):
    """Every QAT linear of a whole GRACE step (CE, gated DKD, RCKA; biases included) runs the fused matmul and none
    the fake-quant kernels; loss and every gradient agree with the torch path up to bf16 rounding (the torch path
    rounds dW_hat and the bias gradient to bf16; seen: loss equal, gradients within 2.5e-3)."""
    rec = result_for(interpreted, "trainer-step")
    fused, torch_path = rec["launches"]
    assert fused == {"linear": rec["num_qat_layers"], "fake_quant": 0} and torch_path == fused, rec
    assert rec["has_biases"] and rec["num_qat_layers"] > 0, rec
    assert rec["loss_rel"] < 1e-3 and rec["worst_grad_rel"] < 1e-2, rec


if __name__ == "__main__":
    _main()


# ----------------------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA): a realistic shape against the torch fake-quant path
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_fused_qat_linear_on_cuda_matches_the_torch_path():
    from grace_quant.modules import GraceQATLinear

    torch.manual_seed(0)
    layer = GraceQATLinear.from_linear(torch.nn.Linear(1536, 8960, device="cuda"), group_size=128, bits=4)
    x = torch.randn(4, 512, 1536, device="cuda", requires_grad=True)
    outputs = {}
    for backend in ("triton_linear", "torch"):
        layer.fake_quant_backend = backend
        layer.zero_grad()
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        (y.float() ** 2).mean().backward()
        outputs[backend] = (y.float(), x.grad.float(), layer.weight.grad.clone(), layer.log_scale.grad.clone())
    for got, want in zip(outputs["triton_linear"], outputs["torch"], strict=True):
        assert float((got - want).norm() / want.norm()) < 4e-3
