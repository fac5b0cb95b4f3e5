"""Fused fake-quant Triton kernels on CPU under Triton's interpreter, checked against the torch path and references.

``TRITON_INTERPRET=1`` must be set before triton is imported, so the kernels run in a subprocess that executes this
file as a script; the tests read its per-case results. Every case draws fresh random weights (with outliers far
outside the code range and, where asked, exact ``.5`` ties of ``w / s``) and compares, through the whole autograd
path of ``fake_quantize``:

* the forward with the torch path and with the packed export (``dequantize(pack(quantize_codes(...)))``), bit for
  bit;
* ``grad_weight`` with the torch path and with the straight-through rule, bit for bit;
* ``grad_log_scale`` with the torch path and with the LSQ formula in fp64 (on the fp32 ratio ``w / s``, which is
  where the semantics put the rounding), within ``1e-5`` of the group's ``e * sum |g * step|``.

GPU tests at the bottom do the same at a realistic size and check CUDA-graph capture.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from interpreter_harness import grace_step, result_for, run_interpreted, run_jobs

ROOT = Path(__file__).resolve().parents[1]
GRAD_RTOL = 1e-5  # grad_log_scale: |got - ref| <= GRAD_RTOL * e * sum_group |g * step| (+ a tiny floor)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# (id, weight dtype, bits, group, out, in, out_dtype, block_elements, special)
CASES = [
    ("fp32-b4-g32-o37", "float32", 4, 32, 37, 256, None, None, None),
    ("fp32-b8-g128-o19", "float32", 8, 128, 19, 512, None, None, None),
    ("fp32-b4-g64-o5-ties", "float32", 4, 64, 5, 384, None, None, "ties"),
    ("fp32-b8-g32-o9-ties-blk64", "float32", 8, 32, 9, 320, None, 64, "ties"),
    ("fp32-b4-g40-o13", "float32", 4, 40, 13, 200, None, None, None),
    ("fp32-b4-g128-o3-ones", "float32", 4, 128, 3, 256, None, None, "ones"),
    ("bf16-b4-g128-o23-ties", "bfloat16", 4, 128, 23, 256, None, None, "ties"),
    ("bf16-b8-g32-o11", "bfloat16", 8, 32, 11, 192, None, None, None),
    ("bf16-b8-g64-o7-ties", "bfloat16", 8, 64, 7, 256, None, None, "ties"),
    ("fp16-b4-g64-o9-ties", "float16", 4, 64, 9, 256, None, None, "ties"),
    ("fp16-b8-g128-o7", "float16", 8, 128, 7, 384, None, None, None),
    ("fp32-b4-g128-o29-out-bf16", "float32", 4, 128, 29, 256, "bfloat16", None, "ties"),
    ("fp32-b8-g64-o6-out-fp16", "float32", 8, 64, 6, 256, "float16", None, None),
    ("bf16-b4-g32-o5-out-fp32", "bfloat16", 4, 32, 5, 128, "float32", None, "ties"),
    ("fp16-b4-g64-o5-out-bf16", "float16", 4, 64, 5, 256, "bfloat16", None, None),
]


def _inputs(case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(weight, log_scale, upstream)``: random weights with outliers and optional exact ties ``w = (k + .5) s``."""
    from grace_quant.kernels import code_range
    from grace_quant.quant import mse_scales, scale_from_log

    name, dtype_name, bits, group, out_f, in_f, out_dtype, _, special = case
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    w = torch.randn(out_f, in_f, generator=gen) * (0.5 + torch.rand(out_f, 1, generator=gen))
    far = torch.rand(out_f, in_f, generator=gen) < 0.03
    w = torch.where(far, w * 40.0, w)  # far outside the code range
    w[0, :group] = 0.0  # an all-zero group
    w = w.to(dtype)
    log_scale = torch.log(mse_scales(w, group, bits)) + 0.3 * torch.randn(out_f, in_f // group, generator=gen)
    if special == "ties":
        lo, hi = code_range(bits)
        groups = log_scale.shape[1]
        tie_groups = torch.rand(out_f, groups, generator=gen) < 0.5
        # powers of two: exp(log(2**-j)) rounds back to 2**-j in bf16/fp16, so (k + .5) s is exact in every dtype
        pow2 = torch.log(2.0 ** -torch.randint(3, 8, (out_f, groups), generator=gen).float())
        log_scale = torch.where(tie_groups, pow2, log_scale)
        s = scale_from_log(log_scale, dtype).double().repeat_interleave(group, dim=1)
        k = torch.randint(lo - 2, hi + 2, (out_f, in_f), generator=gen).double()
        ties = tie_groups.repeat_interleave(group, dim=1) & (torch.rand(out_f, in_f, generator=gen) < 0.5)
        w = torch.where(ties, ((k + 0.5) * s).to(dtype), w)
        # near-ties in the other groups: (k + .5) s rounded to fp32, nudged by 0..2 ulps, so that w / s lands
        # within an ulp or two of k + .5 and only an IEEE division rounds it as torch does
        near = ~tie_groups.repeat_interleave(group, dim=1) & (torch.rand(out_f, in_f, generator=gen) < 0.5)
        nudged = ((k + 0.5) * s).float()
        for _ in range(2):
            direction = torch.where(torch.rand(out_f, in_f, generator=gen) < 0.5, -math.inf, math.inf)
            nudged = torch.where(torch.rand(out_f, in_f, generator=gen) < 0.5, nudged.nextafter(direction), nudged)
        w = torch.where(near, nudged.to(dtype), w)
    up_dtype = DTYPES[out_dtype] if out_dtype else dtype
    upstream = torch.randn(out_f, in_f, generator=gen).to(up_dtype)
    if special == "ones":
        upstream = torch.ones_like(upstream)
    return w, log_scale, upstream


def _run_fake_quant(w, log_scale, upstream, group, bits, out_dtype, fused: bool):
    """``fake_quantize`` forward and backward on the fused (counted launches) or the torch path."""
    from grace_quant import quant

    original = quant._fused_fake_quant_kernels
    if not fused:
        quant._fused_fake_quant_kernels = lambda *args: None
    try:
        with _counted_launches() as calls, quant.fused_fake_quant():  # "auto" picks torch ops on CPU: force them
            w_leaf, ls_leaf = w.clone().requires_grad_(), log_scale.clone().requires_grad_()
            out = quant.fake_quantize(w_leaf, ls_leaf, group, bits, out_dtype=out_dtype)
            (out * upstream).sum().backward()
    finally:
        quant._fused_fake_quant_kernels = original
    return out.detach(), w_leaf.grad, ls_leaf.grad, calls


def _grad_err(got: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor) -> float:
    """max |got - ref| / (GRAD_RTOL * magnitude + tiny): <= 1 passes."""
    err = (got.double() - ref).abs() / (GRAD_RTOL * magnitude + 1e-30)
    return float(err.max()) if torch.isfinite(err).all() else float("inf")


def _run_case(case) -> dict:
    from grace_quant.kernels import code_range, dequantize, pack
    from grace_quant.quant import quantize_codes, scale_from_log

    name, dtype_name, bits, group, out_f, in_f, out_dtype_name, block_elements, _ = case
    dtype = DTYPES[dtype_name]
    out_dtype = DTYPES[out_dtype_name] if out_dtype_name else None
    w, log_scale, upstream = _inputs(case)

    fused_out, fused_gw, fused_gls, calls = _run_fake_quant(w, log_scale, upstream, group, bits, out_dtype, True)
    torch_out, torch_gw, torch_gls, torch_calls = _run_fake_quant(w, log_scale, upstream, group, bits, out_dtype, False)

    # the kernels called directly, with this case's block size (many programs, a partial last one)
    from grace_quant.kernels import triton_fake_quant as tfq

    e = torch.exp(log_scale)
    direct_out = tfq.fake_quant_forward(w, e, group, bits, out_dtype, block_elements=block_elements)
    direct_gw, direct_gls = tfq.fake_quant_backward(w, e, upstream, group, bits, block_elements=block_elements)

    # packed export: the bits a QAT layer exports
    scales = scale_from_log(log_scale, dtype)
    export = dequantize(pack(quantize_codes(w, scales, group, bits), bits), scales, group, bits)
    if out_dtype is not None:
        export = export.to(out_dtype)

    # straight-through and LSQ formulas in fp64 on the fp32 ratio w / s
    lo, hi = code_range(bits)
    s32 = scales.float().repeat_interleave(group, dim=1)
    x = (w.float() / s32).double()
    r = torch.round(x)
    inside = (r >= lo) & (r <= hi)
    g = upstream.to(dtype).double()  # the gradient of w_hat.to(out_dtype) reaches the weight dtype
    expected_gw = torch.where(inside, g, torch.zeros_like(g))
    step = torch.where(inside, r - x, r.clamp(lo, hi))
    e64 = torch.exp(log_scale.double())
    expected_gls = (g * step).reshape(out_f, -1, group).sum(-1) * e64
    magnitude = (g * step).abs().reshape(out_f, -1, group).sum(-1) * e64

    want_dtype = out_dtype or dtype
    return {
        "launches": calls,
        "torch_path_launches": torch_calls,
        "dtypes_ok": fused_out.dtype == want_dtype
        and fused_gw.dtype == dtype
        and fused_gls.dtype == torch.float32
        and direct_out.dtype == want_dtype,
        "forward_equals_torch_path": torch.equal(fused_out, torch_out),
        "forward_equals_export": torch.equal(fused_out, export),
        "direct_forward_equal": torch.equal(direct_out, torch_out),
        "grad_weight_equals_torch_path": torch.equal(fused_gw, torch_gw),
        "grad_weight_equals_ste": torch.equal(fused_gw.double(), expected_gw),
        "direct_grad_weight_equal": torch.equal(direct_gw, torch_gw),
        "grad_log_scale_err_fp64": _grad_err(fused_gls, expected_gls, magnitude),
        "grad_log_scale_err_torch_path": _grad_err(fused_gls, torch_gls.double(), magnitude),
        "direct_grad_log_scale_err": _grad_err(direct_gls, expected_gls, magnitude),
        "torch_path_err_fp64": _grad_err(torch_gls, expected_gls, magnitude),
        "num_ties": int(((x - torch.floor(x)) == 0.5).sum()),
        "num_clamped": int((~inside).sum()),
        "num_inside": int(inside.sum()),
    }


def _run_module_case() -> dict:
    """``GraceQATLinear`` under CPU autocast (bf16): the fused path writes the bf16 weight directly."""
    from grace_quant import quant
    from grace_quant.modules import GraceQATLinear

    torch.manual_seed(11)
    layer = GraceQATLinear.from_linear(torch.nn.Linear(256, 48), group_size=64, bits=4)
    x = torch.randn(5, 256)
    results = []
    with _counted_launches() as launches:
        for backend in ("triton", "torch"):
            layer.fake_quant_backend = backend
            layer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(x)
            (y.float() ** 2).sum().backward()
            results.append((y.detach(), layer.weight.grad.clone(), layer.log_scale.grad.clone(), dict(launches)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the forward before out_dtype existed
        quant._fused_fake_quant_kernels, original = (lambda *args: None), quant._fused_fake_quant_kernels
        try:
            before = torch.nn.functional.linear(x, layer.quantized_weight().to(x.dtype), layer.bias)
        finally:
            quant._fused_fake_quant_kernels = original
    (y_f, gw_f, gls_f, after_fused), (y_t, gw_t, gls_t, after_torch) = results
    return {
        "launches": [after_fused, after_torch],
        "y_dtype": str(y_f.dtype),
        "y_equal": torch.equal(y_f, y_t),
        "y_equal_before": torch.equal(y_f, before),
        "grad_weight_equal": torch.equal(gw_f, gw_t),
        "grad_log_scale_rel": float((gls_f - gls_t).norm() / gls_t.norm()),
    }


@contextlib.contextmanager
def _counted_launches(forward: str = "launch_forward", backward: str = "launch_backward"):
    """Count the fused kernels' forward / backward launches (a dict updated in place) within the block: calls of
    the ``triton_fake_quant`` functions named ``forward`` and ``backward``."""
    from grace_quant.kernels import triton_fake_quant as tfq

    calls = {"forward": 0, "backward": 0}
    originals = {"forward": getattr(tfq, forward), "backward": getattr(tfq, backward)}

    def counted(key):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return originals[key](*args, **kwargs)

        return wrapper

    setattr(tfq, forward, counted("forward"))
    setattr(tfq, backward, counted("backward"))
    try:
        yield calls
    finally:
        setattr(tfq, forward, originals["forward"])
        setattr(tfq, backward, originals["backward"])


def _run_trainer_step_case() -> dict:
    """One ``GraceTrainer`` loss + backward (CE, gated DKD, RCKA) on a tiny LLaVA pair with
    ``fake_quant_backend="triton"`` (the kernels, in the interpreter) and ``"torch"``, from the same weights."""
    runs = {}
    with _counted_launches() as launches:
        for backend in ("triton", "torch"):
            runs[backend] = (*grace_step("llava", backend), dict(launches))
    (loss_f, grads_f, after_fused), (loss_t, grads_t, after_torch) = runs["triton"], runs["torch"]
    scales = [name for name in grads_t if name.endswith("log_scale")]
    return {
        "launches": [after_fused, after_torch],
        "num_log_scales": len(scales),
        "same_names": sorted(grads_f) == sorted(grads_t),
        "loss_equal": torch.equal(loss_f, loss_t),
        "unequal_grads": [n for n in grads_t if n not in scales and not torch.equal(grads_f[n], grads_t[n])],
        "num_grads": len(grads_t),
        "log_scale_rel": max(float((grads_f[n] - grads_t[n]).norm() / grads_t[n].norm()) for n in scales),
    }


# (weight dtype, bits, group, out_dtype, [(out, in, special)]): weights of one many-weight launch, tiles split
MANY = [
    ("float32", 4, 32, "bfloat16", [(37, 256, "ties"), (5, 384, None), (19, 64, "ties"), (1, 32, None)]),
    ("bfloat16", 8, 64, None, [(7, 256, "ties"), (9, 128, None)]),
    ("float32", 4, 128, "float16", [(3, 256, None), (29, 256, "ties")]),
]


def _counted_many_launches():
    """Count the many-weight kernels' forward / backward launches within the block (as :func:`_counted_launches`)."""
    return _counted_launches("launch_many_forward", "launch_many_backward")


def _run_many_case(index: int) -> dict:
    """``fake_quantize_many`` against ``fake_quantize`` per weight on the kernels (and forward / weight gradient
    against the torch path): outputs and both gradients bit for bit, one launch each way."""
    from grace_quant import quant

    dtype_name, bits, group, out_dtype, shapes = MANY[index]
    cases = [(f"many{index}-{j}", dtype_name, bits, group, o, i, out_dtype, None, sp) for j, (o, i, sp) in
             enumerate(shapes)]  # fmt: skip
    inputs = [_inputs(case) for case in cases]
    out_dt = DTYPES[out_dtype] if out_dtype else None

    def run(fn, fused: bool):
        ws = [w.clone().requires_grad_() for w, _, _ in inputs]
        lss = [ls.clone().requires_grad_() for _, ls, _ in inputs]
        with quant.fused_fake_quant(fused):
            outs = fn(ws, lss)
        sum((o.double() * up.double()).sum() for o, (_, _, up) in zip(outs, inputs, strict=True)).backward()
        return [o.detach() for o in outs], [w.grad for w in ws], [ls.grad for ls in lss]

    def per_weight(ws, lss):
        return [quant.fake_quantize(w, ls, group, bits, out_dt) for w, ls in zip(ws, lss, strict=True)]

    with _counted_many_launches() as many_calls, _counted_launches() as single_calls:
        many = run(lambda ws, lss: quant.fake_quantize_many(ws, lss, group, bits, out_dt), True)
        counts = (dict(many_calls), dict(single_calls))
    single, torch_path = run(per_weight, True), run(per_weight, False)
    equal = [all(torch.equal(a, b) for a, b in zip(x, y, strict=True)) for x, y in zip(many, single, strict=True)]
    return {
        "launches_many": counts[0],
        "launches_single": counts[1],
        "dtypes": sorted({str(o.dtype) for o in many[0]}),
        "forward_equal": equal[0],
        "grad_weight_equal": equal[1],
        "grad_log_scale_equal": equal[2],
        "forward_equals_torch_path": all(torch.equal(a, b) for a, b in zip(many[0], torch_path[0], strict=True)),
        "grad_weight_equals_torch_path": all(torch.equal(a, b) for a, b in zip(many[1], torch_path[1], strict=True)),
    }


def _run_grouped_trainer_case() -> dict:
    """One ``GraceTrainer`` micro-batch on the kernels with ``fake_quant_grouped`` on and off, from the same weights."""
    runs = {}
    with _counted_many_launches() as many_calls, _counted_launches() as single_calls:
        for grouped in (True, False):
            before = dict(many_calls), dict(single_calls)
            loss, grads = grace_step("llava", "triton", grouped=grouped)
            runs[grouped] = (loss, grads, {k: many_calls[k] - before[0][k] for k in many_calls},
                             {k: single_calls[k] - before[1][k] for k in single_calls})  # fmt: skip
    (loss_g, grads_g, many_g, single_g), (loss_u, grads_u, many_u, single_u) = runs[True], runs[False]
    return {
        "launches_grouped": [many_g, single_g],
        "launches_ungrouped": [many_u, single_u],
        "num_log_scales": sum(name.endswith("log_scale") for name in grads_u),
        "same_names": sorted(grads_g) == sorted(grads_u),
        "loss_equal": torch.equal(loss_g, loss_u),
        "unequal_grads": [n for n in grads_u if not torch.equal(grads_g[n], grads_u[n])],
    }


def _run_support_case() -> dict:
    """Inputs the kernels decline run the torch path (fp64 stays fp64)."""
    from grace_quant import quant
    from grace_quant.kernels import triton_fake_quant as tfq

    w = torch.randn(4, 64)
    w64 = torch.randn(8, 64, dtype=torch.float64)
    ls64 = torch.randn(8, 2, dtype=torch.float64) * 0.1 - 2.0
    s = torch.exp(ls64).repeat_interleave(32, dim=1)
    expected = s * torch.clamp(torch.round(w64 / s), -8, 7)
    return {
        "fp32_supported": tfq.supports(w, torch.zeros(4, 2)),
        "fp64_weight": tfq.supports(w64, torch.zeros(8, 2)),
        "fp16_log_scale": tfq.supports(w, torch.zeros(4, 2, dtype=torch.float16)),
        "group_not_multiple_of_8": tfq.supports(torch.randn(4, 60), torch.zeros(4, 5)),
        "shape_mismatch": tfq.supports(w, torch.zeros(3, 2)),
        "dispatch_fp64": quant._fused_fake_quant_kernels(w64, ls64, 32, "triton") is None,
        "dispatch_fp32": quant._fused_fake_quant_kernels(w, torch.zeros(4, 2), 32, "triton") is not None,
        "dispatch_auto_on_cpu": quant._fused_fake_quant_kernels(w, torch.zeros(4, 2), 32) is not None,
        "dispatch_auto_forced": _forced(True, lambda: quant._fused_fake_quant_kernels(w, torch.zeros(4, 2), 32)),
        "dispatch_torch_forced": _forced(True, lambda: quant._fused_fake_quant_kernels(w, torch.zeros(4, 2), 32, "torch")),
        "dispatch_auto_off": _forced(False, lambda: quant._fused_fake_quant_kernels(w, torch.zeros(4, 2), 32)),
        "fp64_matches_definition": torch.allclose(quant.fake_quantize(w64, ls64, 32, 4), expected, rtol=0, atol=1e-12),
    }


def _forced(enabled: bool, fn):
    """Whether ``fn()`` inside ``fused_fake_quant(enabled)`` picks the kernels module (not None)."""
    from grace_quant import quant

    with quant.fused_fake_quant(enabled):
        return fn() is not None


def _main() -> None:
    """Subprocess entry: run every case under the interpreter and print one JSON line per result."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    from grace_quant.kernels import triton_fake_quant

    assert triton_fake_quant.INTERPRET
    jobs = [(case[0], lambda case=case: _run_case(case)) for case in CASES]
    jobs += [("module-autocast", _run_module_case), ("support", _run_support_case)]
    jobs += [("trainer-step", _run_trainer_step_case), ("grouped-trainer-step", _run_grouped_trainer_case)]
    jobs += [(f"many-{i}", lambda i=i: _run_many_case(i)) for i in range(len(MANY))]
    run_jobs(jobs)


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict]:
    pytest.importorskip("triton")
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernels_match_torch_path_and_references(interpreted, case):
    rec = result_for(interpreted, case[0])
    assert rec["launches"] == {"forward": 1, "backward": 1}, rec
    assert rec["torch_path_launches"] == {"forward": 0, "backward": 0}, rec
    assert rec["dtypes_ok"], rec
    assert rec["num_clamped"] > 0 and rec["num_inside"] > 0, rec
    if case[-1] == "ties":
        assert rec["num_ties"] >= 20, rec
    for key in ("forward_equals_torch_path", "forward_equals_export", "direct_forward_equal"):
        assert rec[key], (key, rec)
    for key in ("grad_weight_equals_torch_path", "grad_weight_equals_ste", "direct_grad_weight_equal"):
        assert rec[key], (key, rec)
    for key in ("grad_log_scale_err_fp64", "grad_log_scale_err_torch_path", "direct_grad_log_scale_err"):
        assert rec[key] <= 1.0, f"{key}: {rec[key]:.3g} x tolerance; {rec}"
    assert rec["torch_path_err_fp64"] <= 1.0, rec  # the reference agrees with the torch path too


def test_qat_linear_under_autocast_writes_the_bf16_weight(interpreted):
    rec = result_for(interpreted, "module-autocast")
    assert rec["launches"][0] == rec["launches"][1] == {"forward": 1, "backward": 1}, rec  # torch arm: none more
    assert rec["y_dtype"] == "torch.bfloat16", rec
    assert rec["y_equal"] and rec["y_equal_before"] and rec["grad_weight_equal"], rec
    assert rec["grad_log_scale_rel"] < 1e-5, rec


def test_trainer_step_on_the_kernels_equals_the_torch_path(interpreted):
    """fake_quant_backend="triton" (kernels under the interpreter) and "torch" give the same loss and the same
    gradient of every parameter bit for bit; log-scale gradients sum in another order (tolerance)."""
    rec = result_for(interpreted, "trainer-step")
    fused, torch_path = rec["launches"]
    assert fused["forward"] == fused["backward"] == rec["num_log_scales"] > 0, rec  # every QAT linear, once each
    assert torch_path == fused, rec  # the torch run launched nothing more
    assert rec["same_names"] and rec["num_grads"] > rec["num_log_scales"], rec
    assert rec["loss_equal"] and rec["unequal_grads"] == [], rec
    assert rec["log_scale_rel"] < 1e-5, rec


@pytest.mark.parametrize("index", range(len(MANY)), ids=[f"{m[0]}-b{m[1]}-g{m[2]}-out-{m[3]}" for m in MANY])
def test_many_weights_in_one_launch_equal_one_launch_per_weight(interpreted, index):
    rec = result_for(interpreted, f"many-{index}")
    assert rec["launches_many"] == {"forward": 1, "backward": 1}, rec
    assert rec["launches_single"] == {"forward": 0, "backward": 0}, rec
    assert rec["dtypes"] == [str(DTYPES[MANY[index][3] or MANY[index][0]])], rec
    for key in ("forward_equal", "grad_weight_equal", "grad_log_scale_equal"):
        assert rec[key], (key, rec)
    assert rec["forward_equals_torch_path"] and rec["grad_weight_equals_torch_path"], rec


def test_grouped_trainer_step_equals_one_launch_per_layer(interpreted):
    """fake_quant_grouped: one many-weight launch each way for every trainable QAT linear, the frozen ones (the
    vision tower) per layer forward only; loss and every gradient bit for bit as per layer."""
    rec = result_for(interpreted, "grouped-trainer-step")
    (many_g, single_g), (many_u, single_u) = rec["launches_grouped"], rec["launches_ungrouped"]
    assert many_g == {"forward": 1, "backward": 1} and many_u == {"forward": 0, "backward": 0}, rec
    assert single_u["forward"] == single_u["backward"] == rec["num_log_scales"] > 0, rec
    assert single_g["backward"] == 0, rec  # every trainable layer's backward ran in the one launch
    assert rec["same_names"] and rec["loss_equal"] and rec["unequal_grads"] == [], rec


def test_unsupported_inputs_take_the_torch_path(interpreted):
    rec = result_for(interpreted, "support")
    assert rec["fp32_supported"], rec
    assert not any(rec[k] for k in ("fp64_weight", "fp16_log_scale", "group_not_multiple_of_8", "shape_mismatch"))
    assert rec["dispatch_fp64"] and rec["fp64_matches_definition"], rec
    assert rec["dispatch_fp32"] and rec["dispatch_auto_forced"], rec
    # "auto" on CPU tensors is the torch path even under the interpreter; "torch" stays torch inside the block
    assert not any(rec[k] for k in ("dispatch_auto_on_cpu", "dispatch_torch_forced", "dispatch_auto_off")), rec


def test_cpu_path_does_not_import_triton():
    """Without CUDA and without the interpreter, fake_quantize runs torch ops and never imports the Triton kernels
    module (whether ``triton`` itself gets imported is up to torch and transformers, not us)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import sys, torch\n"
        "from grace_quant.quant import fake_quantize\n"
        "w = torch.randn(4, 64, requires_grad=True)\n"
        "fake_quantize(w, torch.zeros(4, 2, requires_grad=True), 32, 4, out_dtype=torch.bfloat16).sum().backward()\n"
        "print(any(name.endswith('kernels.triton_fake_quant') for name in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"


if __name__ == "__main__":
    _main()


# ----------------------------------------------------------------------------------------------------------------
# GPU: fused vs torch path at a realistic size (skipped without CUDA)
# ----------------------------------------------------------------------------------------------------------------

GPU_CASES = [
    ("float32", 4, None),
    ("float32", 8, None),
    ("float32", 4, "bfloat16"),
    ("bfloat16", 4, None),
    ("float16", 8, None),
]


def _cuda_inputs(dtype: torch.dtype, bits: int, out_dtype, seed: int):
    from grace_quant.kernels import code_range
    from grace_quant.quant import mse_scales, scale_from_log

    gen = torch.Generator(device="cuda").manual_seed(seed)
    n = k = 4096
    group = 128
    w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
    w = torch.where(torch.rand(n, k, device="cuda", generator=gen) < 0.01, w * 40, w).to(dtype)
    log_scale = torch.log(mse_scales(w, group, bits)) + 0.1 * torch.randn(n, k // group, device="cuda", generator=gen)
    lo, hi = code_range(bits)
    s = scale_from_log(log_scale, dtype).double().repeat_interleave(group, dim=1)
    ties = torch.rand(n, k, device="cuda", generator=gen) < 0.01
    kk = torch.randint(lo, hi, (n, k), device="cuda", generator=gen).double()
    w = torch.where(ties, ((kk + 0.5) * s).to(dtype), w)  # ties where exact in the dtype, near-ties elsewhere
    near = torch.rand(n, k, device="cuda", generator=gen) < 0.01  # one ulp off a tie: needs an IEEE division
    direction = torch.where(torch.rand(n, k, device="cuda", generator=gen) < 0.5, -math.inf, math.inf)
    w = torch.where(near, ((kk + 0.5) * s).float().nextafter(direction).to(dtype), w)
    upstream = torch.randn(n, k, device="cuda", generator=gen).to(out_dtype or dtype)
    return w, log_scale, upstream, group


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name,bits,out_dtype_name", GPU_CASES)
def test_fused_matches_torch_path_on_cuda(dtype_name, bits, out_dtype_name):
    from grace_quant.kernels import code_range, dequantize, pack
    from grace_quant.quant import quantize_codes, scale_from_log

    dtype = DTYPES[dtype_name]
    out_dtype = DTYPES[out_dtype_name] if out_dtype_name else None
    w, log_scale, upstream, group = _cuda_inputs(dtype, bits, out_dtype, seed=bits)
    fused = _run_fake_quant(w, log_scale, upstream, group, bits, out_dtype, True)
    ref = _run_fake_quant(w, log_scale, upstream, group, bits, out_dtype, False)
    assert fused[3] == {"forward": 1, "backward": 1} and ref[3] == {"forward": 0, "backward": 0}
    assert torch.equal(fused[0], ref[0])
    scales = scale_from_log(log_scale, dtype)
    export = dequantize(pack(quantize_codes(w, scales, group, bits), bits), scales, group, bits)
    assert torch.equal(fused[0], export if out_dtype is None else export.to(out_dtype))
    assert torch.equal(fused[1], ref[1])
    lo, hi = code_range(bits)
    x = (w.float() / scales.float().repeat_interleave(group, dim=1)).double()
    r = torch.round(x)
    inside = (r >= lo) & (r <= hi)
    step = torch.where(inside, r - x, r.clamp(lo, hi))
    g = upstream.to(dtype).double()
    e64 = torch.exp(log_scale.double())
    expected = (g * step).reshape(w.shape[0], -1, group).sum(-1) * e64
    magnitude = (g * step).abs().reshape(w.shape[0], -1, group).sum(-1) * e64
    assert _grad_err(fused[2], expected, magnitude) <= 1.0
    assert _grad_err(fused[2], ref[2].double(), magnitude) <= 1.0


@pytest.mark.gpu
def test_kernels_replay_in_a_cuda_graph():
    """No host syncs: both launches capture into a CUDA graph and replay on new inputs."""
    from grace_quant.kernels import triton_fake_quant as tfq

    w, log_scale, upstream, group = _cuda_inputs(torch.float32, 4, None, seed=5)
    e = torch.exp(log_scale)
    tfq.fake_quant_forward(w, e, group, 4)  # compile outside the capture
    tfq.fake_quant_backward(w, e, upstream, group, 4)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tfq.fake_quant_forward(w, e, group, 4, torch.bfloat16)
        gw, gls = tfq.fake_quant_backward(w, e, upstream, group, 4)
    w.copy_(torch.randn_like(w) * 0.02)
    graph.replay()
    torch.testing.assert_close(out, tfq.fake_quant_forward(w, e, group, 4, torch.bfloat16), rtol=0, atol=0)
    expected_gw, expected_gls = tfq.fake_quant_backward(w, e, upstream, group, 4)
    torch.testing.assert_close(gw, expected_gw, rtol=0, atol=0)
    torch.testing.assert_close(gls, expected_gls, rtol=0, atol=0)


@pytest.mark.gpu
def test_many_weights_match_one_launch_per_weight_on_cuda():
    """The trainer-step student's weight shapes (q|o, k|v, gate|up, down; fp32 masters, bf16 out) in one launch:
    outputs and both gradients bit for bit as one launch per weight, with no host sync in either launch."""
    from grace_quant import quant

    gen = torch.Generator(device="cuda").manual_seed(3)
    shapes = [(1536, 1536), (256, 1536), (8960, 1536), (1536, 8960), (256, 1536)]
    ws = [torch.randn(o, i, device="cuda", generator=gen) * 0.02 for o, i in shapes]
    lss = [torch.log(quant.mse_scales(w, 128, 4)) + 0.2 * torch.randn(w.shape[0], w.shape[1] // 128, device="cuda",
                                                                       generator=gen) for w in ws]  # fmt: skip
    ups = [torch.randn(w.shape, device="cuda", generator=gen).to(torch.bfloat16) for w in ws]

    def run(fn):
        w_leaves = [w.clone().requires_grad_() for w in ws]
        ls_leaves = [ls.clone().requires_grad_() for ls in lss]
        with quant.fused_fake_quant(True):
            outs = fn(w_leaves, ls_leaves)
        torch.autograd.backward(outs, ups)
        return [o.detach() for o in outs], [w.grad for w in w_leaves], [ls.grad for ls in ls_leaves]

    run(lambda w, ls: quant.fake_quantize_many(w, ls, 128, 4, torch.bfloat16))  # compile first
    torch.cuda.set_sync_debug_mode("error")
    try:
        many = run(lambda w, ls: quant.fake_quantize_many(w, ls, 128, 4, torch.bfloat16))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    single = run(lambda w, ls: [quant.fake_quantize(a, b, 128, 4, torch.bfloat16) for a, b in zip(w, ls, strict=True)])
    for name, got, want in zip(("w_hat", "grad_weight", "grad_log_scale"), many, single, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), name
