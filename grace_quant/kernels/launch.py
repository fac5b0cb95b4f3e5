"""Launch a Triton kernel without the JIT's per-call argument binding after its first launch.

``kernel[grid](...)`` binds and specializes every argument, hashes a cache key and looks the compiled kernel up
on each call: host time that eager prefill pays for every INT4 linear (the dequantize kernel's launch took 30-36 us
of host CPU through ``dequantize_w4``, 18-21 us through a bound runner, allocation included, on an H100 host:
``benchmarks/results/prefill_h100.md``). A
:class:`DirectLauncher` keys the compiled kernel by what Triton specializes on (each tensor's dtype and 16-byte
alignment; each integer's divisibility by 16, equality to 1 and width; every constexpr and launch option; the
device), a key at least as fine as Triton's own, so the compiled kernel it keeps is the one Triton would pick.
The first call of a key goes through the JIT (which compiles if needed); later calls launch the compiled kernel
directly. Under Triton's CPU interpreter every call goes through the JIT. A TMA tensor descriptor (Triton's or
Gluon's) is keyed by its class, dtype, block shape and layout: what Triton types it by (its base, shape and strides
are runtime values, encoded by the launcher on every call).

On Triton 3.6 (the version whose launcher was read and checked on a GPU) the direct launch also skips the compiled
kernel's Python wrappers (the stream lookup through the driver object, the launch-metadata dictionary built for
hooks, two calls of empty hook chains, the scratch allocators) and calls its C launch function with what those
wrappers would pass, while no launch hook is installed and the kernel needs no scratch memory (worth ~1-2 ms per
LLaVA-1.5-7B prefill on an H100: ``benchmarks/results/prefill_h100.md``). A kernel taking TMA descriptors gets each
one's encoded map from a cache keyed by what the map encodes, where Triton's wrapper encodes them on every launch.
Other versions, or any hook, go through the compiled kernel's own runner.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
import triton

from .runtime import interpreting

__all__ = ["DirectLauncher", "native_runner", "runner"]

_I32 = (-(2**31), 2**31)
_NATIVE_TRITON = ((3, 6),)
"""Triton versions whose C launch function :func:`native_runner` calls directly (its arguments read from 3.6)."""

_Runner = Callable[..., None]  # runner(grid3, *args): one launch on the current device's current stream


def _arg_key(arg: Any) -> Any:
    """What Triton specializes a runtime argument on (a superset): dtype and alignment, or value class."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool) or arg is None:
        return arg
    if isinstance(arg, int):
        width = 0 if _I32[0] <= arg < _I32[1] else 1 if arg < 2**63 else 2
        return arg % 16 == 0, arg == 1, width
    if isinstance(arg, float):
        return float
    if isinstance(getattr(arg, "base", None), torch.Tensor) and hasattr(arg, "block_shape"):  # a TMA descriptor
        extra = tuple(getattr(arg, name, None) for name in ("layout", "padding", "round_f32_to_tf32"))
        return type(arg).__name__, arg.base.dtype, tuple(arg.block_shape), extra
    raise TypeError(
        "DirectLauncher takes tensors, tensor descriptors, ints, floats, bools and None as runtime arguments, "
        f"got {type(arg)}"
    )


