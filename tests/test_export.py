"""Exports to compressed-tensors and AutoAWQ GEMM, AWQ import, and the optimum quantizer.

Every layout is checked by an unpacker written here from the public format description (not by our code), and
every conversion by logits or bit-exact round trips.
"""

from __future__ import annotations

import importlib.util
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from grace_quant import AutoModelForVision2Seq, GraceConfig
from grace_quant.integrations.awq import export_awq, import_awq
from grace_quant.integrations.checkpoint_files import CheckpointError
from grace_quant.integrations.export_compressed_tensors import export_compressed_tensors
from grace_quant.surgery import grace_layers
from grace_quant.testing import tiny_inputs

HAS_CT = importlib.util.find_spec("compressed_tensors") is not None
HAS_OPTIMUM = importlib.util.find_spec("optimum") is not None
GROUP = 32


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_inputs(model)).logits


@pytest.fixture(scope="module")
def grace(fp_checkpoint, tmp_path_factory):
    """``grace(name, dtype)`` -> (packed GRACE folder, loaded model), built once per (name, dtype)."""
    cache = {}

    def make(name: str, dtype: torch.dtype = torch.float32):
        if (name, dtype) not in cache:
            model = AutoModelForVision2Seq.from_pretrained(
                fp_checkpoint(name), quantization_config=GraceConfig(group_size=GROUP, mode="packed"), dtype=dtype
            )
            folder = tmp_path_factory.mktemp(f"grace_{name.replace('.', '_')}_{str(dtype)[6:]}")
            model.save_pretrained(folder)
            cache[name, dtype] = (folder, model)
        return cache[name, dtype]

    return make


def ondisk_layers(folder: Path, marker: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer: {tensor name: tensor}}`` for every layer owning a ``marker`` tensor in ``model.safetensors``."""
    tensors = load_file(folder / "model.safetensors")
    prefixes = [k[: -len(marker) - 1] for k in tensors if k.endswith("." + marker)]
    return {p: {k[len(p) + 1 :]: v for k, v in tensors.items() if k.startswith(p + ".")} for p in prefixes}


def matching_layer(model, ondisk_name: str) -> nn.Module:
    """The model's GRACE layer stored as ``ondisk_name`` (on-disk and runtime names share the layer suffix)."""
    suffix = re.search(r"layers\.\d+\..*$", ondisk_name).group(0)
    (layer,) = [layer for name, layer in grace_layers(model) if name.endswith(suffix)]
    return layer


# ------------------------------------------------------------------------------------------ compressed-tensors
def spec_unpack_ct(words: torch.Tensor) -> torch.Tensor:
    """compressed-tensors pack-quantized, 4 bits: value k of int32 word j is bits [4k, 4k+4), value - 8 is the code
    of input column 8j + k."""
    rows, n = words.shape
    codes = torch.empty(rows, n * 8, dtype=torch.int64)
    w = words.to(torch.int64) & 0xFFFFFFFF
    for k in range(8):
        codes[:, k::8] = ((w >> (4 * k)) & 0xF) - 8
    return codes


def ct_ignored(name: str, ignore: list[str]) -> bool:
    """compressed-tensors' rule: ``re:`` entries are regexes matched from the start, others exact names."""
    return any(re.match(e[3:], name) if e.startswith("re:") else e == name for e in ignore)


@pytest.mark.parametrize("name", ["llava", "qwen2-vl"])
def test_compressed_tensors_layout_matches_the_spec(name, grace, tmp_path):
    folder, model = grace(name)
    out = export_compressed_tensors(folder, tmp_path / "ct")
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors" and qconfig["format"] == "pack-quantized"
    (group,) = qconfig["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert group["weights"] | {"actorder": None} == {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP,
        "dynamic": False, "actorder": None,
    }  # fmt: skip

    layers = ondisk_layers(out, "weight_packed")
    assert len(layers) == len(list(grace_layers(model)))
    for layer_name, tensors in layers.items():
        layer = matching_layer(model, layer_name)
        assert set(tensors) <= {"weight_packed", "weight_scale", "weight_shape", "bias"}
        assert tensors["weight_packed"].dtype == torch.int32
        assert tensors["weight_shape"].tolist() == [layer.out_features, layer.in_features]
        codes = spec_unpack_ct(tensors["weight_packed"])
        assert torch.equal(codes, layer.codes().to(torch.int64))
        scale = tensors["weight_scale"]
        assert scale.dtype == layer.scales.dtype and scale.shape == (layer.out_features, layer.in_features // GROUP)
        dense = (codes.double() * scale.double().repeat_interleave(GROUP, dim=1)).to(scale.dtype)  # exact in fp64
        assert torch.equal(dense, layer.dequantized_weight())

    # the ignore list keeps exactly GRACE's full-precision linears out of the quantized set (runtime names)
    quantized = {n for n, _ in grace_layers(model)}
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) or n in quantized}
    assert {n for n in linears if not ct_ignored(n, qconfig["ignore"])} == quantized


