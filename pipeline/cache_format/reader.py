"""Reading a cache: CacheReader (rows of one split through np.memmap views) and read_shard_attrs."""

from __future__ import annotations

import bisect
import operator
from pathlib import Path

import h5py
import numpy as np

from pipeline.cache_format.codec import unpack_sampled_row
from pipeline.cache_format.manifest import check_row_layout, manifest_attrs, read_manifest
from pipeline.cache_format.spec import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MODES,
    PER_SHARD_ATTRS,
    REBUILD,
    SHARD_DATASETS,
    plain_attr,
)
from pipeline.cache_format.verify import verify_cache
from pipeline.errors import PipelineError, require


def _attrs_from_h5(h5_attrs) -> dict:
    return {key: plain_attr(h5_attrs[key], key) for key in h5_attrs}


def _corrupt(path, why: str = "sha256 mismatch") -> PipelineError:
    return PipelineError(f"{path} is truncated or corrupted ({why}): delete it and rerun {REBUILD}")


def read_shard_attrs(path) -> dict:
    """A shard file's attributes as plain Python values; PipelineError naming the file if unreadable."""
    path = Path(path)
    require(path.is_file(), f"cache shard {path} is missing: rerun {REBUILD}")
    try:
        with h5py.File(path, "r") as f:
            return _attrs_from_h5(f.attrs)
    except OSError as exc:
        raise _corrupt(path, f"h5py cannot open it: {exc}") from exc


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
            check_row_layout(self.cache_dir / MANIFEST_NAME, entries)

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
