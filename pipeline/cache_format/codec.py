"""The sampled mode's lossless packing: varints of 4-bit groups, and a row's entries <-> its packed bytes.

Layout in spec.py (``packed_ids``, ``packed_counts``); the writer packs with sampled_codes and pack_varints,
the reader unpacks a row with unpack_sampled_row.
"""

from __future__ import annotations

import numpy as np

_GROUP_BITS = 3  # value bits per 4-bit group; the group's top bit says another group of the value follows


def _varint_groups(values: np.ndarray) -> np.ndarray:
    """How many 4-bit groups each non-negative value takes."""
    groups = np.ones(len(values), np.int64)
    rest = values >> _GROUP_BITS
    while rest.any():
        groups += rest > 0
        rest = rest >> _GROUP_BITS
    return groups


def pack_varints(values: np.ndarray) -> np.ndarray:
    """Non-negative ints -> uint8 bytes: each value as 4-bit groups (3 value bits, low first; the top bit is set
    on every group but the value's last), two groups per byte, low nibble first. An odd number of groups is
    padded with a lone continuation group, which unpack_varints ignores."""
    values = np.asarray(values, dtype=np.int64)
    groups = _varint_groups(values)
    total = int(groups.sum())
    first = np.cumsum(groups) - groups
    index = np.arange(total) - np.repeat(first, groups)  # group index inside its value
    nibbles = np.full(total + total % 2, 1 << _GROUP_BITS, np.uint8)
    more = index < np.repeat(groups, groups) - 1
    nibbles[:total] = (np.repeat(values, groups) >> (_GROUP_BITS * index)) & 7 | more << _GROUP_BITS
    return nibbles[0::2] | nibbles[1::2] << 4


def unpack_varints(packed: np.ndarray) -> np.ndarray:
    """The int64 values of pack_varints' bytes, vectorised over the values (the loop runs over group
    positions: as many rounds as the longest value has groups)."""
    nibbles = np.empty(2 * len(packed), np.uint8)
    nibbles[0::2] = packed & 15
    nibbles[1::2] = packed >> 4
    ends = np.flatnonzero(nibbles < 1 << _GROUP_BITS)  # the last group of each value
    if not len(ends):
        return np.zeros(0, np.int64)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    groups = ends - starts + 1
    data = (nibbles & 7).astype(np.int64)
    values = data[starts]
    group = 1
    while True:
        longer = np.flatnonzero(groups > group)
        if not len(longer):
            return values
        values[longer] |= data[starts[longer] + group] << (_GROUP_BITS * group)
        group += 1


def sampled_codes(sample_ids: np.ndarray, sample_counts: np.ndarray, num_distinct: np.ndarray):
    """Entries (ids ascending inside each position, positions in order) -> (id codes, count codes) as
    packed_ids and packed_counts hold them before packing. None when the ids of some position are not
    distinct and ascending (they cannot be stored as gaps)."""
    ids = sample_ids.astype(np.int64)
    counts = sample_counts.astype(np.int64)
    first = np.cumsum(num_distinct.reshape(-1), dtype=np.int64) - num_distinct.reshape(-1)  # first entry of each
    gaps = np.diff(ids, prepend=0)
    gaps[first] = ids[first]
    not_first = np.ones(len(ids), bool)
    not_first[first] = False
    if (gaps[not_first] <= 0).any():
        return None
    repeated = counts > 1
    return gaps << 1 | repeated, counts[repeated] - 2


def unpack_sampled_row(
    packed_ids: np.ndarray, packed_counts: np.ndarray, seq_len: int, num_samples: int, max_distinct: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """One row's packed bytes -> (sample_ids [L, S] int64, sample_counts [L, S] float32), S = max_distinct,
    padded with id 0 and count 0; None when the bytes do not decode to seq_len positions of num_samples draws."""
    codes = unpack_varints(packed_ids)
    repeated = (codes & 1).astype(bool)
    extra = unpack_varints(packed_counts)
    if len(extra) != int(repeated.sum()):
        return None
    counts = np.ones(len(codes), np.int64)
    counts[repeated] = extra + 2
    drawn = np.cumsum(counts)
    ends = np.flatnonzero(drawn % num_samples == 0)  # the last entry of each position
    if len(ends) != seq_len or drawn[-1] != seq_len * num_samples:
        return None
    num_distinct = np.diff(ends, prepend=-1)
    if num_distinct.max() > max_distinct:
        return None
    gaps_sum = np.cumsum(codes >> 1)
    before = np.concatenate([[0], gaps_sum[ends[:-1]]])  # the gap sum up to each position's first entry
    ids = gaps_sum - np.repeat(before, num_distinct)
    filled = np.arange(max_distinct) < num_distinct[:, None]  # [L, S], row-major = entry order
    sample_ids = np.zeros((seq_len, max_distinct), np.int64)
    sample_counts = np.zeros((seq_len, max_distinct), np.float32)
    sample_ids[filled] = ids
    sample_counts[filled] = counts
    return sample_ids, sample_counts