def test_compressed_tensors_export_from_a_model_in_memory(grace, tmp_path):
    folder, model = grace("llava")
    export_compressed_tensors(folder, tmp_path / "from_folder")
    export_compressed_tensors(model, tmp_path / "from_model")
    a, b = load_file(tmp_path / "from_folder/model.safetensors"), load_file(tmp_path / "from_model/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not HAS_CT, reason="compressed-tensors is not installed (pip install compressed-tensors)")
@pytest.mark.parametrize("name", ["llava", "qwen2-vl", "qwen2.5-vl"])
@pytest.mark.parametrize("dequantize", [False, True])
def test_compressed_tensors_export_loads_in_transformers(name, dequantize, grace, tmp_path):
    """transformers' compressed-tensors quantizer on CPU gives logits equal to the GRACE model's, bit for bit.

    Why exact: the codes and scales are the same numbers, both libraries dequantize as ``q * s`` in the scales'
    dtype (one correctly rounded multiply), and both then run ``F.linear`` with that weight.
    """
    from transformers import AutoModelForImageTextToText, CompressedTensorsConfig

    folder, model = grace(name)
    out = export_compressed_tensors(folder, tmp_path / "ct")
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True, **kwargs)
    assert not any(info.values()), info
    assert torch.equal(logits(loaded), logits(model))
    assert not list(grace_layers(loaded))  # served without GRACE layers


