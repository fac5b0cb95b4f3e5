"""GRACE distillation losses (METHOD.md section 3), written to read like the equations.

* GDKD (3.1): decoupled KD (target-class + non-target-class KL) per supervised token, weighted by a
  confidence gate ``g = exp(-H(pT) / log|V|)`` from the teacher, computed in chunks of tokens.
* RCKA (3.2): ``1 - CKA`` between the cosine Gram matrices of each image's visual tokens.

All maths is at least fp32 whatever the input dtype (fp64 stays fp64); only the student receives gradients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from grace_quant.kernels import kernels_can_run
from grace_quant.labels import supervised_rows

MIN_CKA_TOKENS = 4
# A centred Gram whose Frobenius norm is below this fraction of n (its largest possible value) is degenerate.
DEGENERATE_GRAM_RTOL = 1e-4

__all__ = [
    "DKDTerms",
    "GatedDKDOutput",
    "cka",
    "decoupled_kd",
    "entropy_gate",
    "gated_dkd_loss",
    "kd_loss",
    "llava_tokens_per_image",
    "qwen2vl_tokens_per_image",
    "relational_cka_loss",
]


# --------------------------------------------------------------------------------------------------
# Decoupled KD, per token
# --------------------------------------------------------------------------------------------------


class DKDTerms(NamedTuple):
    """Per-token decoupled-KD terms; ``loss = T^2 (alpha * tckd + beta_dkd * nckd)``."""

    tckd: torch.Tensor
    nckd: torch.Tensor
    loss: torch.Tensor


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 inputs stay fp64, which lets tests compare against fp64 references tightly)."""
    return x if x.dtype == torch.float64 else x.float()


def _kl(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``sum_v p (log p - log q)`` over the last dim; entries with ``p == 0`` add exactly 0 (no 0*inf NaN)."""
    return torch.where(p == 0, 0.0, p * (log_p - log_q)).sum(-1)  # NaN p propagates: callers must see it


def _target_split(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``log p(y)``, ``log(1 - p(y))`` and the log-softmax renormalised without ``y`` (``-inf`` at ``y``).

    ``log(1 - p(y))`` is taken as ``logsumexp_{v != y} z - logsumexp z``, exact even when ``p(y) -> 1``.
    """
    is_target = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, target.unsqueeze(-1), True)
    masked = logits.masked_fill(is_target, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    lse_without_y = torch.logsumexp(masked, dim=-1)
    log_p_y = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - lse
    log_not_y = lse_without_y - lse
    log_p_hat = masked - lse_without_y.unsqueeze(-1)
    return log_p_y, log_not_y, log_p_hat


def _check_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if vs != vt:
        raise ValueError(
            f"student and teacher vocabularies differ: student logits have {vs} entries, teacher logits {vt}; "
            "GRACE needs a teacher of the same family with the same tokenizer."
        )


def decoupled_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 2.0,
    alpha: float = 1.0,
    beta_dkd: float = 4.0,
) -> DKDTerms:
    """Per-token TCKD, NCKD and ``L = T^2 (alpha TCKD + beta_dkd NCKD)`` for logits ``[..., V]``, target ``[...]``.

    TCKD = KL([pT(y), 1-pT(y)] || [pS(y), 1-pS(y)]); NCKD = KL(pT_hat || pS_hat) over the vocabulary without y.
    """
    _check_vocab(student_logits, teacher_logits)
    target = target.long()
    t_log_y, t_log_not_y, t_log_hat = _target_split(_upcast(teacher_logits.detach()) / temperature, target)
    s_log_y, s_log_not_y, s_log_hat = _target_split(_upcast(student_logits) / temperature, target)

    t_log_binary = torch.stack([t_log_y, t_log_not_y], dim=-1)
    s_log_binary = torch.stack([s_log_y, s_log_not_y], dim=-1)
    tckd = _kl(t_log_binary.exp(), t_log_binary, s_log_binary)
    nckd = _kl(t_log_hat.exp(), t_log_hat, s_log_hat)
    return DKDTerms(tckd, nckd, temperature**2 * (alpha * tckd + beta_dkd * nckd))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Plain per-token ``T^2 KL(pT || pS)`` at temperature T (the "QAT + naive KD" ablation)."""
    _check_vocab(student_logits, teacher_logits)
    log_t = F.log_softmax(_upcast(teacher_logits.detach()) / temperature, dim=-1)
    log_s = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    return temperature**2 * _kl(log_t.exp(), log_t, log_s)


@torch.no_grad()
def entropy_gate(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Confidence gate ``g = exp(-H(pT) / log|V|)`` in ``[e^-1, 1]`` from the temperature-1 teacher, no gradient."""
    vocab = teacher_logits.shape[-1]
    if vocab < 2:
        raise ValueError(f"entropy_gate needs a vocabulary of at least 2 entries, got {vocab}")
    log_p = F.log_softmax(_upcast(teacher_logits), dim=-1)
    p = log_p.exp()
    entropy = -torch.where(p == 0, 0.0, p * log_p).sum(-1)
    return torch.exp(-entropy / math.log(vocab))


