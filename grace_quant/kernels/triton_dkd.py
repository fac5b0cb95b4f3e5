"""Fused Triton kernel for GRACE's confidence-gated decoupled KD (``grace_quant.losses.gated_dkd_loss``).

One program per supervised row ``i`` (student row ``rows[i]``, target ``y``), two streaming passes over the
vocabulary, all maths in fp32 whatever the logits' dtype (loads are upcast before any arithmetic):

* pass 1 keeps online log-sum-exp statistics, each a running block maximum (a scalar) and per-lane running sums
  rescaled by that scalar, so only the maxima need a block reduction per step:

  - the student ``z = s / T`` *without* ``y`` (``lse_zn``),
  - the teacher ``u = t / T`` *without* ``y`` (``lse_un``; its maximum is the maximum of ``t`` without ``y``
    times ``1/T``, exactly, since rounding is monotonic),
  - the temperature-1 teacher ``t`` with the entropy sum ``sum (t - m) exp(t - m)`` (its maximum starts at
    ``t_y``), for ``H = log e - w / e``.

  The target's own terms come from one scalar load: ``log p_y = -softplus(lse_n - z_y)`` and
  ``log(1 - p_y) = -softplus(z_y - lse_n)``, exact even when ``p_y -> 1`` (nothing is subtracted from 1).

* pass 2 sums ``NCKD = sum_{v != y} p̂T_v (log p̂T_v - log p̂S_v)`` and writes the analytic gradient of
  ``g_i L_i`` with respect to the student logits, ``L = T^2 (alpha TCKD + beta NCKD)``, ``z = s / T``:

  - ``v != y``: ``g T (p̂S_v (alpha (pT_y - pS_y) + beta) - beta p̂T_v)`` (as ``pS_v = (1 - pS_y) p̂S_v``),
  - ``v == y``: ``g T alpha (pS_y - pT_y)``;

  the gate ``g = exp(-H / log V)`` is a constant (no gradient).

A KL entry whose first probability is 0 adds exactly 0 (no ``0 * inf`` NaN); a NaN or inf in a row reaches that
row's outputs as a non-finite value. No host syncs: the launch is CUDA-graph safe.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .runtime import interpreting

INTERPRET = interpreting()
"""Running under Triton's CPU interpreter (programs run one after another; keep blocks small there)."""

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OUT_COLUMNS = 4  # per-row outputs: L, TCKD, NCKD, g
BLOCK_V = 8192  # vocabulary entries per step on a GPU (H200 sweep: 2048..16384 entries x 4..32 warps)
NUM_WARPS = 32
INTERPRET_BLOCK_V = 1024

__all__ = ["BLOCK_V", "OUT_COLUMNS", "SUPPORTED_DTYPES", "gated_dkd_rows", "supports"]


