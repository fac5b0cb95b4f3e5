"""GRACE's weight quantizer (METHOD.md section 2): symmetric per-group codes, MSE-grid scale init,
fake quantization with a straight-through estimator and learnable log-scales (LSQ).

One implementation of each rule: the QAT linear, the packed export and the quantize-on-load path all call
these functions, so a fake-quant weight and its packed form dequantize to the same bits.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from grace_quant.kernels import code_range, dequantize_codes, group_size_problem, kernels_can_run, pack

MSE_GRID_POINTS = 20
FUSED_FAKE_QUANT_ENV = "GRACE_FUSED_FAKE_QUANT"
"""Set to ``1`` to run fake quantization through the fused Triton kernels on CUDA. Opt-in until they have been
checked and timed on a GPU (they are verified bit for bit against the torch path under Triton's interpreter)."""
MSE_GRID_RANGE = (0.3, 1.2)


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
) -> torch.Tensor:
    """``w_hat = s * clamp(round_ste(w / s))`` with ``s = exp(theta)`` rounded to the weight dtype.

    Gradients reach ``weight`` (straight through, zero where clamped) and ``log_scale`` (the LSQ step-size
    gradient times ``s``). The result equals ``dequantize_codes(quantize_codes(w, s), s)`` bit for bit.
    ``out_dtype`` (e.g. the autocast dtype of the matmul that consumes ``w_hat``) returns
    ``w_hat.to(out_dtype)``, written directly in that dtype by the fused kernels on CUDA.

    With ``GRACE_FUSED_FAKE_QUANT=1``, fp32/bf16/fp16 weights with fp32 log-scales on CUDA (or under
    ``TRITON_INTERPRET=1``) run one Triton kernel forward and one backward
    (``grace_quant.kernels.triton_fake_quant``); everything else runs torch ops.
    """
    return _FakeQuantize.apply(weight, log_scale, group_size, bits, out_dtype)


@contextlib.contextmanager
def fused_fake_quant(enabled: bool = True) -> Iterator[None]:
    """Within this block fake quantization runs on the fused Triton kernels (``enabled``) or on torch ops: sets
    ``GRACE_FUSED_FAKE_QUANT`` for the block and restores what it was."""
    previous = os.environ.get(FUSED_FAKE_QUANT_ENV)
    os.environ[FUSED_FAKE_QUANT_ENV] = "1" if enabled else "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(FUSED_FAKE_QUANT_ENV, None)
        else:
            os.environ[FUSED_FAKE_QUANT_ENV] = previous


def _fused_fake_quant_kernels(weight: torch.Tensor, log_scale: torch.Tensor, group_size: int):
    """The Triton module ``grace_quant.kernels.triton_fake_quant`` when it can run these tensors, else None.

    Triton is imported only for CUDA tensors or under ``TRITON_INTERPRET=1``, never on the CPU path.
    """
    if os.environ.get(FUSED_FAKE_QUANT_ENV, "0") != "1":
        return None
    if not kernels_can_run(weight):
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
    ) -> torch.Tensor:
        if (problem := group_size_problem(group_size, in_features=weight.shape[-1])) is not None:
            raise ValueError(problem)  # the check grouped() makes, without reshaping on the fused path
        ctx.group_size, ctx.bits = group_size, bits
        kernels = _fused_fake_quant_kernels(weight, log_scale, group_size)
        ctx.fused = kernels is not None
        if kernels is not None:
            # exp in torch, exactly as scale_from_log takes it: the kernel rounds it to the weight dtype
            exp_log_scale = torch.exp(log_scale)
            ctx.save_for_backward(weight, log_scale, exp_log_scale)
            direct = out_dtype is None or out_dtype in kernels.SUPPORTED_DTYPES
            w_hat = kernels.fake_quant_forward(weight, exp_log_scale, group_size, bits, out_dtype if direct else None)
            return w_hat if direct else w_hat.to(out_dtype)
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
            grad_weight, grad_log_scale = triton_fake_quant.fake_quant_backward(
                weight, exp_log_scale, grad, ctx.group_size, ctx.bits
            )
            return grad_weight, grad_log_scale, None, None, None
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
        return grad_weight, grad_log_scale, None, None, None


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
