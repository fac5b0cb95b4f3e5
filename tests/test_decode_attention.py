"""``attn_implementation="grace_decode"`` on CPU: the custom op's contract, which calls take the decode kernel and
which fall back to sdpa, the ``GraceConfig.decode_attention`` switch, and registration (the Triton kernel itself is
checked in ``test_decode_attention_interpret.py``)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_decode_attention_interpret import _fp64_reference

import grace_quant.kernels as K
from grace_quant import GraceConfig, quantize_model
from grace_quant.integrations import attention
from grace_quant.integrations.generation import deferred_stop_check_available
from grace_quant.testing import tiny_inputs, tiny_model


def _qkv(batch=2, heads=4, kv_heads=2, n_q=1, dim=16, length=9, dtype=torch.float16):
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    return make(batch, heads, n_q, dim), make(batch, kv_heads, length, dim), make(batch, kv_heads, length, dim)


def test_op_passes_opcheck_and_its_reference_matches_fp64():
    q, k, v = _qkv()
    mask = torch.rand(2, 1, 1, 9, generator=torch.Generator().manual_seed(1)) > 0.3
    lens = torch.tensor([9, 4])
    for args in ((q, k, v, mask, None, 0.25), (q.bfloat16(), k.bfloat16(), v.bfloat16(), None, lens, 0.25)):
        torch.library.opcheck(K.decode_attention_op, args)
    got = K.decode_attention(q, k, v, mask, lens)
    ref = _fp64_reference(q, k, v, mask, lens)
    assert ((got.double() - ref).norm() / ref.norm()).item() < 2e-3


def test_unsupported_inputs_get_a_one_line_reason():
    from grace_quant.kernels.triton_decode_attention import unsupported_reason

    q, k, v = _qkv()
    assert unsupported_reason(q, k, v) is None
    assert "float16/bfloat16" in unsupported_reason(q.float(), k.float(), v.float())
    assert "boolean" in unsupported_reason(q, k, v, torch.zeros(2, 1, 1, 9))
    assert "exceed one tile" in unsupported_reason(*_qkv(heads=64, kv_heads=1, n_q=2))
    assert "\n" not in unsupported_reason(q, k[:, :1].repeat(1, 3, 1, 1), v)


class _Attention(torch.nn.Module):
    num_key_value_groups = 2
    is_causal = True
    training = False


def _route(query, key, value, mask, **kwargs) -> tuple[bool, torch.Tensor]:
    """Whether ``grace_decode_attention`` took the kernel path (forced on CPU), and its output."""
    calls = []
    kernel = attention.decode_attention
    attention.decode_attention = lambda *a, **kw: calls.append(1) or kernel(*a, **kw)
    try:
        with attention.force_kernel():
            out, weights = attention.grace_decode_attention(
                _Attention(), query, key, value, mask, scaling=0.25, **kwargs
            )
    finally:
        attention.decode_attention = kernel
    assert weights is None
    return bool(calls), out


def test_decode_steps_take_the_kernel_and_everything_else_falls_back_to_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = _qkv()
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., 6:] = False
    took, out = _route(q, k, v, mask)
    expected, _ = sdpa_attention_forward(_Attention(), q.float(), k.float(), v.float(), mask, scaling=0.25)
    assert took and out.shape == (2, 1, 4, 16) and torch.allclose(out.float(), expected, atol=2e-3)
    assert not _route(q, k, v, None)[0]  # no mask (dynamic cache, no padding): nothing to skip, sdpa
    prefill = _qkv(n_q=9)
    assert not _route(*prefill, None)[0]  # prefill: sdpa (flash / efficient kernels)
    assert not _route(*_qkv(n_q=2), None)[0]  # several queries and no mask: sdpa's causal rule
    assert not _route(q, k, v, mask.float())[0]  # additive float mask
    assert not _route(q, k, v, mask, sliding_window=4)[0]
    assert not _route(q, k, v, mask, dropout=0.1)[0]
    assert not _route(q.float(), k.float(), v.float(), mask)[0]  # fp32: not a kernel dtype
    with torch.enable_grad():
        assert not _route(q.requires_grad_(), k, v, mask)[0]
    out, _ = attention.grace_decode_attention(_Attention(), q.detach(), k, v, mask, scaling=0.25)
    assert torch.allclose(out.float(), expected, atol=2e-3)  # not forced, CPU tensors: sdpa


@pytest.mark.parametrize("name", ["llava", "qwen2-vl"])
def test_grace_decode_generates_the_sdpa_tokens_through_the_op(name):
    """Static-cache greedy generation, batch 2 with left padding: sdpa vs grace_decode (kernel path forced, which
    on CPU without the interpreter runs the op's torch implementation)."""
    model = tiny_model(name, dtype=torch.bfloat16)
    model.generation_config.pad_token_id = 0
    inputs = tiny_inputs(model, batch=2)
    inputs.pop("labels")
    inputs["attention_mask"][1, :1] = 0
    settings = dict(max_new_tokens=10, do_sample=False, cache_implementation="static")
    expected = model.generate(**inputs, **settings)
    assert attention.use_decode_attention(model)
    assert model.config.get_text_config()._attn_implementation == "grace_decode"
    assert model.config.vision_config._attn_implementation == "sdpa"
    with attention.force_kernel():
        assert torch.equal(model.generate(**inputs, **settings), expected)


@pytest.mark.parametrize(("switch", "expected"), [(True, "grace_decode"), (False, "sdpa")])
def test_packed_grace_models_use_grace_decode_unless_switched_off(switch, expected):
    """Set wherever the model sits (on CPU every call falls back to sdpa; a model moved to CUDA gets the kernel)."""
    model = quantize_model(tiny_model("llava"), GraceConfig(mode="packed", group_size=32, decode_attention=switch))
    assert model.config.get_text_config()._attn_implementation == expected
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_loading_a_packed_checkpoint_sets_grace_decode_and_sdpa_is_one_call_away(tmp_path, fp_checkpoint):
    from transformers import AutoModelForImageTextToText

    quantize_model(tiny_model("qwen2-vl"), GraceConfig(mode="packed", group_size=32)).save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert loaded.config.quantization_config.decode_attention is True
    assert loaded.config.get_text_config()._attn_implementation == "grace_decode"
    assert getattr(loaded.generate, "_grace_defers", False) is deferred_stop_check_available()  # deferred_stop_check
    assert loaded.generate._grace_fast is True  # fast_generate: greedy calls through grace_greedy
    assert loaded.config.vision_config._attn_implementation == "sdpa"
    loaded.set_attn_implementation("sdpa")  # what the README says turns it off for a saved checkpoint
    assert loaded.config.get_text_config()._attn_implementation == "sdpa"
    qat = AutoModelForImageTextToText.from_pretrained(
        fp_checkpoint("llava"), quantization_config=GraceConfig(group_size=32)
    )
    assert qat.config.get_text_config()._attn_implementation == "sdpa"  # QAT (training) models are left alone
    assert "generate" not in vars(qat)  # and generate as transformers runs it


def test_any_model_opts_in_by_name_after_import_grace_quant():
    """In a fresh process: ``import grace_quant`` first (transformers not loaded yet), then a plain Llama asks for
    ``attn_implementation="grace_decode"``."""
    code = (
        "import grace_quant\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,"
        " num_key_value_heads=2, vocab_size=50)\n"
        "model = LlamaForCausalLM._from_config(config, attn_implementation='grace_decode')\n"
        "print(model.config._attn_implementation)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "grace_decode"
