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


def test_packed_state_dict_writes_the_checkpoint_order_once_per_shared_layer_and_loading_restores_memory_order():
    """What ``save_pretrained`` writes (``packed_state_dict``) holds the checkpoint's words under every name a layer is
    saved under (shared layers keep one tensor), QAT layers included; ``words_from_checkpoint`` puts files' words
    back in memory order, and refuses to run after fusion (the fused copies would keep the files' order)."""
    from torch import nn

    from grace_quant.checkpoint import packed_state_dict, words_from_checkpoint
    from grace_quant.fusion import fuse_projections
    from grace_quant.modules import GraceQATLinear, GraceQuantLinear

    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(-8, 8, (8, 64), generator=generator, dtype=torch.int8)
    model = nn.Module()
    model.packed = GraceQuantLinear(64, 8, bias=False, group_size=32)
    model.packed.weight = pack(codes, 4)
    model.alias = model.packed
    model.qat = GraceQATLinear(64, 8, bias=False, group_size=32)
    state = packed_state_dict(model)
    expected = torch.tensor([python_pack_row(row, 4) for row in codes.tolist()], dtype=torch.int32)
    assert torch.equal(state["packed.weight"], expected) and state["alias.weight"] is state["packed.weight"]
    qat_words = model.qat.packed_tensors()["weight"]
    assert torch.equal(state["qat.weight"], to_checkpoint(qat_words, 4))
    model.packed.weight = state["packed.weight"]  # what from_pretrained assigns
    words_from_checkpoint(model)
    assert torch.equal(unpack(model.packed.weight, 4), codes)

    layer = nn.Module()
    layer.q_proj, layer.k_proj, layer.v_proj = (GraceQuantLinear(64, 8, bias=False, group_size=32) for _ in range(3))
    fuse_projections(layer)
    with pytest.raises(RuntimeError, match="before fuse_projections"):
        words_from_checkpoint(layer)
