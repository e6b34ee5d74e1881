"""Part files: one slice of teacher output as an uncompressed ``.npz`` written atomically, so a killed cache
run resumes from the parts it finished. Their arrays per mode are spec.PART_KEYS."""

from __future__ import annotations

import zipfile

import numpy as np

from pipeline.cache_format.spec import PART_KEYS, REBUILD
from pipeline.errors import PipelineError, require
from pipeline.fsutil import atomic_path

# What reading a broken part file raises (a truncated or overwritten .npz).
_PART_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)


def _unreadable(path, exc: Exception) -> PipelineError:
    return PipelineError(
        f"part file {path} is unreadable ({exc}): delete it and rerun {REBUILD} (it resumes from the remaining parts)"
    )


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
    except _PART_ERRORS as exc:
        raise _unreadable(path, exc) from exc


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
    except _PART_ERRORS as exc:
        raise _unreadable(path, exc) from exc
    return shapes


def part_layout(path, shapes: dict, mode: str, seq_len: int, k: int) -> tuple[int, int]:
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
