"""``grace_quant.deferred_stop_check``: transformers' deferred stop check on CUDA, scoped to a block.

On CPU the switch's decision is checked against transformers' own rule (CPU has no events, so the deferred loop
itself runs on a GPU only); on a GPU, greedy tokens with and without it are equal, stopping at EOS included.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from grace_quant import deferred_stop_check
from grace_quant.integrations.generation import _stop_check_class, deferred_stop_check_available

CUDA, CPU, MPS = torch.device("cuda"), torch.device("cpu"), torch.device("mps")
pytestmark = pytest.mark.skipif(not deferred_stop_check_available(), reason="this transformers has no DeferredStopCheck")


def supported(device: torch.device, cache=None, returned: bool = False) -> bool:
    return _stop_check_class().is_supported(device, cache, returned, is_assistant=False)


def test_cuda_defers_only_inside_the_block_and_other_devices_keep_transformers_rule():
    before = {d.type: supported(d) for d in (CUDA, CPU, MPS)}
    assert before == {"cuda": False, "cpu": False, "mps": True}  # transformers' rule: MPS only
    with deferred_stop_check() as active:
        assert active and supported(CUDA) and not supported(CPU) and supported(MPS)
        with deferred_stop_check(enabled=False) as inner:
            assert not inner and not supported(CUDA)
        assert supported(CUDA)
    assert {d.type: supported(d) for d in (CUDA, CPU, MPS)} == before


def test_a_returned_cache_that_cannot_be_cropped_still_opts_out():
    class Uncroppable:
        is_croppable = False

    with deferred_stop_check():
        assert not supported(CUDA, Uncroppable(), returned=True)  # the last step could not be undone
        assert supported(CUDA, Uncroppable(), returned=False)


def test_the_switch_is_per_thread():
    seen = []
    with deferred_stop_check():
        worker = threading.Thread(target=lambda: seen.append(supported(CUDA)))
        worker.start()
        worker.join()
        assert supported(CUDA)
    assert seen == [False]


def _flag_seen_by_generate(model, batch) -> list:
    """What the stop-check rule says for CUDA while ``model.generate`` runs, read by a logits processor each step."""
    from transformers import LogitsProcessor, LogitsProcessorList

    seen = []

    class Probe(LogitsProcessor):
        def __call__(self, input_ids, scores):
            seen.append(supported(CUDA))
            return scores

    model.generate(**batch, do_sample=False, max_new_tokens=2, logits_processor=LogitsProcessorList([Probe()]))
    return seen


@pytest.mark.parametrize("switch", [True, False])
def test_grace_models_defer_in_generate_by_default_and_callers_blocks_win(switch):
    """``GraceConfig(deferred_stop_check=...)``: a packed tiny LLaVA's own ``generate`` defers on CUDA (or not), a
    caller's ``deferred_stop_check(...)`` block decides over the model's default, and nothing leaks outside."""
    from grace_quant import GraceConfig, quantize_model
    from grace_quant.testing import collate, tiny_dataset, tiny_model

    config = GraceConfig(mode="packed", group_size=32, deferred_stop_check=switch)
    model = quantize_model(tiny_model("llava"), config).eval()
    batch = {k: v for k, v in collate(tiny_dataset(model, 1)).items() if k != "labels"}
    assert _flag_seen_by_generate(model, batch) == [switch, switch]
    with deferred_stop_check(enabled=not switch):
        assert _flag_seen_by_generate(model, batch) == [not switch, not switch]
    assert not supported(CUDA)
    twin = copy.deepcopy(model)  # its generate runs the copy, not the original
    assert twin.generate.model is twin and twin.generate._grace_defers is switch
    assert _flag_seen_by_generate(twin, batch) == [switch, switch]
    plain = quantize_model(tiny_model("llava"), GraceConfig(mode="qat", group_size=32)).eval()
    assert _flag_seen_by_generate(plain, batch) == [False, False]  # QAT (training) models generate as transformers does


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_greedy_tokens_are_the_same_with_the_deferred_check_on_cuda(cache):
    """GRACE INT4 tiny LLaVA on CUDA: 24 greedy tokens, and a run stopped early by EOS, equal with and without it."""
    from transformers.generation import utils as generation_utils

    from grace_quant import GraceConfig, quantize_model
    from grace_quant.testing import collate, tiny_dataset, tiny_model

    config = GraceConfig(mode="packed", group_size=32, fast_generate=False)  # greedy static calls: transformers' loop
    model = quantize_model(tiny_model("llava").to("cuda"), config).eval()
    batch = {k: v.to("cuda") for k, v in collate(tiny_dataset(model, 2)).items() if k != "labels"}
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    made = []
    original_init = generation_utils.DeferredStopCheck.__init__

    def counting_init(self, *args, **kwargs):
        made.append(1)
        original_init(self, *args, **kwargs)

    def run(defer: bool, **kwargs):
        with deferred_stop_check(defer):
            return model.generate(**batch, do_sample=False, **extra, **kwargs)

    plain = run(False, max_new_tokens=24, min_new_tokens=24)
    generation_utils.DeferredStopCheck.__init__ = counting_init
    try:
        deferred = run(True, max_new_tokens=24, min_new_tokens=24)
        assert made, "generate did not take the deferred stop check"
        prompt = batch["input_ids"].shape[1]
        eos = int(plain[0, prompt + 5])  # a token the first row emits at step 6: both rows stop by then or at 24
        stopped = run(True, max_new_tokens=24, eos_token_id=eos, pad_token_id=0)
    finally:
        generation_utils.DeferredStopCheck.__init__ = original_init
    assert torch.equal(deferred, plain)
    assert torch.equal(stopped, run(False, max_new_tokens=24, eos_token_id=eos, pad_token_id=0))
