"""from_pretrained / save_pretrained with GraceConfig on tiny LLaVA, Qwen2-VL and Qwen2.5-VL models."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import grace_quant
from grace_quant import AutoModelForVision2Seq, GraceConfig, GraceQATLinear, GraceQuantLinear
from grace_quant.checkpoint import saving_qat_master
from grace_quant.kernels import code_range
from grace_quant.surgery import grace_layers
from grace_quant.testing import TINY_MODELS, tiny_inputs

DECODER_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def load(path, **kwargs):
    model, info = AutoModelForVision2Seq.from_pretrained(path, output_loading_info=True, **kwargs)
    return model, info


def assert_clean_report(info):
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def reference_fake_quant(weight: torch.Tensor, group: int) -> torch.Tensor:
    """fp64 fake-quant on the MSE grid, written independently of grace_quant.quant."""
    lo, hi = code_range(4)
    w = weight.double().reshape(weight.shape[0], -1, group)
    absmax = w.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    best, best_err = None, None
    for k in range(20):
        s = (0.3 + 0.9 * k / 19) * absmax / hi
        q = s * torch.clamp(torch.round(w / s), lo, hi)
        err = ((w - q) ** 2).sum(-1, keepdim=True)
        best = q if best is None else torch.where(err < best_err, q, best)
        best_err = err if best_err is None else torch.minimum(err, best_err)
    return best.reshape(weight.shape)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_fp_to_qat_to_int4_round_trip(name, fp_checkpoint, tmp_path):
    """The issue's snippet: QAT on load (empty report) -> save packed -> reload packed, identical logits."""
    fp_dir = fp_checkpoint(name)
    fp_model, _ = load(fp_dir)
    student, info = load(fp_dir, quantization_config=GraceConfig(bits=4, group_size=32))
    assert_clean_report(info)
    layers = dict(grace_layers(student))
    assert layers and all(isinstance(layer, GraceQATLinear) for layer in layers.values())
    assert {name.rsplit(".", 1)[-1] for name in layers} == DECODER_PROJECTIONS
    assert student.hf_quantizer.is_trainable and student.hf_quantizer.is_qat_trainable

    # each QAT layer holds the original master weight and fake-quantizes it on the MSE grid
    for layer_name, layer in layers.items():
        dense = fp_model.get_submodule(layer_name).weight
        assert torch.equal(layer.weight, dense)
        assert torch.allclose(layer.quantized_weight().double(), reference_fake_quant(dense, 32), atol=1e-6)

    inputs = tiny_inputs(student)
    expected = logits(student, inputs)
    student.save_pretrained(tmp_path / "int4")
    assert student.config.quantization_config.modules_to_not_convert  # the resolved list is saved
    model, info = load(tmp_path / "int4")
    assert_clean_report(info)
    assert all(isinstance(layer, GraceQuantLinear) for _, layer in grace_layers(model))
    assert len(dict(grace_layers(model))) == len(layers)
    assert not model.hf_quantizer.is_trainable
    assert torch.equal(logits(model, inputs), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device_map", [None, "cpu", "auto"])
def test_packed_on_load_dtypes_and_device_maps(dtype, device_map, fp_checkpoint, tmp_path):
    fp_dir = fp_checkpoint("qwen2-vl")
    config = GraceConfig(group_size=32, mode="packed")
    model, info = load(fp_dir, quantization_config=config, dtype=dtype, device_map=device_map)
    assert_clean_report(info)
    layer = model.model.language_model.layers[0].mlp.down_proj
    assert isinstance(layer, GraceQuantLinear)
    assert layer.weight.dtype == torch.int32 and layer.scales.dtype == dtype and model.dtype == dtype
    qat, _ = load(fp_dir, quantization_config=GraceConfig(group_size=32), dtype=dtype, device_map=device_map)
    qat_layer = qat.model.language_model.layers[0].mlp.down_proj
    # packed-on-load stores exactly the codes a fresh QAT layer would export
    assert torch.equal(layer.dequantized_weight(), GraceQuantLinear.from_qat(qat_layer).dequantized_weight())

    inputs = tiny_inputs(model)
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path / "q")
    reloaded, info = load(tmp_path / "q", dtype=dtype, device_map=device_map)
    assert_clean_report(info)
    assert reloaded.model.language_model.layers[0].mlp.down_proj.scales.dtype == dtype
    assert torch.equal(logits(reloaded, inputs), expected)


