"""Dequantize-kernel lab: tiles of ``triton_w4a16.dequantize_w4`` on the fused prefill shapes, as bandwidth.

Eager prefill of a GRACE INT4 model runs dequantize + cuBLAS per linear, and on an H100 the dequantize kernels are
what its decoder layers spend over bf16 on the GPU (``benchmarks/results/prefill_h100.md``): a memory-bound copy
(0.5 byte read, 2 bytes written per weight). This lab times each candidate tile (rows and groups per program, warps,
streaming stores) per shape with CUDA graphs over weight copies cycled past L2 (``kernels.timing``), against the
shipped default, and reports the achieved bandwidth. The kernel's results do not depend on the tile (checked here
bit for bit, and under the interpreter in ``tests/test_kernels_interpret.py``).

    python benchmarks/dequant_lab.py --json dequant_lab.json
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from grace_quant.kernels import triton_w4a16 as tw
from grace_quant.kernels.timing import graph_time_us, w4_bytes, w4_copies

SHAPES = {  # the fused shapes eager prefill dequantizes: q|k|v, o, gate|up, down
    "llava-1.5-7b": [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)],
    "qwen2-vl-2b": [(2048, 1536), (1536, 1536), (17920, 1536), (1536, 8960)],
}
GROUP = 128


def candidates() -> list[dict[str, int]]:
    out = []
    for block_n, groups, warps, stream in itertools.product((32, 64, 128), (1, 2, 4), (4, 8), (0, 1)):
        if block_n * groups <= 256:
            out.append({"block_n": block_n, "groups": groups, "num_warps": warps, "stream": stream})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="dequant_lab.json")
    args = parser.parse_args()
    dtype = torch.bfloat16
    rows = []
    for model, shapes in SHAPES.items():
        for n, k in shapes:
            copies = w4_copies(n, k, GROUP, dtype, "cuda")
            moved = w4_bytes(n, k, GROUP) + n * k * 2
            reference = tw.dequantize_w4(*copies[0], GROUP, dtype)
            row = {"model": model, "n": n, "k": k, "mbytes": moved / 1e6, "configs": []}
            for config in [None, *candidates()]:
                if not torch.equal(tw.dequantize_w4(*copies[0], GROUP, dtype, config), reference):
                    raise SystemExit(f"tile {config} changed the result on [{n}, {k}]")
                us = graph_time_us([lambda c=c, t=config: tw.dequantize_w4(*c, GROUP, dtype, t) for c in copies])
                row["configs"].append({"config": config or "default", "us": us, "tbps": moved / us / 1e6})
            best = min(row["configs"], key=lambda c: c["us"])
            default = row["configs"][0]
            print(
                f"{model} [{n}, {k}]: default {default['us']:.1f} us ({default['tbps']:.2f} TB/s), best "
                f"{best['us']:.1f} us ({best['tbps']:.2f} TB/s) {best['config']}",
                flush=True,
            )
            rows.append(row)
            del copies
            torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    # one config for all shapes: the smallest total time
    totals = {}
    for row in rows:
        for entry in row["configs"]:
            key = json.dumps(entry["config"], sort_keys=True)
            totals[key] = totals.get(key, 0.0) + entry["us"]
    ranked = sorted(totals.items(), key=lambda item: item[1])
    print("summed over shapes: default", f"{totals[json.dumps('default')]:.1f} us")
    for key, total in ranked[:6]:
        print(f"  {total:.1f} us  {key}")


if __name__ == "__main__":
    main()
