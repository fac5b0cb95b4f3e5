"""``grace_greedy`` (``generate(custom_generate=grace_greedy)``): the same tokens as transformers' own greedy loop.

Reference: ``generate`` without it, same model, inputs and cache (transformers' ``_sample``). On CPU the loop's step
runs eagerly; on a GPU it runs compiled with CUDA graphs (the ``gpu`` test). Calls it does not cover must reach
transformers' loop unchanged.
"""

from __future__ import annotations

import pytest
import torch

from grace_quant import GraceConfig, quantize_model
from grace_quant.integrations.fast_decode import grace_greedy
from grace_quant.testing import tiny_inputs, tiny_model, tiny_processor

NEW = 12


def _grace(name: str, device: str = "cpu", dtype: torch.dtype = torch.bfloat16, fast_generate: bool = False):
    """A packed tiny GRACE model; by default its plain ``generate()`` is transformers' loop (the reference)."""
    config = GraceConfig(mode="packed", group_size=32, fast_generate=fast_generate)
    model = quantize_model(tiny_model(name, dtype=dtype).to(device), config)
    return model.eval()


def _inputs(model, batch: int = 2) -> dict:
    inputs = tiny_inputs(model, batch=batch, seed=1)
    inputs.pop("labels")
    return {k: v.to(model.device) for k, v in inputs.items()}


def _count_input_preparations(model, monkeypatch) -> list:
    """How often transformers builds a step's model inputs (once per token in its loop; twice in grace_greedy's)."""
    calls = []
    original = type(model).prepare_inputs_for_generation

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(model, "prepare_inputs_for_generation", counting.__get__(model))
    return calls


@pytest.mark.parametrize("name", ["llava-untied", "qwen2-vl", "qwen2.5-vl"])
def test_greedy_tokens_equal_transformers_loop_and_stop_at_eos(name, monkeypatch):
    """Batch of 2, static cache: 12 greedy tokens equal ``_sample``'s; with an EOS token that one row emits at step 4
    that row is padded afterwards as transformers pads it; with both rows' step-4 tokens as EOS both stop there and the
    output is as short as transformers' (the flag read one step late changes nothing)."""
    model = _grace(name)
    inputs = _inputs(model)
    prompt = inputs["input_ids"].shape[1]
    kw = {"max_new_tokens": NEW, "do_sample": False, "cache_implementation": "static", "pad_token_id": 0}
    reference = model.generate(**inputs, **kw)
    calls = _count_input_preparations(model, monkeypatch)
    fast = model.generate(**inputs, **kw, custom_generate=grace_greedy)
    assert len(calls) == 2, "grace_greedy handed the call to transformers' loop"  # the prefill's and step 1's
    assert torch.equal(fast, reference)
    one = int(reference[0, prompt + 3])
    both = sorted({one, int(reference[1, prompt + 3])})
    for eos in (one, both):
        expected = model.generate(**inputs, **kw, eos_token_id=eos)
        got = model.generate(**inputs, **kw, eos_token_id=eos, custom_generate=grace_greedy)
        assert got.shape == expected.shape and torch.equal(got, expected), eos
    assert expected.shape[1] <= prompt + 4  # both rows stopped by step 4


@pytest.mark.parametrize("limit", [{"min_new_tokens": 8}, {"min_length": 0}])
def test_a_minimum_length_holds_eos_back_as_transformers_does(limit, monkeypatch):
    """``min_new_tokens`` / ``min_length`` (transformers' two length processors, the only ones the loop applies
    itself): EOS tokens are held back until the minimum, with the loop still running (two input preparations)."""
    model = _grace("qwen2-vl")
    inputs = _inputs(model)
    prompt = inputs["input_ids"].shape[1]
    kw = {"max_new_tokens": NEW, "do_sample": False, "cache_implementation": "static", "pad_token_id": 0}
    plain = model.generate(**inputs, **kw)
    eos = sorted({int(plain[0, prompt + 2]), int(plain[1, prompt + 2])})  # both rows would stop at step 3
    if "min_length" in limit:
        limit = {"min_length": prompt + 8}
    expected = model.generate(**inputs, **kw, **limit, eos_token_id=eos)
    calls = _count_input_preparations(model, monkeypatch)
    got = model.generate(**inputs, **kw, **limit, eos_token_id=eos, custom_generate=grace_greedy)
    assert len(calls) == 2
    assert got.shape == expected.shape and torch.equal(got, expected)
    assert expected.shape[1] >= prompt + 8  # held back: nobody stopped at step 3


def test_a_single_new_token_and_eos_on_the_prefill_token():
    model = _grace("llava-untied")
    inputs = _inputs(model)
    kw = {"do_sample": False, "cache_implementation": "static", "pad_token_id": 0}
    first = model.generate(**inputs, **kw, max_new_tokens=1)
    assert torch.equal(model.generate(**inputs, **kw, max_new_tokens=1, custom_generate=grace_greedy), first)
    eos = sorted(set(first[:, -1].tolist()))  # every row ends on its first token
    expected = model.generate(**inputs, **kw, max_new_tokens=NEW, eos_token_id=eos)
    got = model.generate(**inputs, **kw, max_new_tokens=NEW, eos_token_id=eos, custom_generate=grace_greedy)
    assert torch.equal(got, expected) and got.shape[1] == first.shape[1]


