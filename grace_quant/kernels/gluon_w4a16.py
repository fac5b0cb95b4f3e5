"""W4A16 GEMM for prefill on Hopper (sm_90), written in Gluon: the weight is dequantized in registers straight into
the tensor cores' A operand, so INT4 is read inside the GEMM instead of dequantize + cuBLAS writing and re-reading
every weight in bf16.

``y^T = W x^T``: each program owns 128 weight rows (two warpgroups of 64) and ``block_m`` tokens. The token tile (the
MMA's B operand) comes through TMA into a ring of shared-memory stages, the packed words beside it. Each thread turns
nibbles ``2c`` and ``2c + 1`` of every word of its fragment rows (``c`` its lane in the quad) into one 32-bit pair of
16-bit floats: exactly the elements ``k = 8 * word + 2c + {0, 1}`` that ``wgmma``'s register A fragment puts in that
thread (``convert_layout(..., assert_trivial=True)`` proves it at compile time: no data moves). Per pair: a shift,
one ``lop3`` into the mantissa of 2**7 (bf16) or 2**10 (fp16), one FMA removing the offset exactly and one
multiplying by the scale (the one rounding ``kernels.reference.dequantize`` makes), so results match dequantize +
matmul up to the summation order.

Two loops: ``pipe`` keeps one MMA in flight while the next K tile is dequantized (unrolled by two so that a tile's A
registers are redefined only after the MMA reading them retired; ptxas keeps the MMAs asynchronous only with this
shape, see ``benchmarks/results/prefill_h100.md``), the other retires each MMA before the next dequantization and
relies on a second program per SM to overlap (small tiles). Which one, and the tile, is the tuner's choice per shape
(``kernels.tuner.WGMMA_SPACE``, in the large buckets up to ``WGMMA_MAX_M``); dequantize + cuBLAS stays the fallback.

Gluon is Triton's layout-explicit dialect; it has no CPU interpreter, so this kernel is checked on GPUs only
(``tests/test_kernels_gpu.py``); it is imported only where a tuned entry names it.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .launch import DirectLauncher
from .triton_w4a16 import dequant_ptx

__all__ = ["BLOCK_N", "TILES", "supports", "wgmma_w4a16"]

BLOCK_N = 128
"""Weight rows per program (two warpgroups of 64): N must be a multiple."""
TILES = {(128, 128, 3, True), (128, 128, 4, True), (256, 128, 3, True), (128, 64, 4, False), (128, 128, 3, False)}
"""The ``(block_m, block_k, stages, pipe)`` tiles checked on GPUs (64-token tiles computed wrong results on an H100
and are refused; 64-column K tiles serialize the pipelined loop's MMAs, so they run unpipelined only)."""
_WARPS = 8

# One word shifted right by 8c -> the pair (nibble 0, nibble 1) times the scale pair $3, as two 16-bit floats: nibble 0
# and nibble 1 (moved to bit 16) into the two mantissas of MAGIC, the offset removed exactly, one rounding by the scale.
_PAIR_PTX = """{
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
_BF16_PAIR = gl.constexpr(dequant_ptx(_PAIR_PTX, "bf16x2"))
_FP16_PAIR = gl.constexpr(dequant_ptx(_PAIR_PTX, "f16x2"))


@functools.cache
def _layouts(block_m: int, block_k: int) -> tuple:
    """(MMA accumulator, A operand, words ``[BLOCK_N, block_k / 8, 4]``, epilogue) layouts for 8 warps."""
    mma = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[_WARPS, 1], instr_shape=[16, block_m, 16])
    dot = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    # registers: the word index, then the row 8 below; lanes: the quad's c, then rows; warps: 16-row bands
    reg = [[0, 1 << bit, 0] for bit in range((block_k // 8).bit_length() - 1)] + [[8, 0, 0]]
    lane = [[0, 0, 1], [0, 0, 2], [1, 0, 0], [2, 0, 0], [4, 0, 0]]
    warp = [[16, 0, 0], [32, 0, 0], [64, 0, 0]]
    words = gl.DistributedLinearLayout(reg, lane, warp, [], [BLOCK_N, block_k // 8, 4])
    out = gl.BlockedLayout([4, 1], [32, 1], [1, _WARPS], [0, 1])
    return mma, dot, words, out


@gluon.jit
def _dequant_tile(words_smem, sc, shift, PAIR: gl.constexpr, WORDS: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                  dtype: gl.constexpr):  # fmt: skip
    """One ``[BN, BK]`` weight tile from its packed words in shared memory and its scales, in the A fragment's order."""
    words = gl.expand_dims(words_smem.load(gl.SliceLayout(2, WORDS)), 2)
    s16 = sc.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    s2 = gl.expand_dims(gl.expand_dims(s16 | (s16 << 16), 1), 2)
    e0, e1 = gl.inline_asm_elementwise(
        PAIR, "=h,=h,r,r", [words >> shift, s2], dtype=(gl.int16, gl.int16), is_pure=True, pack=1
    )
    return gl.reshape(gl.join(e0, e1), [BN, BK]).to(dtype, bitcast=True)  # k = 8 * word + 2c + {0, 1}


@gluon.jit
def _load_tile(x_desc, w_desc, bars, x_smem, w_smem, m0, n0, kt, STAGES: gl.constexpr, BK: gl.constexpr):
    """TMA the token and word tiles of K tile ``kt`` into its ring slot."""
    slot = kt % STAGES
    mbarrier.expect(bars.index(slot), x_desc.block_type.nbytes + w_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(x_desc, [m0, kt * BK], bars.index(slot), x_smem.index(slot))
    tma.async_copy_global_to_shared(w_desc, [n0, kt * (BK // 8)], bars.index(slot), w_smem.index(slot))


@gluon.jit
def _pipe_step(acc, x_desc, w_desc, bars, x_smem, w_smem, m0, n0, kt, num_k, sc, shift,
               STAGES: gl.constexpr, BK: gl.constexpr, PAIR: gl.constexpr, WORDS: gl.constexpr, DOT: gl.constexpr):  # fmt: skip
    """K tile ``kt`` with one MMA left in flight: dequantize it while tile ``kt - 1``'s MMA runs, issue its MMA, retire
    ``kt - 1``'s, then (both warpgroups past it) refill ``kt - 1``'s slot."""
    BN: gl.constexpr = 128
    stage = kt % STAGES
    mbarrier.wait(bars.index(stage), (kt // STAGES) & 1)
    w = _dequant_tile(w_smem.index(stage), sc, shift, PAIR, WORDS, BN, BK, x_desc.dtype)
    a = gl.convert_layout(w, DOT, assert_trivial=True)
    acc = warpgroup_mma(a, x_smem.index(stage).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(1, deps=[acc])
    gl.thread_barrier()  # the other warpgroup has retired tile kt - 1 too: its slot may be overwritten
    if kt >= 1:
        if kt - 1 + STAGES < num_k:
            _load_tile(x_desc, w_desc, bars, x_smem, w_smem, m0, n0, kt - 1 + STAGES, STAGES, BK)
    return acc


@gluon.jit
def _kernel(
    x_desc, w_desc, s_ptr, b_ptr, y_ptr, M, N, KW, KG, stride_ym,
    BM: gl.constexpr, BK: gl.constexpr, GROUP: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr,
    PAIR: gl.constexpr, MMA: gl.constexpr, DOT: gl.constexpr, WORDS: gl.constexpr, OUT: gl.constexpr,
    PIPE: gl.constexpr,
):  # fmt: skip
    BN: gl.constexpr = 128
    pid_m = gl.program_id(0)  # token tiles fastest: programs in flight share weight rows (read once into L2)
    pid_n = gl.program_id(1)
    n0 = pid_n * BN
    m0 = pid_m * BM
    num_k = (KW * 8) // BK
    # scales: one per row and K tile, loaded two tiles ahead (registers carried through the loop)
    srows = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, WORDS)))
    s_rows = s_ptr + srows * KG
    sc_next = gl.load(s_rows)
    sc_after = gl.load(s_rows + BK // GROUP, mask=(srows * 0 + 1) < num_k, other=0.0)
    quad = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, WORDS)))
    shift = gl.expand_dims(gl.expand_dims(quad, 0), 1) * 8  # [1, 1, 4]: lane c of a quad takes nibbles 2c, 2c+1

    x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BM, BK], x_desc.layout)
    w_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, BK // 8], w_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bars.index(s), count=1)
    acc = gl.zeros([BN, BM], gl.float32, layout=MMA)
    if PIPE:
        # Register A with one MMA in flight, unrolled by two so that a tile's A registers are only redefined after
        # the MMA reading them has retired; every slot is refilled only once both warpgroups have retired its tile.
        # An odd K tile count runs one tile past K: TMA fills it with zeros and its scales load as zeros (a branch
        # for the last tile instead makes ptxas serialize every MMA).
        num_k = (num_k + 1) // 2 * 2
        for s in gl.static_range(STAGES):
            if s < num_k:
                _load_tile(x_desc, w_desc, bars, x_smem, w_smem, m0, n0, s, STAGES, BK)
        for kp in range(num_k // 2):
            kt = 2 * kp
            sc0 = sc_next
            sc1 = sc_after
            sc_next = gl.load(s_rows + ((kt + 2) * BK) // GROUP, mask=(srows * 0 + kt + 2) * BK < KW * 8, other=0.0)
            sc_after = gl.load(s_rows + ((kt + 3) * BK) // GROUP, mask=(srows * 0 + kt + 3) * BK < KW * 8, other=0.0)
            acc = _pipe_step(acc, x_desc, w_desc, bars, x_smem, w_smem, m0, n0, kt, num_k, sc0, shift,
                             STAGES, BK, PAIR, WORDS, DOT)  # fmt: skip
            acc = _pipe_step(acc, x_desc, w_desc, bars, x_smem, w_smem, m0, n0, kt + 1, num_k, sc1, shift,
                             STAGES, BK, PAIR, WORDS, DOT)  # fmt: skip
        acc = warpgroup_mma_wait(0, deps=[acc])
    else:
        for s in gl.static_range(STAGES - 1):
            if s < num_k:
                _load_tile(x_desc, w_desc, bars, x_smem, w_smem, m0, n0, s, STAGES, BK)
        for kt in range(num_k):
            stage = kt % STAGES
            mbarrier.wait(bars.index(stage), (kt // STAGES) & 1)
            sc = sc_next
            sc_next = sc_after
            sc_after = gl.load(s_rows + ((kt + 2) * BK) // GROUP, mask=(srows * 0 + kt + 2) < num_k)
            w = _dequant_tile(w_smem.index(stage), sc, shift, PAIR, WORDS, BN, BK, x_desc.dtype)
            a = gl.convert_layout(w, DOT, assert_trivial=True)
            acc = warpgroup_mma(a, x_smem.index(stage).permute((1, 0)), acc, is_async=True)
            # wgmma reads its A registers while it runs: retire it before the next tile's dequantization (other
            # programs on the SM overlap their dequantization with this MMA)
            acc, a = warpgroup_mma_wait(0, deps=[acc, a])
            refill = kt + STAGES - 1
            if refill < num_k:
                _load_tile(x_desc, w_desc, bars, x_smem, w_smem, m0, n0, refill, STAGES, BK)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(s))
    out = gl.convert_layout(acc, OUT)
    on = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, OUT))
    om = m0 + gl.arange(0, BM, layout=gl.SliceLayout(0, OUT))
    if HAS_BIAS:
        out = out + gl.expand_dims(gl.load(b_ptr + on).to(gl.float32), 1)
    y_ptrs = y_ptr + gl.expand_dims(om, 0) * stride_ym + gl.expand_dims(on, 1)
    gl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=gl.expand_dims(om < M, 0))


_launch = DirectLauncher(_kernel)  # eager prefill calls it per linear: repeat launches skip the JIT's binding


@functools.cache
def _shared_layouts(block_m: int, block_k: int, dtype: torch.dtype) -> tuple:
    """(token tile, word tile) shared-memory layouts, built once per tile and dtype rather than on every launch."""
    gdt = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return (
        gl.NVMMASharedLayout.get_default_for([block_m, block_k], gdt),
        gl.NVMMASharedLayout.get_default_for([BLOCK_N, block_k // 8], gl.int32),
    )


def supports(x2: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group: int, block_k: int = 128) -> bool:
    """Whether :func:`wgmma_w4a16` takes this call: a Hopper GPU, 16-bit activations with scales of the same dtype,
    N a multiple of 128, K of ``block_k``, groups of at least ``block_k`` columns, 16-byte aligned rows."""
    if not (x2.is_cuda and torch.cuda.get_device_capability(x2.device)[0] == 9):
        return False
    n, kw = packed.shape
    k = kw * 8
    return (
        x2.dtype in (torch.float16, torch.bfloat16) and scales.dtype == x2.dtype and x2.dim() == 2
        and x2.stride(-1) == 1 and (x2.stride(0) * 2) % 16 == 0 and x2.data_ptr() % 16 == 0
        and n % BLOCK_N == 0 and k % block_k == 0 and group % block_k == 0 and k % group == 0
        and packed.is_contiguous() and scales.is_contiguous() and packed.data_ptr() % 16 == 0
    )  # fmt: skip


def wgmma_w4a16(
    x2: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    group: int,
    *,
    block_m: int = 128,
    block_k: int = 128,
    stages: int = 4,
    pipe: bool = True,
) -> torch.Tensor:
    """``x2 @ W^T (+ bias)`` for ``x2 [M, K]`` in one launch; callers check :func:`supports` first. The tile must
    be one of :data:`TILES`."""
    if (block_m, block_k, stages, bool(pipe)) not in TILES:
        raise ValueError(
            f"(block_m, block_k, stages, pipe) = {(block_m, block_k, stages, bool(pipe))} is not a checked tile; "
            f"pick one of {sorted(TILES)}"
        )
    m, k = x2.shape
    n = packed.shape[0]
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0:
        return y
    mma, dot, words, out = _layouts(block_m, block_k)
    x_layout, w_layout = _shared_layouts(block_m, block_k, x2.dtype)
    x_desc = TensorDescriptor.from_tensor(x2, [block_m, block_k], x_layout)
    w_desc = TensorDescriptor.from_tensor(packed, [BLOCK_N, block_k // 8], w_layout)
    pair = _BF16_PAIR if x2.dtype == torch.bfloat16 else _FP16_PAIR
    bias = None if bias is None else bias.to(x2.dtype).contiguous()
    grid = (triton.cdiv(m, block_m), n // BLOCK_N)
    _launch(
        grid,
        x_desc, w_desc, scales, bias if bias is not None else y, y, m, n, k // 8, k // group, y.stride(0),
        BM=block_m, BK=block_k, GROUP=group, STAGES=stages, HAS_BIAS=bias is not None, PAIR=pair, MMA=mma, DOT=dot,
        WORDS=words, OUT=out, PIPE=bool(pipe), num_warps=_WARPS,
    )  # fmt: skip
    return y
