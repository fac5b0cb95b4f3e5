"""``kernels.launch.DirectLauncher``: which launches go through Triton's JIT and which reuse its compiled kernel.

A stand-in JIT function records every launch, so the cache's keys are checked on CPU: a compiled kernel is reused
only for arguments Triton would specialize the same way. The real kernels, launched both ways on a GPU, are
compared in ``tests/test_kernels_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from grace_quant.kernels import launch as launch_mod
from grace_quant.kernels.launch import DirectLauncher


class _Compiled:
    def __init__(self, log: list):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("direct", grid, args))


class _Jit:
    """Triton's ``JITFunction`` surface that DirectLauncher uses: ``arg_names`` and ``fn[grid](...)``."""

    arg_names = ["x_ptr", "n", "scale", "BLOCK", "MODE"]

    def __init__(self):
        self.log: list = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            return _Compiled(self.log)

        return launch


@pytest.fixture
def launcher(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    launch = DirectLauncher(_Jit())
    launch.direct = True  # as on a GPU (this process may run under the interpreter)
    return launch


def _kinds(launch):
    return [entry[0] for entry in launch.fn.log]


def test_first_launch_compiles_through_the_jit_and_later_ones_reuse_it(launcher):
    x = torch.zeros(64)
    for _ in range(3):
        launcher((4, 2), x, 32, 0.5, BLOCK=16, MODE=1, num_warps=4)
    assert _kinds(launcher) == ["jit", "direct", "direct"]
    # the direct launch passes the runtime arguments, then the constexprs in parameter order, on a 3-D grid
    assert launcher.fn.log[1] == ("direct", (4, 2, 1), (x, 32, 0.5, 16, 1))
    assert launcher.fn.log[0][3] == {"BLOCK": 16, "MODE": 1, "num_warps": 4}


@pytest.mark.parametrize(
    "change",
    [
        {"x": torch.zeros(65)[1:]},  # 4 bytes off 16-byte alignment
        {"x": torch.zeros(64, dtype=torch.float16)},  # another dtype
        {"n": 33},  # not a multiple of 16
        {"n": 1},  # Triton specializes 1
        {"n": 2**31},  # 64-bit integer
        {"BLOCK": 32},  # another constexpr
        {"num_warps": 8},  # another launch option
    ],
    ids=["misaligned", "dtype", "n-odd", "n-one", "n-64bit", "constexpr", "option"],
)
def test_anything_triton_specializes_on_goes_through_the_jit_again(launcher, change):
    args = {"x": torch.zeros(64), "n": 32, "BLOCK": 16, "num_warps": 4}
    launcher((1,), args["x"], args["n"], 1.0, BLOCK=args["BLOCK"], MODE=0, num_warps=args["num_warps"])
    args.update(change)
    launcher((1,), args["x"], args["n"], 1.0, BLOCK=args["BLOCK"], MODE=0, num_warps=args["num_warps"])
    assert _kinds(launcher) == ["jit", "jit"]


def test_values_triton_does_not_specialize_on_reuse_the_kernel(launcher):
    """Another tensor of the same dtype and alignment, another multiple of 16, another float: the same kernel."""
    launcher((1,), torch.zeros(64), 32, 1.0, BLOCK=16, MODE=0)
    launcher((7,), torch.ones(128), 48, 3.0, BLOCK=16, MODE=0)
    assert _kinds(launcher) == ["jit", "direct"]
    assert launcher.fn.log[1][1] == (7, 1, 1)


class _Descriptor:
    """A TMA tensor descriptor's surface (Triton's and Gluon's ``TensorDescriptor``)."""

    def __init__(self, base, block_shape, layout="swizzle128"):
        self.base, self.shape, self.strides = base, list(base.shape), list(base.stride())
        self.block_shape, self.layout, self.padding = block_shape, layout, "zero"


def test_tensor_descriptors_key_by_dtype_block_and_layout_not_by_their_tensor(launcher):
    launcher((1,), _Descriptor(torch.zeros(64, 64), [16, 16]), 32, 1.0, BLOCK=16, MODE=0)
    launcher((1,), _Descriptor(torch.zeros(128, 32)[:, 1:], [16, 16]), 48, 1.0, BLOCK=16, MODE=0)  # runtime values
    assert _kinds(launcher) == ["jit", "direct"]
    for other in (
        _Descriptor(torch.zeros(64, 64), [32, 16]),
        _Descriptor(torch.zeros(64, 64, dtype=torch.float16), [16, 16]),
        _Descriptor(torch.zeros(64, 64), [16, 16], layout="swizzle64"),
    ):
        launcher((1,), other, 32, 1.0, BLOCK=16, MODE=0)
    assert _kinds(launcher) == ["jit", "direct", "jit", "jit", "jit"]


def test_under_the_interpreter_every_launch_goes_through_the_jit(launcher):
    launcher.direct = False
    for _ in range(2):
        launcher((1,), torch.zeros(64), 32, 1.0, BLOCK=16, MODE=0)
    assert _kinds(launcher) == ["jit", "jit"]


def test_an_argument_of_unknown_kind_is_refused(launcher):
    with pytest.raises(TypeError, match="DirectLauncher takes tensors"):
        launcher((1,), torch.zeros(64), "32", 1.0, BLOCK=16, MODE=0)


def test_a_bound_launch_compiles_through_the_jit_once_then_runs_the_compiled_kernel(launcher):
    launch = launcher.bind((3, 2), BLOCK=16, MODE=1, num_warps=4)
    x = torch.zeros(64)
    for _ in range(3):
        launch(x, 32, 0.5)
    assert _kinds(launcher) == ["jit", "direct", "direct"]
    assert launcher.fn.log[2] == ("direct", (3, 2, 1), (x, 32, 0.5, 16, 1))


def test_a_bound_launch_under_the_interpreter_always_goes_through_the_jit(launcher):
    launcher.direct = False
    launch = launcher.bind((1,), BLOCK=16, MODE=0)
    for _ in range(2):
        launch(torch.zeros(64), 32, 1.0)
    assert _kinds(launcher) == ["jit", "jit"]


class _CLaunch:
    """Stands in for the compiled C launch function (not a Python function, as in Triton)."""

    def __init__(self):
        self.calls: list = []

    def __call__(self, *args):
        self.calls.append(args)


class CudaLauncher:  # the type name native_runner checks, as Triton 3.6 names its launcher
    def __init__(self, scratch: int = 0):
        self.launch = _CLaunch()
        self.global_scratch_size = scratch
        self.profile_scratch_size = 0
        self.launch_cooperative_grid = False
        self.launch_pdl = True


class _Kernel:
    """Triton 3.6's ``CompiledKernel`` surface: handles, ``run`` (the launcher), ``function``, metadata, runner."""

    def __init__(self, launcher):
        self.run, self.function, self.packed_metadata = launcher, 0xF00, (4, 1, 1024)
        self.runner_calls: list = []

    def _init_handles(self):
        pass

    def __getitem__(self, grid):
        return lambda *args: self.runner_calls.append((grid, args))


@pytest.fixture
def triton36(monkeypatch):
    import triton

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 1, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 7000 + device, raising=False)


