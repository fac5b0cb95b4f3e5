"""Lab: the Gluon W4A16 tiles' pair order. The shipped kernel pairs nibbles ``c`` and ``c + 4`` of the checkpoint's
words (one shift and one ``lop3`` per pair) and permutes the activations' K to match (one copy of ``x`` per call);
the checkpoint's own K order pairs nibbles ``2c`` and ``2c + 1`` (a second shift and ``lop3``: 21% more loop
instructions, ``benchmarks/results/gluon_h200.md`` section 8, ``benchmarks/sass_lab.py``).

Same tile, same split, three arms in one process: ``ckpt``, the checkpoint-order pair on the checkpoint's words
(the kernel before the change); ``pwor``, the shipped pair on words whose nibbles were permuted at load instead
(no activation copy: what a repack of the weights would give); ``ship``, the shipped kernel (activations permuted
inside the call, the copy timed with it). Each is checked against dequantize + matmul (fp32) of the checkpoint's
words and timed as the tuner times (CUDA-graph replay over weight copies cycled past L2), cuBLAS bf16 beside them.
Prefill shapes first (the TTFT lever), then 64, 16 and 1 token:

    PYTHONSAFEPATH=1 PYTHONPATH=$PWD python benchmarks/repack_lab.py   # on a Hopper GPU; ~2-4 minutes
"""

from __future__ import annotations

import argparse
import time

import torch

from grace_quant.kernels import gluon_w4a16 as gw
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
"""The pair (nibble 0, nibble 1) of a word shifted right by ``8c``: the checkpoint's K order, no activation copy."""
_ARMS = {
    "ckpt": {"pair": CHECKPOINT_PAIR, "lane_bits": 8, "permute": False},
    "pwords": {"permute": False},
    "ship": {},
}
CASES = (  # (M, N, K, (block_m, block_k, stages, pipelined), splits)
    *((m, 22016, 4096, tile, (1,)) for m in (600, 2048, 256) for tile in ((128, 128, 4, True), (256, 128, 3, True))),
    *((m, 4096, 11008, tile, (1, 2)) for m in (256, 2048) for tile in ((128, 128, 4, True), (256, 128, 3, True))),
    *((m, n, k, (128, 128, 5, gw.WS), (1,)) for m in (256, 600) for n, k in ((22016, 4096), (4096, 11008))),
    *((64, n, k, (64, 128, 4, True), (1, 2, 4)) for n, k in ((4096, 4096), (11008, 4096), (4096, 11008))),
    *((m, n, k, (16, 128, 4, True), (1, 2, 4, 8)) for m in (16, 1) for n, k in ((4096, 4096), (11008, 4096), (4096, 11008))),
)  # fmt: skip


def permute_nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 words in the checkpoint's nibble order -> nibbles ``2c`` at ``c`` and ``2c + 1`` at ``c + 4``."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros_like(w)
    for c in range(4):
        out |= ((w >> (8 * c)) & 0xF) << (4 * c)
        out |= ((w >> (8 * c + 4)) & 0xF) << (4 * c + 16)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


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
        permuted = [(permute_nibbles(p), s) for p, s in copies]
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = x.float() @ dequantize(*copies[0], 128, 4).float().T
        base = dense_time_us(n, k, m, dtype)
        line = [f"M={m} N={n} K={k} tile {tile[:3]}: cuBLAS {base:.1f} us |"]
        for split in splits:
            for arm, weights in (("ckpt", copies), ("pwords", permuted), ("ship", copies)):
                run = gw.plan(dtype, n, k, 128, False, tile, split, **_ARMS[arm])
                err = ((run(x, *weights[0], None).float() - ref).norm() / ref.norm()).item()
                us = graph_time_us([lambda p=p, s=s, r=run, x=x: r(x, p, s, None) for p, s in weights])
                flag = "" if err < 1e-2 else f" ERR {err:.1e}"
                line.append(f" s{split} {arm[:4]} {us:.1f} ({base / us:.2f}x){flag}")
        print("".join(line), flush=True)


if __name__ == "__main__":
    main()
