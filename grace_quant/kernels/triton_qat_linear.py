"""A QAT linear whose matmuls fake-quantize the weight tile in registers (experimental, opt-in; untimed on a GPU).

``y = x @ w_hat^T`` with ``w_hat = s * clamp(round(w / s))`` per group, where ``w`` is the fp32 (or bf16/fp16)
master weight and ``s = exp(theta)`` rounded to its dtype: no ``w_hat`` tensor is ever written to memory.

* forward: each program loads ``x`` and ``w`` tiles, quantizes the ``w`` tile exactly as
  ``triton_fake_quant`` does (same helpers, so the same bits), rounds it to the activation dtype (bf16/fp16, what
  ``w_hat.to(autocast dtype)`` gives) and feeds the MMA, accumulating in fp32;
* ``grad_input = g @ w_hat``: the same on-the-fly tile;
* ``grad_weight``: ``dW_hat = g^T @ x`` accumulated in fp32 per ``[BLOCK_N, BLOCK_K]`` tile, then the epilogue applies
  the straight-through mask (``dw``) and sums ``dW_hat * step`` per group for the LSQ log-scale gradient
  (``BLOCK_K`` holds whole groups: no atomics).

Against the torch path (``F.linear(x, fake_quantize(...).to(dtype))``) only the accumulation order differs, and
``dW_hat`` is not rounded to the activation dtype before the mask (the torch path's matmul writes it in bf16):
tested within tolerance against fp64 references under Triton's interpreter, where ``tl.dot`` runs on fp32 copies
of the (exact) bf16/fp16 values because the interpreter's bf16 dot is wrong.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .packing import code_range
from .runtime import interpreting
from .triton_fake_quant import _KIND, _quantize, _round_to

INTERPRET = interpreting()
ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_M, BLOCK_N, MIN_BLOCK_K = 64, 64, 64  # not tuned on hardware yet
INTERPRET_BLOCK_M, INTERPRET_BLOCK_N, INTERPRET_MIN_BLOCK_K = 32, 32, 32

__all__ = ["ACTIVATION_DTYPES", "qat_linear_forward", "qat_linear_grad_input", "qat_linear_grad_weight", "supports"]


@triton.jit
def _fq_tile(
    w_ptr, e_ptr, rows, cols, n_rows, K, groups_per_row,
    LO: tl.constexpr, HI: tl.constexpr, W_KIND: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    """The fake-quant weight tile ``[rows, cols]`` (fp32 holding values of the weight dtype; 0 outside the matrix)
    with its ratio ``w / s``, rounded ratio, codes and mask, as ``triton_fake_quant`` computes them."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < K)
    row_base = rows[:, None].to(tl.int64)
    w = tl.load(w_ptr + row_base * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    e = tl.load(e_ptr + row_base * groups_per_row + cols[None, :] // GROUP, mask=mask, other=1.0).to(tl.float32)
    s = _round_to(e, W_KIND)
    ratio, rounded, q = _quantize(w, s, LO, HI)
    return _round_to(q * s, W_KIND), ratio, rounded, q, mask


@triton.jit
def _load_tile(ptr, rows, cols, n_rows, n_cols):
    """``[rows, cols]`` of a row-major ``[n_rows, n_cols]`` matrix, 0 outside it."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(ptr, acc, rows, cols, n_rows, n_cols, KIND: tl.constexpr):
    """Store the fp32 ``acc`` at ``[rows, cols]`` of a row-major matrix of storage dtype ``KIND``, rounded to nearest
    on the bits (the interpreter truncates casts)."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    value = _round_to(acc, KIND).to(ptr.dtype.element_ty)
    tl.store(ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :], value, mask=mask)


@triton.jit
def _mma(acc, a, b, UPCAST: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation; ``UPCAST`` (the interpreter) multiplies fp32 copies instead."""
    if UPCAST:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _qat_linear_fwd_kernel(
    x_ptr, w_ptr, e_ptr, b_ptr, y_ptr, M, N, K, groups_per_row,
    LO: tl.constexpr, HI: tl.constexpr, W_KIND: tl.constexpr, X_KIND: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = _load_tile(x_ptr, rm, rk, M, K)
        w_hat, _, _, _, _ = _fq_tile(w_ptr, e_ptr, rn, rk, N, K, groups_per_row, LO, HI, W_KIND, GROUP)
        w_hat = _round_to(w_hat, X_KIND).to(x_ptr.dtype.element_ty)  # exact: already a value of that dtype
        acc = _mma(acc, x, tl.trans(w_hat), UPCAST)
    if HAS_BIAS:  # added in fp32 before the one rounding, as F.linear's bias (given in the activation dtype)
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    _store_tile(y_ptr, acc, rm, rn, M, N, X_KIND)


@triton.jit
def _qat_linear_dx_kernel(
    g_ptr, w_ptr, e_ptr, dx_ptr, M, N, K, groups_per_row,
    LO: tl.constexpr, HI: tl.constexpr, W_KIND: tl.constexpr, X_KIND: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        g = _load_tile(g_ptr, rm, rn, M, N)
        w_hat, _, _, _, _ = _fq_tile(w_ptr, e_ptr, rn, rk, N, K, groups_per_row, LO, HI, W_KIND, GROUP)
        acc = _mma(acc, g, _round_to(w_hat, X_KIND).to(g_ptr.dtype.element_ty), UPCAST)
    _store_tile(dx_ptr, acc, rm, rk, M, K, X_KIND)


@triton.jit
def _qat_linear_dw_kernel(
    g_ptr, x_ptr, w_ptr, e_ptr, dw_ptr, dls_ptr, M, N, K, groups_per_row,
    LO: tl.constexpr, HI: tl.constexpr, W_KIND: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # dW_hat = g^T @ x
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        g = _load_tile(g_ptr, rm, rn, M, N)  # coalesced [BLOCK_M, BLOCK_N], transposed in registers
        acc = _mma(acc, tl.trans(g), _load_tile(x_ptr, rm, rk, M, K), UPCAST)
    _, ratio, rounded, q, mask = _fq_tile(w_ptr, e_ptr, rn, rk, N, K, groups_per_row, LO, HI, W_KIND, GROUP)
    if W_KIND != 0:
        acc = _round_to(acc, W_KIND)  # the gradient reaches the weight dtype, as torch's grad of .to() does
    inside = (rounded >= LO) & (rounded <= HI)
    offsets = rn[:, None].to(tl.int64) * K + rk[None, :]
    tl.store(dw_ptr + offsets, tl.where(inside, acc, 0.0).to(dw_ptr.dtype.element_ty), mask=mask)
    contrib = tl.where(mask, acc * tl.where(inside, rounded - ratio, q), 0.0)
    per_group = tl.sum(tl.reshape(contrib, (BLOCK_N, BLOCK_K // GROUP, GROUP)), axis=2)
    gid = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
    g_mask = (rn[:, None] < N) & (gid[None, :] < groups_per_row)
    group_offsets = rn[:, None].to(tl.int64) * groups_per_row + gid[None, :]
    e = tl.load(e_ptr + group_offsets, mask=g_mask, other=0.0)
    tl.store(dls_ptr + group_offsets, per_group * e, mask=g_mask)


# ----------------------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------------------


def supports(x: torch.Tensor, weight: torch.Tensor, log_scale: torch.Tensor, group_size: int) -> bool:
    """Whether these kernels run ``x [..., in]`` (bf16/fp16) against ``weight [out, in]`` (fp32/bf16/fp16) with an fp32
    ``log_scale [out, in / group]``: one CUDA device (or ``TRITON_INTERPRET=1``), a power-of-two ``group_size``
    from 16 to 128 dividing ``in``."""
    devices_ok = (x.is_cuda or INTERPRET) and x.device == weight.device == log_scale.device
    return (
        devices_ok
        and x.dtype in ACTIVATION_DTYPES
        and weight.dtype in WEIGHT_DTYPES
        and log_scale.dtype == torch.float32
        and weight.dim() == 2
        and x.shape[-1] == weight.shape[1]
        and 16 <= group_size <= 128
        and group_size & (group_size - 1) == 0
        and weight.shape[1] % group_size == 0
        and tuple(log_scale.shape) == (weight.shape[0], weight.shape[1] // group_size)
    )


def _blocks(group_size: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K)``; ``BLOCK_K`` is a multiple of the group (whole groups per tile)."""
    if INTERPRET:
        return INTERPRET_BLOCK_M, INTERPRET_BLOCK_N, max(INTERPRET_MIN_BLOCK_K, group_size)
    return BLOCK_M, BLOCK_N, max(MIN_BLOCK_K, group_size)


def _constants(weight: torch.Tensor, x_dtype: torch.dtype, group_size: int, bits: int) -> dict:
    lo, hi = code_range(bits)
    return dict(LO=lo, HI=hi, W_KIND=_KIND[weight.dtype], X_KIND=_KIND[x_dtype], GROUP=group_size, UPCAST=INTERPRET)


def _check(x: torch.Tensor, weight: torch.Tensor, exp_log_scale: torch.Tensor, group_size: int) -> None:
    if not supports(x, weight, exp_log_scale, group_size):
        raise ValueError(
            "the fused QAT linear needs a bf16/fp16 x [M, in], an fp32/bf16/fp16 weight [out, in] and an fp32 "
            "exp(log_scale) [out, in / group] on one CUDA device (or TRITON_INTERPRET=1), group a power of two in "
            f"[16, 128]; got x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}, "
            f"exp(log_scale) {tuple(exp_log_scale.shape)} {exp_log_scale.dtype}, group {group_size}"
        )


def qat_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    exp_log_scale: torch.Tensor,
    group_size: int,
    bits: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [M, in] @ w_hat^T (+ bias) -> [M, out]`` in ``x``'s dtype (fp32 accumulation, one rounding), ``w_hat``
    made tile by tile from ``weight`` and ``exp_log_scale = torch.exp(log_scale)``; one launch, no ``w_hat`` in
    memory. ``bias`` is taken in ``x``'s dtype, as ``F.linear`` under autocast takes it."""
    _check(x, weight, exp_log_scale, group_size)
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.device != x.device):
        raise ValueError(f"bias must be a [{weight.shape[0]}] tensor on {x.device}, got {tuple(bias.shape)} on {bias.device}")
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    x, weight, exp_log_scale = x.contiguous(), weight.contiguous(), exp_log_scale.contiguous()
    (m, k), n = x.shape, weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    bm, bn, bk = _blocks(group_size)
    _qat_linear_fwd_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        x, weight, exp_log_scale, y if bias is None else bias, y, m, n, k, exp_log_scale.shape[1],
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, HAS_BIAS=bias is not None, **_constants(weight, x.dtype, group_size, bits),
    )  # fmt: skip
    return y


