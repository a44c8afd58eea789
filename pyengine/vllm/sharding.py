"""Tensor-parallel shards of pyengine's stored weights (no vLLM import: tested on its own).

A quantized linear layer W[N, K] is stored as tensors whose first dimension is the output
channel (docs/FORMAT.md):

* packed codes, int32 [N, Kp * p / 32]: ``qweight`` (p = the layer's bits) or a Matryoshka
  parent's bit planes ``plane_hi`` / ``plane_mid`` / ``plane_lo`` (p = 3 / 2 / 3). Codes are
  packed along K in blocks of 32 (BLOCK_CODES): block j holds codes [32 j, 32 j + 32) of a row in
  words [j p, j p + p). Kp is K rounded up to the block and to the group size; codes past K are
  zero padding.
* ``scales`` and ``zeros``, [N, G]: one per group of ``group_size`` consecutive codes of a row
  (G = Kp / group_size), or one per row (group_size -1, G = 1).

A column-parallel shard (vLLM's ColumnParallelLinear, the q/k/v and gate/up shards, a vocabulary
shard of an embedding or head) is a block of whole rows: every tensor is cut along dimension 0.

A row-parallel shard (RowParallelLinear: K split over the ranks) takes inputs [k0, k0 + k_local)
of every row. Cutting packed codes there needs k0 and k_local on block boundaries (whole words)
and, with groups, on group boundaries (whole scales); :func:`check_input_split` refuses any split
that is not, with one line naming the layer and what would work. Per-row scales (group -1) are
kept whole on every rank.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch

from ..matryoshka.weight import PLANE_BITS
from ..format.packing import BLOCK_CODES
from ..format.qweight import padded_in_features

GROUP_FIELDS = ("scales", "zeros")


class ShardingError(ValueError):
    """A layer that cannot be split the way the tensor-parallel layout asks."""


def field_bits(field: str, bits: int) -> Optional[int]:
    """Bits per code of a packed field (``qweight``: the layer's ``bits``), None for a group
    field (scales, zeros)."""
    if field == "qweight":
        return bits
    if field in PLANE_BITS:
        return PLANE_BITS[field]
    if field in GROUP_FIELDS:
        return None
    raise ShardingError(f"unknown stored field {field!r} (expected qweight, plane_hi, plane_mid, "
                        f"plane_lo, scales or zeros)")


def split_unit(group_size: int) -> int:
    """The input count a row-parallel shard must be a multiple of: whole packing blocks and,
    with groups, whole groups."""
    return BLOCK_CODES if group_size == -1 else max(group_size, BLOCK_CODES)


def check_input_split(layer: str, in_features: int, ranks: int, group_size: int) -> int:
    """The inputs per rank of a row-parallel layer; ShardingError (one line) when they do not
    cut its packed codes and groups cleanly.

    Args:
        layer: the layer's name, for the message.
        in_features: K of the whole layer.
        ranks: the tensor-parallel size.
        group_size: the layer's group size (-1: one scale per row).
    """
    if ranks == 1:
        return in_features
    unit = split_unit(group_size)
    per_rank, rest = divmod(in_features, ranks)
    if rest or per_rank % unit:
        fits = [1] + [t for t in range(2, ranks + 1) if in_features % t == 0
                      and (in_features // t) % unit == 0]
        what = (f"whole groups of {group_size} and blocks of {BLOCK_CODES}" if group_size != -1
                else f"whole blocks of {BLOCK_CODES} codes")
        raise ShardingError(
            f"{layer}: its {in_features} inputs split over {ranks} tensor-parallel ranks "
            f"({in_features / ranks:g} per rank) do not cut its packed weight into {what}; "
            f"serve it with a tensor-parallel size in {fits} or quantize it with a smaller "
            f"group size")
    return per_rank


def qkv_rows(shard: str, rank: int, heads_per_rank: int, kv_heads_per_rank: int,
             kv_replicas: int, head_size: int,
             v_head_size: Optional[int] = None) -> Tuple[int, int]:
    """(first row, rows) of the q, k or v projection that tensor-parallel rank ``rank`` holds.

    q is split by heads: rank r holds heads [r h, r h + h). k and v are split by kv heads; with
    fewer kv heads than ranks each kv head is replicated on ``kv_replicas`` consecutive ranks,
    so rank r holds kv heads [(r // kv_replicas) kv, ... + kv).
    """
    if shard == "q":
        size = heads_per_rank * head_size
        return rank * size, size
    if shard not in ("k", "v"):
        raise ShardingError(f"a q/k/v shard is 'q', 'k' or 'v', got {shard!r}")
    size = kv_heads_per_rank * (head_size if shard == "k" or v_head_size is None
                                else v_head_size)
    return (rank // kv_replicas) * size, size


def shard_rows(tensors: Mapping[str, torch.Tensor], start: int, size: int,
               padded_size: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Rows [start, start + size) of every stored tensor of a layer (a column-parallel shard),
    as contiguous copies; with ``padded_size`` (>= size) zero rows are appended up to it (a
    vocabulary shard padded to its partition: zero codes with zero scales and zeros give 0)."""
    out = {}
    for field, tensor in tensors.items():
        if start < 0 or start + size > tensor.shape[0]:
            raise ShardingError(f"rows [{start}, {start + size}) are outside {field}'s "
                                f"{tensor.shape[0]} rows")
        rows = tensor.narrow(0, start, size)
        if padded_size is not None and padded_size > size:
            pad = rows.new_zeros((padded_size - size,) + tuple(rows.shape[1:]))
            rows = torch.cat([rows, pad])
        out[field] = rows.contiguous()
    return out


def shard_inputs(tensors: Mapping[str, torch.Tensor], bits: int, group_size: int,
                 k_start: int, k_size: int) -> Dict[str, torch.Tensor]:
    """Inputs [k_start, k_start + k_size) of every stored tensor of a layer (a row-parallel
    shard), as contiguous copies. ``k_start`` and ``k_size`` must be multiples of
    :func:`split_unit` (``check_input_split`` gives such a k_size); the shard is then a
    complete stored weight of ``k_size`` inputs (no padding: k_size is whole blocks and groups).
    """
    unit = split_unit(group_size)
    if k_start % unit or k_size % unit:
        raise ShardingError(f"inputs [{k_start}, {k_start + k_size}) do not start and end on "
                            f"whole blocks and groups ({unit} codes)")
    out = {}
    for field, tensor in tensors.items():
        p = field_bits(field, bits)
        if p is not None:  # codes: block j of a row is words [j p, j p + p)
            start, size = k_start * p // 32, k_size * p // 32
        elif group_size == -1:  # one scale per row, the same on every rank
            start, size = 0, tensor.shape[1]
        else:
            start, size = k_start // group_size, k_size // group_size
        if start + size > tensor.shape[1]:
            raise ShardingError(f"inputs [{k_start}, {k_start + k_size}) are outside {field}'s "
                                f"{tensor.shape[1]} columns")
        out[field] = tensor.narrow(1, start, size).contiguous()
    return out


def stored_columns(field: str, bits: int, group_size: int, in_features: int) -> int:
    """Columns of a stored field for a weight of ``in_features`` inputs (what
    :func:`shard_inputs` must return for a k_size shard)."""
    kp = padded_in_features(in_features, group_size)
    p = field_bits(field, bits)
    if p is not None:
        return kp * p // 32
    return 1 if group_size == -1 else kp // group_size
