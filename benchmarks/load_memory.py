"""Peak process memory while loading a ~440 MB bf16 LLaVA-layout checkpoint: plain, packed-on-load, QAT-on-load.

Each arm runs in its own subprocess; a sampler thread reads RssAnon (anonymous resident memory, i.e. tensors,
not the page cache of the mmapped safetensors file) every millisecond. Usage:
    python benchmarks/load_memory.py [--out benchmarks/results/load_memory.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

ARMS = ("plain bf16", "packed on load (INT4)", "QAT on load")
# glibc raises its mmap threshold after large frees and then keeps freed blocks in the heap: resident memory that
# the process can reuse but that is not live tensors. The second setting pins the threshold to show live memory.
ALLOCATORS = {"glibc default": {}, "MALLOC_MMAP_THRESHOLD_=65536": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("RssAnon not available (Linux only)")


def build_checkpoint(folder: str) -> int:
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
        num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False,
    )  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                              image_size=112, patch_size=14)  # fmt: skip
    with torch.device("cpu"):
        model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text)).to(torch.bfloat16)
    model.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure(folder: str, arm: str) -> dict:
    import torch

    import grace_quant
    from grace_quant import AutoModelForVision2Seq, GraceConfig

    baseline = rss_anon_bytes()
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    kwargs = {"dtype": torch.bfloat16}
    if arm != ARMS[0]:
        kwargs["quantization_config"] = GraceConfig(mode="packed" if "packed" in arm else "qat")
    start = time.perf_counter()
    model = AutoModelForVision2Seq.from_pretrained(folder, **kwargs)
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    state = list(model.parameters()) + list(model.buffers())
    model_bytes = sum(t.numel() * t.element_size() for t in state)
    del grace_quant
    return {"arm": arm, "peak_bytes": peak[0] - baseline, "model_bytes": model_bytes, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/load_memory.md", help="markdown results file")
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "ARM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as folder:
        fp_bytes = build_checkpoint(folder)
        rows = []
        for allocator, env in ALLOCATORS.items():
            for arm in ARMS:
                child = [sys.executable, __file__, "--child", folder, arm]
                out = subprocess.run(child, capture_output=True, text=True, check=True, env={**os.environ, **env})
                rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), "allocator": allocator})
    mib = 1 / 2**20
    lines = [
        "# Peak memory while loading (CPU)",
        "",
        f"Date {datetime.date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}. Checkpoint: LLaVA layout, Llama 12 x 1024 (vocab 32000), "
        f"bf16 weights {fp_bytes * mib:.0f} MiB. Peak = max RssAnon during `from_pretrained` minus before it.",
        "",
        "Plain loading maps the safetensors file and copies nothing (file-backed pages are not RssAnon), so its "
        "anonymous peak is near zero; quantizing arms allocate their packed or QAT tensors.",
        "",
        "| allocator | arm | peak RssAnon during load (MiB) | loaded model (MiB) | load time (s) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['allocator']} | {r['arm']} | {r['peak_bytes'] * mib:.0f} | {r['model_bytes'] * mib:.0f} | "
            f"{r['seconds']:.1f} |"
        )
    largest_layer = 1024 * 2816 * 2
    lines += ["", f"Largest single quantized layer in bf16: {largest_layer * mib:.1f} MiB (a 1024 x 2816 projection)."]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
