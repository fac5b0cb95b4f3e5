"""W4A16 Triton kernels on CPU under Triton's interpreter, checked against an fp64 reference.

``TRITON_INTERPRET=1`` must be set before triton is imported, so the kernels run in a subprocess that executes
this file as a script; the tests read its per-case results. The custom op's CPU implementation is checked with
``torch.library.opcheck`` in the test process itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from interpreter_harness import run_interpreted, run_jobs

ROOT = Path(__file__).resolve().parents[1]
TOL = {"float16": 1e-3, "bfloat16": 5e-3}


# (id, entry, M, N, K, group, dtype, bias, extra keyword arguments)
_DISPATCH = [
    (1, 72, 640, 32, True),
    (1, 200, 384, 128, False),
    (2, 72, 256, 128, False),
    (3, 200, 640, 64, True),
    (4, 72, 384, 32, True),
    (16, 200, 384, 64, False),
    (16, 72, 256, 128, True),
    (40, 72, 384, 32, False),
    (65, 200, 384, 128, True),
    (70, 72, 640, 64, False),
]
CASES = [
    (f"auto-{dt}-m{m}-n{n}-k{k}-g{g}-{'bias' if b else 'nobias'}", "dispatch", m, n, k, g, dt, b, {})
    for dt in ("float16", "bfloat16")
    for m, n, k, g, b in _DISPATCH
] + [
    ("gemv-nosplit-fp16", "gemv", 3, 200, 640, 128, "float16", True, {"splits": 1}),
    ("gemv-split4-bn8-bf16", "gemv", 1, 72, 512, 32, "bfloat16", False, {"splits": 4, "block_n": 8}),
    ("gemv-step256-fp16", "gemv", 2, 200, 384, 64, "float16", True, {"step_k": 256}),
    ("gemv-m4-split3-bf16", "gemv", 4, 200, 1152, 128, "bfloat16", True, {"splits": 3}),
    ("gemv-step1024-g32-bf16", "gemv", 1, 72, 1152, 32, "bfloat16", True, {"step_k": 1024, "splits": 2}),
    ("gemv-step1024-g64-fp16", "gemv", 1, 200, 1152, 64, "float16", False, {"step_k": 1024}),
    ("pipe-m1-j32-bf16", "pipe", 1, 72, 1024, 128, "bfloat16", True, {"block_j": 32}),
    ("pipe-m3-j16-g64-split3-fp16", "pipe", 3, 200, 768, 64, "float16", False, {"block_j": 16, "splits": 3}),
    ("pipe-m2-j8-g32-bn16-bf16", "pipe", 2, 72, 512, 32, "bfloat16", True, {"block_j": 8, "block_n": 16, "splits": 2}),
    ("pipe-m4-j64-st3-fp16", "pipe", 4, 40, 2048, 128, "float16", True, {"block_j": 64, "num_stages": 3}),
    ("tc-nosplit-bf16", "tc", 16, 200, 384, 128, "bfloat16", False, {"splits": 1}),
    ("tc-split3-bm64-fp16", "tc", 33, 72, 384, 32, "float16", True, {"splits": 3, "block_m": 64}),
    ("tc-m5-bn128-bf16", "tc", 5, 200, 256, 64, "bfloat16", True, {"block_n": 128}),
    ("tc-prefetch-split3-bf16", "tc", 3, 72, 1024, 64, "bfloat16", True, {"splits": 3, "prefetch": 1, "block_k": 32}),
    ("tc-prefetch-nosplit-fp16", "tc", 20, 200, 384, 128, "float16", False, {"splits": 1, "prefetch": 1}),
    ("batched-3d-bf16", "batched", 6, 72, 384, 64, "bfloat16", True, {}),
    ("quant-linear-triton-fp16", "quant_linear", 2, 200, 384, 128, "float16", True, {}),
]


def _reference_fp64(kmod, x, packed, scales, bias, group):
    q = kmod.unpack(packed, 4).double()
    w = (q.view(q.shape[0], -1, group) * scales.double().unsqueeze(-1)).view(q.shape[0], -1)
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


def _run_case(kmod, tw, case) -> dict:
    _, entry, m, n, k, group, dtype_name, has_bias, extra = case
    dtype = getattr(torch, dtype_name)
    packed = kmod.pack(torch.randint(-8, 8, (n, k), dtype=torch.int8), 4)
    scales = (torch.rand(n, k // group) * 0.05 + 0.001).to(dtype)
    bias = torch.randn(n).to(dtype) if has_bias else None
    x = torch.randn(m, k).to(dtype)
    if entry == "dispatch":
        y = tw.w4a16_linear(x, packed, scales, bias, group)
    elif entry == "gemv":
        y = tw.gemv_w4a16(x, packed, scales, bias, group, **extra)
    elif entry == "pipe":
        assert tw.supports_pipe(x, scales, group, extra["block_j"])
        y = tw.gemv_pipe_w4a16(x, packed, scales, bias, group, **extra)
    elif entry == "tc":
        y = tw.tc_gemm_w4a16(x, packed, scales, bias, group, **extra)
    elif entry == "batched":
        y = tw.w4a16_linear(x.view(2, m // 2, k), packed, scales, bias, group).view(m, n)
    else:
        y = kmod.quant_linear(x, packed, scales, bias, group_size=group, bits=4, backend="triton")
    assert y.shape == (m, n) and y.dtype == dtype, (y.shape, y.dtype)
    ref = _reference_fp64(kmod, x, packed, scales, bias, group)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    return {"err": err if err == err else float("inf")}


def _run_dequant(kmod, tw) -> dict:
    """The Triton dequantize kernel (the tensor-core kernel's tile rule) vs the torch dequantize: bit for bit in both
    dtypes (one rounding of the exact product to nearest even; the interpreter's truncating bf16 cast is avoided)."""
    out = {}
    for dtype, group, n, k in ((torch.bfloat16, 32, 200, 384), (torch.float16, 128, 72, 640)):
        packed = kmod.pack(torch.randint(-8, 8, (n, k), dtype=torch.int8), 4)
        scales = (torch.rand(n, k // group) * 0.05 + 0.001).to(dtype)
        got = tw.dequantize_w4(packed, scales, group, dtype).float()
        ref = kmod.dequantize(packed, scales, group, 4).float()
        name = str(dtype).removeprefix("torch.")
        out[name + "_mismatches"] = int((got != ref).sum())
        out[name + "_max_rel"] = float(((got - ref).abs() / ref.abs().clamp_min(1e-30)).max())
    return out


def _run_split_reduction(kmod, tw) -> dict:
    """Split-K leaves every arrival counter at zero for the next call (the last split resets its tile's), and
    repeated calls agree bit for bit (partials are added in split order, whichever split arrives last)."""
    torch.manual_seed(5)
    n, k, group, dtype = 72, 1024, 64, torch.float16
    packed = kmod.pack(torch.randint(-8, 8, (n, k), dtype=torch.int8), 4)
    scales = (torch.rand(n, k // group) * 0.05 + 0.001).to(dtype)
    x = torch.randn(3, k).to(dtype)
    ref = _reference_fp64(kmod, x, packed, scales, None, group)
    out = {}
    kernels = (
        ("tc", tw.tc_gemm_w4a16, {"block_n": 32, "block_k": 64}),
        ("gemv", tw.gemv_w4a16, {}),
        ("pipe", tw.gemv_pipe_w4a16, {"block_j": 16}),
    )
    for name, fn, kw in kernels:
        first = fn(x, packed, scales, None, group, splits=4, **kw)
        zero_after_first = bool((tw._counters(x.device) == 0).all())
        again = fn(x, packed, scales, None, group, splits=4, **kw)
        out[name] = {
            "repeat_equal": bool(torch.equal(first, again)),
            "err": ((first.double() - ref).norm() / ref.norm()).item(),
            "counters_zero": zero_after_first and bool((tw._counters(x.device) == 0).all()),
        }
    return out


def _run_tuned(kmod, tw) -> dict:
    """Dispatch with configurations filed in the tuning table (not the heuristic's): same results."""
    from grace_quant.kernels import dispatch, tables

    table = tables.table(tables.INTERPRETER_DEVICE)
    configs = {
        1: {"block_n": 4, "step_k": 256, "num_warps": 2, "target_programs_per_sm": 4},  # split-K GEMV
        5: {"block_n": 32, "num_warps": 4, "num_stages": 2, "target_programs_per_sm": 2},
    }
    configs[2] = {
        "block_n": 8,
        "block_j": 16,
        "num_warps": 2,
        "num_stages": 3,
        "target_programs_per_sm": 4,
    }  # pipelined
    configs[70] = {"tc": 1, "block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2}  # the race's tc winner
    configs[130] = {"tc": 0}  # the race's dequantize + cuBLAS winner
    configs[300] = {"wgmma": 1, "block_m": 128, "block_k": 128, "stages": 4, "pipe": 1}  # Hopper only: falls back here
    configs[3] = {"wgmma": 1, "block_m": 16, "block_k": 128, "stages": 8, "pipe": 1, "split": 4}  # small tile, likewise
    calls, pipe_calls = [], []
    tc_gemm, gemv_pipe = tw.tc_gemm_w4a16, tw.gemv_pipe_w4a16
    tw.tc_gemm_w4a16 = lambda *args, **kwargs: calls.append(kwargs) or tc_gemm(*args, **kwargs)
    tw.gemv_pipe_w4a16 = lambda *args, **kwargs: pipe_calls.append(kwargs) or gemv_pipe(*args, **kwargs)
    out = {}
    try:
        for m, config in configs.items():
            n, k, group, dtype = 72, 384, 64, torch.float16
            table.put(dispatch.key_for(m, n, k, group, dtype), config)
            packed = kmod.pack(torch.randint(-8, 8, (n, k), dtype=torch.int8), 4)
            scales = (torch.rand(n, k // group) * 0.05 + 0.001).to(dtype)
            x = torch.randn(m, k).to(dtype)
            used = dispatch.config_for(x, n, group) == config
            calls.clear()
            pipe_calls.clear()
            y = tw.w4a16_linear(x, packed, scales, None, group)
            ref = _reference_fp64(kmod, x, packed, scales, None, group)
            err = ((y.double() - ref).norm() / ref.norm()).item()
            out[f"m{m}"] = {"used": used, "err": err, "tc_calls": calls[:], "pipe_calls": pipe_calls[:]}
    finally:
        tw.tc_gemm_w4a16, tw.gemv_pipe_w4a16 = tc_gemm, gemv_pipe
    return out


def _run_pipe_heuristic(kmod, tw) -> dict:
    """Without a tuned entry, the GEMV path takes the pipelined GEMV for weights of at least ``_PIPE_MIN_WEIGHTS``
    (lowered here: the interpreter is slow) with the widest step that tiles K, and the first-generation GEMV where the
    scales are not in the activations' dtype (the pipelined kernel reads them as 16-bit pairs)."""
    calls = []
    gemv_pipe, threshold = tw.gemv_pipe_w4a16, tw._PIPE_MIN_WEIGHTS
    tw.gemv_pipe_w4a16 = lambda *args, **kwargs: calls.append(kwargs) or gemv_pipe(*args, **kwargs)
    tw._PIPE_MIN_WEIGHTS = 72 * 768
    out = {}
    try:
        for name, n, k, scale_dtype in (
            ("k1024", 72, 1024, torch.float16), ("k768", 72, 768, torch.float16), ("small", 40, 768, torch.float16),
            ("fp32-scales", 72, 1024, torch.float32),
        ):  # fmt: skip
            packed = kmod.pack(torch.randint(-8, 8, (n, k), dtype=torch.int8), 4)
            scales = (torch.rand(n, k // 128) * 0.05 + 0.001).to(scale_dtype)
            x = torch.randn(1, k).to(torch.float16)
            calls.clear()
            y = tw.w4a16_linear(x, packed, scales, None, 128)
            ref = _reference_fp64(kmod, x, packed, scales, None, 128)
            out[name] = {
                "err": ((y.double() - ref).norm() / ref.norm()).item(),
                "block_j": [c["block_j"] for c in calls],
            }
    finally:
        tw.gemv_pipe_w4a16, tw._PIPE_MIN_WEIGHTS = gemv_pipe, threshold
    return out


def _run_eager(kmod, tw) -> dict:
    """``eager_linear`` (the dispatch resolved once per call shape): every path, 3-D and strided inputs, a bias in
    another dtype, fp32 scales, no tokens, and a group the kernels lack. Each shape runs twice with other tensors of
    that shape (the second call takes the first one's plan, which must hold no tensor), against ``w4a16_linear``
    (bit for bit where the kernels apply) and the fp64 reference."""
    torch.manual_seed(9)
    out = {}
    cases = (  # name, x shape, n, k, group, x dtype, scales dtype, bias dtype, strided x (and bias)
        ("gemv", (1, 384), 72, 384, 64, torch.float16, torch.float16, torch.float16, False),
        ("tc-strided-bias", (16, 256), 40, 256, 64, torch.float16, torch.float16, torch.float16, True),
        ("tc-3d", (2, 8, 256), 200, 256, 128, torch.bfloat16, torch.bfloat16, None, False),
        ("large-bias-fp32", (70, 384), 72, 384, 32, torch.bfloat16, torch.bfloat16, torch.float32, False),
        ("large-strided-fp32-scales", (1, 66, 256), 40, 256, 64, torch.float16, torch.float32, torch.float16, True),
        ("empty", (0, 256), 40, 256, 64, torch.float16, torch.float16, None, False),
        ("group48-reference", (3, 192), 40, 192, 48, torch.float16, torch.float16, None, False),
    )
    for name, shape, n, k, group, dtype, sdtype, bdtype, strided in cases:
        rec = {"equal_direct": [], "err": [], "repeat": []}
        before = len(tw._EAGER_PLANS)
        for _ in range(2):
            packed = kmod.pack(torch.randint(-8, 8, (n, k), dtype=torch.int8), 4)
            scales = (torch.rand(n, k // group) * 0.05 + 0.001).to(sdtype)
            bias = None if bdtype is None else torch.randn(2 * n).to(bdtype)[:: 1 + strided]
            bias = None if bias is None else bias[:n]
            x = torch.randn(*shape[:-1], shape[-1] + 8 * strided).to(dtype)[..., 8 * strided :]
            y = tw.eager_linear(x, packed, scales, bias, group)
            assert y.shape == (*shape[:-1], n) and y.dtype == dtype, (y.shape, y.dtype)
            if name == "group48-reference":
                direct = kmod.quant_linear_reference(x, packed, scales, bias, group, 4)
            else:
                direct = tw.w4a16_linear(x, packed, scales, bias, group)
            rec["equal_direct"].append(bool(torch.equal(y, direct)))
            rec["repeat"].append(bool(torch.equal(y, tw.eager_linear(x, packed, scales, bias, group))))
            if x.numel():
                ref = _reference_fp64(kmod, x.reshape(-1, k), packed, scales, bias, group)
                rec["err"].append(((y.reshape(-1, n).double() - ref).norm() / ref.norm()).item())
        rec["plans_added"] = len(tw._EAGER_PLANS) - before
        out[name] = rec
    out["retuned"] = _eager_after_a_table_edit(kmod, tw)
    return out


def _eager_after_a_table_edit(kmod, tw) -> dict:
    """A plan made before a table edit is not reused after it: the shape's new tuned entry (the tensor-core kernel
    where the heuristic took dequantize + cuBLAS) serves the next call."""
    from grace_quant.kernels import dispatch, tables

    n, k, group, dtype = 40, 256, 64, torch.float16
    packed = kmod.pack(torch.randint(-8, 8, (n, k), dtype=torch.int8), 4)
    scales = (torch.rand(n, k // group) * 0.05 + 0.001).to(dtype)
    x = torch.randn(70, k).to(dtype)
    calls, tc_gemm = [], tw.tc_gemm_w4a16
    tw.tc_gemm_w4a16 = lambda *args, **kwargs: calls.append(kwargs) or tc_gemm(*args, **kwargs)
    try:
        before = tw.eager_linear(x, packed, scales, None, group)
        tc_before = len(calls)
        tables.table(tables.INTERPRETER_DEVICE).put(
            dispatch.key_for(70, n, k, group, dtype), {"tc": 1, "block_m": 64, "block_n": 32, "num_warps": 4}
        )
        after = tw.eager_linear(x, packed, scales, None, group)
    finally:
        tw.tc_gemm_w4a16 = tc_gemm
    ref = _reference_fp64(kmod, x, packed, scales, None, group)
    errs = [((y.double() - ref).norm() / ref.norm()).item() for y in (before, after)]
    return {"tc_before": tc_before, "tc_after": len(calls) - tc_before, "err": errs}


def _main() -> None:
    """Subprocess entry: run every case under the interpreter and print one JSON line per result."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    import grace_quant.kernels as kmod
    from grace_quant.kernels import triton_w4a16 as tw

    assert tw.INTERPRET
    torch.manual_seed(1234)
    jobs = [(case[0], lambda case=case: _run_case(kmod, tw, case)) for case in CASES]
    run_jobs([
        *jobs,
        ("dequant", lambda: _run_dequant(kmod, tw)),
        ("split", lambda: _run_split_reduction(kmod, tw)),
        ("tuned", lambda: _run_tuned(kmod, tw)),
        ("pipe-heuristic", lambda: _run_pipe_heuristic(kmod, tw)),
        ("eager", lambda: _run_eager(kmod, tw)),
    ])  # fmt: skip


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict]:
    pytest.importorskip("triton")
    return run_interpreted(__file__, TRITON_DEFAULT_FP_FUSION=os.environ.get("TRITON_DEFAULT_FP_FUSION", "1"))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_fp64_reference(interpreted, case):
    rec = interpreted.get(case[0])
    assert rec is not None, f"no result for {case[0]}"
    assert "error" not in rec, rec.get("error")
    assert rec["err"] < TOL[case[6]], f"{case[0]}: relative L2 error {rec['err']:.3e} >= {TOL[case[6]]}"


def test_tuned_configs_reach_the_kernels_and_keep_results(interpreted):
    rec = interpreted.get("tuned")
    assert rec is not None and "error" not in rec, rec
    for m in ("m1", "m2", "m3", "m5", "m70", "m130", "m300"):
        assert rec[m]["used"] and rec[m]["err"] < TOL["float16"], rec
    assert [c["block_j"] for c in rec["m2"]["pipe_calls"]] == [16] and rec["m1"]["pipe_calls"] == []
    # above M = 64 the tuned race decides: the tensor-core kernel with the winner's tiles, or dequantize + cuBLAS
    assert rec["m70"]["tc_calls"] == [{"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2, "splits": 1}]
    assert rec["m130"]["tc_calls"] == [] and len(rec["m5"]["tc_calls"]) == 1
    assert rec["m300"]["tc_calls"] == []  # a Gluon entry off Hopper runs the path's fallback, dequantize + matmul
    assert len(rec["m3"]["tc_calls"]) == 1  # and on the tc path, the tensor-core kernel's heuristic


def test_split_k_resets_its_counters_and_repeats_bit_for_bit(interpreted):
    rec = interpreted["split"]
    assert "error" not in rec, rec
    for name in ("tc", "gemv", "pipe"):
        assert rec[name]["counters_zero"] and rec[name]["repeat_equal"], rec
        assert rec[name]["err"] < TOL["float16"], rec


def test_gemv_path_picks_the_pipelined_gemv_only_where_it_reads_the_layout(interpreted):
    rec = interpreted["pipe-heuristic"]
    assert "error" not in rec, rec
    assert rec["k1024"]["block_j"] == [64] and rec["k768"]["block_j"] == [32]  # the widest step tiling K
    assert rec["small"]["block_j"] == [] and rec["fp32-scales"]["block_j"] == []  # first-generation GEMV
    for name in rec:
        assert rec[name]["err"] < TOL["float16"], rec


def test_dequantize_kernel_matches_torch_dequantize(interpreted):
    rec = interpreted["dequant"]
    assert rec["float16_mismatches"] == 0 and rec["bfloat16_mismatches"] == 0, rec


@pytest.mark.parametrize("has_bias", [True, False])
def test_custom_op_opcheck_cpu(has_bias):
    import grace_quant.kernels as kmod

    torch.manual_seed(0)
    packed = kmod.pack(torch.randint(-8, 8, (48, 256), dtype=torch.int8), 4)
    scales = (torch.rand(48, 2) * 0.05).to(torch.bfloat16)
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
    bias = torch.randn(48, dtype=torch.bfloat16) if has_bias else None
    torch.library.opcheck(kmod.w4a16_linear_op.default, (x, packed, scales, bias, 128))
    y = kmod.w4a16_linear_op(x, packed, scales, bias, 128)
    ref = kmod.quant_linear_reference(x, packed, scales, bias, 128, 4)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_quant_linear_backends_on_cpu():
    import grace_quant.kernels as kmod

    packed = kmod.pack(torch.randint(-8, 8, (16, 128), dtype=torch.int8), 4)
    scales = torch.rand(16, 4) * 0.05
    x = torch.randn(3, 128)
    ref = kmod.quant_linear_reference(x, packed, scales, None, 32, 4)
    for backend in ("auto", "torch"):
        torch.testing.assert_close(kmod.quant_linear(x, packed, scales, group_size=32, backend=backend), ref)
    with pytest.raises(ValueError, match="unknown backend"):
        kmod.quant_linear(x, packed, scales, group_size=32, backend="cuda")
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        with pytest.raises(RuntimeError, match="needs CUDA"):
            kmod.quant_linear(x, packed, scales, group_size=32, backend="triton")


if __name__ == "__main__":
    _main()


def test_custom_op_backward_matches_the_reference_autograd():
    """Gradients through the op (e.g. LoRA on a packed model) equal autograd through dequantize + matmul."""
    import torch

    from grace_quant.kernels import pack, quant_linear_reference, w4a16_linear_op

    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (24, 64), generator=generator, dtype=torch.int8)
    packed, scales = pack(codes, 4), torch.rand(24, 2, generator=generator, dtype=torch.float64) + 0.1
    bias = torch.randn(24, generator=generator, dtype=torch.float64)
    x = torch.randn(3, 5, 64, generator=generator, dtype=torch.float64)
    upstream = torch.randn(3, 5, 24, generator=generator, dtype=torch.float64)
    grads = []
    for fn in (
        lambda a, b: w4a16_linear_op(a, packed, scales, b, 32),
        lambda a, b: quant_linear_reference(a, packed, scales, b, 32, 4),
    ):
        xi, bi = x.clone().requires_grad_(), bias.clone().requires_grad_()
        (fn(xi, bi) * upstream).sum().backward()
        grads.append((xi.grad, bi.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-12) and torch.allclose(grads[0][1], grads[1][1], atol=1e-12)
    torch.library.opcheck(w4a16_linear_op, (x.requires_grad_(), packed, scales, bias.requires_grad_(), 32))


def test_eager_linear_resolves_each_call_shape_once_and_matches_the_kernels(interpreted):
    rec = interpreted["eager"]
    assert "error" not in rec, rec.get("error")
    for name, case in rec.items():
        if name == "retuned":
            continue
        # two weights of one shape: one plan, and each call computes with its own tensors
        assert case["plans_added"] == 1, (name, case)
        assert all(case["equal_direct"]) and all(case["repeat"]), (name, case)
        assert all(err < TOL["bfloat16"] for err in case["err"]), (name, case)
    assert rec["empty"]["err"] == [] and len(rec["gemv"]["err"]) == 2


def test_eager_plans_follow_a_table_edit(interpreted):
    rec = interpreted["eager"]["retuned"]
    assert rec["tc_before"] == 0 and rec["tc_after"] == 1, rec
    assert all(err < TOL["float16"] for err in rec["err"]), rec