# ------------------------------------------------------------------------------------------------------- AWQ
def spec_unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """AutoAWQ GEMM: the 4-bit field i (bits [4i, 4i+4)) of word j holds column 8j + [0, 2, 4, 6, 1, 3, 5, 7][i]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    rows, n = words.shape
    out = torch.empty(rows, n * 8, dtype=torch.int64)
    w = words.to(torch.int64) & 0xFFFFFFFF
    for i in range(8):
        out[:, order[i] :: 8] = (w >> (4 * i)) & 0xF
    return out


def test_awq_export_matches_the_spec(grace, tmp_path):
    folder, model = grace("qwen2-vl", torch.float16)
    out = export_awq(folder, tmp_path / "awq")
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: qconfig[k] for k in ("quant_method", "version", "bits", "group_size", "zero_point")} == {
        "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": GROUP, "zero_point": True,
    }  # fmt: skip
    assert "lm_head" in qconfig["modules_to_not_convert"] and "visual" in qconfig["modules_to_not_convert"]
    layers = ondisk_layers(out, "qweight")
    assert len(layers) == len(list(grace_layers(model)))
    for layer_name, tensors in layers.items():
        layer = matching_layer(model, layer_name)
        out_f, in_f = layer.out_features, layer.in_features
        assert tensors["qweight"].shape == (in_f, out_f // 8) and tensors["qweight"].dtype == torch.int32
        assert tensors["qzeros"].shape == (in_f // GROUP, out_f // 8)
        assert tensors["scales"].shape == (in_f // GROUP, out_f)
        assert tensors["scales"].dtype == torch.float16 and "weight" not in tensors
        unsigned, zeros = spec_unpack_awq(tensors["qweight"]), spec_unpack_awq(tensors["qzeros"])
        assert bool((zeros == 8).all())
        group_of_row = torch.arange(in_f) // GROUP
        dense = (unsigned - zeros[group_of_row]).double() * tensors["scales"].double()[group_of_row]  # [in, out]
        assert torch.equal(dense.to(torch.float16).t(), layer.dequantized_weight())


@pytest.mark.parametrize("name", ["llava-untied", "qwen2.5-vl"])
def test_awq_round_trip_is_bit_exact(name, grace, tmp_path):
    folder, model = grace(name, torch.float16)
    export_awq(folder, tmp_path / "awq")
    back = import_awq(tmp_path / "awq", tmp_path / "back")
    original, restored = load_file(folder / "model.safetensors"), load_file(back / "model.safetensors")
    assert original.keys() == restored.keys()
    for key, tensor in original.items():
        assert restored[key].dtype == tensor.dtype and torch.equal(restored[key], tensor), key
    reloaded = AutoModelForVision2Seq.from_pretrained(back)
    assert torch.equal(logits(reloaded), logits(model))


def test_awq_export_warns_when_scales_do_not_fit_fp16(grace, tmp_path):
    folder, model = grace("llava")  # fp32 scales
    with pytest.warns(UserWarning, match="AWQ stores scales in fp16"):
        out = export_awq(folder, tmp_path / "awq")
    for layer_name, tensors in ondisk_layers(out, "qweight").items():
        scales = matching_layer(model, layer_name).scales
        assert torch.equal(tensors["scales"], scales.t().to(torch.float16))


def test_awq_import_refuses_asymmetric_zero_points(grace, tmp_path):
    folder, _ = grace("llava", torch.float16)
    awq = export_awq(folder, tmp_path / "awq")
    tensors = load_file(awq / "model.safetensors")
    victim = sorted(k for k in tensors if k.endswith(".qzeros"))[3]
    tensors[victim] = tensors[victim].clone()
    tensors[victim][0, 0] += 1  # one zero point becomes 9
    save_file(tensors, awq / "model.safetensors", metadata={"format": "pt"})
    layer = victim.removesuffix(".qzeros")
    with pytest.raises(CheckpointError, match=rf"layer '{re.escape(layer)}' has zero points \[9\] besides 8"):
        import_awq(awq, tmp_path / "back")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["awq"]  # nothing half-written


def test_awq_import_refuses_a_skip_list_that_does_not_describe_the_checkpoint(fp_checkpoint, tmp_path):
    config = GraceConfig(group_size=GROUP, mode="packed", modules_to_not_convert=["lm_head"])  # vision tower INT4
    model = AutoModelForVision2Seq.from_pretrained(fp_checkpoint("llava"), quantization_config=config)
    model.save_pretrained(tmp_path / "grace")
    with pytest.warns(UserWarning):
        awq = export_awq(tmp_path / "grace", tmp_path / "awq")
    config = json.loads((awq / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"] = None  # claims the default: decoder layers only
    (awq / "config.json").write_text(json.dumps(config))
    quantized = [name for name, _ in grace_layers(model)]
    decoder = [name for name in quantized if name.startswith("model.language_model.")]
    assert len(decoder) < len(quantized)
    with pytest.raises(
        CheckpointError, match=f"quantizes {len(quantized)} layers but GRACE would quantize {len(decoder)}"
    ):
        import_awq(awq, tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_exports_refuse_8_bit_and_non_grace_checkpoints(fp_checkpoint, tmp_path):
    model = AutoModelForVision2Seq.from_pretrained(
        fp_checkpoint("llava"), quantization_config=GraceConfig(bits=8, group_size=GROUP, mode="packed")
    )
    model.save_pretrained(tmp_path / "int8")
    for export in (export_awq, export_compressed_tensors):
        with pytest.raises(CheckpointError, match="needs a 4-bit"):
            export(tmp_path / "int8", tmp_path / "out")
        with pytest.raises(CheckpointError, match="is not a GRACE checkpoint"):
            export(fp_checkpoint("llava"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------- optimum
@pytest.mark.skipif(not HAS_OPTIMUM, reason="optimum is not installed (pip install 'grace-quant[optimum]')")
def test_optimum_quantizer_writes_the_same_checkpoint_as_from_pretrained(fp_checkpoint, grace, tmp_path):
    from optimum.quantization_base import OptimumQuantizer

    from grace_quant.integrations.optimum import GraceOptimumQuantizer

    quantizer = GraceOptimumQuantizer.from_pretrained(fp_checkpoint("qwen2-vl"))
    assert isinstance(quantizer, OptimumQuantizer)
    out = quantizer.quantize(tmp_path / "int4", group_size=GROUP)
    folder, model = grace("qwen2-vl")
    a, b = load_file(folder / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(logits(AutoModelForVision2Seq.from_pretrained(out)), logits(model))
    with pytest.raises(CheckpointError, match="already exists"):
        quantizer.quantize(tmp_path / "int4", group_size=GROUP)