class DirectLauncher:
    """``launcher(grid, *args, **constexprs_and_options)`` launches ``fn`` like ``fn[grid](...)`` does; the runtime
    ``args`` come positionally (in the kernel's parameter order), constexprs and options by keyword."""

    def __init__(self, fn: Any):
        self.fn = fn
        self.names = tuple(fn.arg_names)
        self.compiled: dict[tuple, Any] = {}
        self.direct = not interpreting()

    def __call__(self, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
        if not self.direct:
            self.fn[grid](*args, **kwargs)
            return
        self._launch(grid, args, kwargs)

    def _launch(self, grid: tuple[int, ...], args: tuple, kwargs: dict) -> _Runner:
        """Launch (through the JIT on a key's first call) and return the runner of the compiled kernel that ran."""
        key = (torch.cuda.current_device(), tuple(map(_arg_key, args)), tuple(kwargs.items()))
        run = self.compiled.get(key)
        if run is None:
            kernel = self.fn[grid](*args, **kwargs)  # binds, compiles if needed, launches
            if hasattr(kernel, "result"):  # an asynchronous compile's future (Triton 3.6)
                kernel = kernel.result()
            run = self.compiled[key] = runner(kernel)
        else:
            run(_grid3(grid), *args, *self._constexprs(args, kwargs))
        return run

    def _constexprs(self, args: tuple, kwargs: dict) -> tuple:
        """The parameters after the runtime ones, in the kernel's order (the compiled runner takes them all)."""
        return tuple(kwargs[name] for name in self.names[len(args) :])

    def bind(self, grid: tuple[int, ...] | None, **kwargs: Any) -> Callable[..., None]:
        """A launcher of ``fn`` with these constexprs and options, for callers whose runtime arguments specialize
        alike on every call (same dtypes, alignment and integer classes): the first call goes through
        :meth:`__call__`, later ones straight to the compiled kernel's runner, with no key computed. With ``grid``
        None the launcher takes the grid first on every call (``launch(grid, *args)``)."""
        if not self.direct:
            if grid is None:
                return lambda grid_, *args: self.fn[grid_](*args, **kwargs)
            return lambda *args: self.fn[grid](*args, **kwargs)
        bound: list = []

        def launch_on(grid_: tuple[int, ...], *args: Any) -> None:
            if bound:
                bound[0](_grid3(grid_), *args, *bound[1])
                return
            bound.extend([self._launch(grid_, args, kwargs), self._constexprs(args, kwargs)])

        if grid is None:
            return launch_on
        grid3 = _grid3(grid)

        def launch(*args: Any) -> None:
            if bound:
                bound[0](grid3, *args, *bound[1])
                return
            launch_on(grid, *args)

        return launch


def runner(kernel: Any) -> _Runner:
    """``run(grid3, *args)`` launching a compiled kernel: :func:`native_runner` where it applies, else the compiled
    kernel's own runner."""
    native = native_runner(kernel)
    if native is not None:
        return native
    return lambda grid3, *args: kernel[grid3](*args)


def native_runner(kernel: Any) -> _Runner | None:
    """The compiled kernel's C launch function called as Triton 3.6's wrappers call it (``CompiledKernel.__getitem__``'s
    runner, then ``CudaLauncher.__call__``, then for TMA descriptors its Python wrapper), or None where that does not
    hold: another Triton version, a launcher of another type, descriptors lowered without a host TMA map, or a kernel
    that needs global or profile scratch memory. A launch hook installed later sends the call through the kernel's own
    runner, which calls the hooks."""
    version = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
    if version not in _NATIVE_TRITON or not hasattr(kernel, "_init_handles"):
        return None
    kernel._init_handles()
    launcher = kernel.run
    launch = getattr(launcher, "launch", None)
    if type(launcher).__name__ != "CudaLauncher" or launch is None:
        return None
    expand = None
    if isinstance(launch, types.FunctionType):  # Triton's wrapper encoding each TMA descriptor on every launch
        launch, expand = _tensordesc_expander(launch)
        if launch is None:
            return None
    if launcher.global_scratch_size or launcher.profile_scratch_size:
        return None
    from triton import knobs

    hooks = knobs.runtime
    enter, leave = hooks.launch_enter_hook, hooks.launch_exit_hook
    if not (hasattr(enter, "calls") and hasattr(leave, "calls")):
        return None
    function, metadata = kernel.function, kernel.packed_metadata
    cooperative, pdl = launcher.launch_cooperative_grid, launcher.launch_pdl
    stream, device = torch._C._cuda_getCurrentRawStream, torch._C._cuda_getDevice

    def native(grid3: tuple[int, int, int], *args: Any) -> None:
        if enter.calls or leave.calls or hooks.launch_enter_hook is not enter or hooks.launch_exit_hook is not leave:
            kernel[grid3](*args)  # a profiler's hooks: the runner that calls them
            return
        if expand is not None:
            args = expand(args)
        gx, gy, gz = grid3
        launch(gx, gy, gz, stream(device()), function, cooperative, pdl, None, None, metadata, None, None, None, *args)

    return native


_MAX_TMA_MAPS = 4096  # encoded descriptors kept per kernel (a model's weights, and its activations' few shapes)


def _tensordesc_expander(wrapper: Any) -> tuple[Any, Callable[[tuple], list] | None]:
    """``(C launch, expand)`` from Triton 3.6's tensor-descriptor wrapper (``wrap_handle_tensordesc``'s ``inner``):
    ``expand(args)`` replaces each descriptor by its encoded TMA map, shape and strides, as the wrapper does, but
    encodes a map once per (address, shape, strides, padding) instead of on every launch (the map is a pure function
    of those and of the position's compile-time metadata; the launch copies it by value). ``(None, None)`` where the
    wrapper is not that one, or a descriptor was lowered without a host TMA map."""
    closure = wrapper.__closure__ or ()
    cells = dict(zip(wrapper.__code__.co_freevars, (cell.cell_contents for cell in closure), strict=True))
    inner, positions, metas = cells.get("launcher"), cells.get("tensordesc_indices"), cells.get("tensordesc_meta")
    if (
        inner is None or isinstance(inner, types.FunctionType) or not positions or metas is None
        or len(metas) != len(positions) or any(meta is None for meta in metas)
    ):  # fmt: skip
        return None, None
    from triton.backends.nvidia import driver as nvidia

    encode = nvidia.make_tensordesc_arg
    specs = dict(zip(sorted(positions), metas, strict=True))  # the j-th descriptor in argument order: metas[j]
    maps: dict[tuple, list] = {}

    def expand(args: tuple) -> list:
        out: list = []
        for i, arg in enumerate(args):
            meta = specs.get(i)
            if meta is None:
                out.append(arg)
                continue
            key = (i, arg.base.data_ptr(), tuple(arg.shape), tuple(arg.strides), arg.padding)
            encoded = maps.get(key)
            if encoded is None:
                if len(maps) >= _MAX_TMA_MAPS:
                    maps.clear()
                encoded = maps[key] = encode(arg, meta)
            out.extend(encoded)
        return out

    return inner, expand


def _grid3(grid: tuple[int, ...]) -> tuple[int, int, int]:
    return (*grid, 1, 1)[:3]