def test_native_runner_calls_the_c_launch_with_what_the_wrappers_pass(triton36):
    kernel = _Kernel(CudaLauncher())
    run = launch_mod.native_runner(kernel)
    x = torch.zeros(4)
    run((3, 2, 1), x, 17, 16)
    # grid, the current device's stream, function, cooperative / PDL flags, no scratch, metadata, no hooks, args
    assert kernel.run.launch.calls == [(3, 2, 1, 7001, 0xF00, False, True, None, None, (4, 1, 1024), None, None, None,
                                        x, 17, 16)]  # fmt: skip
    assert kernel.runner_calls == []


def test_native_runner_leaves_hooks_to_the_kernels_own_runner(triton36):
    from triton import knobs

    kernel = _Kernel(CudaLauncher())
    run = launch_mod.native_runner(kernel)
    hook = knobs.runtime.launch_enter_hook
    seen = []
    hook.add(seen.append)
    try:
        run((1, 1, 1), 5)
    finally:
        hook.remove(seen.append)
    run((2, 1, 1), 6)
    assert kernel.runner_calls == [((1, 1, 1), (5,))]
    assert [call[0] for call in kernel.run.launch.calls] == [2]


@pytest.mark.parametrize("case", ["version", "scratch", "tensordesc", "launcher"])
def test_native_runner_declines_what_it_was_not_checked_on(triton36, monkeypatch, case):
    import triton

    launcher = CudaLauncher(scratch=64 if case == "scratch" else 0)
    if case == "version":
        monkeypatch.setattr(triton, "__version__", "3.7.0")
    elif case == "tensordesc":
        launcher.launch = lambda *args: None  # Triton wraps the C function in Python for tensor descriptors
    elif case == "launcher":
        launcher = _CLaunch()
    assert launch_mod.native_runner(_Kernel(launcher)) is None
    kernel = _Kernel(launcher)
    launch_mod.runner(kernel)((1, 1, 1), 9)  # the fallback: the compiled kernel's own runner
    assert kernel.runner_calls == [((1, 1, 1), (9,))]


