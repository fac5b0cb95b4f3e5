"""Launch a Triton kernel without the JIT's per-call argument binding after its first launch.

``kernel[grid](...)`` binds and specializes every argument, hashes a cache key and looks the compiled kernel up
on each call: host time that eager prefill pays for every INT4 linear (the dequantize kernel's launch took 30-36 us
of host CPU through ``dequantize_w4``, 18-21 us through a bound runner, allocation included, on an H100 host:
``benchmarks/results/prefill_h100.md``). A
:class:`DirectLauncher` keys the compiled kernel by what Triton specializes on (each tensor's dtype and 16-byte
alignment; each integer's divisibility by 16, equality to 1 and width; every constexpr and launch option; the
device), a key at least as fine as Triton's own, so the compiled kernel it keeps is the one Triton would pick.
The first call of a key goes through the JIT (which compiles if needed); later calls launch the compiled kernel
directly. Under Triton's CPU interpreter every call goes through the JIT.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .runtime import interpreting

__all__ = ["DirectLauncher"]

_I32 = (-(2**31), 2**31)


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
    raise TypeError(f"DirectLauncher takes tensors, ints, floats, bools and None as runtime arguments, got {type(arg)}")


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

    def _launch(self, grid: tuple[int, ...], args: tuple, kwargs: dict) -> Any:
        """Launch (through the JIT on a key's first call) and return the compiled kernel that ran."""
        key = (torch.cuda.current_device(), tuple(map(_arg_key, args)), tuple(kwargs.items()))
        kernel = self.compiled.get(key)
        if kernel is None:
            kernel = self.fn[grid](*args, **kwargs)  # binds, compiles if needed, launches
            if hasattr(kernel, "result"):  # an asynchronous compile's future (Triton 3.6)
                kernel = kernel.result()
            self.compiled[key] = kernel
        else:
            kernel[_grid3(grid)](*args, *self._constexprs(args, kwargs))
        return kernel

    def _constexprs(self, args: tuple, kwargs: dict) -> tuple:
        """The parameters after the runtime ones, in the kernel's order (the compiled runner takes them all)."""
        return tuple(kwargs[name] for name in self.names[len(args) :])

    def bind(self, grid: tuple[int, ...], **kwargs: Any) -> Callable[..., None]:
        """A launcher of ``fn`` on ``grid`` with these constexprs and options, for callers whose runtime arguments
        specialize alike on every call (same dtypes, alignment and integer classes): the first call goes through
        :meth:`__call__`, later ones straight to the compiled kernel's runner, with no key computed."""
        if not self.direct:
            return lambda *args: self.fn[grid](*args, **kwargs)
        bound: list = []

        def launch(*args: Any) -> None:
            if bound:
                bound[0](*args, *bound[1])
                return
            kernel = self._launch(grid, args, kwargs)
            bound.extend([kernel[_grid3(grid)], self._constexprs(args, kwargs)])

        return launch


def _grid3(grid: tuple[int, ...]) -> tuple[int, int, int]:
    return (*grid, 1, 1)[:3]
