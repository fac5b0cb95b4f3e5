"""Tune the W4A16 kernels on this GPU for the LLaVA-1.5-7B and Qwen2-VL-2B language-model shapes.

Every M bucket (1..2048: GEMV, tensor-core kernel, and above M = 64 the race of dequantize + cuBLAS against the
tensor-core kernel) of every linear shape, fused (q|k|v, gate|up) and unfused, bf16 activations, group 128.
The result is the JSON table ``kernels.autotune`` reads; commit it to ``kernels/configs/`` to ship it (a cold
start on this GPU then tunes nothing):

    GRACE_QUANT_CACHE=/tmp/tuned python benchmarks/tune_kernels.py
    cp /tmp/tuned/kernels/NVIDIA_H200.json kernels/configs/
"""

from __future__ import annotations

import argparse
import time

import torch
from grace_quant.kernels import autotune
from torch import nn

from grace_quant.modules import GraceQuantLinear

# (in_features K, out_features N)
SHAPES = {
    "llava-1.5-7b": [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096), (4096, 11008)],
    "qwen2-vl-2b": [(1536, 2048), (1536, 1536), (1536, 17920), (8960, 1536), (1536, 256), (1536, 8960)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--retune", action="store_true", help="time keys that already have a configuration too")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tune_kernels.py times kernels on a CUDA GPU; none is available here.")
    layers = nn.ModuleList(
        GraceQuantLinear(k, n, bias=False, group_size=128, device="cuda", dtype=torch.bfloat16)
        for model in args.models
        for k, n in SHAPES[model]
    )
    start = time.perf_counter()
    tuned = autotune.tune_model(layers, retune=args.retune)
    device = autotune.device_name(torch.device("cuda"))
    print(f"{len(tuned)} configurations tuned in {time.perf_counter() - start:.0f} s on {device}")
    print(f"table: {autotune.table(device).user_path}")


if __name__ == "__main__":
    main()
