"""Split-KV decode attention (``kernels.triton_decode_attention``) under Triton's CPU interpreter, against fp64 math,
and ``attn_implementation="grace_decode"`` generating inside tiny LLaVA / Qwen2-VL models with the kernel forced on.

The kernel cases run in a child process with ``TRITON_INTERPRET=1`` (see ``interpreter_harness``); the parent reads
one result per case.
"""

from __future__ import annotations

import os

import pytest
import torch
from interpreter_harness import result_for, run_interpreted, run_jobs

TOL = {"float16": 2e-3, "bfloat16": 1e-2}

# (id, batch, heads, kv heads, query tokens, head dim, cache slots, dtype, splits, lengths, mask kind)
# lengths: valid slots per batch row (None: no lengths); mask: None, "padded" (transformers' decode mask: causal up to
# the row's last position, left padding), "padded-shared" (one mask row for the batch), "random"
CASES = [
    ("gqa1-d64-fp16-len37", 1, 4, 4, 1, 64, 100, "float16", None, [37], None),
    ("gqa4-d128-bf16-len1-131-split3", 2, 8, 2, 1, 128, 200, "bfloat16", 3, [1, 131], None),
    ("gqa8-d128-fp16-3rows", 3, 16, 2, 1, 128, 150, "float16", None, [150, 65, 1], None),
    ("gqa8-d64-bf16-padded-split4", 2, 8, 1, 1, 64, 130, "bfloat16", 4, None, "padded"),
    ("gqa6-d128-bf16-shared-mask", 2, 12, 2, 1, 128, 90, "bfloat16", 2, None, "padded-shared"),
    ("gqa1-d128-bf16-nosplit", 2, 4, 4, 1, 128, 70, "bfloat16", 1, [70, 3], None),
    ("q2-gqa4-d64-fp16-mask-and-lens", 2, 8, 2, 2, 64, 140, "float16", 3, [140, 77], "random"),
    ("q3-gqa2-d80-fp16-lens", 1, 4, 2, 3, 80, 66, "float16", None, [66], None),
]


def _fp64_reference(q, k, v, mask, lens):
    """Attention in float64, written out per KV head group (independent of the torch reference in the package)."""
    batch, heads, n_q, dim = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    group = heads // kv_heads
    out = torch.zeros(batch, n_q, heads, dim, dtype=torch.float64)
    slots = torch.arange(length)
    for b in range(batch):
        for h in range(heads):
            keys, values = k[b, h // group].double(), v[b, h // group].double()
            scores = q[b, h].double() @ keys.T / dim**0.5  # [Q, L]
            keep = torch.ones(n_q, length, dtype=torch.bool)
            if mask is not None:
                keep &= mask[min(b, mask.shape[0] - 1), 0]
            if lens is not None:
                keep &= slots[None, :] <= (int(lens[b]) - n_q + torch.arange(n_q))[:, None]
            weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)
            out[b, :, h] = weights @ values
    return out


def _mask(kind: str | None, batch: int, n_q: int, length: int) -> torch.Tensor | None:
    if kind is None:
        return None
    if kind == "random":
        mask = torch.rand(batch, 1, n_q, length) > 0.4
        mask[..., 0] = True
        return mask
    # as transformers builds it for a static cache: row b has `pad` left-padding slots, its queries sit at `last`
    rows = 1 if kind == "padded-shared" else batch
    mask = torch.zeros(rows, 1, n_q, length, dtype=torch.bool)
    for b in range(rows):
        pad, last = 5 * b, length - 1 - 17 * b
        mask[b, 0, :, pad : last + 1] = True
    return mask


def _run_case(tda, case) -> dict:
    _, batch, heads, kv_heads, n_q, dim, length, dtype_name, splits, lens, mask_kind = case
    dtype = getattr(torch, dtype_name)
    q = torch.randn(batch, heads, n_q, dim).to(dtype)
    k = torch.randn(batch, kv_heads, length, dim).to(dtype)
    v = torch.randn(batch, kv_heads, length, dim).to(dtype)
    mask = _mask(mask_kind, batch, n_q, length)
    kv_lens = None if lens is None else torch.tensor(lens, dtype=torch.int32)
    # the cache slots nothing may attend are poisoned: a kernel reading them would turn the output NaN
    poison = torch.ones(batch, length, dtype=torch.bool)
    if kv_lens is not None:
        poison &= torch.arange(length)[None, :] >= kv_lens[:, None]
    elif mask is not None:
        poison &= ~mask.expand(batch, 1, n_q, length).any(dim=2)[:, 0]
    else:
        poison[:] = False
    k[poison[:, None, :, None].expand_as(k)] = float("nan")
    v[poison[:, None, :, None].expand_as(v)] = float("nan")
    y = tda.decode_attention(q, k, v, mask, kv_lens, splits=splits)
    assert y.shape == (batch, n_q, heads, dim) and y.dtype == dtype, (y.shape, y.dtype)
    ref = _fp64_reference(q, k.nan_to_num(0.0), v.nan_to_num(0.0), mask, kv_lens)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    used_splits = splits if splits is not None else tda.num_splits(batch, kv_heads, length)[0]
    return {"err": err if err == err else float("inf"), "splits": used_splits}


def _run_edges(tda) -> dict:
    """A row with nothing to attend gives zeros; repeated calls agree bit for bit; 1 vs 5 slices agree closely."""
    torch.manual_seed(7)
    q = torch.randn(2, 4, 1, 64).half()
    k, v = torch.randn(2, 2, 300, 64).half(), torch.randn(2, 2, 300, 64).half()
    mask = torch.ones(2, 1, 1, 300, dtype=torch.bool)
    mask[1] = False
    first = tda.decode_attention(q, k, v, mask, splits=5)
    again = tda.decode_attention(q, k, v, mask, splits=5)
    single = tda.decode_attention(q, k, v, mask, splits=1)
    return {
        "empty_row_zero": bool((first[1] == 0).all()),
        "repeat_equal": bool(torch.equal(first, again)),
        "split_vs_single": float((first[0].float() - single[0].float()).abs().max()),
    }


def _run_generate(name: str) -> dict:
    """Greedy static-cache generation of a tiny model, batch 2 with left padding: sdpa vs grace_decode with the
    kernel forced on CPU (so the Triton kernel runs in the interpreter)."""
    from grace_quant.integrations import attention
    from grace_quant.testing import tiny_inputs, tiny_model

    model = tiny_model(name, dtype=torch.bfloat16)
    model.generation_config.pad_token_id = 0
    inputs = tiny_inputs(model, batch=2)
    inputs.pop("labels")
    inputs["attention_mask"][1, :1] = 0  # the first text token (padding an image token breaks Qwen2-VL's rope index)
    settings = dict(max_new_tokens=8, do_sample=False, cache_implementation="static")
    expected = model.generate(**inputs, **settings)
    calls = []
    kernel = attention.decode_attention
    attention.decode_attention = lambda *args, **kwargs: calls.append(args[0].shape[2]) or kernel(*args, **kwargs)
    try:
        assert attention.use_decode_attention(model)
        with attention.force_kernel():
            got = model.generate(**inputs, **settings)
    finally:
        attention.decode_attention = kernel
    return {
        "same_tokens": bool(torch.equal(expected, got)),
        "kernel_calls": len(calls),
        "layers": model.config.get_text_config().num_hidden_layers,
        "vision_attention": model.config.vision_config._attn_implementation,
    }


def _main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    from grace_quant.kernels import triton_decode_attention as tda

    assert tda.INTERPRET
    torch.manual_seed(1234)
    run_jobs([
        *[(case[0], lambda case=case: _run_case(tda, case)) for case in CASES],
        ("edges", lambda: _run_edges(tda)),
        ("generate-llava", lambda: _run_generate("llava")),
        ("generate-qwen2-vl", lambda: _run_generate("qwen2-vl")),
    ])  # fmt: skip


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict]:
    pytest.importorskip("triton")
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_fp64_reference(interpreted, case):
    rec = result_for(interpreted, case[0])
    assert rec["err"] < TOL[case[7]], f"{case[0]}: relative L2 error {rec['err']:.3e} >= {TOL[case[7]]}"


def test_default_split_rule_uses_several_slices_at_batch_1():
    from grace_quant.kernels.triton_decode_attention import num_splits

    assert num_splits(1, 4, 100) == (2, 64)  # two blocks of 64 slots, one per slice
    splits, chunk = num_splits(1, 32, 852)  # LLaVA-7B: 32 KV heads, a static cache of 852 slots
    assert splits > 1 and splits * chunk >= 852 and chunk % 64 == 0
    assert num_splits(8, 32, 852)[0] == 2 and num_splits(64, 32, 852)[0] == 1


def test_empty_rows_determinism_and_slices(interpreted):
    rec = result_for(interpreted, "edges")
    assert rec["empty_row_zero"] and rec["repeat_equal"], rec
    assert rec["split_vs_single"] < 2e-3, rec


@pytest.mark.parametrize("name", ["llava", "qwen2-vl"])
def test_grace_decode_generates_the_sdpa_tokens_with_the_interpreted_kernel(interpreted, name):
    rec = result_for(interpreted, f"generate-{name}")
    assert rec["same_tokens"], rec
    assert rec["kernel_calls"] == 7 * rec["layers"], rec  # every decode step of every layer; prefill went to sdpa
    assert rec["vision_attention"] == "sdpa", rec


if __name__ == "__main__":
    _main()
