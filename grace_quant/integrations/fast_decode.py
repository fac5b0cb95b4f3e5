"""``grace_greedy``: greedy decoding for ``generate(custom_generate=grace_greedy)`` with one compiled step per token.

transformers' decoding loop (``GenerationMixin._sample``) does its bookkeeping on the host around every compiled
forward: ``prepare_inputs_for_generation`` (model inputs, 4-D masks), ``_update_model_kwargs_for_generation``
(``torch.cat`` of ids, masks and positions), an fp32 copy of the logits, the logits processors, ``argmax`` and the
stopping criteria: 0.35-0.8 ms per token on an H100 host (``benchmarks/results/e2e_h200.md``, "generate gap"), a
tenth to a third of a GRACE INT4 decode step (issue 16). ``custom_generate`` is transformers' extension point for the
loop: ``generate`` prepares the inputs, cache and generation config as always, then calls the given function instead
of its own loop. This one runs transformers' own prefill and first-step input preparation, then per token one
compiled ``forward + argmax + end-of-sequence bookkeeping`` (CUDA graphs on CUDA), the positions advanced in place and
the "all finished" flag read one step late (no host sync per token). Its tokens are ``_sample``'s greedy tokens
(EOS, ``min_length`` / ``min_new_tokens`` and left-padded batches included); a call it does not cover (sampling, other
logits processors, streamers, returned dicts or user caches, stop strings, ...) runs transformers' own loop::

    out = model.generate(**inputs, max_new_tokens=256, cache_implementation="static", custom_generate=grace_greedy)

GRACE INT4 models pass it for their greedy calls by default (``GraceConfig.fast_generate``,
``integrations.generation``). Through ``generate``, a callable ``custom_generate`` receives no streamer and no
tokenizer (transformers 5.17-5.25 hand it only the keywords its signature adds to ``_sample``'s), so a streamer passed
together with it gets the prompt and nothing more: the default leaves such calls to transformers' loop.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["grace_greedy", "unsupported_reason"]

_CACHE_KEYS = ("past_key_values", "cache")  # the forward's cache argument: transformers 5.1x / from 5.2x on


def _length_processors():
    """The logits processors the loop applies itself: EOS held back until a minimum length (``min_length`` /
    ``min_new_tokens``), decided per step on the host from the step's length alone."""
    from transformers.generation.logits_process import MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor

    return MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor


def _held_back(logits_processor, length: int) -> tuple[int, ...]:
    """Which processors (their positions) set their EOS logits to -inf when the ids so far are ``length`` long."""
    min_length, min_new = _length_processors()
    return tuple(
        i
        for i, p in enumerate(logits_processor)
        if (isinstance(p, min_length) and length < p.min_length)
        or (isinstance(p, min_new) and length - p.prompt_length_to_skip < p.min_new_tokens)
    )


def _criteria_kinds():
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

    return EosTokenCriteria, MaxLengthCriteria


def _static_cache(model_kwargs: dict):
    from transformers import StaticCache

    cache = next((model_kwargs[k] for k in _CACHE_KEYS if model_kwargs.get(k) is not None), None)
    return cache if isinstance(cache, StaticCache) else None


