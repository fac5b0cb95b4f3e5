"""``GraceConfig``: the quantization config registered with transformers as ``quant_method="grace"``."""

from __future__ import annotations

import copy
import warnings
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from grace_quant.kernels import BACKENDS, SUPPORTED_BITS, SUPPORTED_GROUPS, group_size_problem

FORMAT_VERSION = 1
MODES = ("qat", "packed")


def check_format_version(version: int, source: str) -> None:
    """Refuse a checkpoint written in a newer GRACE format than this grace-quant reads (``source`` names it)."""
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{source} uses GRACE format v{version}, newer than this grace-quant supports (v{FORMAT_VERSION}); "
            "upgrade with `pip install -U grace-quant`."
        )


class GraceConfig(QuantizationConfigMixin):
    """How GRACE quantizes a model's linear layers (weight-only, symmetric, per-group).

    Args:
        bits: 4 (default) or 8 bits per weight.
        group_size: consecutive input features sharing one scale (default 128); must divide every
            quantized layer's ``in_features`` and be a multiple of ``32 // bits``.
        sym: symmetric codes without zero point. Only ``True`` exists in format v1; the format reserves
            ``zeros`` tensors for an asymmetric variant.
        modules_to_not_convert: module names (or dotted suffixes/prefixes of them) kept in full precision.
            ``None`` (default) resolves, by model structure, to the vision tower, the projector/merger,
            the embeddings and ``lm_head``; the resolved list is written to ``config.json``. Pass ``[]``
            to quantize every linear layer, the vision tower included.
        mode: what loading a full-precision checkpoint produces. ``"qat"`` (default): fake-quant linears
            with learnable log-scales, MSE-initialised and trainable. ``"packed"``: packed integer weights
            straight away (round-to-nearest on the MSE grid; memory-light, inference only).
            Loading a GRACE checkpoint ignores ``mode``: the tags of its files say what it holds.
            ``save_pretrained`` writes the kind it saves (``"packed"``, or ``"qat"`` for the Trainer's qat-master
            checkpoints) into ``config.json`` and records it on the model's config, so a saved folder's
            ``config.json`` says what its files hold (older checkpoints said ``"qat"``
            for packed files too; they load all the same).
        backend: kernel choice for packed layers: ``"auto"``, ``"torch"`` (reference) or ``"triton"``.
        format_version: version of the packed checkpoint format (see docs/FORMAT.md).
        fuse_projections: when a model is loaded (or converted) to packed layers for inference, run ``q|k|v``
            and ``gate|up`` as one matmul each (7 kernel launches per decoder layer -> 4). In memory only: the
            checkpoint keeps the separate layers. Default ``True``.
        decode_attention: GRACE INT4 models loaded (or packed in memory) on CUDA run their language model's attention
            as ``attn_implementation="grace_decode"``: decode steps use grace-quant's split-KV Triton kernel, which reads
            only the cache slots the mask keeps; prefill and everything else run transformers' sdpa. The vision
            tower keeps its attention. ``False`` leaves the attention as loaded. Default ``True``.
        deferred_stop_check: GRACE INT4 models loaded (or packed in memory) run ``generate`` with transformers'
            deferred stop check on CUDA: the host reads "all sequences finished" one step late instead of waiting
            for every step, so it queues the next step while the GPU runs this one (same tokens; one extra step is
            run and undone at the end). A caller's own ``grace_quant.deferred_stop_check(...)`` block wins.
            ``False``: ``generate`` as transformers runs it. Default ``True``.
        fast_generate: GRACE INT4 models loaded (or packed in memory) decode greedy ``generate`` calls through
            ``grace_quant.grace_greedy`` (one compiled step per token with ``cache_implementation="static"``, none of
            transformers' per-token host work; the same tokens). Calls it does not cover (sampling, beams, streamers,
            stop strings, other logits processors, a dynamic cache, ...) run transformers' own loop as before, and so
            does a call that passes its own ``custom_generate``. ``False``: every call runs transformers' loop.
            Default ``True``.
        allow_nonfinite: quantize weights holding NaN/inf with those values set to 0, instead of refusing them
            with the layer's name. A loading policy, not a property of the checkpoint: never written to
            ``config.json``. Default ``False``.
    """

    #: attributes that steer one load and are not written to ``config.json``
    LOAD_ONLY = ("allow_nonfinite",)

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = True,
        modules_to_not_convert: list[str] | None = None,
        mode: str = "qat",
        backend: str = "auto",
        format_version: int = FORMAT_VERSION,
        fuse_projections: bool = True,
        decode_attention: bool = True,
        deferred_stop_check: bool = True,
        fast_generate: bool = True,
        allow_nonfinite: bool = False,
        quant_method: str = "grace",
        **kwargs: Any,
    ):
        self.quant_method = "grace"
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.modules_to_not_convert = None if modules_to_not_convert is None else list(modules_to_not_convert)
        self.mode = mode
        self.backend = backend
        self.format_version = format_version
        self.fuse_projections = fuse_projections
        self.decode_attention = decode_attention
        self.deferred_stop_check = deferred_stop_check
        self.fast_generate = fast_generate
        self.allow_nonfinite = allow_nonfinite
        # Keys written by a newer grace-quant are kept (so re-saving does not drop them) but not interpreted.
        self.unknown_keys = {k: v for k, v in kwargs.items() if k != "unknown_keys"}
        self.unknown_keys.update(kwargs.get("unknown_keys") or {})
        self.post_init()

    def post_init(self) -> None:
        """Validate every field with an error that says what to change."""
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"GraceConfig: bits={self.bits!r} is not supported; use one of {SUPPORTED_BITS}.")
        if (problem := group_size_problem(self.group_size, self.bits)) is not None:
            raise ValueError(f"GraceConfig: {problem}.")
        if self.bits == 4 and self.group_size not in SUPPORTED_GROUPS:
            warnings.warn(
                f"GraceConfig(group_size={self.group_size}): the fast INT4 kernels implement group sizes "
                f"{SUPPORTED_GROUPS}; layers with this group size run the slower dequantize + matmul path on GPUs. "
                f"Choose one of {SUPPORTED_GROUPS} for fast inference.",
                UserWarning,
                stacklevel=3,
            )
        if self.sym is not True:
            raise NotImplementedError(
                "GraceConfig: asymmetric quantization (sym=False) is not implemented in format v1; use sym=True."
            )
        if self.mode not in MODES:
            raise ValueError(f"GraceConfig: mode={self.mode!r} is unknown; use 'qat' (trainable) or 'packed'.")
        if self.backend not in BACKENDS:
            raise ValueError(f"GraceConfig: backend={self.backend!r} is unknown; use one of {BACKENDS}.")
        if not isinstance(self.fuse_projections, bool):
            raise ValueError(f"GraceConfig: fuse_projections must be True or False, got {self.fuse_projections!r}.")
        if not isinstance(self.decode_attention, bool):
            raise ValueError(f"GraceConfig: decode_attention must be True or False, got {self.decode_attention!r}.")
        if not isinstance(self.deferred_stop_check, bool):
            raise ValueError(
                f"GraceConfig: deferred_stop_check must be True or False, got {self.deferred_stop_check!r}."
            )
        if not isinstance(self.fast_generate, bool):
            raise ValueError(f"GraceConfig: fast_generate must be True or False, got {self.fast_generate!r}.")
        if not isinstance(self.allow_nonfinite, bool):
            raise ValueError(f"GraceConfig: allow_nonfinite must be True or False, got {self.allow_nonfinite!r}.")
        if not isinstance(self.format_version, int) or self.format_version < 1:
            raise ValueError(f"GraceConfig: format_version must be a positive integer, got {self.format_version!r}.")
        check_format_version(self.format_version, "This checkpoint")
        if self.modules_to_not_convert is not None and not all(
            isinstance(name, str) for name in self.modules_to_not_convert
        ):
            raise ValueError("GraceConfig: modules_to_not_convert must be a list of module-name strings.")

    def to_dict(self) -> dict[str, Any]:
        """Serialisable dict (``config.json``); unknown keys from newer versions are written back unchanged."""
        skip = ("unknown_keys", *self.LOAD_ONLY)
        out = copy.deepcopy({k: v for k, v in self.__dict__.items() if k not in skip})
        out.update(copy.deepcopy(self.unknown_keys))
        return out

    def __repr__(self) -> str:
        return f"GraceConfig({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items() if k != 'quant_method')})"
