"""Export a GRACE INT4 checkpoint as compressed-tensors ``pack-quantized`` (W4A16, symmetric, group strategy).

That is the format transformers' compressed-tensors quantizer and vLLM read, so a GRACE model can be served
without grace-quant. For 4 bits, compressed-tensors packs 8 codes per int32 along the input dimension, code
``k`` of a word in bits ``4k..4k+3``, stored as ``q + 8``: exactly GRACE format v1 (docs/FORMAT.md). So
``weight_packed`` holds GRACE's packed words unchanged and ``weight_scale`` its scales; dequantization
(``q * s`` in the scales' dtype) is the same in both libraries, so the weights are bit-identical.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from grace_quant.kernels import codes_per_word

from .checkpoint_files import (
    CheckpointError,
    atomic_output_dir,
    convert_shards,
    copy_side_files,
    grace_folder,
    grace_settings,
    read_config,
    weight_files,
    write_config,
)

FORMAT = "pack-quantized"
SUPPORTED_BITS = (4,)


def skip_variants(skip: list[str]) -> list[str]:
    """The skip entries plus, for ``model.X`` entries, ``X``: the same module in the legacy on-disk layout
    (transformers 5 names ``model.vision_tower``; checkpoints and serving engines say ``vision_tower``)."""
    out: list[str] = []
    for name in skip:
        for variant in (name, name.removeprefix("model.")):
            if variant and variant not in out:
                out.append(variant)
    return out


def ignore_list(skip: list[str], dense_layers: list[str]) -> list[str]:
    """compressed-tensors ``ignore``: one ``re:`` pattern per skip entry with GRACE's matching rule (the name
    appears as whole dotted segments anywhere in the module name), then the exact checkpoint names of the
    dense 2-D weights left in the checkpoint (for engines that match on-disk names)."""
    patterns = [f"re:^(?:.*\\.)?{re.escape(name)}(?:\\..*)?$" for name in skip_variants(skip)]
    return patterns + list(dense_layers)


def compressed_tensors_config(group_size: int, ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` entry of config.json for GRACE's W4A16 symmetric per-group scheme."""
    weights = {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
        "group_size": group_size,
        "dynamic": False,
        "actorder": None,
    }
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": FORMAT,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def _convert_layer(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GRACE ``weight`` (int32) + ``scales`` -> ``weight_packed`` + ``weight_scale`` + ``weight_shape``."""
    packed = tensors.pop(prefix + "weight", None)
    scales = tensors.pop(prefix + "scales")
    if packed is None or packed.dtype != torch.int32:
        raise CheckpointError(f"layer {prefix[:-1]!r} has scales but no packed int32 weight; is the checkpoint intact?")
    shape = [packed.shape[0], packed.shape[1] * codes_per_word(4)]
    return {
        prefix + "weight_packed": packed,  # the same words: see the module docstring
        prefix + "weight_scale": scales,
        prefix + "weight_shape": torch.tensor(shape, dtype=torch.int64),
    }


def _dense_layers(folder: Path) -> list[str]:
    """Checkpoint names of layers whose ``weight`` stays a floating-point matrix (kept in full precision)."""
    from safetensors import safe_open

    names = []
    for path in weight_files(folder):
        with safe_open(path, framework="pt") as handle:
            keys = set(handle.keys())
            for key in sorted(keys):
                if key.endswith(".weight") and key[: -len("weight")] + "scales" not in keys:
                    tensor = handle.get_slice(key)
                    if len(tensor.get_shape()) == 2 and tensor.get_dtype() in ("F16", "BF16", "F32", "F64"):
                        names.append(key[: -len(".weight")])
    return sorted(names)


def export_compressed_tensors(model_or_dir: Any, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``out_dir``: a compressed-tensors ``pack-quantized`` copy of a GRACE INT4 model or checkpoint folder.

    Loads with ``AutoModelForImageTextToText.from_pretrained(out_dir)`` (compressed-tensors installed, no
    grace-quant needed); it is the W4A16 format vLLM serves. Tokenizer/processor files are copied along.
    """
    with grace_folder(model_or_dir) as src:
        settings = grace_settings(src)
        bits = settings.get("bits", 4)
        if bits not in SUPPORTED_BITS or settings.get("format_version", 1) != 1:
            raise CheckpointError(f"compressed-tensors export needs a 4-bit GRACE v1 checkpoint; {src} has bits={bits}")
        config = read_config(src)
        ignore = ignore_list(settings.get("modules_to_not_convert") or [], _dense_layers(src))
        config["quantization_config"] = compressed_tensors_config(settings["group_size"], ignore)
        with atomic_output_dir(out_dir, overwrite, sources=(src,)) as tmp:
            count = convert_shards(src, tmp, "scales", _convert_layer, {"format": "pt"}, "compressed-tensors")
            if not count:
                raise CheckpointError(f"{src} holds no packed GRACE layer")
            write_config(tmp, config)
            copy_side_files(src, tmp)
    return Path(out_dir)


__all__ = ["compressed_tensors_config", "export_compressed_tensors", "ignore_list", "skip_variants"]
