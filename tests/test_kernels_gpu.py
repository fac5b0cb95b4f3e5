"""W4A16 Triton kernels on a CUDA GPU: every dispatch path vs an fp64 reference, torch.compile, CUDA graphs, opcheck.

Skipped without CUDA. Outputs are poisoned (NaN-filled allocator blocks) before launches and fresh random inputs are
drawn for every case, so unwritten elements or wrong indexing cannot pass.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
TOL = {torch.float16: 1e-3, torch.bfloat16: 5e-3}


KM = importlib.import_module("grace_quant.kernels")
TW = importlib.import_module("grace_quant.kernels.triton_w4a16")


def make(n: int, k: int, group: int, dtype: torch.dtype, bias: bool):
    packed = KM.pack(torch.randint(-8, 8, (n, k), dtype=torch.int8, device="cuda"), 4)
    scales = (torch.rand(n, k // group, device="cuda") * 0.05 + 0.001).to(dtype)
    b = torch.randn(n, device="cuda").to(dtype) if bias else None
    return packed, scales, b


def ref_fp64(x, packed, scales, bias, group):
    q = KM.unpack(packed, 4).double()
    w = (q.view(q.shape[0], -1, group) * scales.double().unsqueeze(-1)).view(q.shape[0], -1)
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


def poison():
    """Fill and free a large block so the next allocations start as NaN rather than stale valid numbers."""
    torch.empty(64 * 2**20, device="cuda").fill_(float("nan"))
    torch.cuda.synchronize()


def rel_err(y, ref) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


_SHAPES = [  # (M, N, K, bias): one per path, with N and K tails
    (1, 4096, 4096, True),
    (1, 200, 640, False),
    (3, 72, 640, True),
    (16, 200, 640, True),
    (64, 4096, 640, False),
    (65, 200, 640, True),
    (300, 72, 4096, False),
]
CASES = [
    (dtype, group, *shape) for dtype in (torch.float16, torch.bfloat16) for group in (32, 64, 128) for shape in _SHAPES
]


@pytest.mark.parametrize(
    "dtype,group,m,n,k,has_bias",
    CASES,
    ids=[f"{str(c[0])[6:]}-g{c[1]}-m{c[2]}-n{c[3]}-k{c[4]}-{'b' if c[5] else 'nb'}" for c in CASES],
)
def test_paths_vs_fp64(dtype, group, m, n, k, has_bias):
    torch.manual_seed(m * 1000 + n + k + group)
    packed, scales, bias = make(n, k, group, dtype, has_bias)
    x = torch.randn(m, k, device="cuda").to(dtype)
    poison()
    y = TW.w4a16_linear(x, packed, scales, bias, group)
    assert y.shape == (m, n) and y.dtype == dtype
    assert torch.isfinite(y).all()
    err = rel_err(y, ref_fp64(x, packed, scales, bias, group))
    assert err < TOL[dtype], f"relative L2 error {err:.3e}"


FORCED = [
    ("gemv", dict(splits=1), 2, 200, 1152, 128),
    ("gemv", dict(splits=3), 1, 200, 4096, 128),
    ("gemv", dict(), 3, 1536, 8960, 128),
    ("gemv", dict(splits=5, block_n=8), 4, 72, 1152, 64),
    ("gemv", dict(step_k=1024, num_warps=8, block_n=32), 1, 4096, 4096, 128),
    ("pipe", dict(block_j=64, block_n=8, num_warps=2), 1, 11008, 4096, 128),
    ("pipe", dict(block_j=32, block_n=32, splits=5), 2, 4096, 11008, 128),
    ("pipe", dict(block_j=16, num_stages=6, splits=1), 3, 200, 1152, 64),
    ("pipe", dict(block_j=8, block_n=16), 4, 1536, 8960, 32),
    ("tc", dict(splits=1), 16, 200, 640, 128),
    ("tc", dict(block_m=64), 33, 72, 640, 32),
    ("tc", dict(), 5, 4096, 4096, 128),
    ("tc", dict(), 256, 1000, 1024, 128),
    ("tc", dict(block_m=16, block_n=128, block_k=64, num_stages=5, splits=7), 1, 4096, 4096, 128),
    ("tc", dict(block_m=16, block_n=64, block_k=128, prefetch=1, splits=5), 3, 4096, 11008, 128),
    ("tc", dict(block_m=64, block_n=64, block_k=32, prefetch=1, num_warps=8, splits=1), 40, 1000, 640, 32),
    ("tc", dict(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=4, splits=1), 300, 512, 1024, 64),
    ("tc", dict(block_m=256, block_n=128, block_k=64, num_warps=8, num_stages=3, splits=1), 2048, 384, 512, 32),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kernel,cfg,m,n,k,group", FORCED, ids=[f"{c[0]}-{i}" for i, c in enumerate(FORCED)])
def test_forced_configs(dtype, kernel, cfg, m, n, k, group):
    torch.manual_seed(7 + m + n)
    packed, scales, bias = make(n, k, group, dtype, True)
    x = torch.randn(m, k, device="cuda").to(dtype)
    poison()
    fn = {"gemv": TW.gemv_w4a16, "pipe": TW.gemv_pipe_w4a16, "tc": TW.tc_gemm_w4a16}[kernel]
    assert kernel != "pipe" or TW.supports_pipe(x, scales, group, cfg["block_j"])
    y = fn(x, packed, scales, bias, group, **cfg)
    assert torch.isfinite(y).all()
    err = rel_err(y, ref_fp64(x, packed, scales, bias, group))
    assert err < TOL[dtype], f"relative L2 error {err:.3e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("group", [32, 128])
def test_dequantize_bit_exact(dtype, group):
    """The PTX tile rule (lop3 + packed FMAs) the tensor-core kernel feeds its MMA, bit for bit the torch rule."""
    packed, scales, _ = make(300, 1024, group, dtype, False)
    poison()
    torch.testing.assert_close(
        TW.dequantize_w4(packed, scales, group, dtype), KM.dequantize(packed, scales, group, 4), rtol=0, atol=0
    )


def test_dequantize_into_another_dtype_rounds_once():
    """fp16 scales, bf16 output: the fp32 path, one rounding of the exact product into bf16."""
    packed, scales, _ = make(200, 512, 64, torch.float16, False)
    ref = KM.dequantize(packed, scales.float(), 64, 4).to(torch.bfloat16)
    torch.testing.assert_close(TW.dequantize_w4(packed, scales, 64, torch.bfloat16), ref, rtol=0, atol=0)


@pytest.mark.parametrize("kernel", ["gemv", "tc"])
def test_split_k_is_deterministic_and_resets_its_counters(kernel):
    """Hundreds of splits racing to finish: the same bits every call, every counter back at zero."""
    torch.manual_seed(3)
    packed, scales, bias = make(4096, 11008, 128, torch.bfloat16, True)
    x = torch.randn(2, 11008, device="cuda").to(torch.bfloat16)
    fn = TW.gemv_w4a16 if kernel == "gemv" else TW.tc_gemm_w4a16
    outs = [fn(x, packed, scales, bias, 128, splits=8) for _ in range(20)]
    assert all(torch.equal(outs[0], y) for y in outs[1:])
    assert int(TW._counters(x.device).abs().sum()) == 0
    assert rel_err(outs[0], ref_fp64(x, packed, scales, bias, 128)) < TOL[torch.bfloat16]


def _count_jit_launches(launcher, monkeypatch) -> list:
    """The grids of ``launcher``'s launches through Triton's JIT from here on (its compiled kernels forgotten)."""
    jit, trips = launcher.fn, []

    class Spy:
        arg_names = jit.arg_names

        def __getitem__(self, grid):
            trips.append(grid)
            return jit[grid]

    monkeypatch.setattr(launcher, "fn", Spy())
    monkeypatch.setattr(launcher, "compiled", {})
    return trips


_LAUNCHERS = {
    "gemv": (TW.gemv_w4a16, "_launch_gemv"),
    "pipe": (TW.gemv_pipe_w4a16, "_launch_gemv_pipe"),
    "tc": (TW.tc_gemm_w4a16, "_launch_tc"),
    "dequant": (TW.dequantize_w4, "_launch_dequant"),
}


@pytest.mark.parametrize("kernel", list(_LAUNCHERS))
def test_direct_launches_equal_the_jit_launch_and_key_on_alignment(kernel, monkeypatch):
    """Launches after the first skip Triton's JIT (``kernels.launch``): the same bits as the JIT launch; an input off
    16-byte alignment (which Triton compiles separately) goes through the JIT once and computes the right result."""
    trips = _count_jit_launches(getattr(TW, _LAUNCHERS[kernel][1]), monkeypatch)
    torch.manual_seed(11)
    n, k, group, m = 4096, 4096, 128, 2 if kernel in ("gemv", "pipe") else 24
    packed, scales, bias = make(n, k, group, torch.bfloat16, True)
    if kernel == "dequant":
        ref = KM.dequantize(packed, scales, group, 4)
        outs = [TW.dequantize_w4(packed, scales, group, torch.bfloat16) for _ in range(3)]
        shifted = torch.empty(packed.numel() + 1, dtype=packed.dtype, device="cuda")[1:].view_as(packed)
        shifted.copy_(packed)  # 4 bytes off 16-byte alignment
        off = TW.dequantize_w4(shifted, scales, group, torch.bfloat16)
        torch.testing.assert_close(off, ref, rtol=0, atol=0)
    else:
        fn = _LAUNCHERS[kernel][0]
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        ref = ref_fp64(x, packed, scales, bias, group)
        outs = [fn(x, packed, scales, bias, group) for _ in range(3)]
        wide = torch.randn(m, k + 1, device="cuda").to(torch.bfloat16)[:, 1:]  # 2 bytes off, odd row stride
        wide.copy_(x)
        off = fn(wide, packed, scales, bias, group)
        assert rel_err(off, ref) < TOL[torch.bfloat16]
        assert rel_err(outs[0], ref) < TOL[torch.bfloat16]
    assert len(trips) == 2, f"expected one JIT launch per alignment, got {len(trips)}"
    assert all(torch.equal(outs[0], y) for y in outs[1:])
    if kernel == "dequant":
        torch.testing.assert_close(outs[0], ref, rtol=0, atol=0)


def test_native_launches_equal_the_kernels_runner_and_leave_launch_hooks_to_it():
    """On Triton 3.6 a direct launch calls the compiled kernel's C launch function itself (``launch.native_runner``):
    the same bits as the kernel's own runner; with a launch hook installed the call goes through that runner, which
    calls the hook."""
    import triton
    from triton import knobs

    from grace_quant.kernels.launch import native_runner

    torch.manual_seed(3)
    packed, scales, _ = make(1000, 1024, 128, torch.bfloat16, False)
    grid, constexprs = TW._dequant_launch(1000, 1024, 128, TW._tile_mode(scales, torch.bfloat16))
    first = torch.empty(1000, 1024, dtype=torch.bfloat16, device="cuda")
    args = (packed, scales, first, 1000, 128, 8, TW._MAGIC)
    kernel = TW._dequant_kernel[grid](*args, **constexprs)
    kernel = kernel.result() if hasattr(kernel, "result") else kernel
    native = native_runner(kernel)
    if triton.__version__.startswith("3.6."):
        assert native is not None, "Triton 3.6's launcher should be called directly"
    if native is None:
        pytest.skip(f"no direct C launch on Triton {triton.__version__}")
    consts = tuple(constexprs[name] for name in ("GROUP", "BLOCK_N", "MODE"))
    hooked = []
    for hook in (False, True):
        poison()
        out = torch.empty_like(first)
        if hook:
            knobs.runtime.launch_enter_hook.add(hooked.append)
        try:
            native((*grid, 1), packed, scales, out, 1000, 128, 8, TW._MAGIC, *consts)
        finally:
            knobs.runtime.launch_enter_hook.remove(hooked.append)
        torch.testing.assert_close(out, first, rtol=0, atol=0)
    torch.testing.assert_close(first, KM.dequantize(packed, scales, 128, 4), rtol=0, atol=0)
    assert len(hooked) == 1


def test_eager_plans_launch_the_dequantize_kernel_through_the_jit_once_and_hold_no_tensor(monkeypatch):
    """``eager_linear`` at prefill sizes: one JIT launch of the dequantize kernel per call shape, then its bound
    runner; a second weight of the same shape takes the same plan and computes with its own tensors; results equal
    the custom op's bit for bit (both dequantize, then cuBLAS on the same 2-D product)."""
    trips = _count_jit_launches(TW._launch_dequant, monkeypatch)
    monkeypatch.setattr(TW, "_EAGER_PLANS", {})
    torch.manual_seed(5)
    for _ in range(2):
        packed, scales, bias = make(1536, 1024, 128, torch.bfloat16, True)
        for x in (torch.randn(600, 1024, device="cuda"), torch.randn(2, 300, 1024, device="cuda")):
            x = x.to(torch.bfloat16)
            with torch.no_grad():
                y = KM.quant_linear(x, packed, scales, bias, group_size=128)
                again = KM.quant_linear(x, packed, scales, bias, group_size=128)
            expected = KM.w4a16_linear_op(x, packed, scales, bias, 128)
            assert torch.equal(y, expected) and torch.equal(again, expected)
            reference = ref_fp64(x.reshape(-1, 1024), packed, scales, bias, 128)
            assert rel_err(y.reshape(-1, 1536), reference) < TOL[torch.bfloat16]
    assert len(trips) == 1, f"expected one JIT launch of the dequantize kernel, got {len(trips)}"
    assert len(TW._EAGER_PLANS) == 1  # [600, K] and [2, 300, K]: one M bucket, one plan


