"""The packed bit layout of docs/FORMAT.md: round trips and hand-computed words."""

import pytest
import torch

from pyengine.format.packing import pack_codes, unpack_codes


def _as_uint32(t: torch.Tensor) -> list:
    return [int(v) & 0xFFFFFFFF for v in t.flatten().tolist()]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,kp", [(1, 32), (5, 64), (3, 4096), (17, 160)])
def test_round_trip(bits, n, kp, rng):
    codes = torch.randint(0, 1 << bits, (n, kp), generator=rng)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert tuple(packed.shape) == (n, kp * bits // 32)
    assert torch.equal(unpack_codes(packed, bits), codes)
    assert torch.equal(unpack_codes(packed, bits, k=kp - 7), codes[:, : kp - 7])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_word_layout_lowest_bits_first(bits):
    # Code j of a word sits at bits [j*bits, (j+1)*bits): codes 1, 2, 3, ... read from the LSB.
    per_word = 32 // bits
    codes = torch.tensor([[(j % ((1 << bits) - 1)) + 1 for j in range(32)]])
    words = _as_uint32(pack_codes(codes, bits))
    assert len(words) == bits
    for i, word in enumerate(words):
        for j in range(per_word):
            assert (word >> (j * bits)) & ((1 << bits) - 1) == int(codes[0, i * per_word + j])


def test_three_bit_block_is_one_little_endian_bit_string():
    # A block of 32 3-bit codes is the 96-bit string word0 | word1 << 32 | word2 << 64 with code
    # j at bits [3j, 3j + 3); codes 10 and 21 straddle words.
    codes = torch.tensor([[(5 * j + 3) % 8 for j in range(32)]])
    w0, w1, w2 = _as_uint32(pack_codes(codes, 3))
    bit_string = w0 | (w1 << 32) | (w2 << 64)
    expected = sum(int(c) << (3 * j) for j, c in enumerate(codes[0].tolist()))
    assert bit_string == expected
    # code 10: bits 30, 31 of word 0 and bit 0 of word 1
    assert ((w0 >> 30) | ((w1 & 1) << 2)) == int(codes[0, 10])
    # code 21: bit 31 of word 1 and bits 0, 1 of word 2
    assert ((w1 >> 31) | ((w2 & 3) << 1)) == int(codes[0, 21])


def test_top_bit_set_words_survive_int32_storage():
    codes = torch.full((2, 32), 15)
    packed = pack_codes(codes, 4)
    assert _as_uint32(packed) == [0xFFFFFFFF] * 8
    assert torch.equal(unpack_codes(packed, 4), codes)


def test_bad_inputs():
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(1, 32, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_codes(torch.zeros(1, 33, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="multiple of bits"):
        unpack_codes(torch.zeros(1, 4, dtype=torch.int32), 3)


def test_worked_examples_of_the_format_document():
    # docs/FORMAT.md: codes 1..8 pack into 0x87654321, stored as the int32 -2023406815.
    codes = torch.zeros(1, 32, dtype=torch.int64)
    codes[0, :8] = torch.arange(1, 9)
    assert int(pack_codes(codes, 4)[0, 0]) == -2023406815
    # docs/FORMAT.md: a 3-bit block with only code 10 = 5 has word 0 = 0x40000000, word 1 = 1.
    codes = torch.zeros(1, 32, dtype=torch.int64)
    codes[0, 10] = 5
    assert _as_uint32(pack_codes(codes, 3)) == [0x40000000, 0x00000001, 0]
    assert _as_uint32(pack_codes(torch.full((1, 32), 7), 3)) == [0xFFFFFFFF] * 3