# ----------------------------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _log1p(x):
    """``log(1 + x)`` accurate for small ``x`` (Goldberg: ``log(u) * x / (u - 1)`` with ``u = 1 + x``)."""
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _softplus(x):
    """``log(1 + exp(x))`` without overflow; ``softplus(inf) = inf``, ``softplus(-inf) = 0``."""
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _safe(m):
    """A finite shift for ``exp(x - m)``: 0 while the running maximum is still ``-inf`` (nothing seen yet)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _kl_term(p, log_p, log_q):
    """``p (log p - log q)``, exactly 0 where ``p == 0``."""
    return tl.where(p == 0.0, 0.0, p * (log_p - log_q))


@triton.jit
def _vocab_block(s_base, t_base, offs, V, y):
    """One block of a row: ``(offs, inside, s, t, is_y)`` with the logits in fp32 and ``-inf`` past the vocabulary."""
    inside = offs < V
    s = tl.load(s_base + offs, mask=inside, other=float("-inf")).to(tl.float32)
    t = tl.load(t_base + offs, mask=inside, other=float("-inf")).to(tl.float32)
    return offs, inside, s, t, offs == y


@triton.jit
def _dkd_rows_kernel(
    s_ptr, t_ptr, rows_ptr, t_rows_ptr, y_ptr, out_ptr, grad_ptr,
    V, stride_s, stride_t, stride_g,
    inv_t, temperature, t_sq, alpha, beta, inv_log_v,
    GATE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0)
    row = tl.load(rows_ptr + i).to(tl.int64)
    t_row = tl.load(t_rows_ptr + i).to(tl.int64)
    y = tl.load(y_ptr + i).to(tl.int64)
    s_base = s_ptr + row * stride_s
    t_base = t_ptr + t_row * stride_t
    neg_inf = float("-inf")

    z_y = tl.load(s_base + y).to(tl.float32) * inv_t
    t_y = tl.load(t_base + y).to(tl.float32)
    u_y = t_y * inv_t

    offs0 = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    # pass 1: running maxima (scalars) and per-lane sums relative to them
    m_zn = tl.full([], neg_inf, tl.float32)  # student without y
    m_tn = m_zn  # teacher without y (temperature 1; the u maximum is m_tn / T)
    m_t = t_y  # teacher with y, temperature 1
    e_zn, e_un, e_t, w_t = zero, zero, zero, zero
    for start in range(0, V, BLOCK):
        offs, inside, s, t, is_y = _vocab_block(s_base, t_base, start + offs0, V, y)
        zn = tl.where(is_y, neg_inf, s * inv_t)
        tn = tl.where(is_y, neg_inf, t)

        m_zn_new = tl.maximum(m_zn, tl.max(zn, 0))
        c_zn = _safe(m_zn_new)
        e_zn = e_zn * tl.exp(m_zn - c_zn) + tl.exp(zn - c_zn)
        m_zn = m_zn_new

        m_tn_new = tl.maximum(m_tn, tl.max(tn, 0))
        c_un = _safe(m_tn_new * inv_t)
        e_un = e_un * tl.exp(m_tn * inv_t - c_un) + tl.exp(tn * inv_t - c_un)
        m_tn = m_tn_new

        m_t_new = tl.maximum(m_t, m_tn_new)
        c_t = _safe(m_t_new)
        scale = tl.exp(m_t - c_t)
        shift = tl.where(m_t == neg_inf, 0.0, m_t - c_t)  # old sums are all 0 while m_t is -inf
        d = t - c_t
        p = tl.exp(d)
        w_t = scale * (w_t + shift * e_t) + tl.where(t == neg_inf, 0.0, d * p)
        e_t = scale * e_t + p
        m_t = m_t_new

    lse_zn = m_zn + tl.log(tl.sum(e_zn, 0))
    lse_un = m_tn * inv_t + tl.log(tl.sum(e_un, 0))
    sum_e_t = tl.sum(e_t, 0)
    entropy = tl.log(sum_e_t) - tl.sum(w_t, 0) / sum_e_t

    # target / non-target split: log p_y = -softplus(lse_n - x_y), log(1 - p_y) = -softplus(x_y - lse_n)
    log_ps_y = -_softplus(lse_zn - z_y)
    log_ps_n = -_softplus(z_y - lse_zn)
    log_pt_y = -_softplus(lse_un - u_y)
    log_pt_n = -_softplus(u_y - lse_un)
    ps_y = tl.exp(log_ps_y)
    pt_y = tl.exp(log_pt_y)
    tckd = _kl_term(pt_y, log_pt_y, log_ps_y) + _kl_term(tl.exp(log_pt_n), log_pt_n, log_ps_n)
    if GATE:
        g = tl.exp(-entropy * inv_log_v)
    else:
        g = tl.full([], 1.0, tl.float32)

    # pass 2: NCKD and the gradient row
    gt = g * temperature
    c_hat_s = gt * (alpha * (pt_y - ps_y) + beta)
    c_hat_t = gt * beta
    grad_y = gt * alpha * (ps_y - pt_y)
    g_base = grad_ptr + row * stride_g
    nckd_acc = zero
    for start in range(0, V, BLOCK):
        offs, inside, s, t, is_y = _vocab_block(s_base, t_base, start + offs0, V, y)
        log_hat_s = s * inv_t - lse_zn
        log_hat_t = t * inv_t - lse_un
        hat_s = tl.where(is_y, 0.0, tl.exp(log_hat_s))
        hat_t = tl.where(is_y, 0.0, tl.exp(log_hat_t))
        nckd_acc += _kl_term(hat_t, log_hat_t, log_hat_s)
        if WRITE_GRAD:
            grad = tl.where(is_y, grad_y, c_hat_s * hat_s - c_hat_t * hat_t)
            tl.store(g_base + offs, grad.to(grad_ptr.dtype.element_ty), mask=inside)
    nckd = tl.sum(nckd_acc, 0)

    loss = t_sq * (alpha * tckd + beta * nckd)
    out = out_ptr + i * 4
    tl.store(out, loss)
    tl.store(out + 1, tckd)
    tl.store(out + 2, nckd)
    tl.store(out + 3, g)


# ----------------------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------------------


def supports(student_flat: torch.Tensor, teacher_flat: torch.Tensor) -> bool:
    """Whether the kernel runs these ``[N, V]`` logits: CUDA (or ``TRITON_INTERPRET=1``), one device, fp32/fp16/bf16."""
    return (
        (student_flat.is_cuda or INTERPRET)
        and student_flat.device == teacher_flat.device
        and student_flat.dtype in SUPPORTED_DTYPES
        and teacher_flat.dtype in SUPPORTED_DTYPES
        and student_flat.dim() == 2
        and teacher_flat.dim() == 2
        and student_flat.shape[1] == teacher_flat.shape[1]
    )


def gated_dkd_rows(
    student_flat: torch.Tensor,
    teacher_flat: torch.Tensor,
    rows: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    alpha: float,
    beta_dkd: float,
    gate: bool,
    grad_out: torch.Tensor | None = None,
    *,
    teacher_rows: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Per-row ``[R, 4]`` fp32 ``(L_i, TCKD_i, NCKD_i, g_i)`` of student rows ``student_flat[rows]`` against
    teacher rows ``teacher_flat[teacher_rows]`` (default ``rows``) with targets ``target`` ``[R]``.

    With ``grad_out`` (``[N, V]``, the student's dtype), ``d(g_i L_i) / d student_flat[rows[i]]`` is written into
    ``grad_out[rows[i]]``; other rows are left untouched. ``g_i = 1`` when ``gate`` is False. ``out`` may be a
    preallocated contiguous ``[R, 4]`` fp32 buffer.
    """
    if not supports(student_flat, teacher_flat):
        raise ValueError(
            "gated_dkd_rows needs 2-D fp32/fp16/bf16 logits with one vocabulary on one CUDA device (or "
            f"TRITON_INTERPRET=1); got student {tuple(student_flat.shape)} {student_flat.dtype} on "
            f"{student_flat.device}, teacher {tuple(teacher_flat.shape)} {teacher_flat.dtype} on {teacher_flat.device}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = student_flat.shape[1]
    if vocab < 2:
        raise ValueError(f"decoupled KD needs a vocabulary of at least 2 entries, got {vocab}")
    num_rows = rows.numel()
    teacher_rows = rows if teacher_rows is None else teacher_rows
    if target.numel() != num_rows or teacher_rows.numel() != num_rows:
        raise ValueError(f"rows, teacher_rows and target must have one entry per row: {num_rows}, "
                         f"{teacher_rows.numel()}, {target.numel()}")  # fmt: skip
    if student_flat.stride(1) != 1:
        student_flat = student_flat.contiguous()
    if teacher_flat.stride(1) != 1:
        teacher_flat = teacher_flat.contiguous()
    if out is None:
        out = torch.empty((num_rows, OUT_COLUMNS), dtype=torch.float32, device=student_flat.device)
    elif out.shape != (num_rows, OUT_COLUMNS) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 [{num_rows}, {OUT_COLUMNS}] tensor")
    if grad_out is not None and (
        grad_out.shape != student_flat.shape or grad_out.stride(1) != 1 or grad_out.device != student_flat.device
    ):
        raise ValueError(f"grad_out must be [N, V] = {tuple(student_flat.shape)} with unit stride along V")
    if num_rows == 0:
        return out
    block = block_v or (INTERPRET_BLOCK_V if INTERPRET else BLOCK_V)
    block = min(block, triton.next_power_of_2(vocab))
    warps = num_warps or (4 if INTERPRET else NUM_WARPS)
    grad = grad_out if grad_out is not None else out  # unused without WRITE_GRAD
    _dkd_rows_kernel[(num_rows,)](
        student_flat, teacher_flat, rows.contiguous(), teacher_rows.contiguous(), target.contiguous(), out, grad,
        vocab, student_flat.stride(0), teacher_flat.stride(0), grad.stride(0),
        1.0 / temperature, float(temperature), float(temperature) ** 2, float(alpha), float(beta_dkd),
        1.0 / math.log(vocab),
        GATE=bool(gate), WRITE_GRAD=grad_out is not None, BLOCK=block, num_warps=warps,
    )  # fmt: skip
    return out
