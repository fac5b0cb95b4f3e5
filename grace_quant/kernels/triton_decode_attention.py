"""Split-KV decode attention (flash-decoding style) for a few query tokens against a static KV cache.

Why: with a static cache, SDPA reads every cache slot under a mask and runs one program per (batch, head), which
leaves most SMs idle at batch 1. Here each program owns one (batch, KV head, slice of the cache): the query heads of
a GQA group (times the query tokens) form the rows of one tile, so K/V are read once per group, and key slots the
mask (or the per-row valid length) excludes are never loaded. A second kernel combines the slices in a fixed order
(deterministic). The number of slices is a function of the shapes only, and nothing reads a device value on the host,
so the launch is safe to capture in a CUDA graph.

Layouts: ``q [B, H, Q, D]``, ``k``/``v [B, Hkv, L, D]`` (any strides, last dim contiguous), ``mask`` boolean
``[B or 1, 1, Q, L]`` (True = attend, as transformers' sdpa masks), ``kv_lens`` int ``[B]``: slots ``< kv_lens[b]``
hold the sequence, whose last ``Q`` positions are the queries (causal). Output ``[B, Q, H, D]`` (what transformers'
attention functions return). fp32 accumulation, base-2 online softmax; rows with no key to attend give zeros.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .reference import decode_attention_reference
from .runtime import interpreting

INTERPRET = interpreting()
"""Under Triton's CPU interpreter the tiles are upcast to fp32 before any arithmetic (bf16 math is wrong there)."""

DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
MAX_ROWS = 64  # query heads per KV head x query tokens in one tile
BLOCK_N = 64  # cache slots per inner step
TARGET_PROGRAMS = 264  # 2 per SM of an H200: enough slices to keep every SM streaming K/V at batch 1
MAX_SPLITS = 64
_LOG2E = 1.4426950408889634

__all__ = ["decode_attention", "decode_attention_reference", "num_splits", "unsupported_reason"]


