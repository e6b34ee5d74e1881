"""The data folder read back: its token files, meta.json, and the packed rows every later stage reads.

`python -m pipeline data` (data.py) writes `<data_dir>/train.bin` and `<data_dir>/val.bin` (flat token ids in
meta["dtype"], documents joined with EOS) and, last, `meta.json`. Everything that reads them (cache, batches,
generate, compare, train, finetune, bench) reads them through this module, so the data stage stays a stage and
not a library.

A row is seq_len + 1 consecutive tokens; row i starts at token i * seq_len, so consecutive rows share one token
(the last label of row i is the first input of row i + 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.fsutil import read_json

SPLITS = ("train", "val")  # the data folder's splits, and so the cache's
META_FILE = "meta.json"  # written last by the data stage: its presence marks a complete data folder


def token_file(split: str) -> str:
    """The name of a split's token file: train.bin, val.bin."""
    return f"{split}.bin"


def token_path(data_dir: str | Path, split: str) -> Path:
    """Where a split's token ids live: <data_dir>/<split>.bin."""
    return Path(data_dir) / token_file(split)


def read_meta(data_dir: str | Path) -> dict:
    """The data folder's meta.json; a PipelineError naming `make data` when there is none."""
    path = Path(data_dir) / META_FILE
    if not path.exists():
        raise PipelineError(f"no tokenized corpus in {data_dir} (meta.json missing); run `make data` first")
    return read_json(path)


def token_file_bytes(meta: dict) -> dict[str, int]:
    """{file name: size in bytes} of the token files meta.json describes (train.bin, val.bin)."""
    itemsize = np.dtype(meta["dtype"]).itemsize
    return {token_file(split): meta[f"{split}_tokens"] * itemsize for split in SPLITS}


def load_tokens(data_dir: str | Path, split: str) -> np.memmap:
    """Memory-map a split written by the data stage."""
    meta = read_meta(data_dir)
    return np.memmap(token_path(data_dir, split), dtype=meta["dtype"], mode="r")


def num_rows(num_tokens: int, seq_len: int, max_rows: int | None = None) -> int:
    """Packed rows of seq_len + 1 tokens, consecutive rows sharing one token (row i starts at i*seq_len)."""
    rows = max(0, (num_tokens - 1) // seq_len)
    return min(rows, max_rows) if max_rows else rows


def row_tokens(tokens: np.ndarray, index: int, seq_len: int) -> np.ndarray:
    """Row `index` of a split: tokens[index*seq_len : index*seq_len + seq_len + 1] as int64."""
    start = index * seq_len
    return np.asarray(tokens[start : start + seq_len + 1], dtype=np.int64)


def label_text_bytes(data_dir: str | Path, split: str, seq_len: int, rows: int, tokenizer) -> int:
    """UTF-8 bytes of the text the first `rows` rows are scored on: their label tokens, tokens[1 : rows*seq_len + 1]
    of the split, decoded by the tokenizer that wrote them (special tokens spell no text). The denominator of bits
    per byte; decoded as one run, so only a character cut at the run's two ends can count a byte or two off."""
    tokens = load_tokens(data_dir, split)[1 : rows * seq_len + 1]
    text = tokenizer.decode(np.asarray(tokens), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return len(text.encode("utf-8"))