# --------------------------------------------------------------------------------------------------
# Gated DKD over a batch, in chunks of supervised tokens
# --------------------------------------------------------------------------------------------------


class GatedDKDOutput(NamedTuple):
    """Result of :func:`gated_dkd_loss`.

    ``loss = weighted_sum / gate_sum`` carries the gradient. To aggregate over gradient-accumulation
    micro-batches or ranks, sum ``weighted_sum`` and ``gate_sum`` and divide. ``tckd`` and ``nckd`` are detached,
    gate-weighted means for logging; ``gate_mean``, ``gate_min`` and ``gate_max`` describe the gates ``g_i``
    (so a log shows whether the gate separates tokens at all; all three are 0 without supervised tokens).
    """

    loss: torch.Tensor
    tckd: torch.Tensor
    nckd: torch.Tensor
    gate_mean: torch.Tensor
    num_tokens: int
    weighted_sum: torch.Tensor
    gate_sum: torch.Tensor
    gate_min: torch.Tensor
    gate_max: torch.Tensor


def _chunk_terms(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    alpha: float,
    beta_dkd: float,
    gate: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``L_i``, ``TCKD_i``, ``NCKD_i`` and ``g_i`` of one chunk of supervised tokens."""
    tckd, nckd, loss = decoupled_kd(student, teacher, target, temperature, alpha, beta_dkd)
    g = entropy_gate(teacher) if gate else torch.ones_like(loss)
    return loss, tckd, nckd, g


_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fused_dkd_kernels(student_flat: torch.Tensor, teacher_flat: torch.Tensor):
    """The fused Triton module ``grace_quant.kernels.triton_dkd`` when it can run these logits, else None.

    It runs CUDA students (or any under ``TRITON_INTERPRET=1``) with fp32/fp16/bf16 logits; fp64 keeps the torch
    path. Triton is imported only here, never on the CPU path.
    """
    if not kernels_can_run(student_flat):
        return None
    if student_flat.dtype not in _FUSED_DTYPES or teacher_flat.dtype not in _FUSED_DTYPES:
        return None
    try:
        from grace_quant.kernels import triton_dkd
    except ImportError:  # no triton on this platform
        return None
    # the teacher may live elsewhere: its rows are then gathered onto the student's device chunk by chunk
    teacher_here = torch.empty((0, teacher_flat.shape[1]), dtype=teacher_flat.dtype, device=student_flat.device)
    return triton_dkd if triton_dkd.supports(student_flat, teacher_here) else None


class _ChunkedGatedDKD(torch.autograd.Function):
    """``sum_i g_i L_i`` over the selected rows, chunk by chunk.

    Each chunk's gradient w.r.t. its student logits is taken in the forward and written into one buffer
    of the student's dtype, so no fp32 ``[chunk, vocab]`` tensor outlives its chunk. On CUDA (fp32/fp16/bf16)
    a fused Triton kernel computes each row's terms and analytic gradient in two passes over the vocabulary,
    with no ``[chunk, vocab]`` temporaries at all; elsewhere the torch maths below runs with autograd.
    """

    @staticmethod
    def forward(
        ctx, student_flat, teacher_flat, rows, target, temperature, alpha, beta_dkd, gate, chunk_size, needs_grad
    ):
        kernels = _fused_dkd_kernels(student_flat, teacher_flat)
        if kernels is not None:
            grad, stats = _fused_forward(
                kernels, student_flat, teacher_flat, rows, target, temperature, alpha, beta_dkd, gate, chunk_size,
                needs_grad,
            )  # fmt: skip
            ctx.save_for_backward(grad)
            ctx.mark_non_differentiable(stats)
            return stats[0].clone(), stats
        grad = torch.zeros_like(student_flat) if needs_grad else None
        # stats: sum g L, sum g TCKD, sum g NCKD, sum g, min g, max g
        stats = torch.zeros(6, dtype=_upcast(student_flat[:0]).dtype, device=student_flat.device)
        stats[4], stats[5] = math.inf, -math.inf
        for start in range(0, rows.numel(), chunk_size):
            idx = rows[start : start + chunk_size]
            s = _upcast(student_flat.index_select(0, idx)).requires_grad_(needs_grad)
            t = teacher_flat.index_select(0, idx.to(teacher_flat.device)).to(s.device)
            with torch.enable_grad():
                loss, tckd, nckd, g = _chunk_terms(
                    s, t, target[start : start + chunk_size], temperature, alpha, beta_dkd, gate
                )
                weighted = (g * loss).sum()
            if needs_grad:
                (chunk_grad,) = torch.autograd.grad(weighted, s)
                grad.index_copy_(0, idx, chunk_grad.to(grad.dtype))
            stats[:4] += torch.stack([weighted.detach(), (g * tckd).sum().detach(), (g * nckd).sum().detach(), g.sum()])
            stats[4] = torch.minimum(stats[4], g.min())
            stats[5] = torch.maximum(stats[5], g.max())
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(stats)
        return stats[0].clone(), stats

    @staticmethod
    def backward(ctx, grad_weighted, _grad_stats):
        (grad,) = ctx.saved_tensors
        return grad * grad_weighted, None, None, None, None, None, None, None, None, None


def _fused_forward(
    kernels,
    student_flat: torch.Tensor,
    teacher_flat: torch.Tensor,
    rows: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    alpha: float,
    beta_dkd: float,
    gate: bool,
    chunk_size: int,
    needs_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The fused kernel over ``rows`` in chunks: the gradient buffer (or None) and the stats vector
    ``(sum g L, sum g TCKD, sum g NCKD, sum g, min g, max g)``, reduced on the device from per-row
    ``(L, TCKD, NCKD, g)``."""
    if student_flat.stride(-1) != 1:
        student_flat = student_flat.contiguous()
    grad = torch.zeros(student_flat.shape, dtype=student_flat.dtype, device=student_flat.device) if needs_grad else None
    per_row = torch.empty((rows.numel(), 4), dtype=torch.float32, device=student_flat.device)
    same_device = teacher_flat.device == student_flat.device
    for start in range(0, rows.numel(), chunk_size):
        idx = rows[start : start + chunk_size]
        if same_device:
            teacher, teacher_rows = teacher_flat, idx
        else:  # only this chunk's teacher rows come over
            teacher = teacher_flat.index_select(0, idx.to(teacher_flat.device)).to(student_flat.device)
            teacher_rows = torch.arange(idx.numel(), device=student_flat.device)
        kernels.gated_dkd_rows(
            student_flat, teacher, idx, target[start : start + chunk_size], temperature, alpha, beta_dkd, gate, grad,
            teacher_rows=teacher_rows, out=per_row[start : start + chunk_size],
        )  # fmt: skip
    g = per_row[:, 3:]
    stats = torch.cat([(per_row[:, :3] * g).sum(0), g.sum(0), g.min(0).values, g.max(0).values])
    return grad, stats


def gated_dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 2.0,
    alpha: float = 1.0,
    beta_dkd: float = 4.0,
    gate: bool = True,
    chunk_size: int = 1024,
) -> GatedDKDOutput:
    """Confidence-gated DKD ``sum_i g_i L_i / sum_i g_i`` over supervised, causally shifted tokens.

    Logits ``[B, L, V]`` (any float dtype), labels ``[B, L]`` with -100 ignored. Tokens are processed
    ``chunk_size`` at a time; with ``gate=False`` every ``g_i = 1`` (plain mean).
    """
    _check_vocab(student_logits, teacher_logits)
    if student_logits.dim() != 3 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"expected student and teacher logits of the same shape [B, L, V], got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    batch, seq_len, vocab = student_logits.shape
    if tuple(labels.shape) != (batch, seq_len):
        raise ValueError(f"labels must have shape [B, L] = {(batch, seq_len)}, got {tuple(labels.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    rows, target = supervised_rows(labels.to(student_logits.device))
    num_tokens = rows.numel()
    if num_tokens == 0:
        # an empty sum: exactly 0, finite, and still part of the student's graph
        weighted_sum = _upcast(student_logits[..., :0].sum())
        zero = torch.zeros_like(weighted_sum.detach())
        return GatedDKDOutput(weighted_sum, zero, zero, zero, 0, weighted_sum, zero, zero, zero)

    weighted_sum, stats = _ChunkedGatedDKD.apply(
        student_logits.reshape(-1, vocab),
        teacher_logits.detach().reshape(-1, vocab),
        rows,
        target,
        float(temperature),
        float(alpha),
        float(beta_dkd),
        bool(gate),
        int(chunk_size),
        torch.is_grad_enabled() and student_logits.requires_grad,  # no gradient work under no_grad / eval
    )
    gate_sum = stats[3]
    return GatedDKDOutput(
        loss=weighted_sum / gate_sum,
        tckd=stats[1] / gate_sum,
        nckd=stats[2] / gate_sum,
        gate_mean=gate_sum / num_tokens,
        num_tokens=num_tokens,
        weighted_sum=weighted_sum,
        gate_sum=gate_sum,
        gate_min=stats[4],
        gate_max=stats[5],
    )


# --------------------------------------------------------------------------------------------------
# Relational CKA on visual tokens
# --------------------------------------------------------------------------------------------------


def _centred_cosine_gram(features: torch.Tensor) -> torch.Tensor:
    """``H K H`` with ``K = V V^T`` of the row-normalised ``n x d`` features and ``H = I - 11^T/n``."""
    v = F.normalize(_upcast(features), dim=-1)
    k = v @ v.T
    # H K H == K minus its row means, minus its column means, plus its grand mean
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def cka(features_student: torch.Tensor, features_teacher: torch.Tensor) -> torch.Tensor | None:
    """Linear CKA of the cosine Grams of one image's tokens, ``<K~T, K~S> / (||K~T|| ||K~S||)``, in fp32.

    Widths may differ. Returns None when there are fewer than 4 tokens or either centred Gram is ~0.
    """
    n = features_student.shape[0]
    if features_teacher.shape[0] != n:
        raise ValueError(f"student has {n} tokens but teacher has {features_teacher.shape[0]}")
    if n < MIN_CKA_TOKENS:
        return None
    k_s = _centred_cosine_gram(features_student)
    k_t = _centred_cosine_gram(features_teacher)
    norm_s, norm_t = k_s.norm(), k_t.norm()
    if min(norm_s.item(), norm_t.item()) <= DEGENERATE_GRAM_RTOL * n:
        return None
    return (k_s * k_t).sum() / (norm_s * norm_t)


def relational_cka_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    image_token_mask: torch.Tensor,
    tokens_per_image: Sequence[int] | torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """Mean over images of ``1 - CKA`` of their visual tokens, and the number of images used.

    Hidden states ``[B, L, d_s]`` / ``[B, L, d_t]``; ``image_token_mask [B, L]``; ``tokens_per_image`` gives
    each image's visual-token count in row-major order. Images with < 4 tokens or a degenerate Gram are
    skipped; with none left the loss is an exact 0 that still backpropagates.
    """
    if student_hidden.shape[:2] != teacher_hidden.shape[:2] or student_hidden.shape[:2] != image_token_mask.shape:
        raise ValueError(
            f"hidden states {tuple(student_hidden.shape)} / {tuple(teacher_hidden.shape)} and image_token_mask "
            f"{tuple(image_token_mask.shape)} must share [B, L]"
        )
    sizes = [int(n) for n in (tokens_per_image.tolist() if torch.is_tensor(tokens_per_image) else tokens_per_image)]
    mask = image_token_mask.to(device=student_hidden.device, dtype=torch.bool)
    num_masked = int(mask.sum())
    if num_masked != sum(sizes):
        raise ValueError(
            f"image_token_mask selects {num_masked} visual tokens but tokens_per_image sums to {sum(sizes)} "
            f"({len(sizes)} images)"
        )
    per_image_s = torch.split(student_hidden[mask], sizes)
    per_image_t = torch.split(teacher_hidden.detach()[mask.to(teacher_hidden.device)].to(student_hidden.device), sizes)

    terms = [1.0 - c for s, t in zip(per_image_s, per_image_t, strict=True) if (c := cka(s, t)) is not None]
    if not terms:
        return _upcast(student_hidden[..., :0].sum()), 0
    return torch.stack(terms).mean(), len(terms)


def llava_tokens_per_image(
    input_ids: torch.Tensor, image_token_id: int, num_images_per_sample: int | Sequence[int] | None = None
) -> list[int]:
    """Visual tokens of each image, row-major, from the image-token count of each sample.

    A sample's image tokens are split evenly over its images; by default a sample with any image tokens
    holds one image. Pass ``num_images_per_sample`` (an int for all samples, or one per sample) otherwise.
    """
    counts = (input_ids == image_token_id).sum(dim=-1).tolist()
    if num_images_per_sample is None:
        images = [1 if c else 0 for c in counts]
    elif isinstance(num_images_per_sample, int):
        images = [num_images_per_sample] * len(counts)
    else:
        images = [int(k) for k in num_images_per_sample]
    if len(images) != len(counts):
        raise ValueError(f"num_images_per_sample has {len(images)} entries for a batch of {len(counts)}")

    sizes: list[int] = []
    for row, (count, k) in enumerate(zip(counts, images, strict=True)):
        if k < 0 or bool(k) != bool(count) or (k and count % k):
            raise ValueError(f"sample {row}: {count} image tokens cannot be split evenly over {k} images")
        sizes += [count // k] * k if k else []
    return sizes


def qwen2vl_tokens_per_image(image_grid_thw: torch.Tensor, spatial_merge_size: int = 2) -> list[int]:
    """Visual tokens of each image in Qwen2-VL: ``t * h * w // merge^2`` per row of ``image_grid_thw``."""
    return (image_grid_thw.long().prod(dim=-1) // spatial_merge_size**2).tolist()


def image_token_id(config) -> int | None:
    """The image placeholder token of a VLM config: ``image_token_id`` (Qwen2-VL, newer LLaVA configs) or the older
    ``image_token_index`` (LLaVA-1.5); None for a model without one."""
    token = getattr(config, "image_token_id", None)
    return token if token is not None else getattr(config, "image_token_index", None)


def visual_tokens(config, inputs: dict) -> tuple[torch.Tensor | None, list[int]]:
    """Image-token mask ``[B, L]`` and the visual-token count of each image, row-major, of a batch for a model with
    ``config`` (LLaVA: image tokens split per sample; Qwen2-VL: from ``image_grid_thw``). ``(None, [])`` without
    images."""
    token = image_token_id(config)
    if token is None or inputs.get("pixel_values") is None:
        return None, []
    mask = inputs["input_ids"] == token
    if inputs.get("image_grid_thw") is not None:
        return mask, qwen2vl_tokens_per_image(inputs["image_grid_thw"], config.vision_config.spatial_merge_size)
    return mask, llava_tokens_per_image(inputs["input_ids"], token)
