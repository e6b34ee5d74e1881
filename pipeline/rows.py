"""The data folder read back: its token files, meta.json, and the packed rows every later stage reads.

`python -m pipeline data` (data.py) writes `<data_dir>/train.bin` and `<data_dir>/val.bin` (flat token ids in
meta["dtype"], documents joined with EOS) and, last, `meta.json`. Everything that reads them (cache, batches,
generate, compare, train, finetune, bench) reads them through this module, so the data stage stays a stage and
not a library.

A row is seq_len + 1 consecutive tokens; row i starts at token i * seq_len, so consecutive rows share one token
(the last label of row i is the first input of row i + 1).

Offsets (meta["offsets"], data format 2) tie every token to the text it covers, so that a student with another
tokenizer can be trained on the same text with its positions aligned to the teacher's by bytes. Beside each
`<split>.bin` the data stage writes:

    <split>.txt   the UTF-8 text the split's tokens cover: the split's part of every document, concatenated in
                  token order (train: the head of each document; val: the tail of each). A document is cut
                  where its last train token ends; text between that and its first val token goes to val.
    <split>.ends  meta["ends_dtype"] (uint64), one per token: the byte offset in <split>.txt where the token's text
                  ends. A zero-width token (the EOS joining documents, a special token) gets the previous
                  token's end, so the ends never decrease. Every end falls on a character boundary; a token
                  that ends inside a multi-byte character ends where that character starts.
    <split>.docs  uint64 pairs [documents, 2], one per document part in the split, in order: (token index where
                  the part ends, exclusive; byte offset in <split>.txt where its text ends). Part i holds tokens
                  [docs[i-1, 0], docs[i, 0]) and text [docs[i-1, 1], docs[i, 1]) (from 0 for the first). A part
                  may be empty (a document too short to give both splits a token). It ended with EOS when its
                  last token is meta["eos_token_id"].

A student data folder (data.prepare_student_data) has the same layout for the student's tokenizer, without its own
text: its meta["text_dir"] names the teacher's data folder (relative to it) whose <split>.txt its ends index, so
student and teacher ends compare directly. Folders built before offsets hold only the token files: the stages that
train with the teacher's own tokenizer read those alone (`require_offsets` is for the cross-tokenizer ones).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.fsutil import read_json

SPLITS = ("train", "val")  # the data folder's splits, and so the cache's
META_FILE = "meta.json"  # written last by the data stage: its presence marks a complete data folder
ENDS_DTYPE = np.dtype("uint64")  # <split>.ends and <split>.docs


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


def data_file_bytes(meta: dict) -> dict[str, int]:
    """{file name: size in bytes} of every file meta.json describes: the token files and, with offsets, each
    split's .ends and .docs, and its .txt unless the text lives in another folder (meta["text_dir"])."""
    sizes = token_file_bytes(meta)
    if has_offsets(meta):
        for split in SPLITS:
            sizes[ends_file(split)] = meta[f"{split}_tokens"] * ENDS_DTYPE.itemsize
            sizes[docs_file(split)] = meta["documents"] * 2 * ENDS_DTYPE.itemsize
            if "text_dir" not in meta:
                sizes[text_file(split)] = meta[f"{split}_text_bytes"]
    return sizes


def load_tokens(data_dir: str | Path, split: str) -> np.memmap:
    """Memory-map a split written by the data stage."""
    meta = read_meta(data_dir)
    return np.memmap(token_path(data_dir, split), dtype=meta["dtype"], mode="r")


# ---------------------------------------------------------------- offsets: text, token ends, document parts


def text_file(split: str) -> str:
    """The name of a split's text file: train.txt, val.txt."""
    return f"{split}.txt"


def ends_file(split: str) -> str:
    """The name of a split's token ends file: train.ends, val.ends."""
    return f"{split}.ends"


def docs_file(split: str) -> str:
    """The name of a split's document parts file: train.docs, val.docs."""
    return f"{split}.docs"


def text_dir(data_dir: str | Path) -> Path:
    """The folder holding the text a data folder's ends index: the folder itself, or the one its meta.json names
    as "text_dir" (a student data folder: its teacher's data folder)."""
    data_dir = Path(data_dir)
    meta_path = data_dir / META_FILE
    if meta_path.exists():
        relative = read_json(meta_path).get("text_dir")
        if relative is not None:
            return data_dir / relative
    return data_dir


def text_path(data_dir: str | Path, split: str) -> Path:
    """Where the UTF-8 text of a split's tokens lives: <text_dir(data_dir)>/<split>.txt."""
    return text_dir(data_dir) / text_file(split)


def ends_path(data_dir: str | Path, split: str) -> Path:
    """Where the byte end of each token of a split lives: <data_dir>/<split>.ends."""
    return Path(data_dir) / ends_file(split)


def docs_path(data_dir: str | Path, split: str) -> Path:
    """Where the (token end, byte end) of each document part of a split lives: <data_dir>/<split>.docs."""
    return Path(data_dir) / docs_file(split)


def has_offsets(meta: dict) -> bool:
    """Was the data folder of this meta.json written with offsets (.txt, .ends, .docs beside the tokens)?"""
    return bool(meta.get("offsets"))


def require_offsets(data_dir: str | Path) -> dict:
    """The meta.json of a data folder written with offsets; a one-line PipelineError naming the rebuild for one
    written before them."""
    meta = read_meta(data_dir)
    if not has_offsets(meta):
        raise PipelineError(
            f"{data_dir} was tokenized before token offsets were recorded (no .txt / .ends / .docs); rerun `make data` "
            f"(or `python -m pipeline data ... --out-dir {data_dir}`), which rebuilds it with them; same-tokenizer "
            "runs keep working on it"
        )
    return meta


def _memmap(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only memmap of `shape`; an empty array for an empty file (which mmap refuses)."""
    if not shape[0]:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


def load_ends(data_dir: str | Path, split: str) -> np.memmap:
    """Memory-map a split's token ends (uint64 byte offsets into text_path(data_dir, split), one per token)."""
    meta = require_offsets(data_dir)
    return _memmap(ends_path(data_dir, split), ENDS_DTYPE, (meta[f"{split}_tokens"],))


def load_document_parts(data_dir: str | Path, split: str) -> np.ndarray:
    """Memory-map a split's document parts: uint64 [documents, 2] of (token end, byte end), each exclusive."""
    meta = require_offsets(data_dir)
    return _memmap(docs_path(data_dir, split), ENDS_DTYPE, (meta["documents"], 2))


# ---------------------------------------------------------------- rows


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