class _QLinear(torch.nn.Module):
    def __init__(self, n: int, k: int, group: int, dtype: torch.dtype):
        super().__init__()
        packed, scales, bias = make(n, k, group, dtype, True)
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return KM.quant_linear(x, self.packed, self.scales, self.bias, group_size=self.group)


class _Block(torch.nn.Module):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.up = _QLinear(768, 512, 128, dtype)
        self.down = _QLinear(512, 768, 64, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.silu(self.up(x)))


@pytest.mark.parametrize("m", [1, 16, 80])
def test_torch_compile_reduce_overhead_matches_eager(m):
    torch.manual_seed(m)
    block = _Block(torch.bfloat16).cuda()
    compiled = torch.compile(block, fullgraph=True, mode="reduce-overhead", dynamic=False)
    for _ in range(3):  # warm-up, record, replay
        x = torch.randn(2, m, 512, device="cuda", dtype=torch.bfloat16)
        got = compiled(x).clone()
        want = block(x)
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)
        assert rel_err(got, want.double()) < 1e-3


@pytest.mark.parametrize("m", [1, 16])
def test_first_call_inside_a_compiled_cuda_graph_warm_up(m, monkeypatch):
    """The split-K counters may first be needed inside torch.compile's CUDA-graph warm-up (a compiled decode step
    before any eager call, as in LLaVA's generate at batch 1): they must stay out of the graph's private pool."""
    monkeypatch.setattr(TW, "_COUNTER_BUFFERS", {})
    torch._dynamo.reset()
    torch.manual_seed(200 + m)
    block = _Block(torch.bfloat16).cuda()
    compiled = torch.compile(block, fullgraph=True, mode="reduce-overhead", dynamic=False)
    for _ in range(3):  # warm-up (allocates the counters), record, replay
        x = torch.randn(1, m, 512, device="cuda", dtype=torch.bfloat16)
        got = compiled(x).clone()
        assert rel_err(got, block(x).double()) < 1e-3
    assert int(TW._counters(x.device).abs().sum()) == 0