@pytest.mark.parametrize("name", ["llava-untied", "qwen2-vl", "qwen2.5-vl"])
def test_a_left_padded_batch_decodes_as_transformers_does(name, monkeypatch):
    """A row with its first prompt token padded out: the loop passes the prompt's mask over the whole cache and the
    model builds its masks inside the step; the tokens equal transformers' loop, and differ from the unpadded run."""
    model = _grace(name)
    inputs = _inputs(model)
    kw = {"max_new_tokens": NEW, "do_sample": False, "cache_implementation": "static", "pad_token_id": 0}
    unpadded = model.generate(**inputs, **kw)
    inputs["attention_mask"][1, 0] = 0
    expected = model.generate(**inputs, **kw)
    assert not torch.equal(expected[1], unpadded[1])  # the padding matters to this row
    calls = _count_input_preparations(model, monkeypatch)
    got = model.generate(**inputs, **kw, custom_generate=grace_greedy)
    assert len(calls) == 2
    assert torch.equal(got, expected)


@pytest.mark.parametrize("case", ["sampling", "logits processor", "dynamic cache"])
def test_calls_it_does_not_cover_run_transformers_loop(case, monkeypatch):
    """Sampling, a logits processor other than the minimum lengths, no static cache: transformers' own loop (one
    input preparation per token) with its own results."""
    model = _grace("llava-untied")
    inputs = _inputs(model)
    kw = {"max_new_tokens": 6, "do_sample": False, "cache_implementation": "static", "pad_token_id": 0}
    if case == "sampling":
        kw |= {"do_sample": True, "top_k": 5}
    elif case == "logits processor":
        kw |= {"repetition_penalty": 1.3}
    else:
        kw.pop("cache_implementation")
    torch.manual_seed(3)
    expected = model.generate(**inputs, **kw)
    calls = _count_input_preparations(model, monkeypatch)
    torch.manual_seed(3)
    got = model.generate(**inputs, **kw, custom_generate=grace_greedy)
    assert len(calls) == 6  # one per token: transformers' loop ran
    assert torch.equal(got, expected)


def test_beam_search_is_refused_with_the_fix():
    model = _grace("llava-untied")
    with pytest.raises(ValueError, match="num_beams=2 asks for beam search: drop custom_generate"):
        model.generate(
            **_inputs(model), max_new_tokens=3, num_beams=2, cache_implementation="static", custom_generate=grace_greedy
        )


def test_grace_models_decode_greedy_calls_through_it_by_default(monkeypatch):
    """``GraceConfig(fast_generate=True)`` (the default): a packed model's plain greedy static-cache ``generate`` runs
    grace_greedy (two input preparations) with transformers' tokens; ``fast_generate=False`` runs transformers' loop
    (one preparation per token)."""
    reference = _grace("qwen2-vl")
    model = _grace("qwen2-vl", fast_generate=True)  # the same seed-0 weights as the reference's
    inputs = _inputs(model)
    kw = {"max_new_tokens": 6, "do_sample": False, "cache_implementation": "static", "pad_token_id": 0}
    expected = reference.generate(**inputs, **kw)
    calls = _count_input_preparations(model, monkeypatch)
    assert torch.equal(model.generate(**inputs, **kw), expected)
    assert len(calls) == 2
    ref_calls = _count_input_preparations(reference, monkeypatch)
    reference.generate(**inputs, **kw)
    assert len(ref_calls) == 6


