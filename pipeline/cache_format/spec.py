"""The cache format itself: what parts, shards and the manifest hold, and the names and dtypes they use.

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

import numpy as np

from pipeline.errors import PipelineError, require

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
# Stored dtypes of the datasets whose dtype does not follow the vocabulary (ids: id_dtype_for).
FIXED_DTYPES = {
    "topk_logprobs": np.dtype("float16"),
    "tail_logprob": np.dtype("float32"),
    "packed_ids": np.dtype("uint8"),
    "packed_counts": np.dtype("uint8"),
    "row_offsets": np.dtype("int64"),
    "teacher_entropy": np.dtype("float16"),
}


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


def plain_attr(value, key: str):
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
