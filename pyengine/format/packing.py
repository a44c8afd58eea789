"""Bit packing of quantization codes along K into 32-bit words (docs/FORMAT.md).

Codes are packed in *blocks* of 32 consecutive codes of one row; a block takes exactly ``bits``
32-bit words. Inside a block, code j occupies bits ``[j*bits, (j+1)*bits)`` of the little-endian
bit string ``word0 | word1 << 32 | word2 << 64 | ...``. For 2, 4 and 8 bits no code crosses a
word (word i holds codes ``i*32/bits .. (i+1)*32/bits - 1``, lowest bits first); for 3 bits,
codes 10 and 21 straddle two words. Words are stored as int32 tensors holding the unsigned bit
pattern.
"""

from __future__ import annotations

from typing import Optional

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
BLOCK_CODES = 32  # codes per packing block


def padded_length(k: int, multiple: int = BLOCK_CODES) -> int:
    """Smallest multiple of ``multiple`` that is >= k."""
    return -(-k // multiple) * multiple


def as_int32_bits(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 tensor with the same bit pattern."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _check_rows(bits: int, name: str, rows: torch.Tensor, multiple: int, layout: str) -> None:
    """ValueError unless ``bits`` is one of SUPPORTED_BITS and ``rows`` (called ``name``) is 2-D
    with a last dimension that is a multiple of ``multiple`` (``layout`` describes that shape
    in the message)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if rows.dim() != 2 or rows.shape[1] % multiple:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(rows.shape)}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs integer codes along the last dimension.

    Args:
        codes: integer tensor [N, Kp] with values in [0, 2^bits), Kp a multiple of 32.
        bits: 2, 3, 4 or 8.

    Returns:
        int32 tensor [N, Kp * bits / 32] (the unsigned words' bit patterns).
    """
    _check_rows(bits, "codes", codes, BLOCK_CODES, f"[N, Kp] with Kp a multiple of {BLOCK_CODES}")
    n, kp = codes.shape
    # rows in chunks: the int64 temporaries below take 16 bytes per code
    rows = max(1, _PACK_CHUNK_CODES // kp)
    if n > rows:
        return torch.cat([_pack_rows(codes[r:r + rows], bits) for r in range(0, n, rows)])
    return _pack_rows(codes, bits)


# Codes packed at once by pack_codes (bounds its temporary memory to ~16 bytes per code).
_PACK_CHUNK_CODES = 1 << 21


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    n, kp = codes.shape
    # contiguous first: elementwise results keep a transposed input's strides
    c = codes.contiguous().to(torch.int64).reshape(n, kp // BLOCK_CODES, BLOCK_CODES)
    if bits == 3:
        words = torch.zeros(n, kp // BLOCK_CODES, 3, dtype=torch.int64, device=codes.device)
        for j in range(BLOCK_CODES):
            bit = 3 * j
            w, shift = divmod(bit, 32)
            words[..., w] |= (c[..., j] << shift) & 0xFFFFFFFF
            if shift > 29:  # the code continues in the next word
                words[..., w + 1] |= c[..., j] >> (32 - shift)
        return as_int32_bits(words.reshape(n, -1))
    per_word = 32 // bits
    c = c.reshape(n, kp // per_word, per_word)
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * bits
    words = (c << shifts).sum(dim=-1)  # disjoint bit fields: the sum is a bitwise or
    return as_int32_bits(words)


def unpack_codes(qweight: torch.Tensor, bits: int, k: Optional[int] = None) -> torch.Tensor:
    """Inverse of :func:`pack_codes`.

    Args:
        qweight: int32 tensor [N, W] of packed words, W a multiple of ``bits``.
        bits: 2, 3, 4 or 8.
        k: if given, only the first k codes of each row are returned.

    Returns:
        int64 tensor [N, 32 * W / bits] (or [N, k]) of codes in [0, 2^bits).
    """
    _check_rows(bits, "qweight", qweight, bits, f"[N, W] with W a multiple of bits={bits}")
    n, n_words = qweight.shape
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    if bits == 3:
        w = words.reshape(n, n_words // 3, 3)
        lo = w[..., 0] | (w[..., 1] << 32)   # bits 0..63 of each block (int64 wraps; masked below)
        hi = w[..., 1] | (w[..., 2] << 32)   # bits 32..95
        j = torch.arange(BLOCK_CODES, device=qweight.device, dtype=torch.int64)
        from_lo = j <= 20                    # codes whose 3 bits lie within bits 0..63
        shift = torch.where(from_lo, 3 * j, 3 * j - 32)
        src = torch.where(from_lo, lo.unsqueeze(-1), hi.unsqueeze(-1))
        codes = (src >> shift) & 7
    else:
        per_word = 32 // bits
        shifts = torch.arange(per_word, device=qweight.device, dtype=torch.int64) * bits
        codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    codes = codes.reshape(n, -1)
    return codes if k is None else codes[:, :k]
