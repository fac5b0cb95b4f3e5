"""End-to-end generation on the GPU: stock bf16 vs bf16 + our decode attention vs GRACE INT4 (all of ours) vs torch's
tinygemm INT4, all compiled.

Arms: ``bf16`` (stock: sdpa, as users run it; the 1.0 reference), ``bf16-grace-attn`` (bf16 with
``attn_implementation="grace_decode"``), ``grace`` (GRACE INT4 with its defaults: fused INT4 linears and
``grace_decode``), ``grace-sdpa`` (GRACE INT4 with ``decode_attention=False``), ``grace-unfused``, ``tinygemm`` (torch's
INT4 GEMV in the same linears, sdpa attention).

Models are built from the published configuration values of LLaVA-1.5-7B and Qwen2-VL-2B with random weights
(nothing is downloaded); every arm rebuilds the model from the same seed, so the INT4 arms quantize exactly the
bf16 arm's weights. Inputs: one random image per sample and a short text prompt; greedy decoding of
``--new-tokens`` tokens with ``cache_implementation="static"`` (transformers then compiles the decode step with
CUDA graphs). cuDNN attention is switched off for every arm (its per-KV-length host graph build distorts decode
on torch 2.11), so all arms run SDPA's flash/efficient kernels. Every arm is warmed up over the full length.

Per arm and batch size: decode tokens/s (all sequences of the batch), time to first token (prefill + first
token, eager as transformers runs it), peak GPU memory (``torch.cuda.max_memory_allocated``) and weight memory.
``--profile`` adds a profile of the INT4 decode step (kernel time by stage against the step's wall time).
Per arm and batch also: the greedy tokens of the compiled run against eager decoding for 32 tokens (the same static
cache with ``disable_compile=True``, and the dynamic cache), and a gpt-fast-style tight loop (our own prefill into a
``StaticCache``, then one compiled ``forward + argmax`` call per token) whose step time, subtracted from
``generate``'s, is the per-token cost of transformers' generate loop. ``--host-tweaks`` runs ``generate`` without the
per-step logits processor that ``min_new_tokens`` adds (EOS switched off instead, so the length is still fixed) and
with transformers' deferred stop check (which skips the host sync per token; transformers enables it on MPS only;
``grace_quant.deferred_stop_check`` turns it on for CUDA) in every arm. GRACE INT4 models decode greedy calls through
``grace_quant.grace_greedy`` by default (``GraceConfig.fast_generate``: one compiled step per token, none of the
per-token host bookkeeping of transformers' loop), so the ``grace`` arm runs it; ``grace-loop`` is the same model
through transformers' loop (``fast_generate=False``) with its deferred stop check (``GraceConfig.deferred_stop_check``,
the default), and ``grace-nodefer`` through transformers' loop without it (a ``deferred_stop_check(False)`` block
around ``generate``). Arms run one after another by default; ``--interleave`` keeps every arm of a model resident
and alternates their timed calls round by round, so that a host whose speed drifts between minutes (the device
machines' does) moves every arm alike; each arm's peak memory is then counted as a process holding it alone would.

    python benchmarks/e2e.py --out benchmarks/results/e2e_h200.md --json benchmarks/results/e2e_h200.json
    python benchmarks/e2e.py --device cpu --tiny --new-tokens 6 --repeats 1   # CPU smoke run of every code path
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import inspect
import json
import statistics
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    StaticCache,
)

import grace_quant
from grace_quant import GraceConfig, deferred_stop_check, quantize_model
from grace_quant.integrations.attention import use_decode_attention
from grace_quant.surgery import resolve_layers, set_submodule
from grace_quant.testing import tiny_inputs, tiny_llava_config, tiny_qwen2_vl_config

PROMPT_TOKENS = 20
CHECK_TOKENS = 32  # greedy tokens compared between the compiled and the eager run
QWEN_GRID = (1, 24, 24)  # a 336 x 336 image: 576 patches -> 144 visual tokens after the 2x2 merge
ARMS = ("bf16", "bf16-grace-attn", "grace", "grace-loop", "grace-nodefer", "grace-sdpa", "grace-unfused", "tinygemm")
REFERENCE_ARM = "bf16"  # stock bf16 with sdpa: the 1.0 of every ratio


class Setup:
    """Where the run happens: the device, and whether the models are tiny stand-ins (the CPU smoke run)."""

    device = "cuda"
    tiny = False

    @classmethod
    def group_size(cls) -> int:
        return 32 if cls.tiny else 128


def sync() -> None:
    if Setup.device == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    if Setup.device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_bytes() -> int:
    return torch.cuda.max_memory_allocated() if Setup.device == "cuda" else 0


def allocated_bytes() -> int:
    return torch.cuda.memory_allocated() if Setup.device == "cuda" else 0


def free_memory() -> None:
    gc.collect()
    if Setup.device == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# models and inputs
# ----------------------------------------------------------------------------------------------------------------


def llava_config() -> LlavaConfig:
    """llava-hf/llava-1.5-7b-hf: Vicuna-7B (LLaMA) language model, CLIP ViT-L/14 at 336 px."""
    text = LlamaConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=32001,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
        patch_size=14, projection_dim=768, hidden_act="quick_gelu",
    )  # fmt: skip
    return LlavaConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_index=32000,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
    )  # fmt: skip


def qwen2vl_config() -> Qwen2VLConfig:
    """Qwen/Qwen2-VL-2B-Instruct: 28-layer 1536-wide Qwen2 decoder (tied lm_head), 32-layer ViT with 2x2 merge."""
    text = dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151645,
        rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
    )  # fmt: skip
    vision = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_chans=3)  # fmt: skip
    return Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
        vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=True,
    )  # fmt: skip


MODELS = {"llava-1.5-7b": llava_config, "qwen2-vl-2b": qwen2vl_config}


TINY_MODELS = {
    "llava-1.5-7b": lambda: tiny_llava_config(hidden=64),
    "qwen2-vl-2b": lambda: tiny_qwen2_vl_config(hidden=64),
}


def build(name: str) -> nn.Module:
    """The model with seed-0 random weights, initialised on the device in bf16 (same weights for every arm)."""
    config = (TINY_MODELS if Setup.tiny else MODELS)[name]()
    config._attn_implementation = "sdpa"
    cls = LlavaForConditionalGeneration if name.startswith("llava") else Qwen2VLForConditionalGeneration
    torch.manual_seed(0)
    with torch.device(Setup.device):
        model = cls(config).to(torch.bfloat16)
    model.generation_config.pad_token_id = 0
    return model.eval()


def inputs_for(model: nn.Module, batch: int) -> dict[str, torch.Tensor]:
    """One random image and ``PROMPT_TOKENS`` random text tokens per sample."""
    if Setup.tiny:
        inputs = tiny_inputs(model, batch=batch, seed=1)
        inputs.pop("labels")
        return {k: v.to(Setup.device) for k, v in inputs.items()}
    generator = torch.Generator().manual_seed(1)
    config = model.config
    text = torch.randint(3, 30000, (batch, PROMPT_TOKENS), generator=generator)
    if config.model_type == "llava":
        vision = config.vision_config
        n_image = (vision.image_size // vision.patch_size) ** 2
        pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=generator)
        image = torch.full((batch, n_image), config.image_token_index)
        extra = {"pixel_values": pixels.to(torch.bfloat16)}
    else:
        t, h, w = QWEN_GRID
        n_image = t * h * w // 4
        pixels = torch.randn(batch * t * h * w, 3 * 2 * 14 * 14, generator=generator)
        image = torch.cat(
            [
                torch.full((batch, 1), config.vision_start_token_id),
                torch.full((batch, n_image), config.image_token_id),
                torch.full((batch, 1), config.vision_end_token_id),
            ],
            dim=1,
        )
        extra = {"pixel_values": pixels.to(torch.bfloat16), "image_grid_thw": torch.tensor([QWEN_GRID] * batch)}
    ids = torch.cat([text[:, :2], image, text[:, 2:]], dim=1)
    batch_inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **extra}
    if config.model_type != "llava":  # Qwen2-VL's forward needs it with image_grid_thw (our tight loop's prefill)
        batch_inputs["mm_token_type_ids"] = (ids == config.image_token_id).long()
    return {k: v.to(Setup.device) for k, v in batch_inputs.items()}


# ----------------------------------------------------------------------------------------------------------------
# INT4 arms
# ----------------------------------------------------------------------------------------------------------------


class TinyGemmLinear(nn.Module):
    """torch's tinygemm INT4 kernel (``_weight_int4pack_mm``, asymmetric g128, bf16) in place of a linear."""

    def __init__(self, linear: nn.Linear, group: int = 128):
        super().__init__()
        w = linear.weight.detach().float()
        n, k = w.shape
        g = w.reshape(n, k // group, group)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        q = torch.clamp(torch.round((g - lo[..., None]) / scale[..., None]), 0, 15).to(torch.int32).reshape(n, k)
        zero = lo + 8 * scale  # tinygemm dequantizes (q - 8) * scale + zero
        packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zeros", torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        self.group, self.out_features = group, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm(x.reshape(-1, x.shape[-1]), self.packed, self.group, self.scale_zeros)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def to_tinygemm(model: nn.Module) -> nn.Module:
    """Swap exactly the linears GRACE quantizes (the language model's projections) for tinygemm layers."""
    for name in resolve_layers(model, GraceConfig()):
        set_submodule(model, name, TinyGemmLinear(model.get_submodule(name)))
        torch.cuda.empty_cache()
    return model


def make_arm(name: str, arm: str) -> nn.Module:
    """The arm's model. GRACE INT4 on CUDA gets ``grace_decode`` from its config's default; the CPU smoke run sets
    it by hand (the quantizer only does so on CUDA)."""
    model = build(name)
    group = Setup.group_size()
    if arm == "bf16-grace-attn":
        use_decode_attention(model)
    elif arm in ("grace", "grace-loop", "grace-nodefer"):
        quantize_model(model, GraceConfig(mode="packed", group_size=group, fast_generate=arm == "grace"))
        use_decode_attention(model)  # a no-op on CUDA, where quantize_model already set it
        if arm == "grace-nodefer":
            model._bench_defer_stop = False
    elif arm == "grace-sdpa":
        quantize_model(model, GraceConfig(mode="packed", group_size=group, decode_attention=False))
    elif arm == "grace-unfused":
        quantize_model(model, GraceConfig(mode="packed", group_size=group, fuse_projections=False))
    elif arm == "tinygemm":
        if Setup.device != "cuda":
            raise RuntimeError("tinygemm (torch._weight_int4pack_mm with this packing) needs CUDA")
        to_tinygemm(model)
    free_memory()
    return model


def attention_of(model: nn.Module) -> str:
    return model.config.get_text_config()._attn_implementation


def weight_bytes(model: nn.Module) -> int:
    """Bytes of distinct parameter and buffer storages (fused views and tied weights counted once)."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


# ----------------------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------------------


HOST_TWEAKS = False  # --host-tweaks: see the module docstring
SKIP_CHECKS = False  # --no-checks: timings only (no eager equality, no tight loop)


def _length(new_tokens: int) -> dict:
    """Exactly ``new_tokens`` tokens: with ``min_new_tokens`` (a logits processor per step), or under
    ``--host-tweaks`` with EOS switched off (no processor and no EOS criterion run per step)."""
    if HOST_TWEAKS:
        return {"max_new_tokens": new_tokens, "eos_token_id": None}
    return {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}


def stop_check(model: nn.Module) -> contextlib.AbstractContextManager:
    """The block ``generate`` runs in: the deferred stop check on under ``--host-tweaks``, off for ``grace-nodefer``,
    and otherwise none (the model's own default: GRACE INT4 defers, bf16 does not)."""
    if HOST_TWEAKS:
        return deferred_stop_check(True)
    if getattr(model, "_bench_defer_stop", None) is False:
        return deferred_stop_check(False)
    return contextlib.nullcontext()


def generate(model: nn.Module, inputs: dict, new_tokens: int, **extra) -> torch.Tensor:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens with a static cache (compiled decode on CUDA)."""
    with stop_check(model):
        return model.generate(**inputs, **_length(new_tokens), do_sample=False, cache_implementation="static", **extra)


class GcClock:
    """Time Python's garbage collector spends (all generations), through ``gc.callbacks``."""

    def __init__(self):
        self.ms, self._start = 0.0, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.ms += (time.perf_counter() - self._start) * 1e3


def timed_calls(calls: dict, repeats: int) -> tuple[dict, dict]:
    """Each call's seconds, ``repeats`` rounds with the calls alternating, every call after a full collection (so
    a collection set off by garbage from earlier work does not land inside one timed call); also the collector's ms
    inside each call's timed runs."""
    times: dict = {key: [] for key in calls}
    clocks = {key: GcClock() for key in calls}
    for _ in range(repeats):
        for key, fn in calls.items():
            gc.collect()
            sync()
            gc.callbacks.append(clocks[key])
            start = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - start)
            gc.callbacks.remove(clocks[key])
    return times, {key: clock.ms for key, clock in clocks.items()}


def measure_ttft(model: nn.Module, batch: int, repeats: int) -> dict:
    """Time to first token and the prefill's peak memory only (no decode step, so nothing is compiled)."""
    inputs = inputs_for(model, batch)
    for _ in range(2):
        generate(model, inputs, 1)
    reset_peak()
    times, gc_ms = timed_calls({"first": lambda: generate(model, inputs, 1)}, repeats)
    return {
        "batch": batch, "ttft_ms": statistics.median(times["first"]) * 1e3, "peak_gib": peak_bytes() / 2**30,
        "ttft_calls_ms": [round(t * 1e3, 2) for t in times["first"]], "gc_ms": round(gc_ms["first"], 2),
    }  # fmt: skip


def first_mismatch(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """First token position where two ``[batch, tokens]`` results differ in any row (``None``: equal)."""
    diff = (a != b).any(dim=0).nonzero()
    return None if diff.numel() == 0 else int(diff[0])


def eager_checks(model: nn.Module, inputs: dict, compiled: torch.Tensor, prompt: int) -> dict:
    """Greedy tokens of the compiled run against eager decoding for ``CHECK_TOKENS`` tokens, every row of the batch:
    the same static cache without compilation, and the dynamic cache (which sums attention over no masked slots)."""
    n = min(CHECK_TOKENS, compiled.shape[1])
    static = generate(model, inputs, n, disable_compile=True)[:, prompt:].cpu()
    with stop_check(model):
        dynamic = model.generate(**inputs, **_length(n), do_sample=False)[:, prompt:].cpu()
    return {
        "check_tokens": n,
        "first_mismatch_eager_static": first_mismatch(compiled[:, :n], static),
        "first_mismatch_eager_dynamic": first_mismatch(compiled[:, :n], dynamic),
    }


def warm_up(model: nn.Module, batch: int, new_tokens: int) -> tuple[dict, int, torch.Tensor]:
    """The batch's inputs, its prompt length and the compiled run's new tokens, after compile + CUDA-graph capture
    and a warm-up over the full length."""
    inputs = inputs_for(model, batch)
    prompt = inputs["input_ids"].shape[1]
    generate(model, inputs, new_tokens)
    return inputs, prompt, generate(model, inputs, new_tokens)[:, prompt:].cpu()


def timing_row(model: nn.Module, batch: int, new_tokens: int, full: list, first: list, gc_ms: float) -> dict:
    """Decode step and TTFT from the medians of full-length and one-token runs (prefill + first token: no decode
    step runs), with every call's ms."""
    decode_s = (statistics.median(full) - statistics.median(first)) / (new_tokens - 1)  # all sequences of the batch
    return {
        "batch": batch, "attention": attention_of(model), "ttft_ms": statistics.median(first) * 1e3,
        "decode_ms_per_step": decode_s * 1e3, "decode_tok_s": batch / decode_s,
        "full_calls_ms": [round(t * 1e3, 2) for t in full], "ttft_calls_ms": [round(t * 1e3, 2) for t in first],
        "gc_ms": round(gc_ms, 2),
    }  # fmt: skip


def add_checks(row: dict, model: nn.Module, inputs: dict, compiled: torch.Tensor, prompt: int, new_tokens: int,
               repeats: int) -> dict:  # fmt: skip
    """The row with the eager-equality and tight-loop columns (a check's failure is reported in its column); none
    under ``--no-checks``."""
    if SKIP_CHECKS:
        return row
    for key, check in (
        ("eager_error", lambda: eager_checks(model, inputs, compiled, prompt)),
        ("tight_error", lambda: tight_loop(model, inputs, new_tokens, repeats, compiled)),
    ):
        try:
            row.update(check())
        except Exception as exc:  # noqa: BLE001  (keep the timing; the check's failure is reported in its column)
            row[key] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return row


def measure(model: nn.Module, batch: int, new_tokens: int, repeats: int) -> dict:
    inputs, prompt, compiled = warm_up(model, batch, new_tokens)
    reset_peak()
    # the full run and the one-token run alternate, so a state change between the two series (an allocator or
    # collector event) cannot land in one series only
    times, gc_ms = timed_calls(
        {"full": lambda: generate(model, inputs, new_tokens), "first": lambda: generate(model, inputs, 1)}, repeats
    )
    row = timing_row(model, batch, new_tokens, times["full"], times["first"], gc_ms["full"] + gc_ms["first"])
    row["peak_gib"] = peak_bytes() / 2**30
    return add_checks(row, model, inputs, compiled, prompt, new_tokens, repeats)


def measure_interleaved(models: dict[str, nn.Module], resident: dict[str, int], batch: int, new_tokens: int,
                        repeats: int) -> dict[str, dict]:  # fmt: skip
    """Every arm's row with all arms' timed calls alternating round by round (full and one-token runs of each arm
    in turn), so a host that drifts between minutes moves every arm alike. ``resident``: the bytes each arm holds
    between calls (weights, cache, graph pools), kept up to date here; an arm's peak is what its call allocated
    beyond the memory in use before it, plus its own resident bytes: the peak a process holding this arm alone
    would report."""
    ready = {}
    for arm, model in models.items():
        before = allocated_bytes()
        ready[arm] = warm_up(model, batch, new_tokens)
        resident[arm] += allocated_bytes() - before
    peaks = dict.fromkeys(models, 0)

    def peaked(arm: str, fn) -> None:
        reset_peak()
        base = allocated_bytes()
        fn()
        peaks[arm] = max(peaks[arm], peak_bytes() - base + resident[arm])

    calls = {}
    for arm, model in models.items():
        calls[arm, "full"] = partial(peaked, arm, partial(generate, model, ready[arm][0], new_tokens))
        calls[arm, "first"] = partial(peaked, arm, partial(generate, model, ready[arm][0], 1))
    times, gc_ms = timed_calls(calls, repeats)
    rows = {}
    for arm, model in models.items():
        inputs, prompt, compiled = ready[arm]
        row = timing_row(model, batch, new_tokens, times[arm, "full"], times[arm, "first"],
                         gc_ms[arm, "full"] + gc_ms[arm, "first"])  # fmt: skip
        row["peak_gib"] = peaks[arm] / 2**30
        before = allocated_bytes()
        rows[arm] = add_checks(row, model, inputs, compiled, prompt, new_tokens, repeats)
        resident[arm] += allocated_bytes() - before
    return rows


# ----------------------------------------------------------------------------------------------------------------
# gpt-fast-style tight loop: what a decode step costs without transformers' generate loop around it
# ----------------------------------------------------------------------------------------------------------------


def _cache_keyword(model: nn.Module) -> str:
    """The forward's cache argument: ``cache`` from transformers 5.2x on, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _decode_positions(model: nn.Module, position: torch.Tensor) -> torch.Tensor:
    """Position ids of one decode step at cache slot ``position [B, 1]``: LLaVA's are the slots; Qwen2-VL's are
    ``[text; t; h; w]``, the three rotary rows shifted by the prefill's ``rope_deltas`` (as generate builds them)."""
    if model.config.model_type == "llava":
        return position
    delta = model.model.rope_deltas.to(position.device)
    return torch.cat([position[None], (position + delta)[None].expand(3, -1, -1)], dim=0)


def tight_loop(model: nn.Module, inputs: dict, new_tokens: int, repeats: int, reference: torch.Tensor) -> dict:
    """Prefill (eager) into a ``StaticCache``, then ``new_tokens - 1`` calls of a compiled ``forward + argmax`` (CUDA
    graphs on CUDA; eager on CPU). Returns its decode step time, the gap to ``generate``'s and whether its greedy
    tokens equal ``generate``'s (the check that its positions and cache use are right)."""
    batch, prompt = inputs["input_ids"].shape
    cache = StaticCache(config=model.config, max_cache_len=prompt + new_tokens)
    keyword = _cache_keyword(model)

    def step(token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        out = model(
            input_ids=token, position_ids=_decode_positions(model, position), use_cache=True, **{keyword: cache}
        )
        return out.logits[:, -1].argmax(-1, keepdim=True)

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True) if Setup.device == "cuda" else step

    def run() -> tuple[torch.Tensor, float]:
        cache.reset()
        if hasattr(getattr(model, "model", None), "rope_deltas"):
            model.model.rope_deltas = None
        with torch.no_grad():
            logits = model(**inputs, use_cache=True, **{keyword: cache}).logits
            tokens = [logits[:, -1].argmax(-1, keepdim=True)]
            position = torch.full((batch, 1), prompt, dtype=torch.long, device=tokens[0].device)
            sync()
            start = time.perf_counter()
            for _ in range(new_tokens - 1):
                tokens.append(compiled(tokens[-1], position).clone())
                position += 1
            sync()
        return torch.cat(tokens, dim=1).cpu(), time.perf_counter() - start

    run()  # compile and capture
    results = [run() for _ in range(max(repeats, 1))]
    step_s = statistics.median(t for _, t in results) / max(new_tokens - 1, 1)
    return {
        "tight_ms_per_step": step_s * 1e3,
        "tight_first_mismatch": first_mismatch(results[-1][0], reference),
    }


# ----------------------------------------------------------------------------------------------------------------
# profile of one decode step
# ----------------------------------------------------------------------------------------------------------------

STAGES = (
    ("INT4 linears (ours)", ("_gemv_kernel", "_tc_kernel", "_dequant_kernel")),
    ("attention", ("flash", "fmha", "attention", "attn", "sdpa")),
    (
        "cuBLAS GEMMs (every linear in bf16; lm_head only in INT4)",
        ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "splitkreduce"),
    ),
    ("norms (fused)", ("rsqrt", "norm", "mean_pow")),
    ("memset / copies", ("memset", "memcpy", "copy", "fill")),
)


def _stage(kernel: str) -> str:
    low = kernel.lower()
    for stage, keys in STAGES:
        if any(key in low for key in keys):
            return stage
    return "other (rotary, activations, cache updates, ...)"


def _profiled(model: nn.Module, inputs: dict, new_tokens: int, stacks: bool = False) -> dict:
    """One generate call under the profiler: wall time, GPU kernel time by stage and by kernel, host-side counts
    (and, with ``stacks``, the host's self time grouped by Python call stack)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], with_stack=stacks) as prof:
        start = time.perf_counter()
        generate(model, inputs, new_tokens)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    stages: dict[str, float] = defaultdict(float)
    kernels: dict[str, float] = defaultdict(float)
    host: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            stages[_stage(event.name)] += event.device_time * 1e-3  # us -> ms
            kernels[event.name] += event.device_time * 1e-3
        else:
            host[event.name] += event.self_cpu_time_total * 1e-3
    counts = {
        name: sum(1 for e in prof.events() if e.name == name)
        for name in ("cudaGraphLaunch", "cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")
    }
    result = {"wall_ms": wall * 1e3, "stages": stages, "kernels": kernels, "host": host, "counts": counts}
    if stacks:
        table = prof.key_averages(group_by_stack_n=6).table(sort_by="self_cpu_time_total", row_limit=40)
        result["host_by_stack"] = table
    return result


def _top(values: dict[str, float], n: int = 25) -> list[tuple[str, float]]:
    """The ``n`` largest entries, largest first."""
    return sorted(values.items(), key=lambda kv: -kv[1])[:n]


def _difference(long: dict, short: dict, steps: int) -> dict:
    """Per-decode-step averages: a run of ``steps + 1`` new tokens minus a run of 1 (which is prefill only)."""

    def per_step(key: str) -> dict[str, float]:
        return {k: (v - short[key].get(k, 0.0)) / steps for k, v in long[key].items()}

    return {
        "step_wall_ms": (long["wall_ms"] - short["wall_ms"]) / steps,
        "stages_ms": per_step("stages"),
        "top_kernels_ms": _top(per_step("kernels")),
        "top_host_ops_ms": _top(per_step("host")),
        "launches_per_step": {k: (v - short["counts"][k]) / steps for k, v in long["counts"].items()},
    }


def profile_generate(model: nn.Module, batch: int, steps: int, stacks: bool = False) -> dict:
    """Profiles of one decode step (averaged over ``steps``) and of the prefill (time to first token)."""
    inputs = inputs_for(model, batch)
    generate(model, inputs, steps + 1)
    long, short = _profiled(model, inputs, steps + 1), _profiled(model, inputs, 1, stacks)
    prefill = {
        "wall_ms": short["wall_ms"], "stages_ms": short["stages"], "top_kernels_ms": _top(short["kernels"]),
        "top_host_ops_ms": _top(short["host"]), "launches": short["counts"],
        "host_by_stack": short.get("host_by_stack"),
    }  # fmt: skip
    return {"decode": _difference(long, short, steps), "prefill": prefill}


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--arms", nargs="+", default=["bf16", "grace", "bf16-grace-attn", "tinygemm"], choices=ARMS,
                        help="in order of importance (a --deadline-s drops the last first)")  # fmt: skip
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--peer-batches", nargs="+", type=int, default=[1, 8], help="batch sizes for the tinygemm arm")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--profile", nargs="*", default=None, metavar="ARM",
                        help="profile decode step and prefill at batch 1 for these arms (no names: grace)")  # fmt: skip
    parser.add_argument(
        "--profile-stacks",
        action="store_true",
        help="with --profile: also group the prefill's host time by Python call stack",
    )
    parser.add_argument(
        "--ttft-only",
        action="store_true",
        help="measure time to first token and prefill memory only (no decode, nothing compiled)",
    )
    parser.add_argument("--interleave", action="store_true",
                        help="build every arm of a model at once and alternate their timed calls round by round (a "
                        "host that drifts between minutes then moves every arm alike)")  # fmt: skip
    parser.add_argument("--no-checks", action="store_true",
                        help="timings only: no eager-equality columns and no tight loop (a shorter GPU call)")  # fmt: skip
    parser.add_argument("--host-tweaks", action="store_true",
                        help="generate without the min-length processor (EOS off) and with the deferred stop check")  # fmt: skip
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny stand-in models (with --device cpu: a smoke run)")
    parser.add_argument("--deadline-s", type=float, default=None, help="skip what would start after this many seconds")
    parser.add_argument("--out", help="markdown results file")
    parser.add_argument("--json", help="ratios to stock bf16 in the issue's format (date, gpu, rows)")
    parser.add_argument("--log-dir", default=".", help="folder for the raw JSON results and the profile")
    parser.add_argument("--merge-json", nargs="+", metavar=("OUT", "IN"),
                        help="only merge the rows of several --json files (one per device call) into OUT")  # fmt: skip
    return parser.parse_args(argv)


def merge_json(out: str, sources: list[str]) -> dict:
    """One results file from several runs' ``--json`` files (rows in the given order; the first run's date and GPU)."""
    parts = [json.loads(Path(source).read_text()) for source in sources]
    if not parts:
        raise SystemExit("--merge-json needs the output file and at least one input file")
    merged = {"date": parts[0]["date"], "gpu": parts[0]["gpu"], "rows": [row for part in parts for row in part["rows"]]}
    Path(out).write_text(json.dumps(merged, indent=1) + "\n")
    return merged


def main(argv: list[str] | None = None) -> dict:
    global HOST_TWEAKS, SKIP_CHECKS
    args = parse_args(argv)
    if args.merge_json:
        return merge_json(args.merge_json[0], args.merge_json[1:])
    Setup.device, Setup.tiny = args.device, args.tiny
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/e2e.py needs a CUDA GPU (or --device cpu --tiny for a smoke run).")
        torch.backends.cuda.enable_cudnn_sdp(False)
    HOST_TWEAKS, SKIP_CHECKS = args.host_tweaks, args.no_checks
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"models": {}}
    began = time.perf_counter()

    def late() -> bool:
        return args.deadline_s is not None and time.perf_counter() - began > args.deadline_s

    if args.interleave:
        for dynamo_limit in ("cache_size_limit", "recompile_limit"):  # every arm's and batch's graphs stay compiled
            if hasattr(torch._dynamo.config, dynamo_limit):
                setattr(torch._dynamo.config, dynamo_limit, 64)
    for name in args.models:
        per_arm: dict = {}
        results["models"][name] = per_arm
        if args.interleave:
            run_interleaved(name, args, per_arm, late)
            write_reports(results, args)
            (log_dir / "e2e_raw.json").write_text(json.dumps(results, indent=1))
            continue
        for arm in args.arms:
            if late():
                print(f"deadline reached: {name} {arm} skipped", flush=True)
                continue
            torch._dynamo.reset()
            started = time.perf_counter()
            try:
                model = make_arm(name, arm)
            except Exception as exc:  # noqa: BLE001  (report the failure, keep the other arms)
                per_arm[arm] = {"weight_gib": 0.0, "batches": [], "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                print(name, arm, per_arm[arm]["error"], flush=True)
                continue
            rows = {"weight_gib": weight_bytes(model) / 2**30, "batches": []}
            per_arm[arm] = rows
            for batch in args.peer_batches if arm == "tinygemm" else args.batches:
                if late():
                    print(f"deadline reached: {name} {arm} batch {batch} skipped", flush=True)
                    continue
                try:
                    if args.ttft_only:
                        rows["batches"].append(measure_ttft(model, batch, args.repeats))
                    else:
                        rows["batches"].append(measure(model, batch, args.new_tokens, args.repeats))
                except Exception as exc:  # noqa: BLE001  (report the failure, keep the other arms)
                    rows["batches"].append({"batch": batch, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                print(name, arm, rows["batches"][-1], flush=True)
                write_reports(results, args)  # a partial report survives a killed run
            if args.profile is not None and arm in (args.profile or ["grace"]) and not late():
                profile = profile_generate(model, 1, 64, args.profile_stacks)
                (log_dir / f"profile_{name}_{arm}.json").write_text(json.dumps(profile, indent=1))
                rows["profile"] = {
                    "step_wall_ms": profile["decode"]["step_wall_ms"],
                    "stages_ms": profile["decode"]["stages_ms"],
                }
                print(name, arm, "profile", rows["profile"], flush=True)
            rows["total_s"] = time.perf_counter() - started
            del model
            free_memory()
            (log_dir / "e2e_raw.json").write_text(json.dumps(results, indent=1))
    text = report(results, args)
    print(text)
    write_reports(results, args)
    return results


def run_interleaved(name: str, args: argparse.Namespace, per_arm: dict, late) -> None:
    """``--interleave``: every arm of one model built and resident at once, each batch's timed calls alternating
    across arms (``measure_interleaved``)."""
    torch._dynamo.reset()  # the previous model's graphs
    models, resident = {}, {}
    for arm in args.arms:
        if late():
            print(f"deadline reached: {name} {arm} not built", flush=True)
            continue
        started, before = time.perf_counter(), allocated_bytes()
        try:
            models[arm] = make_arm(name, arm)
            resident[arm] = allocated_bytes() - before
        except Exception as exc:  # noqa: BLE001  (report the failure, keep the other arms)
            per_arm[arm] = {"weight_gib": 0.0, "batches": [], "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(name, arm, per_arm[arm]["error"], flush=True)
            continue
        per_arm[arm] = {"weight_gib": weight_bytes(models[arm]) / 2**30, "batches": [],
                        "build_s": time.perf_counter() - started}  # fmt: skip
    for batch in args.batches:
        if late():
            print(f"deadline reached: {name} batch {batch} skipped", flush=True)
            continue
        try:
            rows = measure_interleaved(models, resident, batch, args.new_tokens, args.repeats)
        except Exception as exc:  # noqa: BLE001  (report the failure, keep the other batches)
            rows = {arm: {"batch": batch, "error": f"{type(exc).__name__}: {str(exc)[:300]}"} for arm in models}
        for arm, row in rows.items():
            per_arm[arm]["batches"].append(row)
            print(name, arm, row, flush=True)
    models.clear()
    free_memory()


def write_reports(results: dict, args: argparse.Namespace) -> None:
    if args.out:
        Path(args.out).write_text(report(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(ratios(results), indent=1) + "\n")


def device_name() -> str:
    return torch.cuda.get_device_name() if Setup.device == "cuda" else f"cpu (smoke run, tiny={Setup.tiny})"


def _ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else round(value / base, 4)


def ratios(results: dict) -> dict:
    """The issue's format: per model, arm and batch, decode speed-up and TTFT / peak memory ratios to stock bf16."""
    rows = []
    for name, per_arm in results["models"].items():
        base = {r["batch"]: r for r in per_arm.get(REFERENCE_ARM, {}).get("batches", []) if "error" not in r}
        for arm, arm_rows in per_arm.items():
            for r in arm_rows["batches"]:
                b = base.get(r["batch"], {})
                rows.append({
                    "model": name, "arm": arm, "batch": r["batch"],
                    "decode_vs_bf16": _ratio(r.get("decode_tok_s"), b.get("decode_tok_s")),
                    "ttft_vs_bf16": _ratio(r.get("ttft_ms"), b.get("ttft_ms")),
                    "peak_vs_bf16": _ratio(r.get("peak_gib"), b.get("peak_gib")),
                })  # fmt: skip
    date = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}"
    return {"date": date, "gpu": device_name(), "rows": rows}


