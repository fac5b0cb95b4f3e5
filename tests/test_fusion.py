"""Fused q|k|v and gate|up projections of packed INT4 models (grace_quant.fusion)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers.generation.configuration_utils import CompileConfig

import grace_quant.fusion as fusion_module
import grace_quant.modules as modules_module
from grace_quant import (
    AutoModelForVision2Seq,
    GraceConfig,
    GraceQATLinear,
    GraceQuantLinear,
    fuse_projections,
    prepare_qat,
    quantize_model,
    unfuse_projections,
)
from grace_quant.fusion import FusedProjection, fused_groups
from grace_quant.surgery import grace_layers
from grace_quant.testing import tiny_inputs, tiny_model

MODELS = ("llava", "qwen2-vl")  # LLaMA-style decoder without biases; Qwen2 decoder with q/k/v biases
LAYERS = 2


def packed_pair(name: str, group_size: int = 32):
    """The same tiny model quantized to packed INT4 twice: unfused and fused."""
    fp = tiny_model(name, layers=LAYERS)
    plain = quantize_model(copy.deepcopy(fp), GraceConfig(mode="packed", group_size=group_size, fuse_projections=False))
    fused = quantize_model(copy.deepcopy(fp), GraceConfig(mode="packed", group_size=group_size))
    return plain, fused


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("name", MODELS)
def test_fused_model_equals_unfused(name):
    plain, fused = packed_pair(name)
    groups = dict(fused_groups(fused))
    assert not list(fused_groups(plain))
    assert len(groups) == 2 * LAYERS, groups.keys()
    assert {g.names for g in groups.values()} == {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")}
    inputs = tiny_inputs(plain)
    # the reference path computes each output column from its own weight row: fusion changes nothing
    assert torch.equal(logits(plain, inputs), logits(fused, inputs))
    # the checkpoint view of the model is unchanged: same names, same tensors
    a, b = plain.state_dict(), fused.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("name", MODELS)
def test_fusion_makes_four_matmuls_per_decoder_layer(name, monkeypatch):
    plain, fused = packed_pair(name)
    calls = []

    def counting(real):
        def wrapped(x, packed, *args, **kwargs):
            calls.append(packed.shape[0])
            return real(x, packed, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(fusion_module, "quant_linear", counting(fusion_module.quant_linear))
    monkeypatch.setattr(modules_module, "quant_linear", counting(modules_module.quant_linear))
    inputs = tiny_inputs(plain)
    logits(plain, inputs)
    unfused_calls, calls[:] = len(calls), []
    logits(fused, inputs)
    assert unfused_calls == 7 * LAYERS
    assert len(calls) == 4 * LAYERS
    config = fused.config.get_text_config()
    head_dim = config.hidden_size // config.num_attention_heads
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
    assert calls.count(qkv) == LAYERS and calls.count(2 * config.intermediate_size) == LAYERS


def test_members_fall_back_when_called_out_of_order():
    plain, fused = packed_pair("qwen2-vl")
    attn_p = plain.model.language_model.layers[0].self_attn
    attn_f = fused.model.language_model.layers[0].self_attn
    x = torch.randn(2, 3, attn_p.q_proj.in_features)
    y = torch.randn(2, 3, attn_p.q_proj.in_features)
    with torch.no_grad():
        # k first, q twice on one input, v and k on another input: each result equals the member's own matmul
        assert torch.equal(attn_f.k_proj(x), attn_p.k_proj(x))
        assert torch.equal(attn_f.q_proj(x), attn_p.q_proj(x))
        assert torch.equal(attn_f.q_proj(x), attn_p.q_proj(x))
        assert torch.equal(attn_f.v_proj(y), attn_p.v_proj(y))
        assert torch.equal(attn_f.k_proj(y), attn_p.k_proj(y))
        holder = attn_f.grace_fused_q_k_v
        assert holder._pending.input is y  # q has not been served for y yet
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert torch.equal(getattr(attn_f, proj)(x), getattr(attn_p, proj)(x))
    # once every member has taken its slice, no activation is held between calls
    assert holder._pending.input is None and holder._pending.output is None


def test_save_reload_keeps_the_unfused_format(tmp_path):
    plain, fused = packed_pair("llava")
    fused.save_pretrained(tmp_path / "fused")
    plain.save_pretrained(tmp_path / "plain")
    saved_fused = load_file(tmp_path / "fused" / "model.safetensors")
    saved_plain = load_file(tmp_path / "plain" / "model.safetensors")
    assert saved_fused.keys() == saved_plain.keys()
    assert all(torch.equal(saved_fused[k], saved_plain[k]) for k in saved_plain)
    assert not any("grace_fused" in key for key in saved_fused)

    reloaded = AutoModelForVision2Seq.from_pretrained(tmp_path / "fused")
    assert len(list(fused_groups(reloaded))) == 2 * LAYERS
    inputs = tiny_inputs(plain)
    assert torch.equal(logits(reloaded, inputs), logits(plain, inputs))
    # the saved config decides: a model saved with fuse_projections=False loads unfused
    assert not list(fused_groups(AutoModelForVision2Seq.from_pretrained(tmp_path / "plain")))


def test_moving_the_model_keeps_members_as_views_of_the_fused_tensors():
    plain, fused = packed_pair("qwen2-vl")
    plain.double()
    fused.double()
    for _, holder in fused_groups(fused):
        assert holder.scales.dtype == torch.float64
        base = holder.weight.untyped_storage().data_ptr()
        for member in holder._members:
            assert member.weight.untyped_storage().data_ptr() == base
            assert member.scales.untyped_storage().data_ptr() == holder.scales.untyped_storage().data_ptr()
    inputs = tiny_inputs(plain)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    assert torch.equal(logits(plain, inputs), logits(fused, inputs))


def test_unfuse_prepare_qat_and_dequantize_undo_the_fusion():
    plain, fused = packed_pair("qwen2-vl")
    inputs = tiny_inputs(plain)
    expected = logits(plain, inputs)

    again = copy.deepcopy(fused)
    assert unfuse_projections(again) == 2 * LAYERS
    assert not list(fused_groups(again)) and not any(isinstance(m, FusedProjection) for m in again.modules())
    assert all(layer._fusion is None for _, layer in grace_layers(again, GraceQuantLinear))
    assert torch.equal(logits(again, inputs), expected)
    assert fuse_projections(again) == 2 * LAYERS  # and it fuses again

    qat = prepare_qat(copy.deepcopy(fused))
    assert not list(fused_groups(qat))
    assert all(isinstance(layer, GraceQATLinear) for _, layer in grace_layers(qat))
    torch.testing.assert_close(logits(qat, inputs), expected, rtol=1e-5, atol=1e-5)

    dense = copy.deepcopy(fused).dequantize()
    assert not list(fused_groups(dense)) and not list(grace_layers(dense))
    torch.testing.assert_close(logits(dense, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_compiled_static_cache_generate_equals_eager(name):
    """``generate(cache_implementation="static")`` compiles the decode step (fullgraph; the eager backend keeps
    this CPU test fast, the H200 run uses inductor with CUDA graphs) and gives the eager INT4 model's tokens."""
    _, fused = packed_pair(name)
    fused.generation_config.pad_token_id = 0
    inputs = tiny_inputs(fused, batch=1)
    inputs.pop("labels")
    settings = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, output_scores=True,
                    return_dict_in_generate=True)  # fmt: skip
    eager = fused.generate(**inputs, **settings)
    compile_config = CompileConfig(backend="eager", fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    static = fused.generate(**inputs, **settings, cache_implementation="static", compile_config=compile_config)
    assert hasattr(fused, "_compiled_call"), "generate did not compile the decode step"
    assert torch.equal(eager.sequences, static.sequences)
    torch.testing.assert_close(torch.stack(static.scores), torch.stack(eager.scores), rtol=1e-5, atol=1e-5)


def test_fuse_projections_config_is_validated():
    with pytest.raises(ValueError, match="fuse_projections must be True or False"):
        GraceConfig(fuse_projections="yes")
    assert GraceConfig().to_dict()["fuse_projections"] is True
