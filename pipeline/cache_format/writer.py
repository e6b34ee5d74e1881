"""Shard assembly: a shard's parts, checked and cast, concatenated into one HDF5 file of contiguous datasets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import h5py
import numpy as np

from pipeline.cache_format.codec import pack_varints, sampled_codes
from pipeline.cache_format.parts import part_layout, read_part, read_part_shapes
from pipeline.cache_format.spec import (
    FIXED_DTYPES,
    FORMAT_VERSION,
    MODES,
    REBUILD,
    REQUIRED_ATTRS,
    SHARD_ATTR_ORDER,
    SHARD_DATASETS,
    id_dtype_for,
    plain_attr,
    shard_name,
)
from pipeline.errors import require
from pipeline.fsutil import atomic_path, reserve_space, sha256_file
from pipeline.rows import SPLITS


def _ordered_keys(attrs: dict) -> list[str]:
    """The order attributes are written in: SHARD_ATTR_ORDER, then any others sorted (same attrs, same bytes)."""
    known = [k for k in SHARD_ATTR_ORDER if k in attrs]
    return known + sorted(k for k in attrs if k not in SHARD_ATTR_ORDER)


def _check_shard_attrs(attrs: dict, final_path: Path) -> None:
    """Check the attributes a caller gives assemble_shard; plain values, float temperature and id_dtype set in place."""
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    require(not missing, f"assemble_shard for {final_path.name} is missing attributes: {', '.join(missing)}")
    for key in attrs:
        attrs[key] = plain_attr(attrs[key], key)
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


def _sampled_sizes(part_paths: list, vocab_size: int, id_dtype: np.dtype, num_samples: int) -> tuple[np.ndarray, int]:
    """Pass 1 of a sampled shard: every part checked and packed -> ([2] bytes of packed_ids and packed_counts,
    max_distinct)."""
    packed_bytes, max_distinct = np.zeros(2, np.int64), 0
    for path in part_paths:
        packed_ids, packed_counts, num_distinct = _packed_sampled_part(
            path, read_part(path), vocab_size, id_dtype, num_samples
        )
        packed_bytes += (sum(map(len, packed_ids)), sum(map(len, packed_counts)))
        max_distinct = max(max_distinct, int(num_distinct.max(initial=0)))
    return packed_bytes, max_distinct


@dataclasses.dataclass
class _Target:
    """The open shard that pass 2 copies parts into, with what the copies check values against."""

    datasets: dict[str, h5py.Dataset]
    vocab_size: int
    id_dtype: np.dtype
    num_samples: int
    packed_bytes: np.ndarray  # [2] sampled: sizes of packed_ids and packed_counts (pass 1); topk: zeros
    packed_at: np.ndarray  # [2] sampled: where the packed bytes copied so far end; topk: zeros


def _copy_topk_part(target: _Target, path, part: dict, start: int, stop: int) -> None:
    """A topk part's ids and log-probs into rows start:stop of the shard."""
    datasets = target.datasets
    datasets["topk_ids"][start:stop] = _as_ids(path, "topk_ids", part["topk_ids"], target.vocab_size, target.id_dtype)
    for name in ("topk_logprobs", "tail_logprob"):
        datasets[name][start:stop] = _as_floats(path, name, part[name], FIXED_DTYPES[name])


def _copy_sampled_part(target: _Target, path, part: dict, start: int, stop: int) -> None:
    """A sampled part packed into the bytes after the previous part's, its rows' offsets into row_offsets[start :
    stop + 1] (the first is where the previous part ended) and its entropies into rows start:stop."""
    datasets = target.datasets
    packed_ids, packed_counts, _ = _packed_sampled_part(
        path, part, target.vocab_size, target.id_dtype, target.num_samples
    )
    sizes = np.array([[len(a), len(b)] for a, b in zip(packed_ids, packed_counts)], np.int64)
    ends = target.packed_at + np.cumsum(sizes.reshape(-1, 2), axis=0)  # [part rows, 2]
    part_end = ends[-1] if stop > start else target.packed_at
    require(
        (part_end <= target.packed_bytes).all(),
        f"part file {path} changed while the shard was assembled: rerun {REBUILD}",
    )
    for index, (name, pieces) in enumerate((("packed_ids", packed_ids), ("packed_counts", packed_counts))):
        if part_end[index] > target.packed_at[index]:
            datasets[name][target.packed_at[index] : part_end[index]] = np.concatenate(pieces)
    datasets["row_offsets"][start : stop + 1] = np.concatenate([target.packed_at[None], ends])
    target.packed_at = part_end
    datasets["teacher_entropy"][start:stop] = _as_floats(
        path, "teacher_entropy", part["teacher_entropy"], FIXED_DTYPES["teacher_entropy"]
    )


# How pass 2 copies one part's arrays other than its tokens, per mode.
_COPY_PART = {"topk": _copy_topk_part, "sampled": _copy_sampled_part}


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
    layouts = [part_layout(p, read_part_shapes(p), mode, seq_len, k) for p in part_paths]
    rows = sum(r for r, _ in layouts)
    require(rows >= 1, f"the parts of {final_path.name} hold no rows")
    require(
        attrs.setdefault("rows", rows) == rows,
        f"attrs say {final_path.name} has {attrs['rows']} rows but its parts hold {rows}",
    )
    shapes = {"tokens": (rows, seq_len + 1)}
    if mode == "topk":
        packed_bytes, max_distinct = np.zeros(2, np.int64), 0
        shapes.update(topk_ids=(rows, seq_len, k), topk_logprobs=(rows, seq_len, k), tail_logprob=(rows, seq_len))
    else:
        packed_bytes, max_distinct = _sampled_sizes(part_paths, vocab_size, id_dtype, num_samples)
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
        int(np.prod(shapes[name])) * FIXED_DTYPES.get(name, id_dtype).itemsize for name in SHARD_DATASETS[mode]
    )
    copy_part = _COPY_PART[mode]
    with atomic_path(final_path) as tmp:
        reserve_space(tmp, data_bytes + (64 << 10))  # data + HDF5 metadata (~8 KiB): a full disk fails here, cleanly
        with h5py.File(tmp, "w") as f:
            datasets = {
                name: _new_dataset(f, name, shapes[name], FIXED_DTYPES.get(name, id_dtype))
                for name in SHARD_DATASETS[mode]
            }
            target = _Target(datasets, vocab_size, id_dtype, num_samples, packed_bytes, np.zeros(2, np.int64))
            row = 0
            for path, (part_rows, part_entries) in zip(part_paths, layouts):
                part = read_part(path)
                actual = {name: (arr.shape, arr.dtype) for name, arr in part.items()}
                require(
                    part_layout(path, actual, mode, seq_len, k) == (part_rows, part_entries),
                    f"part file {path} changed while the shard was assembled: rerun {REBUILD}",
                )
                stop = row + part_rows
                datasets["tokens"][row:stop] = _as_ids(path, "tokens", part["tokens"], vocab_size, id_dtype)
                copy_part(target, path, part, row, stop)
                row = stop
                del part
            require(
                (target.packed_at == target.packed_bytes).all(),
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
