"""Lab (run on an H100: ``benchmarks/results/gluon_h200.md``, section 9): the Gluon W4A16 tiles on the in-memory word
order (columns ``2c`` and ``2c + 1`` in fields ``c`` and ``c + 4``, ``kernels.packing``: the pair lane ``c`` of a
quad makes costs a shift by ``4c`` and one ``lop3``, what ships since section 13) against the same tiles on the
checkpoint's order (the pair costs a shift by ``8c``, a shift by 12 and two ``lop3``: what shipped before; -21% of the
loop's SASS instructions, ``benchmarks/results/gluon_h200.md`` section 8, ``benchmarks/sass_lab.py``).

Same tile, same split, two arms in one process, each checked against dequantize + matmul (fp32), timed as the tuner
times (CUDA-graph replay over weight copies cycled past L2), and cuBLAS bf16 beside them. (Section 9's third arm, the
checkpoint's words with the activations' K permuted per call, lost everywhere and is gone.) Prefill shapes first,
then 64, 16 and 1 token:

    PYTHONSAFEPATH=1 PYTHONPATH=$PWD python benchmarks/repack_lab.py   # on a Hopper GPU; ~2-4 minutes
"""

from __future__ import annotations

import argparse
import time

import torch

from grace_quant.kernels import gluon_w4a16 as gw
from grace_quant.kernels import to_checkpoint
from grace_quant.kernels.reference import dequantize
from grace_quant.kernels.timing import dense_time_us, graph_time_us, w4_copies

CHECKPOINT_PAIR = """{
.reg .b32 a, v, one, off, nz;
mov.b32 one, ONE;
mov.b32 off, OFF;
mov.b32 nz, 0x80008000;
shl.b32 a, $2, 12;
lop3.b32 v, $2, 0x0000000F, MAGIC, 0xEA;
lop3.b32 v, a, 0x000F0000, v, 0xEA;
fma.rn.TY v, v, one, off;
fma.rn.TY v, v, $3, nz;
mov.b32 {$0, $1}, v;
}"""
"""The pair-making PTX on the checkpoint's word order, shifted right by ``8c`` (``CHECKPOINT_LANE_BITS``): nibbles
``2c`` and ``2c + 1`` are the pair, the second moved to bit 16 by a shift and a second ``lop3``."""
CHECKPOINT_LANE_BITS = 8
_LAYOUTS = {"memory": {}, "checkpoint": {"pair": CHECKPOINT_PAIR, "lane_bits": CHECKPOINT_LANE_BITS}}
CASES = (  # (M, N, K, (block_m, block_k, stages, pipelined), splits)
    *((m, 22016, 4096, tile, (1,)) for m in (600, 2048, 256) for tile in ((128, 128, 4, True), (256, 128, 3, True))),
    *((m, 4096, 11008, tile, (1, 2)) for m in (256, 2048) for tile in ((128, 128, 4, True), (256, 128, 3, True))),
    *((m, n, k, (128, 128, 5, gw.WS), (1,)) for m in (256, 600) for n, k in ((22016, 4096), (4096, 11008))),
    *((64, n, k, (64, 128, 4, True), (1, 2, 4)) for n, k in ((4096, 4096), (11008, 4096), (4096, 11008))),
    *((m, n, k, (16, 128, 4, True), (1, 2, 4, 8)) for m in (16, 1) for n, k in ((4096, 4096), (11008, 4096), (4096, 11008))),
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deadline-s", type=float, default=420)
    args = parser.parse_args()
    start, dtype = time.time(), torch.bfloat16
    print(f"{torch.cuda.get_device_name()}: us per call (CUDA-graph replay past L2), ratio to cuBLAS bf16", flush=True)
    for m, n, k, tile, splits in CASES:
        if time.time() - start > args.deadline_s:
            print("deadline reached", flush=True)
            return
        copies = w4_copies(n, k, 128, dtype, "cuda")
        on_disk = [(to_checkpoint(p, 4), s) for p, s in copies]
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = x.float() @ dequantize(*copies[0], 128, 4).float().T
        base = dense_time_us(n, k, m, dtype)
        line = [f"M={m} N={n} K={k} tile {tile[:3]}: cuBLAS {base:.1f} us |"]
        for split in splits:
            for layout, weights in (("checkpoint", on_disk), ("memory", copies)):
                run = gw.plan(dtype, n, k, 128, False, tile, split, **_LAYOUTS[layout])
                err = ((run(x, *weights[0], None).float() - ref).norm() / ref.norm()).item()
                us = graph_time_us([lambda p=p, s=s, r=run, x=x: r(x, p, s, None) for p, s in weights])
                flag = "" if err < 1e-2 else f" ERR {err:.1e}"
                line.append(f" s{split} {layout[:4]} {us:.1f} ({base / us:.2f}x){flag}")
        print("".join(line), flush=True)


if __name__ == "__main__":
    main()