def unsupported_reason(
    model: nn.Module, logits_processor, stopping_criteria, generation_config, synced_gpus: bool, streamer,
    model_kwargs: dict,
) -> str | None:  # fmt: skip
    """Why :func:`grace_greedy` hands this call to transformers' own loop, or None where it runs it itself."""
    eos_kind, max_kind = _criteria_kinds()
    attention_mask = model_kwargs.get("attention_mask")
    cache = _static_cache(model_kwargs)
    checks = (
        (generation_config.do_sample, "sampling (do_sample=True)"),
        (generation_config.return_dict_in_generate, "return_dict_in_generate=True"),
        (streamer is not None, "a streamer"),
        (bool(synced_gpus), "synced_gpus"),
        (
            any(not isinstance(p, _length_processors()) for p in logits_processor),
            f"logits processors ({', '.join(type(p).__name__ for p in logits_processor)})",
        ),
        (
            any(not isinstance(c, (eos_kind, max_kind)) for c in stopping_criteria),
            "stopping criteria beyond EOS / length",
        ),
        (stopping_criteria.max_length is None, "no maximum length"),
        (getattr(model.config, "is_encoder_decoder", False), "an encoder-decoder model"),
        (getattr(generation_config, "prefill_chunk_size", None) is not None, "chunked prefill"),
        (getattr(generation_config, "is_assistant", False), "an assistant model's generate"),
        (model_kwargs.get("inputs_embeds") is not None, "inputs_embeds"),
        (cache is None, "no static cache (pass cache_implementation='static')"),
        (cache is not None and getattr(cache, "_is_user_defined", False), "a cache passed in by the caller"),
        (
            attention_mask is not None and (not torch.is_tensor(attention_mask) or attention_mask.dim() != 2),
            "an attention mask that is not [batch, length]",
        ),
    )
    for failed, reason in checks:
        if failed:
            return reason
    return None


def _select(
    logits: torch.Tensor, unfinished: torch.Tensor, eos: torch.Tensor | None, pad: torch.Tensor | None,
    held: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``_sample``'s greedy token choice and end-of-sequence bookkeeping: the ``held`` ids masked out (the minimum
    length processors), finished rows get the pad token, a row finishes on an EOS token. Returns the tokens, the rows
    still running, and whether none is."""
    if held is not None:
        vocab = torch.arange(logits.shape[-1], device=logits.device)
        logits = torch.where(torch.isin(vocab, held), -float("inf"), logits)
    token = logits.argmax(-1)
    if eos is not None:
        token = token * unfinished + pad * (1 - unfinished)
        unfinished = unfinished & ~torch.isin(token, eos)
    return token, unfinished, unfinished.max() == 0


def _step(
    model: nn.Module, token: torch.Tensor, position: torch.Tensor, unfinished: torch.Tensor,
    eos: torch.Tensor | None, pad: torch.Tensor | None, held: torch.Tensor | None, inputs: dict,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """One decode step: the forward of the previous token at ``position``, then :func:`_select`."""
    out = model(input_ids=token[:, None], position_ids=position, **inputs)
    return _select(out.logits[:, -1].float(), unfinished, eos, pad, held)


_COMPILED: dict[str, object] = {}


def _compiled_step(model: nn.Module, generation_config):
    """:func:`_step` compiled as transformers compiles its decode forward (the generation config's
    ``compile_config``, else the model's default: ``mode="reduce-overhead"``, CUDA graphs), one compiled function per
    set of options."""
    from transformers.generation.configuration_utils import CompileConfig

    config = getattr(generation_config, "compile_config", None)
    if config is None:
        config = model._default_compile_config() if hasattr(model, "_default_compile_config") else CompileConfig()
    options = config.to_dict()
    key = repr(sorted(options.items(), key=lambda kv: kv[0]))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_step, **options)
    return _COMPILED[key]


class _StopFlag:
    """The "all finished" flag of the step before the last queued one (CUDA: pinned copies and events, so the host
    queues step ``t + 1`` while the GPU runs step ``t``; elsewhere read at once)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.flags = [torch.zeros((), dtype=torch.bool, pin_memory=self.cuda) for _ in range(2)]
        self.events = [torch.cuda.Event() for _ in range(2)] if self.cuda else []

    def push(self, step: int, done: torch.Tensor) -> None:
        self.flags[step % 2].copy_(done, non_blocking=self.cuda)
        if self.cuda:
            self.events[step % 2].record()

    def read(self, step: int) -> bool:
        if self.cuda:
            self.events[step % 2].synchronize()
        return bool(self.flags[step % 2])


def grace_greedy(
    model: nn.Module,
    input_ids: torch.Tensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    **model_kwargs,
) -> torch.Tensor:
    """Greedy decoding as transformers' ``_sample`` decodes, one compiled step per token (see the module docstring);
    ``generate`` calls it with ``custom_generate=grace_greedy``. Returns the prompt and the generated ids."""
    from transformers.generation.utils import GenerationMixin

    if generation_config.num_beams != 1:
        raise ValueError(
            f"grace_greedy decodes greedily, num_beams={generation_config.num_beams} asks for beam search: drop "
            "custom_generate=grace_greedy (or set num_beams=1)."
        )
    if unsupported_reason(
        model, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer, model_kwargs
    ):
        return GenerationMixin._sample(
            model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer,
            **model_kwargs,
        )  # fmt: skip
    eos_kind, _ = _criteria_kinds()
    eos = next((c.eos_token_id for c in stopping_criteria if isinstance(c, eos_kind)), None)
    pad = generation_config._pad_token_tensor
    device = input_ids.device
    eos = None if eos is None else eos.to(device)
    pad = None if eos is None else pad.to(device)
    new_tokens = stopping_criteria.max_length - input_ids.shape[1]
    outputs = model._prefill(input_ids, generation_config, model_kwargs, is_first_iteration=True)
    model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=device)
    logits = logits_processor(input_ids, outputs.logits[:, -1].to(copy=True, dtype=torch.float32))
    token, unfinished, done = _select(logits, unfinished, eos, pad)
    del outputs
    tokens = [token]
    if new_tokens > 1 and not (eos is not None and bool(done)):  # one sync, after the prefill
        # the decode steps under transformers' decode-time switches (MoE experts), the prefill outside them, as _sample
        with getattr(model, "_optimize_model_for_decode", contextlib.nullcontext)():
            tokens += _decode(model, input_ids, token, unfinished, eos, pad, new_tokens - 1, logits_processor,
                              generation_config, model_kwargs)  # fmt: skip
    return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)