def qat_linear_grad_input(
    grad: torch.Tensor, weight: torch.Tensor, exp_log_scale: torch.Tensor, group_size: int, bits: int
) -> torch.Tensor:
    """``grad [M, out] @ w_hat -> [M, in]`` in ``grad``'s dtype (bf16/fp16), ``w_hat`` made on the fly."""
    dummy_x = grad.new_empty((0, weight.shape[1]))
    _check(dummy_x, weight, exp_log_scale, group_size)
    grad, weight, exp_log_scale = grad.contiguous(), weight.contiguous(), exp_log_scale.contiguous()
    (m, n), k = grad.shape, weight.shape[1]
    dx = torch.empty(m, k, dtype=grad.dtype, device=grad.device)
    if m == 0:
        return dx
    bm, bn, bk = _blocks(group_size)
    _qat_linear_dx_kernel[(triton.cdiv(m, bm), triton.cdiv(k, bk))](
        grad, weight, exp_log_scale, dx, m, n, k, exp_log_scale.shape[1],
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **_constants(weight, grad.dtype, group_size, bits),
    )  # fmt: skip
    return dx


def qat_linear_grad_weight(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, exp_log_scale: torch.Tensor, group_size: int, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_weight, grad_log_scale)``: ``dW_hat = grad^T @ x`` (fp32 accumulation), then the straight-through
    mask and ``e * sum_group dW_hat * step``, fused in the epilogue; one launch."""
    _check(x, weight, exp_log_scale, group_size)
    grad, x = grad.contiguous(), x.contiguous()
    weight, exp_log_scale = weight.contiguous(), exp_log_scale.contiguous()
    (m, k), n = x.shape, weight.shape[0]
    grad_weight = torch.empty_like(weight)
    grad_log_scale = torch.empty_like(exp_log_scale)
    bm, bn, bk = _blocks(group_size)
    constants = _constants(weight, x.dtype, group_size, bits)
    constants.pop("X_KIND")
    _qat_linear_dw_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        grad, x, weight, exp_log_scale, grad_weight, grad_log_scale, m, n, k, exp_log_scale.shape[1],
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **constants,
    )  # fmt: skip
    return grad_weight, grad_log_scale
