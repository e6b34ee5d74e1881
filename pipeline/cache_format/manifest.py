"""The manifest, ``cache_dir/manifest.json``: the cache's common attributes, its shards and per-split totals
(layout in spec.py). Written once every shard is assembled; its presence means the cache is complete."""

from __future__ import annotations

from pathlib import Path

from pipeline.cache_format.spec import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    PER_SHARD_ATTRS,
    PER_SPLIT_ATTRS,
    REBUILD,
    plain_attr,
)
from pipeline.errors import PipelineError, require
from pipeline.fsutil import atomic_write_json, read_json

_MANIFEST_SECTIONS = ("shards", "splits")
_ENTRY_KEYS = ("file", "split", "shard_index", "num_shards", "row_start", "rows", "bytes", "sha256")


def check_row_layout(where, entries: list[dict]) -> None:
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
    attrs = {k: plain_attr(v, k) for k, v in common_attrs.items() if k not in PER_SHARD_ATTRS + PER_SPLIT_ATTRS}
    attrs["format_version"] = FORMAT_VERSION
    require("seq_len" in attrs, "write_manifest needs seq_len in common_attrs")
    clashes = [k for k in _MANIFEST_SECTIONS if k in attrs]
    require(not clashes, f"common_attrs may not use the manifest's own keys: {', '.join(clashes)}")
    shards = []
    for entry in shard_entries:
        missing = [k for k in _ENTRY_KEYS if k not in entry]
        require(not missing, f"manifest entry {entry.get('file', '?')} lacks {', '.join(missing)}")
        shards.append({k: plain_attr(entry[k], k) for k in _ENTRY_KEYS + ("tokens_sha256",) if k in entry})
    shards.sort(key=lambda e: (e["split"], e["shard_index"]))
    names = [e["file"] for e in shards]
    require(len(set(names)) == len(names), f"write_manifest got a shard twice: {names}")
    check_row_layout(cache_dir / MANIFEST_NAME, shards)
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
