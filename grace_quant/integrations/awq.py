"""AutoAWQ GEMM checkpoints, both ways: export GRACE INT4 as AWQ, import symmetric AWQ W4 as GRACE.

AWQ GEMM layout of a linear with weight ``[out, in]`` and group size ``g`` (AutoAWQ ``WQLinear_GEMM``):

* ``qweight`` int32 ``[in, out / 8]``: unsigned codes ``u = q + zero`` (0..15) of the *transposed* weight,
  8 output columns per word, interleaved: the 4-bit field ``i`` (bits ``4i..4i+3``) of word ``j`` holds output
  column ``8j + AWQ_ORDER[i]`` with ``AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)``.
* ``qzeros`` int32 ``[in / g, out / 8]``: zero points, packed the same way.
* ``scales`` fp16 ``[in / g, out]``.

Dequantization: ``w[o, c] = (u[c, o] - zero[c // g, o]) * scales[c // g, o]``. GRACE's symmetric codes are
``q = u - 8``, so a GRACE layer is an AWQ layer with every zero point 8, and back.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from grace_quant.checkpoint import PACKED, metadata_for
from grace_quant.config import GraceConfig
from grace_quant.kernels import code_range, from_checkpoint, pack, to_checkpoint, unpack

from .checkpoint_files import (
    CheckpointError,
    atomic_output_dir,
    convert_shards,
    copy_side_files,
    grace_folder,
    grace_settings,
    quantization_config,
    read_config,
    weight_files,
    write_config,
)
from .export_compressed_tensors import skip_variants

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
BITS = 4
ZERO = -code_range(BITS)[0]  # 8: AWQ's unsigned code of GRACE's 0
PER_WORD = 32 // BITS


def awq_pack(unsigned: torch.Tensor) -> torch.Tensor:
    """AWQ GEMM packing of unsigned 4-bit values ``[rows, cols]`` into int32 ``[rows, cols / 8]``."""
    rows, cols = unsigned.shape
    if cols % PER_WORD:
        raise ValueError(f"AWQ packs 8 columns per word; {cols} columns is not a multiple of 8")
    fields = unsigned.to(torch.int64).reshape(rows, cols // PER_WORD, PER_WORD)[..., list(AWQ_ORDER)]
    shifts = torch.arange(PER_WORD, dtype=torch.int64) * BITS
    words = (fields << shifts).sum(-1)  # disjoint fields: the sum is a bitwise or
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def awq_unpack(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`awq_pack`: int32 ``[rows, n]`` to unsigned values ``[rows, 8n]`` (int32)."""
    shifts = torch.arange(PER_WORD, dtype=torch.int32) * BITS
    fields = (words.unsqueeze(-1) >> shifts) & (2**BITS - 1)  # fields[..., i] is column AWQ_ORDER[i]
    columns = torch.empty_like(fields)
    columns[..., list(AWQ_ORDER)] = fields
    return columns.reshape(words.shape[0], -1)


def _to_fp16(scales: torch.Tensor, lossy: list[str], name: str) -> torch.Tensor:
    half = scales.to(torch.float16)
    if not torch.equal(half.to(scales.dtype), scales):
        lossy.append(name)
    return half


