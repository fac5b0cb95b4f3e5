"""Packing is bit-exact and laid out as docs/FORMAT.md (checkpoint) and ``kernels.packing`` (memory) say, checked
against pure-Python bit references."""

import pytest
import torch

from grace_quant.kernels import code_range, from_checkpoint, pack, to_checkpoint, unpack


def python_pack_row(codes: list[int], bits: int, memory: bool = False) -> list[int]:
    """Independent reference. Checkpoint (docs/FORMAT.md): field i of word j holds codes[j*P+i] + 2**(bits-1), least
    significant first. Memory, 4 bits: fields c and c + 4 hold columns 2c and 2c + 1 of the word's eight."""
    per_word, offset = 32 // bits, 1 << (bits - 1)
    words = []
    for start in range(0, len(codes), per_word):
        word = 0
        for column, code in enumerate(codes[start : start + per_word]):
            field = column // 2 + 4 * (column % 2) if memory and bits == 4 else column
            word |= (code + offset) << (field * bits)
        words.append(word - (1 << 32) if word >= 1 << 31 else word)  # as a signed int32
    return words


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_matches_bit_reference_and_round_trips(bits):
    lo, hi = code_range(bits)
    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(lo, hi + 1, (5, 64), generator=generator, dtype=torch.int8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, 64 * bits // 32)
    on_disk = to_checkpoint(packed, bits)
    assert on_disk.dtype == torch.int32 and on_disk.shape == packed.shape
    for row in range(5):
        assert packed[row].tolist() == python_pack_row(codes[row].tolist(), bits, memory=True)
        assert on_disk[row].tolist() == python_pack_row(codes[row].tolist(), bits)
    assert torch.equal(unpack(packed, bits), codes)
    assert torch.equal(from_checkpoint(on_disk, bits), packed)
    if bits == 4:  # the orders differ (so a missed conversion cannot pass unseen)
        assert not torch.equal(on_disk, packed)


def test_checkpoint_order_conversions_are_inverse_bijections_on_every_bit_pattern():
    generator = torch.Generator().manual_seed(0)
    words = torch.randint(-(2**31), 2**31, (3, 257), generator=generator, dtype=torch.int64).to(torch.int32)
    words[0, :3] = torch.tensor([-1, -(2**31), 0x0F0F0F0F], dtype=torch.int32)
    assert torch.equal(from_checkpoint(to_checkpoint(words, 4), 4), words)
    assert torch.equal(to_checkpoint(from_checkpoint(words, 4), 4), words)
    for bits in (4, 8):  # every set bit lands somewhere: the popcount of each word is kept
        moved = to_checkpoint(words, bits)
        popcount = [bin(w & 0xFFFFFFFF).count("1") for w in words.flatten().tolist()]
        assert [bin(w & 0xFFFFFFFF).count("1") for w in moved.flatten().tolist()] == popcount
    with pytest.raises(TypeError, match="int32"):
        to_checkpoint(words.to(torch.int64), 4)


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
