"""Packing is bit-exact and laid out as docs/FORMAT.md says (checked against a pure-Python bit reference)."""

import pytest
import torch

from grace_quant.kernels import code_range, pack, unpack


def python_pack_row(codes: list[int], bits: int) -> list[int]:
    """Independent reference: field i of word j holds codes[j*P+i] + 2**(bits-1), least significant first."""
    per_word, offset = 32 // bits, 1 << (bits - 1)
    words = []
    for start in range(0, len(codes), per_word):
        word = 0
        for i, code in enumerate(codes[start : start + per_word]):
            word |= (code + offset) << (i * bits)
        words.append(word - (1 << 32) if word >= 1 << 31 else word)  # as a signed int32
    return words


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_matches_bit_reference_and_round_trips(bits):
    lo, hi = code_range(bits)
    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(lo, hi + 1, (5, 64), generator=generator, dtype=torch.int8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, 64 * bits // 32)
    for row in range(5):
        assert packed[row].tolist() == python_pack_row(codes[row].tolist(), bits)
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", [4, 8])
def test_extreme_codes_survive(bits):
    lo, hi = code_range(bits)
    codes = torch.tensor([[lo, hi] * 16], dtype=torch.int8)
    assert torch.equal(unpack(pack(codes, bits), bits), codes)


def test_code_ranges():
    assert code_range(4) == (-8, 7)
    assert code_range(8) == (-128, 127)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="bits must be one of"):
        pack(torch.zeros(1, 8, dtype=torch.int8), 3)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack(torch.zeros(1, 12, dtype=torch.int8), 4)
    with pytest.raises(ValueError, match=r"lie in \[-8, 7\]"):
        pack(torch.full((1, 8), 8, dtype=torch.int8), 4)
    with pytest.raises(TypeError, match="integer codes"):
        pack(torch.zeros(1, 8), 4)
    with pytest.raises(TypeError, match="int32"):
        unpack(torch.zeros(1, 1, dtype=torch.int64), 4)
