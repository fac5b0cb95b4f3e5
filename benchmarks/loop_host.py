"""Host time per decode step outside the model's forward: transformers' greedy loop vs ``grace_greedy``.

Tiny GRACE INT4 LLaVA / Qwen2-VL on the CPU, eager (no compile), batch 1, ``min_new_tokens`` as ``e2e.py`` sets it:
per step, ``generate``'s wall time minus the time spent inside the model's forward (hooks), from the difference of
a 68-token and a 4-token ``generate`` (prefill and setup cancel), median of 5. What the loop itself costs the host,
not a GPU number (on a GPU the compiled step also takes ``grace_greedy``'s argmax and EOS bookkeeping):

    PYTHONPATH=$PWD python benchmarks/loop_host.py
"""

from __future__ import annotations

import statistics
import time

import torch
import transformers

from grace_quant import GraceConfig, grace_greedy, quantize_model
from grace_quant.testing import tiny_inputs, tiny_model


def per_step_ms(name: str) -> dict[str, float]:
    """Host ms per decode step outside the forward, for transformers' loop and grace_greedy."""
    config = GraceConfig(mode="packed", group_size=32, fast_generate=False)  # plain generate(): transformers' loop
    model = quantize_model(tiny_model(name, dtype=torch.bfloat16), config).eval()
    inputs = tiny_inputs(model, 1, seed=1)
    inputs.pop("labels")
    inside = {"s": 0.0, "start": 0.0}

    def enter(module, args) -> None:
        inside["start"] = time.perf_counter()

    def leave(module, args, out) -> None:
        inside["s"] += time.perf_counter() - inside["start"]

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave)

    def outside(n: int, **extra) -> float:
        inside["s"] = 0.0
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       cache_implementation="static", pad_token_id=0, **extra)  # fmt: skip
        return time.perf_counter() - start - inside["s"]

    result = {}
    for label, extra in (("transformers' loop", {}), ("grace_greedy", {"custom_generate": grace_greedy})):
        outside(4, **extra)
        result[label] = statistics.median((outside(68, **extra) - outside(4, **extra)) / 64 * 1e3 for _ in range(5))
    return result


def main() -> None:
    torch.set_num_threads(1)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, CPU, 1 thread")
    for name in ("llava-untied", "qwen2-vl"):
        for label, ms in per_step_ms(name).items():
            print(f"{name}: {label} {ms:.3f} ms per step outside the forward")


if __name__ == "__main__":
    main()