def _tensordesc_wrapper(c_launch, positions, metas):
    """Triton 3.6's ``wrap_handle_tensordesc`` inner function: the names of its closure are what the runner reads."""
    launcher, tensordesc_indices, tensordesc_meta = c_launch, set(positions), metas

    def inner(*args):
        return launcher(*args), tensordesc_indices, tensordesc_meta

    return inner


@pytest.fixture
def encoder(monkeypatch):
    from triton.backends.nvidia import driver

    calls = []

    def encode(desc, meta):
        calls.append((desc.base.data_ptr(), meta["swizzle"]))
        return [("map", desc.base.data_ptr(), meta["swizzle"]), *desc.shape, *desc.strides]

    monkeypatch.setattr(driver, "make_tensordesc_arg", encode)
    return calls


def test_native_runner_expands_tma_descriptors_and_encodes_each_map_once(triton36, encoder):
    launcher = CudaLauncher()
    c_launch = launcher.launch
    launcher.launch = _tensordesc_wrapper(c_launch, [0, 2], [{"swizzle": 128}, {"swizzle": 64}])
    run = launch_mod.native_runner(_Kernel(launcher))
    a, b, c = torch.zeros(8, 4), torch.zeros(16, 2), torch.zeros(8, 4)
    run((1, 1, 1), _Descriptor(a, [8, 4]), 5, _Descriptor(b, [16, 2]), 16)
    run((2, 1, 1), _Descriptor(a, [8, 4]), 6, _Descriptor(b, [16, 2]), 16)  # the same tensors: no encoding
    run((3, 1, 1), _Descriptor(c, [8, 4]), 7, _Descriptor(b, [16, 2]), 16)  # another base address: encoded
    assert encoder == [(a.data_ptr(), 128), (b.data_ptr(), 64), (c.data_ptr(), 128)]
    # each descriptor becomes (map, shape..., strides...) in place, as Triton's wrapper passes them
    first, last = c_launch.calls[0][13:], c_launch.calls[2][13:]
    assert first == (("map", a.data_ptr(), 128), 8, 4, 4, 1, 5, ("map", b.data_ptr(), 64), 16, 2, 2, 1, 16)
    assert last[0] == ("map", c.data_ptr(), 128) and last[5] == 7
    assert [call[:3] for call in c_launch.calls] == [(1, 1, 1), (2, 1, 1), (3, 1, 1)]


def test_a_new_shape_of_the_same_tensor_gets_its_own_map(triton36, encoder):
    launcher = CudaLauncher()
    launcher.launch = _tensordesc_wrapper(launcher.launch, [0], [{"swizzle": 128}])
    run = launch_mod.native_runner(_Kernel(launcher))
    a = torch.zeros(64, 8)
    run((1, 1, 1), _Descriptor(a, [8, 8]))
    run((1, 1, 1), _Descriptor(a[:32], [8, 8]))  # same address, fewer rows: another map
    assert len(encoder) == 2


def test_native_runner_declines_descriptors_lowered_without_a_host_map(triton36, encoder):
    launcher = CudaLauncher()
    launcher.launch = _tensordesc_wrapper(launcher.launch, [0], [None])  # Triton's device-side descriptors
    assert launch_mod.native_runner(_Kernel(launcher)) is None


def test_a_launcher_bound_without_a_grid_takes_it_per_call(launcher):
    launch = launcher.bind(None, BLOCK=16, MODE=0)
    x = torch.zeros(64)
    launch((1,), x, 32, 1.0)
    launch((5, 2), x, 32, 1.0)
    assert _kinds(launcher) == ["jit", "direct"]
    assert launcher.fn.log[1] == ("direct", (5, 2, 1), (x, 32, 1.0, 16, 0))