def _same(r: dict, key: str) -> str:
    if key not in r:
        return ""
    return "yes" if r[key] is None else f"no (from token {r[key]})"


def report(results: dict, args: argparse.Namespace) -> str:
    lines = [
        "# End-to-end generation: stock bf16 vs our decode attention vs GRACE INT4 (compiled decode)",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- device: {device_name()}; torch {torch.__version__}, triton {__import__('triton').__version__}, "
        f"transformers {transformers.__version__}, grace_quant {grace_quant.__version__}",
        f"- random weights at the published configs; one image + {PROMPT_TOKENS} text tokens per sample; "
        f'{args.new_tokens} new tokens, greedy, `cache_implementation="static"` (compiled decode step with CUDA '
        f"graphs) for every arm; cuDNN SDPA off for every arm; median of {args.repeats} runs after 2 full-length "
        "warm-ups. Decode tok/s counts all sequences of the batch; TTFT is prefill + first token. "
        f"Host tweaks (no min-length processor, deferred stop check): {'on' if args.host_tweaks else 'off'}.",
        f"- compiled = eager: greedy tokens of the compiled run against eager decoding ({CHECK_TOKENS} tokens, every "
        "row), with the same static cache (`disable_compile=True`) and with the dynamic cache. Tight loop: our own "
        "prefill + one compiled `forward + argmax` per token; gap = generate's decode step - the tight loop's.",
        "",
        "| model | arm | attention | batch | decode tok/s | vs bf16 | TTFT ms | vs bf16 | peak GiB | vs bf16 | "
        "weights GiB | = eager (static) | = eager (dynamic) | tight loop ms/step | generate gap ms/step | "
        "tight = generate tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, per_arm in results["models"].items():
        base = {r["batch"]: r for r in per_arm.get(REFERENCE_ARM, {}).get("batches", []) if "error" not in r}
        for arm, rows in per_arm.items():
            if "error" in rows:
                lines.append(f"| {name} | {arm} | | | error: {rows['error'][:100]} |" + " |" * 11)
            for r in rows["batches"]:
                if "error" in r:
                    lines.append(f"| {name} | {arm} | | {r['batch']} | error: {r['error'][:100]} |" + " |" * 11)
                    continue
                b = base.get(r["batch"])
                decoded = "decode_tok_s" in r and b is not None and "decode_tok_s" in b
                speed = f"{r['decode_tok_s'] / b['decode_tok_s']:.2f}x" if decoded else ""
                tok_s = f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else "(not measured)"
                ttft = f"{r['ttft_ms'] / b['ttft_ms']:.2f}x" if b else ""
                peaked = "peak_gib" in r and b is not None and b.get("peak_gib")
                peak = f"{r['peak_gib'] / b['peak_gib']:.2f}x" if peaked else ""
                peak_gib = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "(not measured)"
                tight = f"{r['tight_ms_per_step']:.3f}" if "tight_ms_per_step" in r else r.get("tight_error", "")[:60]
                gap = f"{r['decode_ms_per_step'] - r['tight_ms_per_step']:.3f}" if "tight_ms_per_step" in r else ""
                lines.append(
                    f"| {name} | {arm} | {r.get('attention', '')} | {r['batch']} | {tok_s} | {speed} | "
                    f"{r['ttft_ms']:.1f} | {ttft} | {peak_gib} | {peak} | {rows['weight_gib']:.2f} | "
                    f"{_same(r, 'first_mismatch_eager_static')} | {_same(r, 'first_mismatch_eager_dynamic')} | "
                    f"{tight} | {gap} | {_same(r, 'tight_first_mismatch')} |"
                )
        for arm, rows in per_arm.items():
            profile = rows.get("profile")
            if not profile:
                continue
            lines += ["", f"Profile of one {arm} decode step, {name}, batch 1 (GPU kernel time per step, ms):", ""]
            lines += ["| stage | ms per step | share of step |", "|---|---|---|"]
            wall = profile["step_wall_ms"]
            busy = 0.0
            for stage, ms in sorted(profile["stages_ms"].items(), key=lambda kv: -kv[1]):
                busy += ms
                lines.append(f"| {stage} | {ms:.3f} | {ms / wall:.0%} |")
            idle = max(wall - busy, 0.0)
            lines.append(f"| GPU idle (host work between steps, launch gaps) | {idle:.3f} | {idle / wall:.0%} |")
            lines.append(f"| **step wall time** | {wall:.3f} | 100% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
