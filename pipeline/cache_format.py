"""On-disk format of the teacher-logit cache: parts, shards, manifest, checks and the reader.

The cache stage writes each slice of teacher output as a small uncompressed ``.npz`` *part*
(so a killed run resumes), then concatenates a shard's parts into one HDF5 *shard*. Training
reads shards through ``np.memmap`` views of their contiguous datasets; h5py is used only once,
when the reader opens, to learn where each dataset lives in the file.

A row holds ``L + 1`` token ids (``L = seq_len``). The model input is ``tokens[r, :L]``, and
the teacher data at position ``j`` is its distribution over token ``j + 1`` given tokens
``0..j``.

Datasets in a shard (uncompressed, contiguous, storage allocated when created):

- ``tokens`` ``[rows, L+1]`` id dtype (uint16 when ``vocab_size <= 65536``, else uint32)
- mode ``"topk"``: ``topk_ids`` ``[rows, L, K]`` id dtype, ``topk_logprobs`` ``[rows, L, K]``
  float16, ``tail_logprob`` ``[rows, L]`` float32 (log of the teacher mass outside the K ids)
- mode ``"sampled"``: the distinct ids drawn at each position (ascending) with their counts, packed
  losslessly (format_version 2; version 1 stored 2-byte ids, 1-byte counts and 1-byte entry counts):
  ``packed_ids`` ``[B]`` uint8, per entry ``gap * 2 + (count > 1)`` where ``gap`` is the id minus the
  previous id of its position (the id itself for a position's first entry); ``packed_counts`` ``[C]``
  uint8, ``count - 2`` of every entry drawn more than once; both as varints of 4-bit groups (3 value
  bits, low first, and a bit that says another group follows), two groups per byte, low nibble
  first, each row padded to a whole byte with a lone continuation group. Positions end where the
  running count reaches a multiple of ``num_samples``. ``row_offsets`` ``[rows + 1, 2]`` int64: row
  ``r`` owns bytes ``row_offsets[r, 0]:row_offsets[r+1, 0]`` of packed_ids and
  ``row_offsets[r, 1]:row_offsets[r+1, 1]`` of packed_counts. ``teacher_entropy`` ``[rows, L]`` float16.

File attributes are plain str/int/float values, listed in ``SHARD_ATTR_ORDER``. The manifest
``cache_dir/manifest.json`` holds::

    {"format_version": 2,
     ...the attributes shared by every shard of every split, at the top level (see manifest_attrs)...,
     "shards": [{"file", "split", "shard_index", "num_shards", "row_start", "rows",
                 "bytes", "sha256", "tokens_sha256"}, ...],
     "splits": {"train": {"rows", "tokens", "bytes", "bytes_per_token", "num_shards",
                          "tokens_sha256"}, ...}}
"""

from __future__ import annotations

import bisect
import math
import operator
import zipfile
from pathlib import Path

import h5py
import numpy as np

from pipeline.errors import PipelineError, require
from pipeline.fsutil import atomic_path, atomic_write_json, read_json, reserve_space, sha256_file
from pipeline.rows import SPLITS

FORMAT_VERSION = 2  # 2: the sampled mode's ids and counts are packed (varints of 4-bit groups)
MANIFEST_NAME = "manifest.json"
REBUILD = "make cache-logits (python -m pipeline cache-logits)"
MODES = ("topk", "sampled")

# Attributes of a shard file, in the order they are written (a fixed order keeps bytes identical).
SHARD_ATTR_ORDER = (
    "format_version",
    "mode",
    "split",
    "teacher_name",
    "teacher_hash",
    "tokenizer_hash",
    "vocab_size",
    "seq_len",
    "temperature",
    "k",
    "num_samples",
    "seed",
    "tokens_sha256",
    "shard_index",
    "num_shards",
    "row_start",
    "rows",
    "id_dtype",
    "max_distinct",
)
# Attributes the caller of assemble_shard must give (the rest are filled in).
REQUIRED_ATTRS = tuple(a for a in SHARD_ATTR_ORDER if a not in ("format_version", "rows", "id_dtype", "max_distinct"))
# Attributes that differ between the shards of one split.
PER_SHARD_ATTRS = ("shard_index", "row_start", "rows", "max_distinct")
# Attributes that differ between splits (kept per split in the manifest, not among its common attributes).
PER_SPLIT_ATTRS = ("split", "num_shards", "tokens_sha256")