def _export_layer(group_size: int, lossy: list[str]):
    def convert(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        packed, scales = tensors.pop(prefix + "weight"), tensors.pop(prefix + "scales")
        codes = unpack(from_checkpoint(packed, BITS), BITS)  # [out, in] signed
        out_features, in_features = codes.shape
        if out_features % PER_WORD:
            raise CheckpointError(
                f"layer {prefix[:-1]!r} has out_features={out_features}; AWQ GEMM needs a multiple of 8"
            )
        zeros = torch.full((in_features // group_size, out_features), ZERO, dtype=torch.int32)
        return {
            prefix + "qweight": awq_pack(codes.t().to(torch.int32) + ZERO),
            prefix + "qzeros": awq_pack(zeros),
            prefix + "scales": _to_fp16(scales.t().contiguous(), lossy, prefix[:-1]),
        }

    return convert


def awq_config(group_size: int, skip: list[str]) -> dict[str, Any]:
    """AutoAWQ's ``quantization_config`` for a GEMM checkpoint with zero points."""
    return {
        "quant_method": "awq",
        "version": "gemm",
        "bits": BITS,
        "group_size": group_size,
        "zero_point": True,
        "modules_to_not_convert": skip_variants(skip),
    }


def export_awq(model_or_dir: Any, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``out_dir``: an AutoAWQ GEMM checkpoint (zero point 8, fp16 scales) of a 4-bit GRACE model or folder.

    Scales are stored in fp16 as AWQ requires; a warning names the layers whose scales fp16 cannot hold exactly.
    """
    with grace_folder(model_or_dir) as src:
        settings = grace_settings(src)
        if settings.get("bits", 4) != BITS:
            raise CheckpointError(f"AWQ export needs a 4-bit GRACE checkpoint; {src} has bits={settings.get('bits')}")
        group_size = settings["group_size"]
        config = read_config(src)
        config["quantization_config"] = awq_config(group_size, settings.get("modules_to_not_convert") or [])
        lossy: list[str] = []
        with atomic_output_dir(out_dir, overwrite, sources=(src,)) as tmp:
            count = convert_shards(src, tmp, "scales", _export_layer(group_size, lossy), {"format": "pt"}, "AWQ")
            if not count:
                raise CheckpointError(f"{src} holds no packed GRACE layer")
            write_config(tmp, config)
            copy_side_files(src, tmp)
    if lossy:
        warnings.warn(
            f"AWQ stores scales in fp16: the scales of {len(lossy)} layer(s) (first: {lossy[0]!r}) were rounded, so "
            "the AWQ model is close to, not bit-identical with, the GRACE one. Quantize in fp16 for an exact export.",
            stacklevel=2,
        )
    return Path(out_dir)


def _awq_settings(src: Path) -> dict[str, Any]:
    """Validated AWQ settings: 4 bits, GEMM layout, zero points present."""
    qconfig = quantization_config(read_config(src), "awq", src)
    bits = qconfig.get("bits", qconfig.get("w_bit"))
    version = str(qconfig.get("version", "gemm")).lower()
    group_size = qconfig.get("group_size", qconfig.get("q_group_size"))
    if bits != BITS:
        raise CheckpointError(f"{src}: only 4-bit AWQ can be imported (bits={bits})")
    if version != "gemm":
        raise CheckpointError(f"{src}: only the AWQ GEMM layout can be imported (version={version!r})")
    if not qconfig.get("zero_point", True):
        raise CheckpointError(f"{src}: AWQ without zero points is not supported (zero_point=false)")
    if not isinstance(group_size, int) or group_size <= 0:
        raise CheckpointError(f"{src}: AWQ group_size={group_size!r} is not supported (per-group scales are needed)")
    return {"group_size": group_size, "skip": qconfig.get("modules_to_not_convert")}


def _import_layer(group_size: int):
    def convert(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        name = prefix[:-1]
        qweight, qzeros, scales = (tensors.pop(prefix + key) for key in ("qweight", "qzeros", "scales"))
        unsigned = awq_unpack(qweight)  # [in, out]
        zeros = awq_unpack(qzeros)  # [in / g, out]
        in_features, out_features = unsigned.shape
        if scales.shape != (in_features // group_size, out_features) or zeros.shape != scales.shape:
            raise CheckpointError(
                f"layer {name!r}: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} and scales "
                f"{tuple(scales.shape)} do not fit AWQ GEMM with group_size={group_size}"
            )
        if not bool((zeros == ZERO).all()):
            found = sorted({int(z) for z in zeros.unique()} - {ZERO})
            raise CheckpointError(
                f"layer {name!r} has zero points {found[:4]} besides {ZERO}: asymmetric AWQ cannot be represented by "
                "GRACE's symmetric codes"
            )
        codes = (unsigned - ZERO).t().to(torch.int8)  # [out, in] signed
        return {prefix + "weight": to_checkpoint(pack(codes, BITS), BITS), prefix + "scales": scales.t().contiguous()}

    return convert


def _check_selection(folder: Path) -> None:
    """Refuse when GRACE's loader would quantize other layers than the AWQ checkpoint holds (compared by count
    and shapes on a meta-device copy of the architecture; names differ between on-disk and runtime layouts)."""
    import transformers
    from safetensors import safe_open

    from grace_quant.surgery import resolve_layers

    config = transformers.AutoConfig.from_pretrained(folder)
    model_class = getattr(transformers, (config.architectures or [""])[0], None)
    if model_class is None:
        warnings.warn(f"cannot build {config.architectures} to check the imported layer selection", stacklevel=3)
        return
    stored = []
    for path in weight_files(folder):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(".scales"):
                    out_features = handle.get_slice(key).get_shape()[0]
                    words = handle.get_slice(key[: -len("scales")] + "weight").get_shape()[1]
                    stored.append((out_features, words * PER_WORD))
    with torch.device("meta"):
        model = model_class._from_config(config)
    grace = GraceConfig(**config.quantization_config)
    selected = [model.get_submodule(name) for name in resolve_layers(model, grace, check_skips=False)]
    expected = sorted((layer.out_features, layer.in_features) for layer in selected)
    if expected != sorted(stored):
        raise CheckpointError(
            f"the AWQ checkpoint quantizes {len(stored)} layers but GRACE would quantize {len(expected)} layers of this "
            f"architecture with modules_to_not_convert={grace.modules_to_not_convert}; the AWQ skip list does not "
            "describe the checkpoint"
        )


def import_awq(src_dir: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``out_dir``: a packed GRACE checkpoint from a symmetric-representable AutoAWQ GEMM W4 checkpoint.

    Every zero point must be 8 (what GRACE and symmetric AWQ write); anything else is refused naming the layer.
    Load the result with ``grace_quant.AutoModelForVision2Seq.from_pretrained(out_dir)``.
    """
    src = Path(src_dir)
    settings = _awq_settings(src)
    config = read_config(src)
    skip = settings["skip"]
    grace = GraceConfig(bits=BITS, group_size=settings["group_size"], modules_to_not_convert=skip, mode="packed")
    config["quantization_config"] = grace.to_dict()
    metadata = {"format": "pt", **metadata_for(PACKED)}
    with atomic_output_dir(out_dir, overwrite, sources=(src,)) as tmp:
        count = convert_shards(src, tmp, "qweight", _import_layer(settings["group_size"]), metadata, "AWQ -> GRACE")
        if not count:
            raise CheckpointError(f"{src} holds no AWQ layer (no qweight tensors)")
        write_config(tmp, config)
        copy_side_files(src, tmp)
        _check_selection(tmp)
    return Path(out_dir)


__all__ = ["AWQ_ORDER", "awq_config", "awq_pack", "awq_unpack", "export_awq", "import_awq"]
