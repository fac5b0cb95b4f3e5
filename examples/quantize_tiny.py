"""Quantize a tiny random LLaVA end to end on CPU: fp -> QAT on load -> a few QAT steps -> packed INT4 -> reload.

Nothing is downloaded: the model is built from a config. Run:  python examples/quantize_tiny.py [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

import grace_quant
from grace_quant import AutoModelForVision2Seq, GraceConfig
from grace_quant.surgery import grace_layers
from grace_quant.testing import tiny_inputs, tiny_model


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for the checkpoints (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=5, help="QAT steps to run (default 5)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="grace_tiny_")
    fp_dir, int4_dir = os.path.join(out, "fp"), os.path.join(out, "int4")

    tiny_model("llava").save_pretrained(fp_dir)
    student = AutoModelForVision2Seq.from_pretrained(fp_dir, quantization_config=GraceConfig(bits=4, group_size=32))
    print(f"QAT on load: {len(list(grace_layers(student)))} fake-quant linears, skipped "
          f"{student.config.quantization_config.modules_to_not_convert}")  # fmt: skip

    inputs = tiny_inputs(student, batch=4, seed=1)
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in student.named_parameters() if not n.endswith("log_scale")], "lr": 1e-3},
            {"params": [p for n, p in student.named_parameters() if n.endswith("log_scale")], "lr": 1e-2, "weight_decay": 0.0},
        ]
    )  # fmt: skip
    student.train()
    for step in range(args.steps):
        loss = student(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")
    student.eval()

    with torch.no_grad():
        expected = student(**inputs).logits
    student.save_pretrained(int4_dir)
    model = AutoModelForVision2Seq.from_pretrained(int4_dir)
    with torch.no_grad():
        got = model(**inputs).logits
    layer = model.model.language_model.layers[0].self_attn.q_proj
    print(f"reloaded: {type(layer).__name__} weight {tuple(layer.weight.shape)} {layer.weight.dtype}")
    print(f"fp checkpoint {folder_bytes(fp_dir):,} bytes -> INT4 checkpoint {folder_bytes(int4_dir):,} bytes")
    print(f"INT4 logits equal the QAT model's: {torch.equal(got, expected)}  (checkpoints in {out})")
    if not torch.equal(got, expected):
        raise SystemExit("mismatch between the QAT model and its packed INT4 reload")
    print(f"grace_quant {grace_quant.__version__} OK")


if __name__ == "__main__":
    main()