# Arrays a part file holds, per mode.
PART_KEYS = {
    "topk": ("tokens", "topk_ids", "topk_logprobs", "tail_logprob"),
    "sampled": ("tokens", "sample_ids", "sample_counts", "num_distinct", "teacher_entropy"),
}
# Datasets a shard holds, per mode (sampled: packed from the parts' sample_ids, sample_counts, num_distinct).
SHARD_DATASETS = {
    "topk": ("tokens", "topk_ids", "topk_logprobs", "tail_logprob"),
    "sampled": ("tokens", "packed_ids", "packed_counts", "row_offsets", "teacher_entropy"),
}
_FIXED_DTYPES = {
    "topk_logprobs": np.dtype("float16"),
    "tail_logprob": np.dtype("float32"),
    "packed_ids": np.dtype("uint8"),
    "packed_counts": np.dtype("uint8"),
    "row_offsets": np.dtype("int64"),
    "teacher_entropy": np.dtype("float16"),
}
_ID_ARRAYS = ("tokens", "topk_ids", "sample_ids")
_FLOAT_ARRAYS = ("topk_logprobs", "tail_logprob", "teacher_entropy")


# ----------------------------------------------------------------------------- small helpers


def id_dtype_for(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id below vocab_size: uint16 or uint32."""
    vocab_size = int(vocab_size)
    require(vocab_size >= 1, f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 2**16:
        return np.dtype("uint16")
    require(vocab_size <= 2**32, f"vocab_size {vocab_size} does not fit uint32 token ids (max {2**32})")
    return np.dtype("uint32")


def shard_name(split: str, shard_index: int, num_shards: int) -> str:
    """File name of one shard, e.g. ``train-00000-of-00004.h5``."""
    return f"{split}-{int(shard_index):05d}-of-{int(num_shards):05d}.h5"


def _plain(value, key: str):
    """A str/int/float attribute value as a plain Python value (numpy scalars unwrapped)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, bool):
        value = int(value)
    if not isinstance(value, (str, int, float)):
        raise PipelineError(f"cache attribute {key} must be a str, int or float, got {type(value).__name__} {value!r}")
    return value


def _attrs_from_h5(h5_attrs) -> dict:
    return {key: _plain(h5_attrs[key], key) for key in h5_attrs}


def _ordered_keys(attrs: dict) -> list[str]:
    known = [k for k in SHARD_ATTR_ORDER if k in attrs]
    return known + sorted(k for k in attrs if k not in SHARD_ATTR_ORDER)


def _corrupt(path, why: str = "sha256 mismatch") -> PipelineError:
    return PipelineError(f"{path} is truncated or corrupted ({why}): delete it and rerun {REBUILD}")


# ----------------------------------------------------------------------------- sampled packing

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


# ----------------------------------------------------------------------------- parts


def write_part(path, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays to an uncompressed .npz at path, atomically (temp file + rename)."""
    for name, arr in arrays.items():
        require(
            isinstance(arr, np.ndarray) and arr.dtype != object,
            f"part array {name} must be a numeric numpy array, got {type(arr).__name__}",
        )
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object keeps np.savez from appending ".npz"
        np.savez(f, **arrays)


def read_part(path) -> dict[str, np.ndarray]:
    """All arrays of a part file; PipelineError naming the file when it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise PipelineError(
            f"part file {path} is unreadable ({exc}): delete it and rerun {REBUILD} "
            "(it resumes from the remaining parts)"
        ) from exc


def read_part_shapes(path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} of a part's arrays, read from the .npy headers without loading data."""
    shapes = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                require(member.endswith(".npy"), f"part file {path} holds {member}, not a .npy array")
                with zf.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                shapes[member[: -len(".npy")]] = (tuple(int(n) for n in shape), np.dtype(dtype))
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise PipelineError(
            f"part file {path} is unreadable ({exc}): delete it and rerun {REBUILD} "
            "(it resumes from the remaining parts)"
        ) from exc
    return shapes


# ----------------------------------------------------------------------------- assembly


def _check_shard_attrs(attrs: dict, final_path: Path) -> None:
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    require(not missing, f"assemble_shard for {final_path.name} is missing attributes: {', '.join(missing)}")
    for key in attrs:
        attrs[key] = _plain(attrs[key], key)
    for key in ("vocab_size", "seq_len", "k", "num_samples", "seed", "shard_index", "num_shards", "row_start"):
        require(isinstance(attrs[key], int), f"cache attribute {key} must be an int, got {attrs[key]!r}")
    for key in ("mode", "split", "teacher_name", "teacher_hash", "tokenizer_hash", "tokens_sha256"):
        require(isinstance(attrs[key], str), f"cache attribute {key} must be a str, got {attrs[key]!r}")
    require(
        isinstance(attrs["temperature"], (int, float)) and attrs["temperature"] > 0,
        f"cache attribute temperature must be a positive number, got {attrs['temperature']!r}",
    )
    attrs["temperature"] = float(attrs["temperature"])
    mode = attrs["mode"]
    require(mode in MODES, f"cache mode must be one of {MODES}, got {mode!r}")
    require(attrs["split"] in SPLITS, f"cache split must be one of {SPLITS}, got {attrs['split']!r}")
    attrs.setdefault("format_version", FORMAT_VERSION)
    require(
        attrs["format_version"] == FORMAT_VERSION,
        f"assemble_shard writes format_version {FORMAT_VERSION}, attrs say {attrs['format_version']}",
    )
    if mode == "topk":
        require(
            attrs["k"] >= 1 and attrs["num_samples"] == 0,
            f"topk cache needs k >= 1 and num_samples 0, got k={attrs['k']} num_samples={attrs['num_samples']}",
        )
    else:
        require(
            attrs["num_samples"] >= 1 and attrs["k"] == 0,
            f"sampled cache needs num_samples >= 1 and k 0, got k={attrs['k']} num_samples={attrs['num_samples']}",
        )
    require(attrs["seq_len"] >= 1, f"seq_len must be positive, got {attrs['seq_len']}")
    require(
        0 <= attrs["shard_index"] < attrs["num_shards"],
        f"shard_index {attrs['shard_index']} is outside 0..num_shards-1 (num_shards={attrs['num_shards']})",
    )
    require(attrs["row_start"] >= 0, f"row_start must be >= 0, got {attrs['row_start']}")
    expected_name = shard_name(attrs["split"], attrs["shard_index"], attrs["num_shards"])
    require(
        final_path.name == expected_name,
        f"shard file {final_path} should be named {expected_name} to match its attributes",
    )
    id_dtype = id_dtype_for(attrs["vocab_size"]).name
    require(
        attrs.setdefault("id_dtype", id_dtype) == id_dtype,
        f"id_dtype {attrs['id_dtype']!r} does not match vocab_size {attrs['vocab_size']} (needs {id_dtype})",
    )


def _part_layout(path, shapes: dict, mode: str, seq_len: int, k: int) -> tuple[int, int]:
    """Check one part's array names and shapes; return (rows, entries). entries is 0 in topk mode."""
    names = set(shapes)
    expected = set(PART_KEYS[mode])
    require(
        names == expected,
        f"part file {path} holds {sorted(names)}, a {mode} part needs {sorted(expected)}: "
        f"delete it and rerun {REBUILD}",
    )
    rows = shapes["tokens"][0][0] if len(shapes["tokens"][0]) == 2 else -1
    want = {"tokens": (rows, seq_len + 1)}
    entries = 0
    if mode == "topk":
        want.update(topk_ids=(rows, seq_len, k), topk_logprobs=(rows, seq_len, k), tail_logprob=(rows, seq_len))
    else:
        entries = shapes["sample_ids"][0][0] if len(shapes["sample_ids"][0]) == 1 else -1
        want.update(
            sample_ids=(entries,),
            sample_counts=(entries,),
            num_distinct=(rows, seq_len),
            teacher_entropy=(rows, seq_len),
        )
    for name, shape in want.items():
        require(
            shapes[name][0] == shape and min(shape) >= 0,
            f"part file {path}: {name} has shape {shapes[name][0]}, expected {shape} "
            f"(seq_len={seq_len}{f', k={k}' if mode == 'topk' else ''}): delete it and rerun {REBUILD}",
        )
    return rows, entries


def _as_ids(path, name: str, arr: np.ndarray, vocab_size: int, id_dtype: np.dtype) -> np.ndarray:
    """arr cast to id_dtype after checking every value is a valid id (never wraps around)."""
    require(arr.dtype.kind in "ui", f"part file {path}: {name} has dtype {arr.dtype}, token ids must be integers")
    if arr.size:
        low, high = int(arr.min()), int(arr.max())
        require(
            low >= 0 and high < vocab_size,
            f"part file {path}: {name} holds id {low if low < 0 else high}, outside the vocabulary "
            f"[0, {vocab_size}) stored as {id_dtype.name}: the teacher and cache settings disagree; "
            f"check vocab_size and rerun {REBUILD}",
        )
    return arr.astype(id_dtype, copy=False)


def _as_small_counts(path, name: str, arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Positive integer counts cast to dtype after checking they fit."""
    require(arr.dtype.kind in "ui", f"part file {path}: {name} has dtype {arr.dtype}, expected integers")
    if arr.size:
        low, high = int(arr.min()), int(arr.max())
        top = int(np.iinfo(dtype).max)
        require(
            low >= 1 and high <= top,
            f"part file {path}: {name} holds {low if low < 1 else high}, expected 1..{top}: "
            f"delete it and rerun {REBUILD}",
        )
    return arr.astype(dtype, copy=False)


def _as_floats(path, name: str, arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Floats cast to dtype after checking there is no NaN and no finite value overflows."""
    require(arr.dtype.kind == "f", f"part file {path}: {name} has dtype {arr.dtype}, expected floats")
    out = arr.astype(dtype, copy=False)
    require(not np.isnan(arr).any(), f"part file {path}: {name} holds NaN: delete it and rerun {REBUILD}")
    require(
        np.array_equal(np.isinf(arr), np.isinf(out)),
        f"part file {path}: {name} holds values that overflow {dtype.name}: delete it and rerun {REBUILD}",
    )
    return out


def _check_sampled_counts(path, num_distinct: np.ndarray, counts: np.ndarray, num_samples: int) -> None:
    """Entries match num_distinct, and each position's counts add up to num_samples."""
    require(
        int(num_distinct.sum()) == counts.shape[0],
        f"part file {path}: num_distinct sums to {int(num_distinct.sum())} but there are "
        f"{counts.shape[0]} sample entries: delete it and rerun {REBUILD}",
    )
    if counts.size:
        starts = np.concatenate([[0], np.cumsum(num_distinct.reshape(-1), dtype=np.int64)[:-1]])
        per_position = np.add.reduceat(counts.astype(np.int64), starts)
        require(
            bool((per_position == num_samples).all()),
            f"part file {path}: sample counts at some position do not add up to num_samples={num_samples}: "
            f"delete it and rerun {REBUILD}",
        )


def _new_dataset(f: h5py.File, name: str, shape: tuple, dtype) -> h5py.Dataset:
    """A contiguous, uncompressed dataset whose storage exists now (so get_offset() is not None)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return f.create_dataset(name, shape=shape, dtype=dtype, dcpl=dcpl, track_times=False, fill_time="never")


def _spans(lengths: np.ndarray) -> list[tuple[int, int]]:
    """[(start, stop)] of consecutive slices of these lengths."""
    stops = np.cumsum(lengths, dtype=np.int64)
    return list(zip((stops - lengths).tolist(), stops.tolist()))


def _packed_sampled_part(path, part: dict, vocab_size: int, id_dtype: np.dtype, num_samples: int):
    """A sampled part's arrays, checked, -> ([packed_ids bytes per row], [packed_counts bytes per row],
    num_distinct as uint8)."""
    num_distinct = _as_small_counts(path, "num_distinct", part["num_distinct"], np.dtype("uint8"))
    counts = _as_small_counts(path, "sample_counts", part["sample_counts"], np.dtype("uint8"))
    _check_sampled_counts(path, num_distinct, counts, num_samples)
    ids = _as_ids(path, "sample_ids", part["sample_ids"], vocab_size, id_dtype)
    codes = sampled_codes(ids, counts, num_distinct)
    require(
        codes is not None,
        f"part file {path}: the sample ids of some position are not distinct and ascending: delete it and rerun "
        f"{REBUILD}",
    )
    id_codes, count_codes = codes
    entries_per_row = num_distinct.sum(axis=1, dtype=np.int64)
    row_of_entry = np.repeat(np.arange(len(num_distinct)), entries_per_row)
    repeats_per_row = np.bincount(row_of_entry[counts > 1], minlength=len(num_distinct))
    packed_ids = [pack_varints(id_codes[a:b]) for a, b in _spans(entries_per_row)]
    packed_counts = [pack_varints(count_codes[a:b]) for a, b in _spans(repeats_per_row)]
    return packed_ids, packed_counts, num_distinct


def assemble_shard(final_path, attrs: dict, part_paths: list) -> dict:
    """Concatenate parts, in order, into one shard file at final_path (temp file, fsync, rename).

    attrs must hold REQUIRED_ATTRS; ``format_version``, ``rows``, ``id_dtype`` and
    ``max_distinct`` are filled in place when missing (and checked when given).
    Returns ``{"file", "split", "shard_index", "num_shards", "row_start", "rows", "bytes",
    "sha256", "tokens_sha256"}``: one manifest entry.
    """
    final_path = Path(final_path)
    _check_shard_attrs(attrs, final_path)
    mode, seq_len, k = attrs["mode"], attrs["seq_len"], attrs["k"]
    vocab_size, num_samples = attrs["vocab_size"], attrs["num_samples"]
    id_dtype = np.dtype(attrs["id_dtype"])
    require(len(part_paths) > 0, f"assemble_shard for {final_path.name} got no part files")

    # Pass 1: shapes from the .npy headers; a sampled part is also checked and packed, to learn the packed sizes.
    layouts = [_part_layout(p, read_part_shapes(p), mode, seq_len, k) for p in part_paths]
    rows = sum(r for r, _ in layouts)
    require(rows >= 1, f"the parts of {final_path.name} hold no rows")
    require(
        attrs.setdefault("rows", rows) == rows,
        f"attrs say {final_path.name} has {attrs['rows']} rows but its parts hold {rows}",
    )
    shapes = {"tokens": (rows, seq_len + 1)}
    max_distinct = 0
    if mode == "topk":
        shapes.update(topk_ids=(rows, seq_len, k), topk_logprobs=(rows, seq_len, k), tail_logprob=(rows, seq_len))
    else:
        packed_bytes = np.zeros(2, np.int64)
        for path in part_paths:
            packed_ids, packed_counts, num_distinct = _packed_sampled_part(
                path, read_part(path), vocab_size, id_dtype, num_samples
            )
            packed_bytes += (sum(map(len, packed_ids)), sum(map(len, packed_counts)))
            max_distinct = max(max_distinct, int(num_distinct.max(initial=0)))
        shapes.update(
            packed_ids=(int(packed_bytes[0]),),
            packed_counts=(int(packed_bytes[1]),),
            row_offsets=(rows + 1, 2),
            teacher_entropy=(rows, seq_len),
        )
    require(
        attrs.setdefault("max_distinct", max_distinct) == max_distinct,
        f"attrs say max_distinct={attrs['max_distinct']} for {final_path.name}, the parts give {max_distinct}",
    )

    # Pass 2: copy part by part.
    data_bytes = sum(
        int(np.prod(shapes[name])) * _FIXED_DTYPES.get(name, id_dtype).itemsize for name in SHARD_DATASETS[mode]
    )
    with atomic_path(final_path) as tmp:
        reserve_space(tmp, data_bytes + (64 << 10))  # data + HDF5 metadata (~8 KiB): a full disk fails here, cleanly
        with h5py.File(tmp, "w") as f:
            datasets = {
                name: _new_dataset(f, name, shapes[name], _FIXED_DTYPES.get(name, id_dtype))
                for name in SHARD_DATASETS[mode]
            }
            if mode == "sampled":
                datasets["row_offsets"][0] = (0, 0)
            row, packed_at = 0, np.zeros(2, np.int64)
            for path, (part_rows, part_entries) in zip(part_paths, layouts):
                part = read_part(path)
                actual = {name: (arr.shape, arr.dtype) for name, arr in part.items()}
                require(
                    _part_layout(path, actual, mode, seq_len, k) == (part_rows, part_entries),
                    f"part file {path} changed while the shard was assembled: rerun {REBUILD}",
                )
                stop = row + part_rows
                datasets["tokens"][row:stop] = _as_ids(path, "tokens", part["tokens"], vocab_size, id_dtype)
                if mode == "topk":
                    datasets["topk_ids"][row:stop] = _as_ids(path, "topk_ids", part["topk_ids"], vocab_size, id_dtype)
                    for name in ("topk_logprobs", "tail_logprob"):
                        datasets[name][row:stop] = _as_floats(path, name, part[name], _FIXED_DTYPES[name])
                else:
                    packed_ids, packed_counts, _ = _packed_sampled_part(path, part, vocab_size, id_dtype, num_samples)
                    sizes = np.array([[len(a), len(b)] for a, b in zip(packed_ids, packed_counts)], np.int64)
                    ends = packed_at + np.cumsum(sizes.reshape(-1, 2), axis=0)  # [part rows, 2]
                    part_end = ends[-1] if part_rows else packed_at
                    require(
                        (part_end <= packed_bytes).all(),
                        f"part file {path} changed while the shard was assembled: rerun {REBUILD}",
                    )
                    for index, (name, pieces) in enumerate(
                        (("packed_ids", packed_ids), ("packed_counts", packed_counts))
                    ):
                        if part_end[index] > packed_at[index]:
                            datasets[name][packed_at[index] : part_end[index]] = np.concatenate(pieces)
                    datasets["row_offsets"][row + 1 : stop + 1] = ends
                    packed_at = part_end
                    datasets["teacher_entropy"][row:stop] = _as_floats(
                        path, "teacher_entropy", part["teacher_entropy"], _FIXED_DTYPES["teacher_entropy"]
                    )
                row = stop
                del part
            require(
                mode == "topk" or (packed_at == packed_bytes).all(),
                f"the parts of {final_path.name} changed while the shard was assembled: rerun {REBUILD}",
            )
            for key in _ordered_keys(attrs):
                f.attrs[key] = attrs[key]
    return {
        "file": final_path.name,
        "split": attrs["split"],
        "shard_index": attrs["shard_index"],
        "num_shards": attrs["num_shards"],
        "row_start": attrs["row_start"],
        "rows": rows,
        "bytes": final_path.stat().st_size,
        "sha256": sha256_file(final_path),
        "tokens_sha256": attrs["tokens_sha256"],
    }


def read_shard_attrs(path) -> dict:
    """A shard file's attributes as plain Python values; PipelineError naming the file if unreadable."""
    path = Path(path)
    require(path.is_file(), f"cache shard {path} is missing: rerun {REBUILD}")
    try:
        with h5py.File(path, "r") as f:
            return _attrs_from_h5(f.attrs)
    except OSError as exc:
        raise _corrupt(path, f"h5py cannot open it: {exc}") from exc


# ----------------------------------------------------------------------------- manifest

_MANIFEST_SECTIONS = ("shards", "splits")
_ENTRY_KEYS = ("file", "split", "shard_index", "num_shards", "row_start", "rows", "bytes", "sha256")


def _check_row_layout(where, entries: list[dict]) -> None:
    """Shards of each split are numbered 0..n-1 and their rows run contiguously from 0."""
    by_split: dict[str, list[dict]] = {}
    for entry in entries:
        by_split.setdefault(entry["split"], []).append(entry)
    for split, shards in by_split.items():
        shards = sorted(shards, key=lambda e: e["shard_index"])
        num_shards = {e["num_shards"] for e in shards}
        indexes = [e["shard_index"] for e in shards]
        require(
            len(num_shards) == 1 and indexes == list(range(len(shards))) and num_shards == {len(shards)},
            f"{where}: {split} shards {indexes} (of {sorted(num_shards)}) are incomplete or duplicated: "
            f"rerun {REBUILD}",
        )
        next_row = 0
        for e in shards:
            require(
                e["row_start"] == next_row,
                f"{where}: {e['file']} starts at row {e['row_start']}, expected {next_row} "
                f"(rows have a gap or overlap): rerun {REBUILD}",
            )
            next_row += e["rows"]


def _split_summaries(entries: list[dict], seq_len: int) -> dict:
    summaries = {}
    for split in sorted({e["split"] for e in entries}):
        shards = [e for e in entries if e["split"] == split]
        rows = sum(e["rows"] for e in shards)
        size = sum(e["bytes"] for e in shards)
        tokens_hashes = {e.get("tokens_sha256") for e in shards}
        summaries[split] = {
            "rows": rows,
            "tokens": rows * seq_len,
            "bytes": size,
            "bytes_per_token": size / (rows * seq_len) if rows else 0.0,
            "num_shards": len(shards),
            "tokens_sha256": tokens_hashes.pop() if len(tokens_hashes) == 1 else None,
        }
    return summaries


def write_manifest(cache_dir, common_attrs: dict, shard_entries: list[dict]) -> None:
    """Write cache_dir/manifest.json atomically (layout in the module docstring).

    common_attrs: the shard attributes; per-shard and per-split keys (PER_SHARD_ATTRS,
    PER_SPLIT_ATTRS) are dropped from them. shard_entries: what assemble_shard returned.
    """
    cache_dir = Path(cache_dir)
    attrs = {k: _plain(v, k) for k, v in common_attrs.items() if k not in PER_SHARD_ATTRS + PER_SPLIT_ATTRS}
    attrs["format_version"] = FORMAT_VERSION
    require("seq_len" in attrs, "write_manifest needs seq_len in common_attrs")
    clashes = [k for k in _MANIFEST_SECTIONS if k in attrs]
    require(not clashes, f"common_attrs may not use the manifest's own keys: {', '.join(clashes)}")
    shards = []
    for entry in shard_entries:
        missing = [k for k in _ENTRY_KEYS if k not in entry]
        require(not missing, f"manifest entry {entry.get('file', '?')} lacks {', '.join(missing)}")
        shards.append({k: _plain(entry[k], k) for k in _ENTRY_KEYS + ("tokens_sha256",) if k in entry})
    shards.sort(key=lambda e: (e["split"], e["shard_index"]))
    names = [e["file"] for e in shards]
    require(len(set(names)) == len(names), f"write_manifest got a shard twice: {names}")
    _check_row_layout(cache_dir / MANIFEST_NAME, shards)
    atomic_write_json(
        cache_dir / MANIFEST_NAME,
        {
            **attrs,
            "format_version": FORMAT_VERSION,
            "shards": shards,
            "splits": _split_summaries(shards, int(attrs["seq_len"])),
        },
    )


def manifest_attrs(manifest: dict) -> dict:
    """The common attributes of a manifest: every top-level key except "shards" and "splits"."""
    return {k: v for k, v in manifest.items() if k not in _MANIFEST_SECTIONS}


def read_manifest(cache_dir) -> dict:
    """The parsed manifest.json of cache_dir; PipelineError with the rebuild command if absent or broken."""
    path = Path(cache_dir) / MANIFEST_NAME
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"no cache at {cache_dir} ({path.name} is missing or unreadable): run {REBUILD}") from exc
    require(
        isinstance(manifest, dict) and all(k in manifest for k in ("format_version", "shards", "splits")),
        f"no cache at {cache_dir} ({path.name} is incomplete): run {REBUILD}",
    )
    require(
        manifest["format_version"] == FORMAT_VERSION,
        f"cache at {cache_dir} has format_version {manifest['format_version']}, this code reads "
        f"{FORMAT_VERSION}: delete it and rerun {REBUILD}",
    )
    return manifest


def verify_cache(cache_dir, split=None) -> None:
    """Check every listed shard (of `split`, or all) exists with the listed size and sha256,
    and that each split's rows run contiguously from 0. One PipelineError lists every problem."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    shards = manifest["shards"]
    if split is not None:
        shards = [e for e in shards if e["split"] == split]
        require(shards, f"cache at {cache_dir} has no {split} split: run {REBUILD}")
    _check_row_layout(cache_dir / MANIFEST_NAME, shards)
    problems = []
    for entry in shards:
        path = cache_dir / entry["file"]
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(
                f"{path} is truncated or corrupted (size {path.stat().st_size}, manifest says {entry['bytes']})"
            )
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{path} is truncated or corrupted (sha256 mismatch)")
    require(not problems, "; ".join(problems) + f": delete the broken files and rerun {REBUILD}")


def check_compatible(attrs: dict, expected: dict, where: str = "the logit cache") -> None:
    """Raise one PipelineError listing every key of `expected` whose value differs in `attrs`."""
    mismatches = []
    for key, want in expected.items():
        if key not in attrs:
            mismatches.append(f"{key}: cache has nothing, expected {want!r}")
            continue
        have = attrs[key]
        if isinstance(have, float) or isinstance(want, float):
            same = (
                isinstance(have, (int, float))
                and isinstance(want, (int, float))
                and math.isclose(float(have), float(want), rel_tol=1e-9, abs_tol=1e-12)
            )
        else:
            same = have == want
        if not same:
            mismatches.append(f"{key}: cache has {have!r}, expected {want!r}")
    require(
        not mismatches,
        f"{where} was built with other settings ({'; '.join(mismatches)}): "
        f"rebuild it with {REBUILD} or point the run at a matching cache",
    )


# ----------------------------------------------------------------------------- reader


class _ShardLayout:
    """Where one shard's datasets live: path, first global row, rows, {name: (offset, shape, dtype)}."""

    def __init__(self, path: Path, row_start: int, rows: int, datasets: dict):
        self.path, self.row_start, self.rows, self.datasets = path, row_start, rows, datasets


class CacheReader:
    """Rows of one split of a cache, read through np.memmap views (h5py is used only in __init__).

    ``row(i)`` returns for global row ``i`` (L = seq_len):
    ``tokens`` [L+1] int64, and in topk mode ``topk_ids`` [L,K] int64, ``topk_logprobs`` [L,K]
    float32, ``tail_logprob`` [L] float32; in sampled mode ``sample_ids`` [L,S] int64,
    ``sample_counts`` [L,S] float32 (S = ``max_distinct``, padding is id 0 with count 0) and
    ``teacher_entropy`` [L] float32. Pickles cheaply: memmaps are re-opened in each process.
    """

    def __init__(self, cache_dir, split: str, verify: bool = False):
        self.cache_dir = Path(cache_dir)
        self.split = split
        manifest = read_manifest(self.cache_dir)
        entries = sorted((e for e in manifest["shards"] if e["split"] == split), key=lambda e: e["shard_index"])
        require(entries, f"cache at {self.cache_dir} has no {split} split: run {REBUILD}")
        if verify:
            verify_cache(self.cache_dir, split)
        else:
            _check_row_layout(self.cache_dir / MANIFEST_NAME, entries)

        self._shards: list[_ShardLayout] = []
        common = None
        max_distinct = 0
        for entry in entries:
            path = self.cache_dir / entry["file"]
            attrs, datasets = self._open_shard(path, entry)
            shard_common = {k: v for k, v in attrs.items() if k not in PER_SHARD_ATTRS}
            if common is None:
                common = shard_common
                mismatched = [k for k, v in manifest_attrs(manifest).items() if k in common and common[k] != v]
                require(
                    not mismatched,
                    f"{path} does not match {MANIFEST_NAME} ({', '.join(mismatched)}): the cache "
                    f"mixes different runs; delete {self.cache_dir} and rerun {REBUILD}",
                )
            else:
                mismatched = sorted(k for k in set(common) | set(shard_common) if common.get(k) != shard_common.get(k))
                require(
                    not mismatched,
                    f"{path} disagrees with {entries[0]['file']} on {', '.join(mismatched)}: "
                    f"the cache mixes different runs; delete {self.cache_dir} and rerun {REBUILD}",
                )
            max_distinct = max(max_distinct, attrs["max_distinct"])
            self._shards.append(_ShardLayout(path, entry["row_start"], entry["rows"], datasets))

        self.attrs: dict = common
        self.mode: str = common["mode"]
        self.seq_len: int = common["seq_len"]
        self.vocab_size: int = common["vocab_size"]
        self.k: int = common["k"]
        self.num_samples: int = common["num_samples"]
        self.max_distinct: int = max_distinct if self.mode == "sampled" else 0
        self._row_starts = [s.row_start for s in self._shards]
        self._num_rows = sum(s.rows for s in self._shards)
        self._maps: list[dict[str, np.ndarray]] | None = None

    def _open_shard(self, path: Path, entry: dict) -> tuple[dict, dict]:
        """Read a shard's attributes and dataset layout with h5py, then close it."""
        require(path.is_file(), f"cache shard {path} is missing: rerun {REBUILD}")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise _corrupt(path, f"size {size}, manifest says {entry['bytes']}")
        try:
            with h5py.File(path, "r") as f:
                attrs = _attrs_from_h5(f.attrs)
                require(
                    attrs.get("format_version") == FORMAT_VERSION,
                    f"{path} has format_version {attrs.get('format_version')}, this code reads "
                    f"{FORMAT_VERSION}: delete it and rerun {REBUILD}",
                )
                mode = attrs.get("mode")
                require(mode in MODES, f"{path} has unknown cache mode {mode!r}: delete it and rerun {REBUILD}")
                datasets = {}
                for name in SHARD_DATASETS[mode]:
                    require(name in f, f"{path} lacks dataset {name}: delete it and rerun {REBUILD}")
                    ds = f[name]
                    offset = ds.id.get_offset()
                    nbytes = int(np.prod(ds.shape, dtype=np.int64)) * ds.dtype.itemsize
                    require(
                        ds.chunks is None and ds.compression is None and (offset is not None or nbytes == 0),
                        f"{path}: dataset {name} is not stored contiguously: delete it and rerun {REBUILD}",
                    )
                    if nbytes and offset + nbytes > size:
                        raise _corrupt(path, f"dataset {name} runs past the end of the file")
                    datasets[name] = (offset, tuple(ds.shape), ds.dtype)
        except OSError as exc:
            raise _corrupt(path, f"h5py cannot open it: {exc}") from exc
        for key in ("split", "rows", "row_start", "shard_index", "num_shards"):
            require(
                attrs.get(key) == entry[key],
                f"{path} says {key}={attrs.get(key)!r} but {MANIFEST_NAME} says {entry[key]!r}: "
                f"delete {self.cache_dir} and rerun {REBUILD}",
            )
        return attrs, datasets

    # -- memmaps (built lazily, per process) --

    def _views(self) -> list[dict[str, np.ndarray]]:
        if self._maps is None:
            maps = []
            for shard in self._shards:
                views = {}
                for name, (offset, shape, dtype) in shard.datasets.items():
                    if offset is None:  # zero-size dataset: nothing stored
                        views[name] = np.zeros(shape, dtype)
                        continue
                    try:
                        views[name] = np.memmap(shard.path, dtype=dtype, mode="r", offset=offset, shape=shape)
                    except (OSError, ValueError) as exc:
                        raise _corrupt(shard.path, f"cannot map {name}: {exc}") from exc
                maps.append(views)
            self._maps = maps
        return self._maps

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    def close(self) -> None:
        """Drop the memmaps (they are re-opened on the next read)."""
        self._maps = None

    # -- reads --

    def __len__(self) -> int:
        return self._num_rows

    def _locate(self, index) -> tuple[dict[str, np.ndarray], int]:
        index = operator.index(index)
        if index < 0:
            index += self._num_rows
        if not 0 <= index < self._num_rows:
            raise IndexError(f"row {index} is outside the {self.split} cache ({self._num_rows} rows)")
        shard = bisect.bisect_right(self._row_starts, index) - 1
        return self._views()[shard], index - self._row_starts[shard]

    def tokens(self, index) -> np.ndarray:
        """Token ids of row `index`: [L+1] int64."""
        views, local = self._locate(index)
        return views["tokens"][local].astype(np.int64)

    def row(self, index) -> dict[str, np.ndarray]:
        """Teacher data of global row `index` (shapes in the class docstring)."""
        views, local = self._locate(index)
        out = {"tokens": views["tokens"][local].astype(np.int64)}
        if self.mode == "topk":
            out["topk_ids"] = views["topk_ids"][local].astype(np.int64)
            out["topk_logprobs"] = views["topk_logprobs"][local].astype(np.float32)
            out["tail_logprob"] = views["tail_logprob"][local].astype(np.float32)
            return out
        (ids_start, counts_start), (ids_stop, counts_stop) = views["row_offsets"][local : local + 2].tolist()
        unpacked = unpack_sampled_row(
            views["packed_ids"][ids_start:ids_stop],
            views["packed_counts"][counts_start:counts_stop],
            self.seq_len,
            self.num_samples,
            self.max_distinct,
        )
        if unpacked is None:
            raise _corrupt(self._shard_path_of(index), f"row {index} does not unpack to {self.seq_len} positions")
        out["sample_ids"], out["sample_counts"] = unpacked
        out["teacher_entropy"] = views["teacher_entropy"][local].astype(np.float32)
        return out

    def _shard_path_of(self, index) -> Path:
        index = operator.index(index) % max(self._num_rows, 1)
        return self._shards[bisect.bisect_right(self._row_starts, index) - 1].path

    def __repr__(self) -> str:
        return (
            f"CacheReader({str(self.cache_dir)!r}, split={self.split!r}, mode={self.mode!r}, "
            f"rows={self._num_rows}, shards={len(self._shards)})"
        )