@pytest.mark.parametrize(
    "case",
    ["beams", "sampling", "streamer", "stop strings", "config with beams", "checkpoint beams", "positional", "2 ranks"],
)
def test_calls_the_default_leaves_to_transformers(case, monkeypatch):
    """By default only greedy calls are decoded by grace_greedy: beam search and sampling keep transformers' own
    loops (no error for beams, unlike an explicit ``custom_generate=grace_greedy``), and calls whose keywords a
    ``custom_generate`` loop would lose keep transformers' loop and get them: the streamer receives every token,
    stop strings stop as transformers stops them. Results equal the ``fast_generate=False`` model's."""
    from transformers import GenerationConfig, TextStreamer

    model = _grace("llava-untied", fast_generate=True)
    reference = _grace("llava-untied")
    inputs = _inputs(model, batch=1)
    kw = {"max_new_tokens": 5, "do_sample": False, "cache_implementation": "static", "pad_token_id": 0}
    args: tuple = ()
    if case == "beams":
        kw["num_beams"] = 2
    elif case == "sampling":
        kw |= {"do_sample": True, "top_k": 4}
    elif case == "config with beams":
        kw = {"generation_config": GenerationConfig(max_new_tokens=5, num_beams=2, pad_token_id=0),
              "cache_implementation": "static"}  # fmt: skip
    elif case == "checkpoint beams":  # a checkpoint's generation config asks for beams, the caller's config is silent
        for m in (model, reference):
            m.generation_config.num_beams = 2
        kw = {"generation_config": GenerationConfig(max_new_tokens=5, pad_token_id=0), "cache_implementation": "static"}
    elif case == "2 ranks":  # a process group of two (ZeRO-3 / FSDP would need synced_gpus): transformers decides
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    elif case == "positional":
        args = (inputs.pop("input_ids"), GenerationConfig(max_new_tokens=5, do_sample=False, pad_token_id=0))
    sent: list = []
    if case == "streamer":

        class Recorder(TextStreamer):
            def __init__(self):  # no tokenizer: record the ids
                pass

            def put(self, value):
                sent.append(value.reshape(-1).tolist())

            def end(self):
                sent.append("end")

        kw["streamer"] = Recorder()
    stop = {}
    if case == "stop strings":
        stop = {"stop_strings": ["x"], "tokenizer": tiny_processor("llava").tokenizer}
    torch.manual_seed(3)
    expected = reference.generate(*args, **inputs, **kw, **stop)
    stream_expected, sent[:] = list(sent), []
    calls = _count_input_preparations(model, monkeypatch)
    torch.manual_seed(3)
    got = model.generate(*args, **inputs, **kw, **stop)
    assert torch.equal(got, expected)
    assert len(calls) > 2  # transformers' loop: one preparation per token
    if case == "streamer":
        assert sent == stream_expected and sent[-1] == "end" and len(sent) == 1 + 5 + 1  # prompt, 5 tokens, end


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", ["llava-untied", "qwen2-vl"])
def test_the_decode_step_traces_as_one_graph(name, padded):
    """Compiled as transformers compiles its decode forward (here on CPU with dynamo's ``eager`` backend and
    ``fullgraph=True``, which fails on any graph break): the loop's step is one graph, captured once for all steps,
    and its tokens equal transformers' loop."""
    import torch._dynamo
    from transformers.generation.configuration_utils import CompileConfig

    model = _grace(name)
    inputs = _inputs(model)
    if padded:
        inputs["attention_mask"][1, 0] = 0
    kw = {"max_new_tokens": NEW, "do_sample": False, "cache_implementation": "static", "pad_token_id": 0}
    reference = model.generate(**inputs, **kw)
    config = CompileConfig(backend="eager", fullgraph=True, mode=None)
    config._compile_all_devices = True  # transformers' switch to compile off its usual devices
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    got = model.generate(**inputs, **kw, compile_config=config, custom_generate=grace_greedy)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert torch.equal(got, reference)


def _parts_only_at_near_ties(tokens: torch.Tensor, reference, margin: float = 0.05) -> bool:
    """Compiled and eager runs round differently (inductor fuses norms and rotary), so greedy tokens may part where
    the top two logits were within bf16 rounding: true when every row equals the reference's or first differs at a
    step whose reference top-2 gap was below ``margin``."""
    steps = len(reference.scores)
    for row in range(tokens.shape[0]):
        differ = (tokens[row, -steps:] != reference.sequences[row, -steps:]).nonzero()
        if differ.numel():
            top = reference.scores[int(differ[0])][row].float().topk(2).values
            if float(top[0] - top[1]) >= margin:
                return False
    return True


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, margin", [(torch.float32, 1e-4), (torch.bfloat16, 0.05)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["llava-untied", "qwen2-vl"])
def test_compiled_greedy_tokens_match_transformers_loop_on_cuda(name, dtype, margin):
    """On CUDA: run eagerly (``disable_compile``), the loop's tokens equal transformers' eager loop exactly; compiled
    (CUDA graphs), twice in a row (the second call replays), they equal it up to a near-tie of the top two logits
    (fp32: ``margin`` 1e-4, where the tiny models' smallest gap is ~1e-3, so in effect exactly; bf16: within its
    rounding); stopped early by EOS, compiled equals eager wherever the plain runs did not part."""
    from grace_quant.integrations import fast_decode

    model = _grace(name, "cuda", dtype)
    inputs = _inputs(model)
    prompt = inputs["input_ids"].shape[1]
    kw = {"max_new_tokens": 24, "do_sample": False, "cache_implementation": "static", "pad_token_id": 0}
    reference = model.generate(**inputs, **kw, disable_compile=True, output_scores=True, return_dict_in_generate=True)
    eager = model.generate(**inputs, **kw, disable_compile=True, custom_generate=grace_greedy)
    assert torch.equal(eager, reference.sequences)
    fast_decode._COMPILED.clear()
    for _ in range(2):
        compiled = model.generate(**inputs, **kw, custom_generate=grace_greedy)
        assert _parts_only_at_near_ties(compiled, reference, margin)
    assert fast_decode._COMPILED, "the loop did not compile its step"
    eos = sorted({int(eager[0, prompt + 5]), int(eager[1, prompt + 5])})
    eager_eos = model.generate(**inputs, **kw, eos_token_id=eos, disable_compile=True, custom_generate=grace_greedy)
    compiled_eos = model.generate(**inputs, **kw, eos_token_id=eos, custom_generate=grace_greedy)
    assert eager_eos.shape[1] <= prompt + 6
    if torch.equal(compiled, eager):
        assert torch.equal(compiled_eos, eager_eos)