def test_int8_round_trip(fp_checkpoint, tmp_path):
    student, info = load(fp_checkpoint("llava-untied"), quantization_config=GraceConfig(bits=8, group_size=64))
    assert_clean_report(info)
    inputs = tiny_inputs(student)
    expected = logits(student, inputs)
    student.save_pretrained(tmp_path / "int8")
    model, info = load(tmp_path / "int8")
    assert_clean_report(info)
    layer = model.model.language_model.layers[0].self_attn.q_proj
    assert layer.bits == 8 and layer.weight.shape == (layer.out_features, layer.in_features // 4)
    assert torch.equal(logits(model, inputs), expected)


def test_skip_list_defaults_and_user_choice(fp_checkpoint):
    fp_dir = fp_checkpoint("llava")
    fp_model, _ = load(fp_dir)
    default, _ = load(fp_dir, quantization_config=GraceConfig(group_size=32))
    assert sorted(default.config.quantization_config.modules_to_not_convert) == [
        "lm_head", "model.language_model.embed_tokens", "model.multi_modal_projector", "model.vision_tower",
    ]  # fmt: skip
    for name in ("model.vision_tower", "model.multi_modal_projector"):
        for (n, mod), (_, ref) in zip(
            default.get_submodule(name).named_modules(), fp_model.get_submodule(name).named_modules(), strict=True
        ):
            if isinstance(ref, nn.Linear):
                assert type(mod) is nn.Linear and torch.equal(mod.weight, ref.weight), n
    assert type(default.lm_head) is nn.Linear

    everything, _ = load(fp_dir, quantization_config=GraceConfig(group_size=32, modules_to_not_convert=["lm_head"]))
    names = dict(grace_layers(everything))
    assert any(n.startswith("model.vision_tower.") for n in names)
    assert any(n.startswith("model.multi_modal_projector.") for n in names)
    assert "lm_head" not in names

    qwen, _ = load(fp_checkpoint("qwen2-vl"), quantization_config=GraceConfig(group_size=32))
    assert "model.visual" in qwen.config.quantization_config.modules_to_not_convert
    assert not any(n.startswith("model.visual.") for n in dict(grace_layers(qwen)))


def test_group_size_error_names_the_layer(fp_checkpoint):
    with pytest.raises(
        ValueError, match=r"in_features=64 of layer 'model\.language_model\.layers\.0\.self_attn\.q_proj'"
    ):
        load(fp_checkpoint("llava"), quantization_config=GraceConfig(group_size=128))


def test_nothing_to_quantize_says_so(fp_checkpoint):
    skip = ["lm_head", "model.vision_tower", "model.multi_modal_projector", "model.language_model"]
    with pytest.raises(ValueError, match="Nothing to quantize in LlavaForConditionalGeneration"):
        load(fp_checkpoint("llava"), quantization_config=GraceConfig(group_size=32, modules_to_not_convert=skip))


def test_prepare_qat_continues_from_the_stored_codes(fp_checkpoint, tmp_path):
    packed, _ = load(fp_checkpoint("qwen2.5-vl"), quantization_config=GraceConfig(group_size=32, mode="packed"))
    inputs = tiny_inputs(packed)
    expected = logits(packed, inputs)
    grace_quant.prepare_qat(packed)
    assert all(isinstance(layer, GraceQATLinear) for _, layer in grace_layers(packed))
    assert packed.hf_quantizer.is_trainable
    assert torch.allclose(logits(packed, inputs), expected, rtol=1e-5, atol=1e-5)  # exp(log(s)) is s up to 1 ulp
    packed.train()
    loss = packed(**inputs).loss
    loss.backward()
    layer = packed.model.language_model.layers[0].self_attn.q_proj
    assert layer.weight.grad is not None and layer.log_scale.grad is not None


def test_qat_master_checkpoint_restores_master_weights_and_scales(fp_checkpoint, tmp_path):
    student, _ = load(fp_checkpoint("llava"), quantization_config=GraceConfig(group_size=32))
    with torch.no_grad():
        for _, layer in grace_layers(student):
            layer.log_scale.add_(0.05)  # as if trained
    with saving_qat_master(student):
        student.save_pretrained(tmp_path / "master")
    restored, info = load(tmp_path / "master")
    assert_clean_report(info)
    for (name, layer), (_, ref) in zip(grace_layers(restored), grace_layers(student), strict=True):
        assert isinstance(layer, GraceQATLinear), name
        assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.log_scale, ref.log_scale)
    assert restored.hf_quantizer.is_trainable


def test_dequantize_gives_plain_linears(fp_checkpoint):
    model, _ = load(fp_checkpoint("llava"), quantization_config=GraceConfig(group_size=32, mode="packed"))
    inputs = tiny_inputs(model)
    expected = logits(model, inputs)
    model.dequantize()
    assert not list(grace_layers(model))
    assert torch.allclose(logits(model, inputs), expected, atol=1e-5)


def test_quantize_model_in_memory_saves_like_from_pretrained(fp_checkpoint, tmp_path):
    fp_model, _ = load(fp_checkpoint("llava"))
    grace_quant.quantize_model(fp_model, GraceConfig(group_size=32))
    loaded, _ = load(fp_checkpoint("llava"), quantization_config=GraceConfig(group_size=32))
    inputs = tiny_inputs(loaded)
    assert torch.equal(logits(fp_model, inputs), logits(loaded, inputs))
    fp_model.save_pretrained(tmp_path / "q")
    reloaded, info = load(tmp_path / "q")
    assert_clean_report(info)
    assert torch.equal(logits(reloaded, inputs), logits(loaded, inputs))


