"""Lab (run on an H100: ``benchmarks/results/gluon_h200.md``, section 9): the Gluon W4A16 tiles on a nibble-permuted
word layout. Each word's nibbles are permuted (a bijection inside the word, so the same bytes and TMA tiles) so that
the codes lane ``c`` of a quad turns into one pair, ``2c`` and ``2c + 1``, sit at nibbles ``c`` and ``c + 4``: the
pair then costs a shift by ``4c`` and one ``lop3`` where the checkpoint's order needs a shift by ``8c``, a shift by 12
and two ``lop3`` (-21% of the loop's SASS instructions: ``benchmarks/results/gluon_h200.md``, section 8,
``benchmarks/sass_lab.py``).

Same tile, same split, three arms in one process: the shipped pair on the checkpoint's words, the permuted pair on
permuted words, and the permuted pair on the checkpoint's words with the activations' K permuted instead (``xperm``:
the copy of ``x`` timed with the call, no weight repacked), each checked against dequantize + matmul (fp32) of the
checkpoint's words, timed as the tuner times (CUDA-graph replay over weight copies cycled past L2), and cuBLAS bf16
beside them. Prefill shapes first (the TTFT lever), then 64, 16 and 1 token:

    PYTHONSAFEPATH=1 PYTHONPATH=$PWD python benchmarks/repack_lab.py   # on a Hopper GPU; ~2-4 minutes
"""

from __future__ import annotations

import argparse
import time

import torch

from grace_quant.kernels import gluon_w4a16 as gw
from grace_quant.kernels.reference import dequantize
from grace_quant.kernels.timing import dense_time_us, graph_time_us, w4_copies

PERMUTED_PAIR = """{
.reg .b32 v, one, off, nz;
mov.b32 one, ONE;
mov.b32 off, OFF;
mov.b32 nz, 0x80008000;
lop3.b32 v, $2, 0x000F000F, MAGIC, 0xEA;
fma.rn.TY v, v, one, off;
fma.rn.TY v, v, $3, nz;
mov.b32 {$0, $1}, v;
}"""
"""The pair-making PTX for permuted words, shifted right by ``4c`` (``PERMUTED_LANE_BITS``): one ``lop3``."""
PERMUTED_LANE_BITS = 4
_PERMUTED = {"pair": PERMUTED_PAIR, "lane_bits": PERMUTED_LANE_BITS}
_LAYOUTS = {"checkpoint": {}, "permuted": _PERMUTED, "xperm": _PERMUTED}
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


def permute_k(x: torch.Tensor) -> torch.Tensor:
    """Activations in the K order the permuted pair reads the checkpoint's own words in: within every 8 columns,
    ``x[8g + c + 4h]`` moves to ``8g + 2c + h`` (lane ``c``'s pair is nibbles ``c`` and ``c + 4`` of an unpermuted
    word), so no weight is repacked and only the activations pay one copy."""
    m, k = x.shape
    return x.view(m, k // 8, 2, 4).transpose(2, 3).reshape(m, k)


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
            for layout, weights in (("checkpoint", copies), ("permuted", permuted), ("xperm", copies)):
                run = gw.plan(dtype, n, k, 128, False, tile, split, **_LAYOUTS[layout])
                prep = permute_k if layout == "xperm" else (lambda a: a)
                err = ((run(prep(x), *weights[0], None).float() - ref).norm() / ref.norm()).item()
                us = graph_time_us([lambda p=p, s=s, r=run, f=prep, x=x: r(f(x), p, s, None) for p, s in weights])
                flag = "" if err < 1e-2 else f" ERR {err:.1e}"
                line.append(f" s{split} {layout[:4]} {us:.1f} ({base / us:.2f}x){flag}")
        print("".join(line), flush=True)


if __name__ == "__main__":
    main()