@triton.jit
def _split_kernel(
    Q, K, V, MASK, LENS, OUT, OP, LSE,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, smb, smm, smn, sob, som, soh,
    L, chunk, scale_log2, splits,
    G: tl.constexpr, Q_LEN: tl.constexpr, D: tl.constexpr, ONE_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_LENS: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One (slice, KV head, batch row): online softmax over the slice's valid keys for the group's query rows.
    Row ``r`` is query token ``r // G`` of query head ``kv_head * G + r % G``."""
    split = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)  # the cache's batch offset overflows int32 past 2**31 elements (long contexts, big batches)
    rows = tl.arange(0, BLOCK_M)
    qi = rows // G
    head = kvh * G + rows % G
    row_ok = rows < G * Q_LEN
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q_ptrs = Q + b * sqb + head[:, None] * sqh + qi[:, None] * sqm + d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, L)
    if HAS_LENS:
        n_valid = tl.load(LENS + b).to(tl.int32)
        hi = tl.minimum(hi, n_valid)
        last = n_valid - Q_LEN + qi  # the position of row r's query: it sees keys up to there
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b64 * skb + kvh * skh
    v_base = V + b64 * svb + kvh * svh
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        valid = row_ok[:, None] & (n < hi)[None, :]
        if HAS_LENS:
            valid = valid & (n[None, :] <= last[:, None])
        if HAS_MASK:
            keep = tl.load(MASK + b64 * smb + qi[:, None] * smm + n[None, :] * smn, mask=valid, other=0)
            valid = valid & (keep != 0)
        needed = tl.max(valid.to(tl.int32), axis=0) > 0  # slots some row attends: the only ones loaded
        kv_mask = needed[:, None] & d_ok[None, :]
        k = tl.load(k_base + n[:, None] * skn + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + n[:, None] * svn + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if ONE_SPLIT:
        out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
        o_ptrs = OUT + b * sob + qi[:, None] * som + head[:, None] * soh + d[None, :]
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        part = (b * tl.num_programs(1) + kvh) * splits + split
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(OP + (part * BLOCK_M + rows[:, None]) * BLOCK_D + d[None, :], out)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(LSE + part * BLOCK_M + rows, lse)


@triton.jit
def _reduce_kernel(
    OP, LSE, OUT, sob, som, soh, splits,
    G: tl.constexpr, Q_LEN: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One (KV head, batch row): the slices' partial outputs weighted by their log-sum-exp, in slice order."""
    kvh = tl.program_id(0)
    b = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    base = (b * tl.num_programs(0) + kvh) * splits
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    w = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(splits):  # a run-time count: a cache that grows does not compile a kernel per split count
        lse = tl.load(LSE + (base + s) * BLOCK_M + rows)
        part = tl.load(OP + ((base + s) * BLOCK_M + rows[:, None]) * BLOCK_D + d[None, :])
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        beta = tl.exp2(lse - m_safe)
        acc = acc * alpha[:, None] + beta[:, None] * part
        w = w * alpha + beta
        m = m_new
    out = tl.where(w[:, None] > 0, acc / tl.where(w > 0, w, 1.0)[:, None], 0.0)
    qi = rows // G
    head = kvh * G + rows % G
    ok = (rows < G * Q_LEN)[:, None] & (d < D)[None, :]
    tl.store(
        OUT + b * sob + qi[:, None] * som + head[:, None] * soh + d[None, :], out.to(OUT.dtype.element_ty), mask=ok
    )


def num_splits(batch: int, kv_heads: int, cache_len: int, block_n: int = BLOCK_N) -> tuple[int, int]:
    """``(slices, slots per slice)`` from the shapes alone: enough programs to fill the GPU, whole blocks per slice."""
    blocks = max(1, triton.cdiv(cache_len, block_n))
    want = min(max(1, triton.cdiv(TARGET_PROGRAMS, batch * kv_heads)), blocks, MAX_SPLITS)
    chunk = triton.cdiv(blocks, want) * block_n
    return triton.cdiv(max(cache_len, 1), chunk), chunk


def unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> str | None:
    """Why the kernel cannot take these inputs (``None`` when it can); callers fall back to SDPA on a reason."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k and v must be 4-D ([B, H, Q, D] and [B, Hkv, L, D])"
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes must be one of float16/bfloat16 and equal, got {q.dtype}, {k.dtype}, {v.dtype}"
    (b, h, n_q, dim), (bk, hkv, length, dk) = q.shape, k.shape
    if tuple(v.shape) != (bk, hkv, length, dk) or bk != b or dk != dim or dim > MAX_HEAD_DIM:
        return f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit (head dim <= 256)"
    if hkv == 0 or h % hkv or (h // hkv) * n_q > MAX_ROWS:
        return f"{h} query heads over {hkv} KV heads with {n_q} query tokens exceed one tile ({MAX_ROWS} rows)"
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return "the head dimension of q, k and v must be contiguous"
    if len({q.device, k.device, v.device}) != 1:
        return "q, k and v must be on one device"
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 4:
            return f"the mask must be a boolean 4-D mask, got {mask.dtype} with {mask.dim()} dims"
        if mask.shape[0] not in (1, b) or mask.shape[1] != 1 or mask.shape[2] != n_q or mask.shape[3] != length:
            return f"mask {tuple(mask.shape)} is not [B or 1, 1, {n_q}, {length}]"
        if mask.device != q.device:
            return "the mask must be on the device of q"
    return None


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    kv_lens: torch.Tensor | None = None,
    scale: float | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Attention of ``q [B, H, Q, D]`` over the cache ``k``/``v [B, Hkv, L, D]`` -> ``[B, Q, H, D]``.

    Keys attended: those the boolean ``mask`` keeps and, with ``kv_lens [B]`` (a device tensor), those at slots
    ``< kv_lens[b]`` up to each query's own position (causal, the queries being the last ``Q`` valid slots).
    ``splits`` overrides the shape rule (tests).
    """
    if (reason := unsupported_reason(q, k, v, mask)) is not None:
        raise ValueError(f"decode_attention: {reason}")
    batch, heads, n_q, dim = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    group = heads // kv_heads
    n_splits, chunk = num_splits(batch, kv_heads, length)
    if splits is not None:
        chunk = triton.cdiv(triton.cdiv(length, splits), BLOCK_N) * BLOCK_N
        n_splits = triton.cdiv(length, chunk)
    block_m = max(16, triton.next_power_of_2(group * n_q))
    block_d = max(16, triton.next_power_of_2(dim))
    out = q.new_empty((batch, n_q, heads, dim))
    if n_splits > 1:
        partial = torch.empty((batch, kv_heads, n_splits, block_m, block_d), device=q.device, dtype=torch.float32)
        lse = torch.empty((batch, kv_heads, n_splits, block_m), device=q.device, dtype=torch.float32)
    else:
        partial = lse = out  # unused by the kernel when there is one slice
    if mask is not None:
        mask_strides = (mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(2), mask.stride(3))
    else:
        mask_strides = (0, 0, 0)
    lens = kv_lens.to(device=q.device, dtype=torch.int32) if kv_lens is not None else None
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    _split_kernel[(n_splits, kv_heads, batch)](
        q, k, v, mask if mask is not None else q, lens if lens is not None else q, out, partial, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), *mask_strides, out.stride(0), out.stride(1), out.stride(2),
        length, chunk, scale * _LOG2E, n_splits,
        G=group, Q_LEN=n_q, D=dim, ONE_SPLIT=n_splits == 1, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_D=block_d,
        HAS_MASK=mask is not None, HAS_LENS=lens is not None, UPCAST=INTERPRET, num_warps=4,
    )  # fmt: skip
    if n_splits > 1:
        _reduce_kernel[(kv_heads, batch)](
            partial, lse, out, out.stride(0), out.stride(1), out.stride(2), n_splits,
            G=group, Q_LEN=n_q, D=dim, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    return out
