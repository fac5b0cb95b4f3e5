"""Model surgery: which linears GRACE quantizes (chosen by model structure) and swapping them in place.

The text decoder is found as the sub-model built from ``config.get_text_config()``; by default everything
beside it on the way down from the top (vision tower, projector/merger, ``lm_head``) and its input
embeddings stay in full precision. This works for LLaVA, Qwen2-VL, Qwen2.5-VL and plain decoders alike,
whatever the module names of the transformers version.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import nn

from grace_quant.config import GraceConfig
from grace_quant.kernels import SUPPORTED_GROUPS, group_size_problem
from grace_quant.modules import GraceQATLinear, GraceQuantLinear

GRACE_LAYERS = (GraceQATLinear, GraceQuantLinear)


def text_decoder_name(model: nn.Module) -> str:
    """Dotted name of the language-model decoder inside ``model`` ('' when the model is the decoder)."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config(decoder=True) if config is not None else None
    for name, module in model.named_modules():
        if name and getattr(module, "config", None) is text_config and hasattr(module, "get_input_embeddings"):
            return name
    return ""


def holds_linear(module: nn.Module) -> bool:
    """True when ``module`` or one of its descendants is a linear layer (plain or GRACE)."""
    return any(isinstance(m, (nn.Linear, *GRACE_LAYERS)) for m in module.modules())


def vision_tower_name(model: nn.Module) -> str | None:
    """Dotted name of the vision encoder: the outermost sub-model built from ``config.vision_config`` (LLaVA's
    ``vision_tower``, Qwen2-VL's ``visual``), or None for a model without one. Found as the decoder is, by
    structure, so it holds whatever the transformers version names it."""
    vision_config = getattr(getattr(model, "config", None), "vision_config", None)
    if vision_config is None:
        return None
    for name, module in model.named_modules():
        if name and getattr(module, "config", None) is vision_config:
            return name
    return None


def _after_block_stack(tower: nn.Module) -> list[str]:
    """Modules of ``tower`` that run after its block stack and hold a linear (Qwen2-VL's ``merger``).

    The block stack is the ``nn.ModuleList`` holding most of the tower's parameters; the modules registered after
    it, at its level and every level above it up to the tower, are the tower's output head."""
    stacks = [(name, m) for name, m in tower.named_modules() if name and isinstance(m, nn.ModuleList)]
    if not stacks:
        return []
    stack = max(stacks, key=lambda item: sum(p.numel() for p in item[1].parameters()))[0].split(".")
    found = []
    for depth, part in enumerate(stack):
        prefix = ".".join(stack[:depth])
        parent = tower.get_submodule(prefix)
        names = [name for name, _ in parent.named_children()]
        for name in names[names.index(part) + 1 :]:
            if holds_linear(parent.get_submodule(name)):
                found.append(f"{prefix}.{name}" if prefix else name)
    return found


def projector_names(model: nn.Module) -> list[str]:
    """Dotted names of the modules that map vision features into the decoder (METHOD.md section 1).

    Two places, one rule: a branch off the path to the decoder that holds a linear and is neither the vision
    tower nor the output embeddings (LLaVA's ``multi_modal_projector``), and the vision tower's own head after its
    block stack (Qwen2-VL / Qwen2.5-VL's ``merger``)."""
    tower = vision_tower_name(model)
    if tower is None:
        return []
    output = model.get_output_embeddings()
    names = [
        name for name in _branches_off_decoder_path(model)
        if name != tower and not tower.startswith(name + ".") and model.get_submodule(name) is not output
    ]  # fmt: skip
    names += [f"{tower}.{name}" for name in _after_block_stack(model.get_submodule(tower))]
    return sorted(names)


def set_vision_training(model: nn.Module, train_vision_tower: bool, train_projector: bool) -> None:
    """Set ``requires_grad`` of the vision tower and of the projector (inside the tower or beside it), in place.

    The paper trains the projector and freezes the vision encoder; the Trainer's optimizer then leaves the frozen
    parameters out. The projector is set after the tower, so Qwen2-VL's merger follows ``train_projector``."""
    tower = vision_tower_name(model)
    if tower is not None:
        model.get_submodule(tower).requires_grad_(train_vision_tower)
    for name in projector_names(model):
        model.get_submodule(name).requires_grad_(train_projector)


def _branches_off_decoder_path(model: nn.Module) -> list[str]:
    """Children met on the way down to the decoder that are not on that way and hold a linear: vision tower,
    projector, ``lm_head``."""
    decoder = text_decoder_name(model)
    branches: list[str] = []
    parent, prefix = model, ""
    for part in decoder.split(".") if decoder else []:
        for child_name, child in parent.named_children():
            if child_name != part and holds_linear(child):
                branches.append(prefix + child_name)
        parent, prefix = getattr(parent, part), prefix + part + "."
    return branches


