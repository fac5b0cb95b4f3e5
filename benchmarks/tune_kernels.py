"""Tune the W4A16 kernels on this GPU for the LLaVA-1.5-7B and Qwen2-VL-2B language-model shapes.

Every M bucket (1..2048: GEMV, tensor-core kernel, and above M = 64 the race of dequantize + cuBLAS against the
tensor-core kernel) of every linear shape, fused (q|k|v, gate|up) and unfused, bf16 activations, group 128.
The result is the JSON table ``grace_quant.kernels.dispatch`` reads; commit it to ``grace_quant/kernels/configs/`` to ship it (a cold
start on this GPU then tunes nothing):

    GRACE_QUANT_CACHE=/tmp/tuned python benchmarks/tune_kernels.py
    cp /tmp/tuned/kernels/NVIDIA_H200.json grace_quant/kernels/configs/
"""

from __future__ import annotations

import argparse
import time

import torch

from grace_quant.kernels.dispatch import M_BUCKETS, m_bucket
from grace_quant.kernels.tables import device_name, table
from grace_quant.kernels.tuner import tune_shapes

# (in_features K, out_features N)
SHAPES = {
    "llava-1.5-7b": [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096), (4096, 11008)],
    "qwen2-vl-2b": [(1536, 2048), (1536, 1536), (1536, 17920), (8960, 1536), (1536, 256), (1536, 8960)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--retune", action="store_true", help="time keys that already have a configuration too")
    parser.add_argument("--ms", default=None, help="comma-separated M buckets to tune (default: all of them)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tune_kernels.py times kernels on a CUDA GPU; none is available here.")
    cuda = torch.device("cuda", torch.cuda.current_device())
    shapes = {(n, k, 128, torch.bfloat16, cuda) for model in args.models for k, n in SHAPES[model]}
    start = time.perf_counter()
    m_values = M_BUCKETS if args.ms is None else [m_bucket(int(v)) for v in args.ms.split(",")]
    tuned = tune_shapes(shapes, m_values, retune=args.retune)
    device = device_name(cuda)
    print(f"{len(tuned)} configurations tuned in {time.perf_counter() - start:.0f} s on {device}")
    print(f"table: {table(device).user_path}")


if __name__ == "__main__":
    main()
