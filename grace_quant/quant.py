"""GRACE's weight quantizer (METHOD.md section 2): symmetric per-group codes, MSE-grid scale init,
fake quantization with a straight-through estimator and learnable log-scales (LSQ).

One implementation of each rule: the QAT linear, the packed export and the quantize-on-load path all call
these functions, so a fake-quant weight and its packed form dequantize to the same bits.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from collections.abc import Iterator, Sequence

import torch

from grace_quant.kernels import code_range, dequantize_codes, group_size_problem, interpreting, kernels_can_run, pack

MSE_GRID_POINTS = 20
MSE_GRID_RANGE = (0.3, 1.2)
FAKE_QUANT_BACKENDS = ("auto", "triton", "torch", "triton_linear")
"""Where fake quantization runs: ``"auto"`` (the fused Triton kernels on CUDA, torch ops elsewhere), ``"triton"``
(the fused kernels; CUDA or ``TRITON_INTERPRET=1``), ``"torch"`` (torch ops: the reference). The two paths give
the same forward and weight gradient bit for bit (log-scale gradients agree to within 1e-5 relative: another summation order).
``"triton_linear"`` (experimental, untimed): QAT linears quantize inside their matmul kernels
(:func:`fused_qat_linear`; equal to the others up to the matmul's summation order), where those kernels apply, and
fall back to ``"triton"`` elsewhere."""
KERNEL_BACKENDS = ("triton", "triton_linear")  # backends that require the Triton kernels to be able to run
FUSED_FAKE_QUANT_ENV = "GRACE_FUSED_FAKE_QUANT"
"""Deprecated: ``1`` / ``0`` overrides ``"auto"`` (fused where the kernels can run / torch ops), with a
``FutureWarning``; use ``GraceTrainingArguments(fake_quant_backend=...)`` or :func:`set_fake_quant_backend`."""
_AUTO_OVERRIDE: contextvars.ContextVar[bool | None] = contextvars.ContextVar("grace_fused_fake_quant", default=None)
_warned_env = False


def grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """View ``[out, in]`` as ``[out, in / group_size, group_size]`` (groups of consecutive input features)."""
    out_features, in_features = weight.shape
    if (problem := group_size_problem(group_size, in_features=in_features)) is not None:
        raise ValueError(problem)
    return weight.reshape(out_features, in_features // group_size, group_size)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of the ``w / s`` ratio: at least fp32 (fp64 inputs stay fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _ratio(weight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """``w / s`` per group ``[out, in / group_size, group_size]``, a fresh tensor in :func:`compute_dtype`."""
    dtype = compute_dtype(weight.dtype)
    return grouped(weight.to(dtype), group_size) / scales.to(dtype).unsqueeze(-1)


def _codes_from_ratio(ratio: torch.Tensor, bits: int) -> torch.Tensor:
    """``clamp(round(w / s), -Qn, Qp)``, computed in place in the fresh ``ratio`` it is given (no extra full-size
    temporaries; the straight-through gradient lives in ``_FakeQuantize.backward``)."""
    lo, hi = code_range(bits)
    return ratio.round_().clamp_(lo, hi)


def quantize_codes(weight: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    """Integer codes ``q = clamp(round(w / s), -Qn, Qp)`` as int8 ``[out, in]``; the ratio is taken in fp32."""
    return _codes_from_ratio(_ratio(weight, scales, group_size), bits).reshape(weight.shape).to(torch.int8)


def nonfinite_problem(name: str, weight: torch.Tensor) -> str | None:
    """Why a layer's weight cannot be quantized as it is: NaN or inf values make its group's MSE scale NaN, so the
    whole group would dequantize to NaN (and QAT would train on NaN). None for a finite weight."""
    bad = int((~torch.isfinite(weight)).sum())
    if not bad:
        return None
    return (
        f"layer '{name}': its weight holds {bad} NaN/inf value(s) of {weight.numel()}; the checkpoint is damaged "
        "or diverged. Repair it, add the layer to modules_to_not_convert (--skip), or pass "
        "GraceConfig(allow_nonfinite=True) (--allow-nonfinite) to quantize it with those values set to 0."
    )


def zero_nonfinite(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with NaN/inf set to 0 (``allow_nonfinite``): the rest of each group keeps its codes and scale."""
    return torch.nan_to_num(weight, nan=0.0, posinf=0.0, neginf=0.0)


@torch.no_grad()
def pack_weight(weight: torch.Tensor, log_scale: torch.Tensor, group_size: int, bits: int) -> dict[str, torch.Tensor]:
    """``{"weight": packed words, "scales": s}`` of ``weight`` quantized with ``s = exp(log_scale)`` in its dtype: what
    a QAT layer exports and what packing on load writes (its dequantization equals :func:`fake_quantize`'s output)."""
    scales = scale_from_log(log_scale, weight.dtype)
    return {"weight": pack(quantize_codes(weight, scales, group_size, bits), bits), "scales": scales}


def fake_quantize(
    weight: torch.Tensor,
    log_scale: torch.Tensor,
    group_size: int,
    bits: int,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``w_hat = s * clamp(round_ste(w / s))`` with ``s = exp(theta)`` rounded to the weight dtype.

    Gradients reach ``weight`` (straight through, zero where clamped) and ``log_scale`` (the LSQ step-size
    gradient times ``s``). The result equals ``dequantize_codes(quantize_codes(w, s), s)`` bit for bit.
    ``out_dtype`` (e.g. the autocast dtype of the matmul that consumes ``w_hat``) returns
    ``w_hat.to(out_dtype)``, written directly in that dtype by the fused kernels on CUDA.

    ``backend`` (one of :data:`FAKE_QUANT_BACKENDS`): with ``"auto"`` (default) fp32/bf16/fp16 weights with fp32
    log-scales on CUDA run one fused Triton kernel forward and one backward
    (``grace_quant.kernels.triton_fake_quant``), everything else torch ops; ``"triton"`` also runs the kernels
    under ``TRITON_INTERPRET=1`` and raises where they cannot run at all; ``"torch"`` always runs torch ops.
    Tensors the kernels decline (fp64, a group size not a multiple of 8) run torch ops whatever the backend.
    """
    return _FakeQuantize.apply(weight, log_scale, group_size, bits, out_dtype, backend)


def fake_quant_backend_problem(backend: str, device: torch.device | str | None = None) -> str | None:
    """Why ``backend`` cannot run fake quantization on ``device`` (None: not checked), or None."""
    if backend not in FAKE_QUANT_BACKENDS:
        return f"fake_quant_backend={backend!r} is unknown; use one of {FAKE_QUANT_BACKENDS}"
    if backend in KERNEL_BACKENDS and device is not None and torch.device(device).type != "cuda" and not interpreting():
        return (
            f"fake_quant_backend={backend!r} runs the fused Triton kernels, which need CUDA (or TRITON_INTERPRET=1, "
            f"Triton's CPU interpreter), but this run is on {torch.device(device).type}: use 'auto' (fused on CUDA, "
            "torch ops elsewhere) or 'torch'"
        )
    return None


@contextlib.contextmanager
def fused_fake_quant(enabled: bool = True) -> Iterator[None]:
    """Within this block, layers on ``backend="auto"`` run fake quantization on the fused Triton kernels wherever
    they can run (CUDA, or ``TRITON_INTERPRET=1``) when ``enabled``, else on torch ops; explicit backends keep
    theirs. For code outside ``GraceTrainer`` (benchmarks, tests); the Trainer's switch is ``fake_quant_backend``."""
    token = _AUTO_OVERRIDE.set(bool(enabled))
    try:
        yield
    finally:
        _AUTO_OVERRIDE.reset(token)


def _auto_override() -> bool | None:
    """What ``"auto"`` is forced to: :func:`fused_fake_quant`'s block, else the deprecated environment variable."""
    forced = _AUTO_OVERRIDE.get()
    if forced is not None:
        return forced
    value = os.environ.get(FUSED_FAKE_QUANT_ENV)
    if value is None:
        return None
    global _warned_env
    if not _warned_env:
        _warned_env = True
        warnings.warn(
            f"{FUSED_FAKE_QUANT_ENV} is deprecated: the fused fake-quant kernels are the default on CUDA; choose "
            "with GraceTrainingArguments(fake_quant_backend='auto'|'triton'|'torch') or "
            "grace_quant.set_fake_quant_backend(model, ...).",
            FutureWarning,
            stacklevel=4,
        )
    return value == "1"


def _wants_kernels(weight: torch.Tensor, backend: str) -> bool:
    """Whether ``backend`` asks for the fused kernels on this weight; raises where ``"triton"`` cannot run."""
    if backend == "torch":
        return False
    if backend in KERNEL_BACKENDS:
        if (problem := fake_quant_backend_problem(backend, weight.device)) is not None:
            raise RuntimeError(problem)
        return True
    if backend != "auto":
        raise ValueError(fake_quant_backend_problem(backend))
    forced = _auto_override()
    return weight.is_cuda if forced is None else forced and kernels_can_run(weight)


def _fused_fake_quant_kernels(weight: torch.Tensor, log_scale: torch.Tensor, group_size: int, backend: str = "auto"):
    """The Triton module ``grace_quant.kernels.triton_fake_quant`` when ``backend`` picks it and it can run these
    tensors, else None. Triton is imported only when the kernels are wanted, never on the default CPU path."""
    if not _wants_kernels(weight, backend):
        return None
    if weight.dtype == torch.float64 or log_scale.dtype != torch.float32:
        return None
    try:
        from grace_quant.kernels import triton_fake_quant
    except ImportError:  # no triton on this platform
        return None
    return triton_fake_quant if triton_fake_quant.supports(weight, log_scale, group_size) else None


class _FakeQuantize(torch.autograd.Function):
    """Fake quantization whose backward recomputes ``w / s`` instead of saving it.

    Plain autograd would keep several full-size fp32 intermediates per quantized weight alive from forward to
    backward; this keeps only ``weight`` and ``log_scale`` (plus, on the fused path, the per-group
    ``exp(log_scale)``, 1/group of the weight), which the layer holds anyway.
    """

    @staticmethod
    def forward(
        ctx,
        weight: torch.Tensor,
        log_scale: torch.Tensor,
        group_size: int,
        bits: int,
        out_dtype: torch.dtype | None = None,
        backend: str = "auto",
    ) -> torch.Tensor:
        if (problem := group_size_problem(group_size, in_features=weight.shape[-1])) is not None:
            raise ValueError(problem)  # the check grouped() makes, without reshaping on the fused path
        ctx.group_size, ctx.bits = group_size, bits
        kernels = _fused_fake_quant_kernels(weight, log_scale, group_size, backend)
        ctx.fused = kernels is not None
        if kernels is not None:
            # exp in torch, exactly as scale_from_log takes it: the kernel rounds it to the weight dtype
            exp_log_scale = torch.exp(log_scale)
            ctx.save_for_backward(weight, log_scale, exp_log_scale)
            direct = out_dtype in kernels.SUPPORTED_DTYPES  # written in out_dtype by the kernel
            w_hat = kernels.launch_forward(weight, exp_log_scale, group_size, bits, out_dtype if direct else weight.dtype)
            return w_hat if direct or out_dtype is None else w_hat.to(out_dtype)
        scales = scale_from_log(log_scale, weight.dtype)
        codes = _codes_from_ratio(_ratio(weight, scales, group_size), bits).reshape(weight.shape)
        ctx.save_for_backward(weight, log_scale)
        w_hat = dequantize_codes(codes, scales, group_size)
        return w_hat if out_dtype is None else w_hat.to(out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        """``dw = g`` inside the code range, 0 outside; ``dtheta = s * sum_group g * (q - w/s inside | q outside)``."""
        if ctx.fused:
            weight, _, exp_log_scale = ctx.saved_tensors
            from grace_quant.kernels import triton_fake_quant

            if grad.dtype not in triton_fake_quant.SUPPORTED_DTYPES:
                grad = grad.to(weight.dtype)
            grad_weight, grad_log_scale = triton_fake_quant.launch_backward(  # tensors checked in forward
                weight, exp_log_scale, grad, ctx.group_size, ctx.bits
            )
            return grad_weight, grad_log_scale, None, None, None, None
        weight, log_scale = ctx.saved_tensors
        grad = grad.to(weight.dtype)  # the gradient of w_hat.to(out_dtype)
        lo, hi = code_range(ctx.bits)
        dtype = compute_dtype(weight.dtype)
        ratio = _ratio(weight, scale_from_log(log_scale, weight.dtype), ctx.group_size)
        rounded = torch.round(ratio)
        codes = rounded.clamp(lo, hi)
        inside = codes == rounded  # inside the code range (False for NaN, as the comparisons with lo/hi were)
        g = grouped(grad.to(dtype), ctx.group_size)
        grad_weight = torch.where(inside, g, 0.0).reshape(weight.shape).to(weight.dtype)
        step = torch.where(inside, rounded.sub_(ratio), codes)  # d w_hat / d s; one pass fewer per temporary
        grad_scale = step.mul_(g).sum(dim=-1)
        grad_log_scale = (grad_scale * torch.exp(log_scale.to(dtype))).to(log_scale.dtype)
        return grad_weight, grad_log_scale, None, None, None, None


def runs_fused(weight: torch.Tensor, log_scale: torch.Tensor, group_size: int, backend: str = "auto") -> bool:
    """Whether :func:`fake_quantize` of this weight runs the fused Triton kernels on ``backend``."""
    return _fused_fake_quant_kernels(weight, log_scale, group_size, backend) is not None


def fake_quantize_many(
    weights: Sequence[torch.Tensor],
    log_scales: Sequence[torch.Tensor],
    group_size: int,
    bits: int,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> list[torch.Tensor]:
    """:func:`fake_quantize` of each ``(weight, log_scale)`` pair, equal to it bit for bit (gradients too).

    Where the fused kernels take all of them (``backend`` as for :func:`fake_quantize`; one dtype and device,
    contiguous), it is one kernel launch forward and one backward for the lot: a QAT step that launches per weight
    is bound by the host's per-launch work. The backward then runs once every output's gradient is in, at the end
    of the model's backward. Elsewhere it is :func:`fake_quantize` per pair.
    """
    if len(weights) != len(log_scales):
        raise ValueError(f"fake_quantize_many needs one log_scale per weight, got {len(weights)} weights and "
                         f"{len(log_scales)} log-scales")  # fmt: skip
    if not weights:
        return []
    kernels = _fused_fake_quant_kernels(weights[0], log_scales[0], group_size, backend)
    target = out_dtype or weights[0].dtype
    if kernels is None or target not in kernels.SUPPORTED_DTYPES or not kernels.supports_many(weights, log_scales,
                                                                                               group_size):  # fmt: skip
        return [fake_quantize(w, ls, group_size, bits, out_dtype, backend) for w, ls in zip(weights, log_scales, strict=True)]
    return list(_FakeQuantizeMany.apply(group_size, bits, target, len(weights), *weights, *log_scales))


class _FakeQuantizeMany(torch.autograd.Function):
    """:class:`_FakeQuantize` of many weights on the many-weight kernels (inputs: the weights, then their log-scales;
    outputs: the fake-quant weights, views of one flat buffer). Saves the weights and the flat ``exp(log_scale)``."""

    @staticmethod
    def forward(ctx, group_size: int, bits: int, out_dtype: torch.dtype, count: int, *tensors: torch.Tensor):
        from grace_quant.kernels import triton_fake_quant

        weights, log_scales = tensors[:count], tensors[count:]
        # exp in torch, as scale_from_log takes it (elementwise: the same values as one exp per log-scale)
        exp_log_scale = torch.exp(torch.cat([ls.reshape(-1) for ls in log_scales]))
        flat = triton_fake_quant.launch_many_forward(weights, exp_log_scale, group_size, bits, out_dtype)
        ctx.group_size, ctx.bits = group_size, bits
        ctx.save_for_backward(*weights, exp_log_scale)
        return tuple(part.view(w.shape) for part, w in zip(flat.split([w.numel() for w in weights]), weights, strict=True))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        from grace_quant.kernels import triton_fake_quant

        *weights, exp_log_scale = ctx.saved_tensors
        kinds = triton_fake_quant.SUPPORTED_DTYPES
        dtype = grads[0].dtype if grads[0].dtype in kinds and all(g.dtype == grads[0].dtype for g in grads) else None
        grads = [g.contiguous() if dtype is not None else g.to(weights[0].dtype).contiguous() for g in grads]
        grad_weight, grad_log_scale = triton_fake_quant.launch_many_backward(
            weights, exp_log_scale, grads, ctx.group_size, ctx.bits
        )
        sizes = [w.numel() for w in weights]
        grad_weights = [g.view(w.shape) for g, w in zip(grad_weight.split(sizes), weights, strict=True)]
        groups = [size // ctx.group_size for size in sizes]
        # a log-scale is [out, in / group_size] (supports_many checked it)
        grad_scales = [g.view(w.shape[0], -1) for g, w in zip(grad_log_scale.split(groups), weights, strict=True)]
        return None, None, None, None, *grad_weights, *grad_scales


def fused_qat_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    log_scale: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    bits: int,
) -> torch.Tensor | None:
    """``x @ fake_quantize(weight, log_scale)^T + bias`` with the fake quantization inside the matmul kernels
    (``grace_quant.kernels.triton_qat_linear``; bf16/fp16 ``x``, straight-through and LSQ gradients in the weight
    gradient's epilogue), or None where those kernels do not apply: the caller then takes the fake-quant path."""
    if not kernels_can_run(x):
        return None
    try:
        from grace_quant.kernels import triton_qat_linear
    except ImportError:  # no triton on this platform
        return None
    if not triton_qat_linear.supports(x, weight, log_scale, group_size):
        return None
    return _FusedQATLinear.apply(x, weight, log_scale, bias, group_size, bits)


class _FusedQATLinear(torch.autograd.Function):
    """The QAT linear on the fused matmul kernels: saves ``x``, the master weight and ``exp(log_scale)`` (never a
    fake-quant weight), and recomputes the fake-quant tiles in both backward kernels."""

    @staticmethod
    def forward(ctx, x, weight, log_scale, bias, group_size: int, bits: int):
        from grace_quant.kernels import triton_qat_linear

        exp_log_scale = torch.exp(log_scale)  # in torch, as scale_from_log takes it
        rows = x.reshape(-1, x.shape[-1])
        y = triton_qat_linear.qat_linear_forward(rows, weight, exp_log_scale, group_size, bits, bias)
        ctx.save_for_backward(rows, weight, exp_log_scale)
        ctx.group_size, ctx.bits, ctx.x_shape = group_size, bits, x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from grace_quant.kernels import triton_qat_linear

        rows, weight, exp_log_scale = ctx.saved_tensors
        grad_rows = grad.reshape(-1, weight.shape[0]).to(rows.dtype)
        grad_x = grad_weight = grad_log_scale = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = triton_qat_linear.qat_linear_grad_input(grad_rows, weight, exp_log_scale, ctx.group_size, ctx.bits)
            grad_x = grad_x.reshape(ctx.x_shape)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_weight, grad_log_scale = triton_qat_linear.qat_linear_grad_weight(
                grad_rows, rows, weight, exp_log_scale, ctx.group_size, ctx.bits
            )
        if ctx.needs_input_grad[3]:
            grad_bias = grad_rows.float().sum(0).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_log_scale, grad_bias, None, None


def scale_from_log(log_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The scale a QAT layer uses and exports: ``exp(theta)`` in fp32, then rounded once to ``dtype``."""
    return torch.exp(log_scale.to(compute_dtype(log_scale.dtype))).to(dtype)


@torch.no_grad()
def mse_scales(
    weight: torch.Tensor,
    group_size: int,
    bits: int,
    grid_points: int = MSE_GRID_POINTS,
    grid_range: tuple[float, float] = MSE_GRID_RANGE,
) -> torch.Tensor:
    """Per-group fp32 scales minimising ``||w - s q(s)||^2`` over ``s in linspace(lo, hi, n) * max|w| / Qp``.

    Ties keep the smallest candidate; an all-zero group gets the scale of a unit group (its codes are 0 anyway).
    """
    lo_code, hi_code = code_range(bits)
    groups = grouped(weight.detach().float(), group_size)
    absmax = groups.abs().amax(dim=-1)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    best_scale = torch.empty_like(absmax)
    best_error = torch.full_like(absmax, float("inf"))
    work = torch.empty_like(groups)  # one reused buffer: in-place ops keep the pass cheap and allocation-free
    for factor in torch.linspace(grid_range[0], grid_range[1], grid_points).tolist():
        scale = absmax * (factor / hi_code)
        torch.div(groups, scale.unsqueeze(-1), out=work)
        work.round_().clamp_(lo_code, hi_code).mul_(scale.unsqueeze(-1))  # s * q(s)
        error = torch.sub(groups, work, out=work).square_().sum(dim=-1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale
