"""Split-KV decode attention on CUDA (``pytest -m gpu``): against fp64 math, under ``torch.compile`` with CUDA graphs
while the cache position moves, and inside ``generate`` (compiled vs eager greedy tokens)."""

from __future__ import annotations

import pytest
import torch
from test_decode_attention_interpret import _fp64_reference

import grace_quant.kernels as K

pytestmark = pytest.mark.gpu
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double().cpu() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "n_q", "dim", "length"),
    [(1, 32, 32, 1, 128, 852), (8, 32, 32, 1, 128, 852), (1, 12, 2, 1, 128, 420), (4, 32, 4, 1, 64, 1000),
     (2, 16, 2, 4, 128, 333), (3, 8, 8, 1, 64, 1)],
)  # fmt: skip
def test_kernel_matches_fp64_on_cuda(dtype, batch, heads, kv_heads, n_q, dim, length):
    torch.manual_seed(0)
    q = torch.randn(batch, heads, n_q, dim, device="cuda", dtype=dtype)
    k = torch.randn(batch, kv_heads, length, dim, device="cuda", dtype=dtype)
    v = torch.randn(batch, kv_heads, length, dim, device="cuda", dtype=dtype)
    lens = torch.randint(n_q, length + 1, (batch,), device="cuda")
    mask = torch.rand(batch, 1, n_q, length, device="cuda") > 0.2
    for m, ln in ((None, lens), (mask, None), (mask, lens)):
        got = K.decode_attention(q, k, v, m, ln)
        ref = _fp64_reference(
            q.cpu(), k.cpu(), v.cpu(), None if m is None else m.cpu(), None if ln is None else ln.cpu()
        )
        assert _rel(got, ref) < TOL[dtype]


def test_compiled_with_cuda_graphs_as_the_cache_position_moves():
    """A static cache written at a device-side position, the decode mask built from it on the device, the op under
    ``torch.compile(mode="reduce-overhead", fullgraph=True)``: every step equals eager and fp64."""
    torch.manual_seed(1)
    batch, heads, kv_heads, dim, length = 2, 8, 2, 128, 300
    dtype = torch.bfloat16
    k_cache = torch.zeros(batch, kv_heads, length, dim, device="cuda", dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.arange(length, device="cuda")
    pad = torch.tensor([0, 7], device="cuda")

    def step(q, k_new, v_new, position):
        k_cache.index_copy_(2, position, k_new)
        v_cache.index_copy_(2, position, v_new)
        mask = ((slots <= position) & (slots[None, :] >= pad[:, None]))[:, None, None, :]
        return K.decode_attention(q, k_cache, v_cache, mask)

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    position = torch.zeros(1, dtype=torch.long, device="cuda")
    for p in range(40):
        position.fill_(p)
        q = torch.randn(batch, heads, 1, dim, device="cuda", dtype=dtype)
        k_new = torch.randn(batch, kv_heads, 1, dim, device="cuda", dtype=dtype)
        v_new = torch.randn(batch, kv_heads, 1, dim, device="cuda", dtype=dtype)
        got = compiled(q, k_new, v_new, position).clone()
        mask = ((slots <= p) & (slots[None, :] >= pad[:, None]))[:, None, None, :]
        eager = K.decode_attention(q, k_cache, v_cache, mask)
        assert torch.equal(got, eager), p
        if p >= 7:  # row 1 has something to attend from its 8th slot on
            ref = _fp64_reference(q.cpu(), k_cache.cpu(), v_cache.cpu(), mask.cpu(), None)
            assert _rel(got, ref) < TOL[dtype], p


def _first_split_is_a_near_tie(tokens: torch.Tensor, reference, margin: float = 0.05) -> bool:
    """Greedy runs that round differently (inductor fuses RMSNorm and RoPE; two attention kernels sum in other
    orders) may part at a near-tie of the top two logits, and only there: true when ``tokens`` equal the reference's,
    or where they first differ the reference's top-2 logit gap was below ``margin`` (bf16 rounding scale)."""
    generated = reference.sequences[0, -len(reference.scores) :]
    ours = tokens[0, -len(reference.scores) :]
    differ = (ours != generated).nonzero()
    if differ.numel() == 0:
        return True
    step = int(differ[0])
    top = reference.scores[step][0].float().topk(2).values
    return float(top[0] - top[1]) < margin


@pytest.mark.parametrize("name", ["llava", "qwen2-vl"])
def test_int4_model_with_grace_decode_generates_like_eager_when_compiled(name):
    """A packed tiny VLM on CUDA gets ``grace_decode`` by default; 32 greedy tokens of the compiled static-cache run
    equal eager decoding, and sdpa's own tokens, up to a near-tie where rounding may pick the other token."""
    from grace_quant import GraceConfig, quantize_model
    from grace_quant.integrations import fast_decode
    from grace_quant.testing import tiny_inputs, tiny_model

    model = tiny_model(name, hidden=128, layers=2, dtype=torch.bfloat16).cuda()
    quantize_model(model, GraceConfig(mode="packed", group_size=32))
    assert model.config.get_text_config()._attn_implementation == "grace_decode"
    inputs = {k: v.cuda() for k, v in tiny_inputs(model, batch=1).items() if k != "labels"}
    model.generation_config.pad_token_id = 0
    settings = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, cache_implementation="static")
    fast_decode._COMPILED.clear()
    compiled = model.generate(**inputs, **settings)  # a packed model's default: grace_greedy's compiled step
    assert fast_decode._COMPILED
    scored = dict(output_scores=True, return_dict_in_generate=True, disable_compile=True)
    eager = model.generate(**inputs, **settings, **scored)
    assert _first_split_is_a_near_tie(compiled, eager)
    model.config.get_text_config()._attn_implementation = "sdpa"
    sdpa = model.generate(**inputs, **settings, **scored)
    assert _first_split_is_a_near_tie(eager.sequences, sdpa)
