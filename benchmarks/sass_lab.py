"""Count the SASS instructions of the W4A16 kernels' main loops without a GPU: compile for sm_90 with Triton's own
``ptxas`` and disassemble with its ``cuobjdump`` (both ship in the Triton wheel), then count the instructions between
the loop's backward branch and its target, by opcode.

    pip install --no-deps --target /tmp/triton36 triton==3.6.0     # the GPU machine's Triton
    PYTHONPATH=/tmp/triton36:$PWD python benchmarks/sass_lab.py gemv4 --rows 4 --cols 4
    PYTHONPATH=/tmp/triton36:$PWD python benchmarks/sass_lab.py wgmma --block-m 16
    PYTHONPATH=/tmp/triton36:$PWD python benchmarks/sass_lab.py wgmma --block-m 256 --stages 3 --pair checkpoint
    PYTHONPATH=/tmp/triton36:$PWD python benchmarks/sass_lab.py wgmma --block-m 128 --stages 5 --ws

``--pair checkpoint`` compiles the Gluon kernel as ``benchmarks/repack_lab.py`` runs it on the checkpoint's word
order (two shifts and two ``lop3`` per pair where the in-memory order that ships needs one of each;
``benchmarks/results/gluon_h200.md``, sections 8 and 13).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource

from benchmarks.repack_lab import CHECKPOINT_LANE_BITS, CHECKPOINT_PAIR
from grace_quant.kernels import gluon_gemv, gluon_w4a16
from grace_quant.kernels.triton_w4a16 import dequant_ptx

_INTS = ("N", "KW", "KG", "stride_xm", "stride_ym", "WORDS_PER", "K_PER")  # specialized as divisible by 16


def _gemv4(args: argparse.Namespace) -> tuple:
    ptr = "*fp16" if args.fp16 else "*bf16"
    sig = dict(x_ptr=ptr, w_ptr="*i32", s_ptr=ptr, b_ptr=ptr, y_ptr=ptr, ws_ptr="*fp32", cnt_ptr="*i32")
    sig |= {name: "i32" for name in ("M", "N", "KW", "KG", "stride_xm", "stride_ym", "WORDS_PER", "magic")}
    consts = dict(R=args.rows, C=args.cols, WARPS=args.warps, GROUP=128, T=args.tokens, FP16=args.fp16,
                  SPLIT=args.split, HAS_BIAS=False)  # fmt: skip
    return gluon_gemv._gemv_kernel, sig, consts, args.warps


def _wgmma(args: argparse.Namespace) -> tuple:
    bm, bk = args.block_m, 128
    mma, dot, words, out = gluon_w4a16._layouts(bm, bk)
    x_layout, w_layout = gluon_w4a16._shared_layouts(bm, bk, torch.bfloat16)
    sig = dict(x_desc=f"tensordesc<bf16[{bm}, {bk}],{x_layout!r}>", w_desc=f"tensordesc<i32[128, {bk // 8}],{w_layout!r}>",
               s_ptr="*bf16", b_ptr="*bf16", y_ptr="*bf16")  # fmt: skip
    pair, lane_bits = gluon_w4a16._BF16_PAIR, gluon_w4a16.LANE_BITS
    if args.pair == "checkpoint":
        pair, lane_bits = triton.language.constexpr(dequant_ptx(CHECKPOINT_PAIR, "bf16x2")), CHECKPOINT_LANE_BITS
    consts = dict(BM=bm, BK=bk, GROUP=128, STAGES=args.stages, HAS_BIAS=False, PAIR=pair, MMA=mma, DOT=dot,
                  WORDS=words, OUT=out)  # fmt: skip
    if args.ws:  # the warp-specialized persistent form
        sig |= {name: "i32" for name in ("M", "N", "KG", "stride_ym", "K_TILES", "K_ITERS")}
        consts |= dict(DIRECT=bm > 128, LANE_BITS=lane_bits)
        return gluon_w4a16._ws_kernel, sig, consts, 8
    sig |= dict(ws_ptr="*fp32", cnt_ptr="*i32") | {name: "i32" for name in ("M", "N", "KW", "KG", "stride_ym", "K_PER")}
    consts |= dict(PIPE=True, SPLIT=args.split, LANE_BITS=lane_bits)
    return gluon_w4a16._kernel, sig, consts, 8


def _loop(sass: str) -> tuple[list[str], int]:
    """The instructions of the innermost loop with the most MMAs (the shortest such span; for a kernel without MMAs,
    the longest loop): opcodes, and its MMA count."""
    ins = [(int(m[1], 16), m[2].strip()) for m in re.finditer(r"/\*([0-9a-f]{4})\*/\s+([^;]*);", sass)]
    best: tuple[int, list[str]] = (-1, [])
    for address, text in ins:
        target = re.search(r"BRA 0x([0-9a-f]+)", text)
        if target and int(target[1], 16) < address:
            body = [t for a, t in ins if int(target[1], 16) <= a <= address]
            mmas = sum("HGMMA" in t for t in body)
            rank, best_rank = (
                (mmas, -len(body) if mmas else len(body)),
                (best[0], -len(best[1]) if best[0] else len(best[1])),
            )
            if rank > best_rank:
                best = (mmas, body)
    opcodes = [re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0] for text in best[1]]
    return opcodes, best[0]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The kernel and its constexprs, from the command line (or ``argv``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kernel", choices=("gemv4", "wgmma"))
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--cols", type=int, default=4)
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1, help="gemv4: padded tokens (1, 2 or 4)")
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--split", action="store_true")
    parser.add_argument("--block-m", type=int, default=16)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--pair", choices=("shipped", "checkpoint"), default="shipped")
    parser.add_argument("--ws", action="store_true", help="wgmma: the warp-specialized persistent form")
    return parser.parse_args(argv)


def compile_kernel(args: argparse.Namespace):
    """The kernel compiled for sm_90 by the installed Triton (its own ptxas; no GPU needed)."""
    fn, sig, consts, warps = (_gemv4 if args.kernel == "gemv4" else _wgmma)(args)
    sig |= {name: "constexpr" for name in consts}
    attrs = {
        (i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(sig.items()) if ty[0] == "*" or name in _INTS
    }
    source = (GluonASTSource if "Gluon" in type(fn).__name__ else ASTSource)(fn, sig, consts, attrs)
    options = {"num_warps": warps} | (
        {"maxnreg": gluon_w4a16._WS_MAXNREG} if args.kernel == "wgmma" and args.ws else {}
    )
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def sass_of(kernel) -> tuple[str, str]:
    """(SASS, resource usage) of a compiled kernel, by the ``cuobjdump`` in the Triton wheel."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([tool, "-sass", cubin.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    return sass, usage


def main() -> None:
    args = parse()
    kernel = compile_kernel(args)
    sass, usage = sass_of(kernel)
    opcodes, mmas = _loop(sass)
    regs = re.search(r"REG:(\d+)", usage)
    spills = len(re.findall(r"\b(?:STL|LDL)\b", sass))
    gemv = dict(rows=args.rows, cols=args.cols, warps=args.warps, tokens=args.tokens, fp16=args.fp16, split=args.split)
    what = gemv if args.kernel == "gemv4" else (args.block_m, args.stages, args.pair)
    print(f"{args.kernel} {what}: "
          f"{regs[1] if regs else '?'} registers, {spills} local loads/stores, {kernel.metadata.shared} B shared, loop of {len(opcodes)} instructions ({mmas} MMAs)")  # fmt: skip
    print("  " + ", ".join(f"{op} {n}" for op, n in collections.Counter(opcodes).most_common(14)))


if __name__ == "__main__":
    main()