def test_trainer_accepts_qat_and_refuses_packed(fp_checkpoint, tmp_path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    qat, _ = load(fp_checkpoint("llava"), quantization_config=GraceConfig(group_size=32))
    Trainer(model=qat, args=args)
    packed, _ = load(fp_checkpoint("llava"), quantization_config=GraceConfig(group_size=32, mode="packed"))
    with pytest.raises(ValueError):
        Trainer(model=packed, args=args)


@pytest.mark.parametrize("bits", [4, 8])
def test_loading_without_grace_quant_fails_loudly(bits, fp_checkpoint, tmp_path):
    model, _ = load(fp_checkpoint("llava"), quantization_config=GraceConfig(bits=bits, group_size=32, mode="packed"))
    model.save_pretrained(tmp_path / "q")
    code = (
        "import sys\n"
        "from transformers import AutoModelForImageTextToText\n"
        f"AutoModelForImageTextToText.from_pretrained({str(tmp_path / 'q')!r})\n"
        "assert 'grace_quant' not in sys.modules\n"
        "print('LOADED')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "LOADED" not in result.stdout
    assert "size mismatch" in result.stderr or "mismatch" in result.stderr.lower()


@pytest.mark.parametrize(
    ("tags", "message"),
    [({"grace_format": "2", "grace_checkpoint": "packed"}, "format v2, newer than"),
     ({"grace_format": "1", "grace_checkpoint": "int3"}, "unknown GRACE checkpoint kind 'int3'")],
)  # fmt: skip
def test_every_reader_of_a_checkpoint_tag_refuses_a_newer_format_or_an_unknown_kind(tags, message, fp_checkpoint,
                                                                                     tmp_path):  # fmt: skip
    from safetensors.torch import load_file, save_file

    from grace_quant.integrations.checkpoint_files import CheckpointError, grace_settings
    from grace_quant.integrations.trainer import load_qat_master

    model, _ = load(fp_checkpoint("llava"), quantization_config=GraceConfig(group_size=32, mode="packed"))
    model.save_pretrained(tmp_path / "q")
    path = tmp_path / "q" / "model.safetensors"
    save_file(load_file(path), path, metadata=tags)
    with pytest.raises(ValueError, match=message):
        load(tmp_path / "q")  # from_pretrained
    with pytest.raises(CheckpointError, match=message):
        grace_settings(tmp_path / "q")  # the CLI's and the exporters' reader
    with pytest.raises(ValueError, match=message):
        load_qat_master(str(tmp_path / "q"))  # the Trainer's resume


def test_packed_checkpoint_says_packed_and_an_old_qat_label_still_loads(fp_checkpoint, tmp_path):
    """config.json's mode says what the files hold; loading reads the files' tags, so folders written before it did
    (mode "qat" over packed files) load as packed all the same."""
    import json

    student, _ = load(fp_checkpoint("llava"), quantization_config=GraceConfig(group_size=32))
    inputs = tiny_inputs(student)
    expected = logits(student, inputs)
    student.save_pretrained(tmp_path / "int4")
    config_path = tmp_path / "int4" / "config.json"
    config = json.loads(config_path.read_text())
    assert config["quantization_config"]["mode"] == "packed"
    for label in ("packed", "qat"):
        config["quantization_config"]["mode"] = label
        config_path.write_text(json.dumps(config))
        model, info = load(tmp_path / "int4")
        assert_clean_report(info)
        assert all(isinstance(layer, GraceQuantLinear) for _, layer in grace_layers(model))
        assert torch.equal(logits(model, inputs), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llava", "qwen2-vl"])
def test_int4_checkpoint_loaded_onto_cuda_and_saved_from_it_keeps_its_tensors(name, fp_checkpoint, tmp_path):
    """A packed checkpoint loaded onto CUDA (words put in the kernels' memory order there) and saved from it (put back
    in the file's order there) is the same file's tensors; loading the copy serves the same words and logits."""
    from safetensors.torch import load_file

    cpu_model, _ = load(fp_checkpoint(name), quantization_config=GraceConfig(group_size=32, mode="packed"))
    cpu_model.to(torch.bfloat16).save_pretrained(tmp_path / "cpu")
    on_gpu, info = load(tmp_path / "cpu", dtype=torch.bfloat16, device_map="cuda")
    assert_clean_report(info)
    assert all(layer.weight.is_cuda for _, layer in grace_layers(on_gpu))
    on_gpu.save_pretrained(tmp_path / "gpu")
    written = load_file(tmp_path / "cpu" / "model.safetensors")
    copied = load_file(tmp_path / "gpu" / "model.safetensors")
    assert written.keys() == copied.keys()
    assert all(torch.equal(written[k], copied[k]) for k in written)

    reloaded, info = load(tmp_path / "gpu", dtype=torch.bfloat16, device_map="cuda")
    assert_clean_report(info)
    for (_, a), (_, b) in zip(grace_layers(reloaded), grace_layers(on_gpu), strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.scales, b.scales)
    inputs = {k: v.cuda() for k, v in tiny_inputs(on_gpu).items()}
    assert torch.equal(logits(reloaded, inputs), logits(on_gpu, inputs))