@pytest.mark.parametrize("m", [1, 3, 16, 64, 130])
def test_manual_cuda_graph_matches_eager(m):
    torch.manual_seed(100 + m)
    packed, scales, bias = make(1000, 1024, 128, torch.float16, True)
    static_x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            KM.w4a16_linear_op(static_x, packed, scales, bias, 128)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = KM.w4a16_linear_op(static_x, packed, scales, bias, 128)
    for _ in range(3):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
        static_x.copy_(x)
        graph.replay()
        want = KM.w4a16_linear_op(x, packed, scales, bias, 128)
        torch.cuda.synchronize()
        assert rel_err(static_y, want.double()) < 1e-4
        assert rel_err(static_y, ref_fp64(x, packed, scales, bias, 128)) < TOL[torch.float16]


@pytest.mark.parametrize("m", [1, 16, 100])
def test_opcheck_cuda(m):
    packed, scales, bias = make(256, 512, 128, torch.bfloat16, True)
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(KM.w4a16_linear_op.default, (x, packed, scales, bias, 128))
    torch.library.opcheck(KM.w4a16_linear_op.default, (x, packed, scales, None, 128))


def test_quant_linear_backends_on_cuda():
    packed, scales, bias = make(200, 640, 64, torch.bfloat16, True)
    x = torch.randn(3, 640, device="cuda", dtype=torch.bfloat16)
    ref = ref_fp64(x, packed, scales, bias, 64)
    for backend in ("auto", "triton", "torch"):
        y = KM.quant_linear(x, packed, scales, bias, group_size=64, backend=backend)
        assert rel_err(y, ref) < TOL[torch.bfloat16], backend
    packed2, scales2, _ = make(64, 1024, 256, torch.bfloat16, False)
    x2 = torch.randn(2, 1024, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="group_size"):
        KM.quant_linear(x2, packed2, scales2, group_size=256, backend="triton")
    ref2 = KM.quant_linear_reference(x2, packed2, scales2, None, 256, 4)
    torch.testing.assert_close(KM.quant_linear(x2, packed2, scales2, group_size=256), ref2)  # auto falls back
    codes8 = torch.randint(-128, 128, (64, 256), dtype=torch.int8, device="cuda")
    packed8, scales8 = KM.pack(codes8, 8), torch.rand(64, 2, device="cuda", dtype=torch.bfloat16) * 0.01
    x8 = torch.randn(2, 256, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(
        KM.quant_linear(x8, packed8, scales8, group_size=128, bits=8),
        KM.quant_linear_reference(x8, packed8, scales8, None, 128, 8),
    )


def test_fused_int4_model_generates_like_eager_when_compiled():
    """A packed, fused tiny VLM on CUDA: fused = unfused logits (to accumulation order), and
    ``generate(cache_implementation="static")`` (inductor + CUDA graphs: through ``grace_greedy``'s compiled step,
    a packed model's default for greedy calls) gives the eager greedy tokens."""
    import copy

    from grace_quant import GraceConfig, quantize_model
    from grace_quant.fusion import fused_groups
    from grace_quant.integrations import fast_decode
    from grace_quant.testing import tiny_inputs, tiny_model

    fp = tiny_model("qwen2-vl", hidden=128, layers=2, dtype=torch.bfloat16).cuda()
    plain = quantize_model(copy.deepcopy(fp), GraceConfig(mode="packed", group_size=32, fuse_projections=False))
    fused = quantize_model(fp, GraceConfig(mode="packed", group_size=32))
    assert len(list(fused_groups(fused))) == 4
    inputs = {k: v.cuda() for k, v in tiny_inputs(fused, batch=1).items()}
    inputs.pop("labels")
    with torch.no_grad():
        a, b = plain(**inputs).logits.float(), fused(**inputs).logits.float()
    assert rel_err(b, a.double()) < 1e-2
    fused.generation_config.pad_token_id = 0
    settings = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    eager = fused.generate(**inputs, **settings)
    fast_decode._COMPILED.clear()
    compiled = fused.generate(**inputs, **settings, cache_implementation="static")
    assert fast_decode._COMPILED  # the compiled step ran
    assert torch.equal(eager, compiled)


def test_eager_fast_path_equals_the_custom_op_and_keeps_autograd():
    """``quant_linear(backend="auto")`` calls the kernels directly in eager no-grad code (no op dispatch on the
    host) and goes through the custom op when a gradient is needed: both agree with the op (split-K sums with
    fp32 atomics, so only to the order of the partial sums) and with the fp64 reference."""
    packed, scales, bias = make(384, 512, 64, torch.bfloat16, True)
    for m in (1, 16, 200):
        x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
        expected = KM.w4a16_linear_op(x, packed, scales, bias, 64)
        reference = ref_fp64(x, packed, scales, bias, 64)
        with torch.no_grad():
            fast = KM.quant_linear(x, packed, scales, bias, group_size=64)
        assert fast.grad_fn is None and rel_err(fast, expected.double()) < 1e-3
        assert rel_err(fast, reference) < TOL[torch.bfloat16]
        xg = x.clone().requires_grad_(True)
        y = KM.quant_linear(xg, packed, scales, bias, group_size=64)
        assert y.grad_fn is not None and rel_err(y.detach(), expected.double()) < 1e-3
        y.float().sum().backward()
        w = KM.dequantize(packed, scales, 64, 4).to(torch.bfloat16)
        torch.testing.assert_close(xg.grad, torch.ones_like(y) @ w)


def _gluon_kernel():
    """:mod:`grace_quant.kernels.gluon_w4a16` on a Hopper GPU (skips elsewhere: it is an sm_90 kernel)."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon W4A16 kernel targets Hopper (sm_90)")
    return importlib.import_module("grace_quant.kernels.gluon_w4a16")


_WGMMA_CASES = [  # dtype, bias, M, N, K, group, (block_m, block_k, stages, pipe)
    (torch.bfloat16, False, 300, 256, 512, 128, (128, 128, 3, False)),
    (torch.bfloat16, True, 1000, 128, 384, 64, (128, 64, 4, False)),
    (torch.float16, False, 1, 256, 256, 128, (128, 64, 4, False)),
    (torch.float16, True, 333, 256, 2048, 64, (128, 64, 4, False)),
    # one MMA in flight: odd K tile counts (3, and 1 below the stage count), even ones past the ring, groups of 2 tiles
    (torch.bfloat16, True, 600, 384, 384, 128, (128, 128, 4, True)),
    (torch.float16, False, 5, 256, 128, 128, (128, 128, 4, True)),
    (torch.bfloat16, False, 700, 512, 4096, 128, (256, 128, 3, True)),
    (torch.float16, False, 2048, 512, 4096, 128, (256, 128, 3, True)),
    (torch.float16, True, 129, 256, 1536, 256, (128, 128, 3, True)),
    # decode and small batches: token tiles of 16-64 (one row in a 16-row tile, a tail in a 64-row tile)
    (torch.bfloat16, True, 1, 256, 1024, 128, (16, 128, 4, True)),
    (torch.float16, False, 13, 384, 1152, 128, (16, 128, 8, True)),
    (torch.bfloat16, False, 29, 128, 4096, 128, (32, 128, 4, True)),
    (torch.bfloat16, True, 50, 256, 640, 128, (64, 128, 4, True)),
    # warp-specialized, persistent (pipe 2): programs walking several output tiles (more tiles than SMs), odd K tile
    # counts (a zero-filled tile past K), token tails, fewer output tiles than SMs, K tiles past the ring
    (torch.bfloat16, True, 2000, 2048, 384, 128, (128, 128, 4, 2)),
    (torch.float16, False, 5, 256, 4096, 128, (128, 128, 5, 2)),
    (torch.bfloat16, False, 1100, 4096, 1152, 128, (256, 128, 3, 2)),
    (torch.float16, True, 2048, 1024, 2048, 256, (256, 128, 2, 2)),
]


@pytest.mark.parametrize(
    "case", _WGMMA_CASES, ids=lambda c: f"{str(c[0])[6:]}-m{c[2]}-n{c[3]}-k{c[4]}-g{c[5]}-pipe{int(c[6][3])}"
)
def test_wgmma_kernel_matches_the_fp64_reference(case):
    """The Gluon kernel (weight in registers as the MMA's A operand): every checked tile against fp64, with a token
    tail inside a tile, bias, fewer K tiles than pipeline stages, odd tile counts, and both 16-bit dtypes."""
    gw = _gluon_kernel()
    dtype, bias, m, n, k, group, (bm, bk, st, pipe) = case
    torch.manual_seed(m + n)
    packed, scales, b = make(n, k, group, dtype, bias)
    x = torch.randn(m, k, device="cuda").to(dtype)
    assert gw.supports(x, packed, scales, group, bk)
    poison()
    config = {"block_m": bm, "block_k": bk, "stages": st, "pipe": pipe}
    y = gw.wgmma_w4a16(x, packed, scales, b, group, **config)
    assert rel_err(y, ref_fp64(x, packed, scales, b, group)) < TOL[dtype]
    again = gw.wgmma_w4a16(x, packed, scales, b, group, **config)
    assert torch.equal(y, again)


_SPLIT_CASES = [  # dtype, bias, M, N, K, (block_m, block_k, stages, pipelined), split: K tiles per split, the last
    (torch.bfloat16, True, 600, 256, 1152, (128, 128, 4, True), 2),  # 5 + 4 tiles: an odd count runs a zeroed tile
    (torch.bfloat16, False, 300, 128, 4096, (256, 128, 3, True), 4),  # 8 each
    (torch.float16, True, 129, 256, 1280, (128, 64, 4, False), 3),  # 20 tiles of 64: 7 + 7 + 6
    (torch.float16, False, 1000, 384, 384, (128, 128, 3, False), 5),  # 3 tiles: 3 splits of 1
    (torch.bfloat16, True, 1, 256, 4096, (16, 128, 8, True), 8),  # decode: 4 tiles each, fewer than the stages
    (torch.float16, False, 7, 128, 1408, (16, 128, 4, True), 4),  # 11 tiles: 3 + 3 + 3 + 2
    (torch.bfloat16, True, 64, 256, 11008, (64, 128, 4, True), 4),  # 86 tiles: 22 + 22 + 22 + 20
]


@pytest.mark.parametrize("case", _SPLIT_CASES, ids=lambda c: f"{str(c[0])[6:]}-m{c[2]}-k{c[4]}-split{c[6]}")
def test_split_k_wgmma_kernel_matches_the_fp64_reference(case):
    """Split-K: every split's fp32 partial, added by the last to arrive, against fp64; a repeat call gives the same
    bits (the arrival counters were reset, the sum is in split order), and a second M of the same plan (another
    class of M, another bound launch) is right too."""
    gw = _gluon_kernel()
    dtype, bias, m, n, k, tile, split = case
    torch.manual_seed(m + k)
    packed, scales, b = make(n, k, 128, dtype, bias)
    config = dict(zip(("block_m", "block_k", "stages", "pipe"), tile, strict=True))
    for rows in (m, 64 if m != 64 else 3):
        x = torch.randn(rows, k, device="cuda").to(dtype)
        poison()
        y = gw.wgmma_w4a16(x, packed, scales, b, 128, **config, split=split)
        assert rel_err(y, ref_fp64(x, packed, scales, b, 128)) < TOL[dtype]
        assert torch.equal(gw.wgmma_w4a16(x, packed, scales, b, 128, **config, split=split), y)


def test_every_checked_wgmma_tile_is_tested_and_tuned():
    """Each checked tile has a case above (that the tuner races only checked tiles, and never splits K for the
    warp-specialized form, ``tests/test_tuning.py`` checks on every machine)."""
    from grace_quant.kernels import gluon_w4a16, tuner

    small = [c for space in tuner.WGMMA_SMALL_SPACE.values() for c in space]
    assert {case[6] for case in _WGMMA_CASES} == gluon_w4a16.TILES
    assert {c["split"] for c in small} <= {case[6] for case in _SPLIT_CASES} | {1, 2}
    with pytest.raises(ValueError, match="not a checked"):
        gluon_w4a16.wgmma_w4a16(torch.zeros(1, 128), None, None, None, 128, block_m=48)


def test_the_tuner_drops_a_candidate_whose_results_are_wrong(monkeypatch):
    """The tuner checks each candidate's output against dequantize + matmul before timing it: the same candidate
    times once right, and is refused once its results are 10% off (a fast wrong kernel never reaches a table)."""
    from grace_quant.kernels import tuner

    measure = tuner.cuda_measure(300, 256, 512, 128, torch.bfloat16, torch.device("cuda"))
    config = {"tc": 0}
    assert measure(config) > 0
    right = TW.linear_with_config
    monkeypatch.setattr(TW, "linear_with_config", lambda *args: right(*args) * 1.1)
    with pytest.raises(ValueError, match="is wrong at"):
        measure(config)


@pytest.mark.parametrize(
    "n, split, pipe",
    [(384, 1, 1), (256, 2, 1), (320, 1, 1), (512, 1, 2)],
    ids=["pipe1", "split2", "n320", "pipe2"],
)
def test_a_tuned_wgmma_entry_runs_the_gluon_kernel_and_falls_back_where_it_cannot(n, split, pipe):
    """Dispatch: a ``"wgmma"`` entry on the large path gives the Gluon kernel's bits (eager plan and custom op alike;
    split-K and the warp-specialized kernel (pipe 2) too), and a call it does not take (N not a multiple of 128) runs
    dequantize + cuBLAS."""
    from grace_quant.kernels import dispatch, tables

    gw = _gluon_kernel()
    table = tables.table(tables.device_name(torch.device("cuda")))
    saved = dict(table.configs)
    try:
        config = {"wgmma": 1, "block_m": 128, "block_k": 128, "stages": 4, "pipe": pipe, "split": split}
        torch.manual_seed(n)
        packed, scales, bias = make(n, 1024, 128, torch.bfloat16, True)
        x = torch.randn(2, 150, 1024, device="cuda").to(torch.bfloat16)
        table.put(dispatch.key_for(300, n, 1024, 128, torch.bfloat16), config)
        expected = (
            gw.wgmma_w4a16(x.reshape(-1, 1024), packed, scales, bias, 128, stages=4, pipe=pipe, split=split)
            if n % gw.BLOCK_N == 0
            else TW.linear_with_config(x.reshape(-1, 1024), packed, scales, bias, 128, "large", {"tc": 0})
        ).reshape(2, 150, n)
        assert rel_err(expected, ref_fp64(x.reshape(-1, 1024), packed, scales, bias, 128).reshape(2, 150, n)) < 5e-3
        assert torch.equal(TW.eager_linear(x, packed, scales, bias, 128), expected)
        assert torch.equal(KM.w4a16_linear_op(x, packed, scales, bias, 128), expected)
    finally:
        table.configs.clear()
        table.configs.update(saved)
        tables.EDITS += 1


def _decode_entry(kind: str, m: int):
    """A tuned decode entry of ``kind`` for ``m`` tokens and the direct call whose bits it must give."""
    if kind == "wgmma":
        gw = _gluon_kernel()
        block_m = 16 if m <= 16 else 64
        config = {"wgmma": 1, "block_m": block_m, "block_k": 128, "stages": 4, "pipe": 1, "split": 4}
        return config, lambda x, p, s, b: gw.wgmma_w4a16(x, p, s, b, 128, block_m=block_m, stages=4, split=4)
    gg = importlib.import_module("grace_quant.kernels.gluon_gemv")
    config = {"gemv4": 1, "rows": 4, "cols": 2, "warps": 4, "split": 4}
    return config, lambda x, p, s, b: gg.gemv4_w4a16(x, p, s, b, 128, rows=4, cols=2, split=4)


@pytest.mark.parametrize(
    "kind,m", [("wgmma", 1), ("wgmma", 3), ("wgmma", 16), ("wgmma", 64), ("gemv4", 1), ("gemv4", 2), ("gemv4", 3)]
)
def test_small_gluon_entries_run_in_cuda_graphs_and_compiled_decode(kind, m):
    """Decode with the Gluon kernels' tuned entries on the gemv / tc paths (the small token tiles and the GEMV, both
    with split-K): the eager plan and the custom op give the kernel's bits, and a manual CUDA graph and
    ``torch.compile(fullgraph=True, mode="reduce-overhead")`` replay them, against fp64."""
    from grace_quant.kernels import dispatch, tables

    table = tables.table(tables.device_name(torch.device("cuda")))
    saved = dict(table.configs)
    try:
        torch._dynamo.reset()
        torch.manual_seed(300 + m)
        packed, scales, bias = make(384, 2048, 128, torch.bfloat16, True)
        config, direct = _decode_entry(kind, m)
        table.put(dispatch.key_for(m, 384, 2048, 128, torch.bfloat16), config)
        x = torch.randn(m, 2048, device="cuda").to(torch.bfloat16)
        eager = TW.eager_linear(x, packed, scales, bias, 128)
        expected = direct(x, packed, scales, bias)
        assert torch.equal(eager, expected) and torch.equal(KM.w4a16_linear_op(x, packed, scales, bias, 128), eager)
        assert rel_err(eager, ref_fp64(x, packed, scales, bias, 128)) < TOL[torch.bfloat16]
        static_x = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            KM.w4a16_linear_op(static_x, packed, scales, bias, 128)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = KM.w4a16_linear_op(static_x, packed, scales, bias, 128)
        compiled = torch.compile(
            lambda t: KM.w4a16_linear_op(t, packed, scales, bias, 128), fullgraph=True, mode="reduce-overhead"
        )
        for step in range(3):
            x = torch.randn(m, 2048, device="cuda").to(torch.bfloat16)
            static_x.copy_(x)
            graph.replay()
            want = TW.eager_linear(x, packed, scales, bias, 128)
            assert torch.equal(static_y, want), step
            assert torch.equal(compiled(x).clone(), want), step
    finally:
        table.configs.clear()
        table.configs.update(saved)
        tables.EDITS += 1


def test_a_gemv4_entry_falls_back_where_the_gluon_gemv_cannot_read_the_call():
    """A ``"gemv4"`` entry meeting activations the Gluon GEMV cannot read as 32-bit pairs (an odd row stride) runs the
    path's heuristic, in the dispatch and the eager plan alike, and its result is right; contiguous rows of the same
    call take the GEMV."""
    from grace_quant.kernels import dispatch, tables

    gg = importlib.import_module("grace_quant.kernels.gluon_gemv")
    table = tables.table(tables.device_name(torch.device("cuda")))
    saved = dict(table.configs)
    try:
        torch.manual_seed(7)
        packed, scales, bias = make(256, 4096, 128, torch.bfloat16, True)
        config = {"gemv4": 1, "rows": 4, "cols": 4, "warps": 4, "split": 2}
        for m in (1, 2):
            odd = torch.randn(m, 4097, device="cuda").to(torch.bfloat16)[:, :4096]  # rows 4097 elements apart
            table.put(dispatch.key_for(m, 256, 4096, 128, torch.bfloat16), config)
            want = TW.linear_with_config(odd, packed, scales, bias, 128, dispatch.path_for(m), None)
            assert not gg.reads(odd) and rel_err(want, ref_fp64(odd, packed, scales, bias, 128)) < TOL[torch.bfloat16]
            assert torch.equal(
                TW.linear_with_config(odd, packed, scales, bias, 128, dispatch.path_for(m), config), want
            )
            assert torch.equal(TW.eager_linear(odd, packed, scales, bias, 128), want)
            dense = odd.contiguous()
            assert torch.equal(
                TW.eager_linear(dense, packed, scales, bias, 128),
                gg.gemv4_w4a16(dense, packed, scales, bias, 128, split=2),
            )
    finally:
        table.configs.clear()
        table.configs.update(saved)
        tables.EDITS += 1


def test_wgmma_kernel_declines_what_it_does_not_implement():
    gw = importlib.import_module("grace_quant.kernels.gluon_w4a16")
    packed, scales, _ = make(256, 512, 64, torch.bfloat16, False)
    x = torch.randn(64, 512, device="cuda").to(torch.bfloat16)
    hopper = torch.cuda.get_device_capability()[0] == 9
    assert gw.supports(x, packed, scales, 64, 64) == hopper
    assert not gw.supports(x, packed, scales, 64, 128)  # groups narrower than the K tile
    assert not gw.supports(x, packed, scales.float(), 64, 64)  # scales in another dtype
    assert not gw.supports(x, packed[:200], scales[:200], 64, 64)  # N not a multiple of 128
    assert not gw.supports(x.cpu(), packed, scales, 64, 64)


_GEMV4_CASES = [  # dtype, bias, M, N, K, group, (rows, cols, warps), split
    (torch.bfloat16, False, 1, 4096, 4096, 128, (4, 4, 4), 1),
    (torch.float16, True, 1, 200, 640, 64, (4, 4, 4), 1),  # N and K tails: a partial row block, a partial step
    (torch.bfloat16, True, 2, 256, 11008, 128, (8, 2, 4), 3),  # 1376 words in steps of 64: 8 + 8 + 5.5 steps
    (torch.float16, False, 3, 72, 1536, 32, (4, 2, 4), 1),  # 3 of 4 padded tokens, groups of 4 words
    (torch.bfloat16, True, 4, 1536, 8960, 128, (2, 4, 4), 4),
    (torch.bfloat16, False, 1, 2048, 1536, 128, (8, 1, 4), 2),
    (torch.float16, True, 4, 320, 2048, 128, (4, 4, 4), 8),  # 2 steps: 8 splits asked, 2 run
    (torch.bfloat16, False, 2, 96, 256, 64, (2, 2, 4), 1),
]


@pytest.mark.parametrize(
    "case", _GEMV4_CASES, ids=lambda c: f"{str(c[0])[6:]}-m{c[2]}-n{c[3]}-k{c[4]}-g{c[5]}-{c[6]}-split{c[7]}"
)
def test_gluon_gemv_matches_the_fp64_reference(case):
    """The Gluon GEMV (rows x words per thread, activations shared by a thread's rows): every checked shape against
    fp64 with token padding, N and K tails, bias, split-K and both 16-bit dtypes; a repeat call gives the same bits
    (the split counters were reset, the partials are added in split order)."""
    gg = importlib.import_module("grace_quant.kernels.gluon_gemv")
    dtype, bias, m, n, k, group, (rows, cols, warps), split = case
    torch.manual_seed(m + n + k)
    packed, scales, b = make(n, k, group, dtype, bias)
    x = torch.randn(m, k, device="cuda").to(dtype)
    assert gg.supports(x, packed, scales, group, cols)
    poison()
    y = gg.gemv4_w4a16(x, packed, scales, b, group, rows=rows, cols=cols, warps=warps, split=split)
    assert rel_err(y, ref_fp64(x, packed, scales, b, group)) < TOL[dtype]
    assert torch.equal(gg.gemv4_w4a16(x, packed, scales, b, group, rows=rows, cols=cols, warps=warps, split=split), y)
    strided = torch.randn(m, k + 64, device="cuda").to(dtype)[:, :k]  # rows further apart than K
    strided.copy_(x)
    assert torch.equal(
        gg.gemv4_w4a16(strided, packed, scales, b, group, rows=rows, cols=cols, warps=warps, split=split), y
    )


def test_gluon_gemv_plan_serves_weights_of_one_shape_at_other_alignments():
    """One plan (per weight shape) launched on a 16-byte-aligned weight, then on one whose words and scales start 4 and
    2 bytes past such a boundary: each launch is specialized for what it reads, both match fp64."""
    gg = importlib.import_module("grace_quant.kernels.gluon_gemv")
    torch.manual_seed(11)
    packed, scales, _ = make(256, 1024, 128, torch.bfloat16, False)
    shifted_packed = torch.empty(packed.numel() + 1, dtype=torch.int32, device="cuda")[1:].view_as(packed)
    shifted_scales = torch.empty(scales.numel() + 1, dtype=scales.dtype, device="cuda")[1:].view_as(scales)
    shifted_packed.copy_(packed)
    shifted_scales.copy_(scales)
    assert shifted_packed.data_ptr() % 16 and shifted_scales.data_ptr() % 16
    x = torch.randn(2, 1024, device="cuda").to(torch.bfloat16)
    ref = ref_fp64(x, packed, scales, None, 128)
    for p, s in ((packed, scales), (shifted_packed, shifted_scales)):
        assert rel_err(gg.gemv4_w4a16(x, p, s, None, 128, rows=2, cols=4), ref) < TOL[torch.bfloat16]


def test_every_checked_gemv_shape_is_tested_and_the_gemv_declines_what_it_does_not_read():
    gg = importlib.import_module("grace_quant.kernels.gluon_gemv")
    assert {case[6] for case in _GEMV4_CASES} == gg.CONFIGS
    packed, scales, _ = make(256, 1536, 128, torch.bfloat16, False)
    x = torch.randn(4, 1536, device="cuda").to(torch.bfloat16)
    assert gg.supports(x, packed, scales, 128, 4)
    assert not gg.supports(torch.randn(5, 1536, device="cuda").to(torch.bfloat16), packed, scales, 128, 4)  # 5 tokens
    assert not gg.supports(x.float(), packed, scales, 128, 4)  # fp32 activations
    assert not gg.supports(x.cpu(), packed, scales, 128, 4)
    assert not gg.supports(torch.randn(4, 1537, device="cuda").to(torch.bfloat16)[:, 1:], packed, scales, 128, 4)
    packed2, scales2, _ = make(64, 1024, 512, torch.bfloat16, False)  # a 32-word step would straddle 64-word groups
    x2 = torch.randn(1, 1024, device="cuda").to(torch.bfloat16)
    assert gg.supports(x2, packed2, scales2, 512, 2) and not gg.supports(x2, packed2, scales2, 512, 1)
    with pytest.raises(ValueError, match="not one of the checked"):
        gg.gemv4_w4a16(x, packed, scales, None, 128, rows=3)