def default_modules_to_not_convert(model: nn.Module) -> list[str]:
    """Vision tower, projector/merger, embeddings and ``lm_head``: every branch that leaves the path to the decoder."""
    skip = _branches_off_decoder_path(model)
    for embeddings in (model.get_input_embeddings(), model.get_output_embeddings()):
        if embeddings is not None:
            skip.extend(name for name, module in model.named_modules() if module is embeddings)
    return sorted(set(skip))


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """True when ``name`` is one of ``patterns`` or lies inside one, matching whole dotted segments.

    ``"lm_head"`` matches ``lm_head``; ``"vision_tower"`` matches ``model.vision_tower.encoder.layers.0.fc1``.
    """
    padded = f".{name}."
    return any(pattern and f".{pattern.strip('.')}." in padded for pattern in patterns)


def select_linears(model: nn.Module, modules_to_not_convert: Iterable[str]) -> list[str]:
    """Names of the ``nn.Linear`` (or GRACE) layers to quantize, in model order."""
    skip = list(modules_to_not_convert)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, *GRACE_LAYERS)) and not matches_any(name, skip)
    ]


def check_group_size(model: nn.Module, names: list[str], group_size: int) -> None:
    """Refuse, naming the layer, when ``group_size`` does not divide a selected layer's ``in_features``."""
    for name in names:
        in_features = model.get_submodule(name).in_features
        if (problem := group_size_problem(group_size, in_features=in_features)) is not None:
            divisors = [g for g in SUPPORTED_GROUPS if in_features % g == 0]
            hint = f"a group_size that divides it (e.g. {divisors[-1]})" if divisors else "another group_size"
            raise ValueError(
                f"GraceConfig: {problem} of layer '{name}'. Choose {hint}, or add '{name}' to modules_to_not_convert."
            )


def unmatched_patterns(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """The entries of a skip list that name no module of ``model`` (a typo would otherwise quantize what the user
    meant to keep, silently)."""
    names = [name for name, _ in model.named_modules() if name]
    return [pattern for pattern in patterns if not any(matches_any(name, [pattern]) for name in names)]


def check_skip_list(model: nn.Module, patterns: Iterable[str]) -> None:
    """Refuse a user skip list entry that matches no module, with examples of the names that exist."""
    unmatched = unmatched_patterns(model, patterns)
    if unmatched:
        top = ", ".join(f"'{name}'" for name, _ in model.named_children())
        raise ValueError(
            f"GraceConfig: modules_to_not_convert (--skip) entry {unmatched[0]!r} matches no module of "
            f"{type(model).__name__} (its top-level modules: {top}; default skip list: "
            f"{default_modules_to_not_convert(model)}). Check the spelling: entries are dotted module names."
        )


def resolve_layers(model: nn.Module, config: GraceConfig, check_skips: bool = True) -> list[str]:
    """Resolve the skip list into ``config.modules_to_not_convert`` and return the layers to quantize.

    ``check_skips``: refuse user skip entries that match no module (off when loading a saved GRACE checkpoint,
    whose stored list was checked when it was written)."""
    if config.modules_to_not_convert is None:
        config.modules_to_not_convert = default_modules_to_not_convert(model)
    elif check_skips:
        check_skip_list(model, config.modules_to_not_convert)
    names = select_linears(model, config.modules_to_not_convert)
    if not names:
        raise ValueError(
            f"Nothing to quantize in {type(model).__name__}: no nn.Linear layer is left once "
            f"modules_to_not_convert={config.modules_to_not_convert} is applied. Pass a shorter "
            "modules_to_not_convert (or [] to quantize every linear layer)."
        )
    check_group_size(model, names, config.group_size)
    return names


def empty_layer(linear: nn.Module, config: GraceConfig, kind: str, dtype=None) -> nn.Module:
    """A GRACE layer of ``kind`` ("qat" or "packed") shaped like ``linear``, on the meta device."""
    has_bias = getattr(linear, "bias", None) is not None
    dtype = dtype or linear.weight.dtype
    if kind == "qat":
        return GraceQATLinear(
            linear.in_features, linear.out_features, has_bias,
            group_size=config.group_size, bits=config.bits, device="meta", dtype=dtype,
        )  # fmt: skip
    return GraceQuantLinear(
        linear.in_features, linear.out_features, has_bias,
        group_size=config.group_size, bits=config.bits, backend=config.backend, device="meta", dtype=dtype,
    )  # fmt: skip


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def replace_with_empty_layers(model: nn.Module, names: list[str], config: GraceConfig, kind: str, dtype=None) -> None:
    """Swap each named linear for an empty GRACE layer (used on the meta model before weights load)."""
    for name in names:
        set_submodule(model, name, empty_layer(model.get_submodule(name), config, kind, dtype))


def grace_layers(model: nn.Module, kind: type[nn.Module] | tuple = GRACE_LAYERS) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` for every GRACE layer of ``kind`` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, kind):
            yield name, module
