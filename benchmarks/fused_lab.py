"""Prefill lab: the Gluon W4A16 kernel (``grace_quant.kernels.gluon_w4a16``, the weight dequantized in registers as the
MMA's A operand) against cuBLAS bf16 and dequantize + cuBLAS on the fused decoder-layer shapes (q|k|v, o, gate|up, down).

Every arm is timed with CUDA graphs over weight copies cycled past L2 (``kernels.timing``); per model and M the
table sums the four shapes (one decoder layer) and gives each arm's ratio to cuBLAS bf16 (above 1 is faster).
``eager`` rows time the same calls launched from Python back to back (host time included, as eager prefill runs
them): dequantize + cuBLAS and the Gluon kernel's best tile.

    python benchmarks/fused_lab.py --ms 256,600,1024,2048 --splits 1,2,4 --tuned-tiles --json fused_lab.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from grace_quant.kernels import gluon_w4a16 as gw
from grace_quant.kernels import triton_w4a16 as tw
from grace_quant.kernels.reference import dequantize
from grace_quant.kernels.timing import copies_for, dense_time_us, graph_time_us, w4_copies

SHAPES = {
    "llava-1.5-7b": [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)],
    "qwen2-vl-2b": [(2048, 1536), (1536, 1536), (17920, 1536), (1536, 8960)],
}
KEYS = ("block_m", "block_k", "stages", "pipe", "split")  # a config: a checked tile (pipe: one MMA kept in flight)


def eager_us(fns: list, calls: int = 60) -> float:
    """Microseconds per call of ``fns`` (cycled) launched back to back from Python, one sync at the end."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(calls):
        fns[i % len(fns)]()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ms", default="256,600,1024,2048")
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--splits", default="1", help="K splits to time each tile with (comma-separated)")
    parser.add_argument("--tuned-tiles", action="store_true", help="only the tiles the tuner races (WGMMA_SPACE)")
    parser.add_argument("--json", default="fused_lab.json")
    args = parser.parse_args()
    from grace_quant.kernels.tuner import WGMMA_SPACE

    tiles = sorted({gw.tile_of(c) for c in WGMMA_SPACE} if args.tuned_tiles else gw.TILES)
    configs = [(*tile, int(split)) for tile in tiles for split in args.splits.split(",")]
    dtype, group = torch.bfloat16, 128
    rows = []
    for model in args.models:
        for m in (int(v) for v in args.ms.split(",")):
            total = {"bf16": 0.0, "deq+cublas": 0.0, "eager deq+cublas": 0.0, "eager fused": 0.0}
            best_total = 0.0
            per_config = dict.fromkeys(configs, 0.0)
            for n, k in SHAPES[model]:
                copies = w4_copies(n, k, group, dtype, "cuda")
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                ref = F.linear(x.double(), dequantize(*copies[0], group, 4).double())
                bf16 = dense_time_us(n, k, m, dtype)
                deq = graph_time_us([lambda c=c, x=x: F.linear(x, tw.dequantize_w4(*c, group, dtype)) for c in copies])
                total["bf16"] += bf16
                total["deq+cublas"] += deq
                times = {}
                for config in configs:
                    kw = dict(zip(KEYS, config, strict=True))
                    try:
                        y = gw.wgmma_w4a16(x, *copies[0], None, group, **kw)
                        err = ((y.double() - ref).norm() / ref.norm()).item()
                        if not err < 5e-3:  # NaN fails too
                            raise RuntimeError(f"relative error {err:.2e}")
                        times[config] = graph_time_us(
                            [lambda c=c, kw=kw, x=x: gw.wgmma_w4a16(x, *c, None, group, **kw) for c in copies]
                        )
                    except Exception as exc:  # noqa: BLE001 - a lab: report and go on
                        print(f"  {model} m={m} [{n},{k}] {config}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                        times[config] = float("inf")
                    per_config[config] += times[config]
                best = min(times.values())
                best_total += best
                best_kw = dict(zip(KEYS, min(times, key=times.get), strict=True))
                total["eager deq+cublas"] += eager_us(
                    [lambda c=c, x=x: F.linear(x, tw.dequantize_w4(*c, group, dtype)) for c in copies]
                )
                total["eager fused"] += eager_us(
                    [lambda c=c, x=x, kw=best_kw: gw.wgmma_w4a16(x, *c, None, group, **kw) for c in copies]
                )
                print(
                    f"{model} m={m} [{n}, {k}]: bf16 {bf16:.1f} us, deq+cublas {deq:.1f}, fused best {best:.1f} "
                    f"{min(times, key=times.get)}  ({', '.join(f'{c}: {t:.1f}' for c, t in times.items())})",
                    flush=True,
                )
                del copies
                torch.cuda.empty_cache()
            row = {
                "model": model, "m": m, "bf16_us": total["bf16"], "deq_cublas_us": total["deq+cublas"],
                "fused_best_us": best_total, "eager_deq_cublas_us": total["eager deq+cublas"],
                "eager_fused_best_us": total["eager fused"],
                "fused_config_us": {str(c): t for c, t in per_config.items()},
            }  # fmt: skip
            rows.append(row)
            print(
                f"== {model} m={m} layer: bf16 {total['bf16']:.1f} us, deq+cublas {total['deq+cublas']:.1f} "
                f"({total['bf16'] / total['deq+cublas']:.2f}x), fused best-per-shape {best_total:.1f} "
                f"({total['bf16'] / best_total:.2f}x), best single config "
                f"{min(per_config.values()):.1f} {min(per_config, key=per_config.get)}; eager: deq+cublas "
                f"{total['eager deq+cublas']:.1f} us, fused {total['eager fused']:.1f}",
                flush=True,
            )
    with open(args.json, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "copies_rule": copies_for(1), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