def _decode(
    model: nn.Module, input_ids: torch.Tensor, token: torch.Tensor, unfinished: torch.Tensor,
    eos: torch.Tensor | None, pad: torch.Tensor | None, steps: int, logits_processor, generation_config,
    model_kwargs: dict,
) -> list[torch.Tensor]:  # fmt: skip
    """The decode steps after the prefill's token: at most ``steps``, fewer once every row has finished."""
    first = model.prepare_inputs_for_generation(
        torch.cat([input_ids, token[:, None]], dim=1), next_sequence_length=1, **model_kwargs
    )
    position = first["position_ids"].clone()
    # the cache and scalar switches as transformers passes them, positions advanced here; the mask: none without
    # padding (the model's own causal mask over the cache position), else the 2-D mask over the whole cache (the
    # prompt's, then ones), from which the model builds its masks inside the step
    inputs = {k: v for k, v in first.items() if k in _CACHE_KEYS or (v is not None and not torch.is_tensor(v)
                                                                          and not isinstance(v, dict))}  # fmt: skip
    mask = model_kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):  # one sync, before the loop
        cache = _static_cache(model_kwargs)
        full = mask.new_ones((mask.shape[0], cache.get_max_length()))
        full[:, : mask.shape[1]] = mask
        inputs["attention_mask"] = full
    compiled = model._valid_auto_compile_criteria(model_kwargs, generation_config)  # transformers' own rule
    step = _compiled_step(model, generation_config) if compiled else _step
    stop = _StopFlag(input_ids.device)
    tokens: list[torch.Tensor] = []
    held: dict[tuple[int, ...], torch.Tensor | None] = {(): None}  # one id tensor per set of active processors
    for i in range(steps):
        active = _held_back(logits_processor, input_ids.shape[1] + 1 + i)
        if active not in held:
            ids = [logits_processor[j].eos_token_id.reshape(-1) for j in active]
            held[active] = torch.cat(ids).to(input_ids.device)
        token, unfinished, done = step(model, token, position, unfinished, eos, pad, held[active], inputs)
        token, unfinished = token.clone(), unfinished.clone()  # graph outputs are overwritten by the next replay
        tokens.append(token)
        position += 1
        if eos is None:
            continue
        stop.push(i, done)
        if i >= 1 and stop.read(i - 1):  # every row had finished one step ago: that step's tokens are the last
            return tokens[:-1]
    return tokens
