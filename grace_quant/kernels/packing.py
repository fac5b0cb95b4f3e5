"""The one packing rule of GRACE's INT4/INT8 words: in memory (:func:`pack` / :func:`unpack`) and in the
checkpoint format v1 (:func:`to_checkpoint` / :func:`from_checkpoint`; see docs/FORMAT.md).

Signed codes ``q`` in ``[-2**(bits-1), 2**(bits-1) - 1]`` are stored offset by ``2**(bits-1)`` as unsigned
``bits``-wide fields, ``32 // bits`` of them per int32 word along the input dimension. In a checkpoint, field ``i``
of word ``j`` holds column ``j*P + i`` (least significant first). In memory, 8-bit words are the same and 4-bit
words hold columns ``8j + 2c`` and ``8j + 2c + 1`` in fields ``c`` and ``c + 4`` (:data:`NIBBLE_COLUMNS`): a pair of
neighbouring columns is one shift and one ``lop3`` away from two 16-bit floats, the pair a tensor-core A fragment
holds (``kernels.gluon_w4a16``). Every in-memory writer and reader (modules, kernels, reference) goes through
:func:`pack` / :func:`unpack`; every file writer and reader converts with :func:`to_checkpoint` /
:func:`from_checkpoint`.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (4, 8)
NIBBLE_COLUMNS = (0, 2, 4, 6, 1, 3, 5, 7)
"""4-bit words in memory: field ``i`` holds column ``8j + NIBBLE_COLUMNS[i]`` of word ``j``'s eight."""


def codes_per_word(bits: int) -> int:
    """How many ``bits``-wide codes one int32 word holds."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return 32 // bits


def code_range(bits: int) -> tuple[int, int]:
    """Smallest and largest signed code: (-8, 7) for 4 bits, (-128, 127) for 8 bits."""
    codes_per_word(bits)
    half = 1 << (bits - 1)
    return -half, half - 1


def group_size_problem(group_size: object, bits: int | None = None, in_features: int | None = None) -> str | None:
    """What makes ``group_size`` invalid, or None: the one validity rule of a group size (callers add context).

    A group size is a positive integer; with ``bits``, a whole number of packed words (a word never straddles two
    groups); with ``in_features``, a divisor of it (groups of consecutive input features cover each row exactly).
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        return f"group_size must be a positive integer, got {group_size!r}"
    if bits is not None and group_size % codes_per_word(bits):
        return (
            f"group_size={group_size} must be a multiple of {codes_per_word(bits)} for {bits}-bit packing "
            "(e.g. 32, 64 or 128)"
        )
    if in_features is not None and in_features % group_size:
        return f"group_size={group_size} does not divide in_features={in_features}"
    return None


def _column_shifts(bits: int, device: torch.device) -> torch.Tensor:
    """Bit offset of each column's field within its word, in memory: ``bits * field``, as int32 on ``device`` (built
    by arithmetic on the device, so readers stay safe under CUDA-graph capture)."""
    column = torch.arange(codes_per_word(bits), device=device, dtype=torch.int32)
    field = column // 2 + 4 * (column % 2) if bits == 4 else column  # NIBBLE_COLUMNS inverted
    return field * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed integer codes ``[..., in]`` into in-memory int32 words ``[..., in * bits / 32]``."""
    per_word = codes_per_word(bits)
    lo, hi = code_range(bits)
    if codes.shape[-1] % per_word:
        raise ValueError(
            f"the last dimension ({codes.shape[-1]}) must be a multiple of {per_word} to pack {bits}-bit codes"
        )
    if codes.is_floating_point():
        raise TypeError(f"pack expects integer codes, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise ValueError(f"codes must lie in [{lo}, {hi}] for {bits} bits")
    unsigned = (codes.to(torch.int64) - lo).reshape(*codes.shape[:-1], -1, per_word)
    words = (unsigned << _column_shifts(bits, codes.device).to(torch.int64)).sum(dim=-1)  # disjoint fields: an or
    # Reinterpret the low 32 bits as a signed int32 (the top field may set the sign bit).
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: in-memory int32 words ``[..., n]`` to signed int8 codes ``[..., n * 32 / bits]``."""
    lo, _ = code_range(bits)
    if words.dtype != torch.int32:
        raise TypeError(f"unpack expects int32 words, got {words.dtype}")
    mask = (1 << bits) - 1
    columns = (words.unsqueeze(-1) >> _column_shifts(bits, words.device)) & mask  # arithmetic shift, then mask
    return (columns + lo).to(torch.int8).reshape(*words.shape[:-1], -1)


def _permuted(words: torch.Tensor, bits: int) -> bool:
    """Whether ``bits``-bit words differ between memory and checkpoint (4 bits; 8-bit words are the same), after
    checking ``bits`` and that ``words`` are int32 (the only dtype packed words have)."""
    codes_per_word(bits)
    if words.dtype != torch.int32:
        raise TypeError(f"expected int32 words, got {words.dtype}")
    return bits == 4


def _compress_nibbles(x: torch.Tensor) -> torch.Tensor:
    """The low nibbles of the 4 bytes of int32 ``x`` (all else zero) -> bits 0-15, in byte order (in place)."""
    x |= x >> 4
    x &= 0x00FF00FF
    x |= x >> 8
    return x.bitwise_and_(0x0000FFFF)


def _spread_nibbles(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_compress_nibbles`: bits 0-15 of int32 ``x`` -> the low nibbles of its 4 bytes (in place)."""
    x |= x << 8
    x &= 0x00FF00FF
    x |= x << 4
    return x.bitwise_and_(0x0F0F0F0F)


def to_checkpoint(words: torch.Tensor, bits: int) -> torch.Tensor:
    """In-memory words -> the checkpoint format's (a new tensor; 8-bit words are the same): the even columns (bits
    0-15 in memory) go to the low nibble of each byte, the odd ones (bits 16-31) to the high nibble."""
    if not _permuted(words, bits):
        return words.clone()
    high = _spread_nibbles((words >> 16).bitwise_and_(0xFFFF)).bitwise_left_shift_(4)
    return _spread_nibbles(words & 0xFFFF).bitwise_or_(high)


def from_checkpoint(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Checkpoint words -> in memory: the inverse of :func:`to_checkpoint`."""
    if not _permuted(words, bits):
        return words.clone()
    odd = _compress_nibbles((words >> 4).bitwise_and_(0x0F0F0F0F)).bitwise_left_shift_(16)
    return _compress_nibbles(words & 0x0F0F0F0F).bitwise_or_(odd)
