"""GRACE checkpoint kinds, told apart by the safetensors metadata (docs/FORMAT.md).

* ``packed`` (what ``save_pretrained`` writes): packed integer ``weight`` + ``scales`` per quantized linear.
* ``qat-master`` (Trainer checkpoints): full-precision master ``weight`` + learnable ``log_scale``, so that
  training resumes exactly.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
from safetensors import safe_open
from torch import nn

from grace_quant.config import FORMAT_VERSION, check_format_version
from grace_quant.kernels import from_checkpoint, to_checkpoint
from grace_quant.modules import GraceQATLinear, GraceQuantLinear
from grace_quant.surgery import GRACE_LAYERS, grace_layers

FORMAT_KEY = "grace_format"
KIND_KEY = "grace_checkpoint"
PACKED = "packed"
QAT_MASTER = "qat-master"
KINDS = (PACKED, QAT_MASTER)


def metadata_for(kind: str) -> dict[str, str]:
    """The str->str safetensors header entries that tag a GRACE checkpoint."""
    if kind not in KINDS:
        raise ValueError(f"unknown GRACE checkpoint kind {kind!r}; expected one of {KINDS}")
    return {FORMAT_KEY: str(FORMAT_VERSION), KIND_KEY: kind}


def packed_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every QAT layer replaced by its packed ``weight`` and ``scales``, and every packed
    ``weight`` in the checkpoint's word order (``kernels.to_checkpoint``): what a ``packed`` checkpoint holds."""
    state = model.state_dict()
    for name, layer in grace_layers(model, GraceQATLinear):
        prefix = f"{name}." if name else ""
        del state[prefix + "log_scale"]
        for key, tensor in layer.packed_tensors().items():
            state[prefix + key] = tensor
    converted: dict[tuple, torch.Tensor] = {}  # one conversion per storage: keys that shared words still share them
    for name, layer in model.named_modules(remove_duplicate=False):  # every name a shared layer is saved under
        if isinstance(layer, GRACE_LAYERS):
            key = f"{name}.weight" if name else "weight"
            words = state[key]
            same = (words.device, words.data_ptr(), tuple(words.shape), words.stride())
            if same not in converted:
                converted[same] = to_checkpoint(words, layer.bits)
            state[key] = converted[same]
    return state


def words_from_checkpoint(model: nn.Module) -> None:
    """Every packed layer's ``weight`` from the checkpoint's word order into memory's (``kernels.from_checkpoint``),
    in place: for loaders that assign checkpoint tensors to the modules directly (transformers' ``from_pretrained``).
    Run it once per load, before :func:`grace_quant.fusion.fuse_projections`."""
    for _, layer in grace_layers(model, GraceQuantLinear):
        if layer._fusion is not None:
            raise RuntimeError(
                "words_from_checkpoint runs before fuse_projections: the fused copies are made from them"
            )
        layer.weight = from_checkpoint(layer.weight, layer.bits)


def qat_master_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` of a QAT model (master weights and log-scales); packed layers cannot be saved so."""
    packed = [name for name, _ in grace_layers(model, GraceQuantLinear)]
    if packed:
        raise ValueError(
            f"a qat-master checkpoint needs QAT layers, but {packed[0]!r} (and {len(packed) - 1} more) hold packed "
            "weights; call grace_quant.prepare_qat(model) first."
        )
    return model.state_dict()


def file_kind(path: str | os.PathLike) -> str:
    """The kind of one safetensors file, from its metadata (untagged files are packed); refuses a newer format
    version or an unknown kind. The one reader of the tags :func:`metadata_for` writes."""
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    check_format_version(int(metadata.get(FORMAT_KEY, FORMAT_VERSION)), str(path))
    kind = metadata.get(KIND_KEY, PACKED)
    if kind not in KINDS:
        raise ValueError(f"{path}: unknown GRACE checkpoint kind {kind!r} in its metadata; expected one of {KINDS}")
    return kind


def checkpoint_kind(checkpoint_files: Sequence[str] | None) -> str:
    """Kind of a GRACE checkpoint: that of its first safetensors file (packed when there is none)."""
    for path in checkpoint_files or ():
        if str(path).endswith(".safetensors") and os.path.exists(path):
            return file_kind(path)
    return PACKED


_SAVE_KIND: dict[int, str] = {}


@contextlib.contextmanager
def saving_qat_master(model: nn.Module) -> Iterator[None]:
    """Within this block ``model.save_pretrained`` writes a qat-master checkpoint instead of packed weights."""
    _SAVE_KIND[id(model)] = QAT_MASTER
    try:
        yield
    finally:
        _SAVE_KIND.pop(id(model), None)


def save_kind(model: nn.Module) -> str:
    """Which kind ``save_pretrained`` writes for ``model`` right now."""
    return _SAVE_KIND.get(id(model), PACKED)
