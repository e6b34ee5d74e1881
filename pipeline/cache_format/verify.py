"""Checks of a finished cache: its files against the manifest, its attributes against what a run expects."""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.cache_format.manifest import check_row_layout, read_manifest
from pipeline.cache_format.spec import MANIFEST_NAME, REBUILD
from pipeline.errors import require
from pipeline.fsutil import sha256_file


def verify_cache(cache_dir, split=None) -> None:
    """Check every listed shard (of `split`, or all) exists with the listed size and sha256,
    and that each split's rows run contiguously from 0. One PipelineError lists every problem."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    shards = manifest["shards"]
    if split is not None:
        shards = [e for e in shards if e["split"] == split]
        require(shards, f"cache at {cache_dir} has no {split} split: run {REBUILD}")
    check_row_layout(cache_dir / MANIFEST_NAME, shards)
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
