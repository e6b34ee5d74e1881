"""Data stage: a corpus -> flat token files that training memory-maps.

Writes `<out_dir>/train.bin` and `<out_dir>/val.bin` (raw token ids, uint16 when the vocabulary
fits, else uint32; documents joined with EOS) and `meta.json`. The held-out split is the last
`val_fraction` of every document (contiguous ranges). Read them back with `rows.load_tokens(out_dir, split)`
(`np.memmap(path, dtype=meta["dtype"], mode="r")`); rows.py holds every reader of the data folder.

Beside each split's tokens it writes their offsets (meta["offsets"], rows.py describes the files): `<split>.txt`,
the UTF-8 text the split's tokens cover (each document's head in train, its tail in val, cut where the last
train token ends); `<split>.ends`, uint64, the byte in that text where each token ends (from the fast
tokenizer's offset mapping; the EOS joining documents gets the previous token's end); and `<split>.docs`, uint64
(token end, byte end) of each document part. Read them back with `rows.load_ends`, `rows.load_document_parts`
and `rows.text_path`.

A student with another tokenizer is trained on the same text: student_data.py, the stage's second entry point,
tokenizes every document part of a data folder with the student's tokenizer.

The corpora (corpora.py): `shakespeare` (embedded default), `willows`, `text8`, files, folders, data files and
Hugging Face datasets, each a stream of documents in text pieces.

The corpus is a stream: documents are read in pieces, pieces of consecutive documents are tokenized
in batches by the fast tokenizer (over `--num-proc` threads), and both token files are written as the
ids arrive, so memory does not grow with the corpus (TokenSplitWriter holds at most one document's
first DOCUMENT_BUFFER_TOKENS ids, with their ends and text).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm.auto import tqdm

from pipeline.cache_format import id_dtype_for
from pipeline.config import DataConfig, check, to_flags
from pipeline.corpora import Corpus, resolve_corpus
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_path, atomic_write_json, folder_lock, sha256_file
from pipeline.models import load_tokenizer
from pipeline.rows import (
    ENDS_DTYPE,
    META_FILE,
    SPLITS,
    data_file_bytes,
    docs_file,
    ends_file,
    text_file,
    token_file,
)
from pipeline.runs import save_config, up_to_date
from pipeline.teacher import tokenizer_hash

DATA_FORMAT_VERSION = 2  # 2: each split's text, token ends and document parts
ENCODE_BATCH_CHARS = 1 << 22  # characters of consecutive pieces (and documents) per batched tokenizer call
DOCUMENT_BUFFER_TOKENS = 1 << 22  # a longer document is spilled to train.bin and its val tail moved at its end
MOVE_BLOCK_BYTES = 1 << 20  # the val tail of a spilled document is moved in blocks of this size


# ---------------------------------------------------------------- tokenization


def token_byte_ends(text: str, offsets) -> np.ndarray:
    """The byte offset in text's UTF-8 bytes where each token ends (int64 [tokens]), from the fast tokenizer's
    offset mapping of `text` (character spans: a Python str's offsets count code points).

    Characters become bytes through the text's cumulative UTF-8 lengths. A token that ends inside a multi-byte
    character (byte-level BPE gives it the whole character's span, which the next token's span overlaps) takes the
    previous token's end, as a zero-width token (a special token) does (0 for the first): no prefix of the text ends
    where it does, so it must never be the first token to end at a byte (alignment.align_positions). The ends are
    made non-decreasing (tokenizers that trim offsets), so every end falls on a character boundary."""
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if text.isascii():  # one byte a character
        starts, ends = spans[:, 0], spans[:, 1]
    else:
        code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        char_bytes = 1 + (code_points >= 0x80).astype(np.int64) + (code_points >= 0x800) + (code_points >= 0x10000)
        byte_at = np.zeros(len(code_points) + 1, dtype=np.int64)  # byte offset of each character, and of the end
        np.cumsum(char_bytes, out=byte_at[1:])
        starts, ends = byte_at[spans[:, 0]], byte_at[spans[:, 1]]
    spanning = np.flatnonzero(ends > starts)
    spanning_ends = ends[spanning]
    inside_a_character = spanning_ends[:-1] > starts[spanning[1:]]  # the next token starts before this one ends
    spanning_ends[:-1][inside_a_character] = 0  # -> the previous token's end, by the running maximum below
    token_ends = np.zeros(len(spans), dtype=np.int64)
    token_ends[spanning] = spanning_ends
    return np.maximum.accumulate(token_ends) if len(token_ends) else token_ends


class _DocumentEnd:
    """Marks the end of a document among the pieces of a tokenizer batch."""

    __slots__ = ("has_text",)

    def __init__(self, has_text: bool):
        self.has_text = has_text


@dataclass
class OffsetFiles:
    """A split's files beside its token file (rows.py describes them): the text its
    tokens cover, the byte end of each token in that text, and the (token end, byte end) of each document part.
    Train's ends and text files are opened for reading too: a spilled document's val tail is read back."""

    ends: BinaryIO
    text: BinaryIO
    docs: BinaryIO


class TokenSplitWriter:
    """Appends documents to the train and val token files as their ids arrive, never holding the corpus.

    The last `val_fraction` of every document goes to val. A document's ids are kept in memory up to
    `buffer_tokens`; beyond that (text8 is one 100 MB document) they are spilled to the train file, and when
    the document ends its val tail is moved from the end of the train file to the val file and the train file
    is truncated. Either way the files get the bytes of splitting the whole document in memory.
    `max_tokens` caps the tokens kept, cutting the document that reaches it (its val tail is taken after
    the cut), as the data stage always has.

    Each split also gets its text, token ends and document parts (`train_offsets`, `val_offsets`), written
    (spilled, moved) alongside its ids: a document's text is cut between the splits where its last train token
    ends, and a capped document's text where its last kept token ends."""

    def __init__(
        self,
        train_file,
        val_file,
        dtype: np.dtype,
        val_fraction: float,
        max_tokens: int | None,
        buffer_tokens: int,
        train_offsets: OffsetFiles,
        val_offsets: OffsetFiles,
    ):
        self.dtype, self.val_fraction, self.max_tokens = np.dtype(dtype), val_fraction, max_tokens
        self.buffer_tokens = buffer_tokens
        self.train_file, self.val_file = train_file, val_file  # binary files; train's opened for reading too
        self.train_offsets, self.val_offsets = train_offsets, val_offsets
        self.train_tokens = self.val_tokens = self.documents = 0
        self.train_text_bytes = self.val_text_bytes = 0
        self._buffer: list[np.ndarray] = []  # ids of the current document not yet in the train file
        self._buffered = self._spilled = 0  # tokens of the current document in memory / in the train file
        self._reset_text()

    def _reset_text(self) -> None:
        self._ends: list[np.ndarray] = []  # byte ends of the buffered ids, from the document's start
        self._text: list[bytes] = []  # text of the current document not yet in the train text file
        self._document_bytes = 0  # text of the current document so far, buffered and spilled
        self._last_end = 0  # byte end of the current document's last token, from the document's start

    @property
    def full(self) -> bool:
        """True once max_tokens tokens are kept (counting the current document)."""
        return self.max_tokens is not None and self._kept() + self._buffered + self._spilled >= self.max_tokens

    def _kept(self) -> int:
        return self.train_tokens + self.val_tokens

    def add(self, ids, ends, text: bytes) -> None:
        """Append a piece's ids to the current document (beyond max_tokens they are dropped), with its UTF-8 text
        and each id's byte end in it (token_byte_ends)."""
        ids = np.asarray(ids, dtype=np.int64)
        self._append(ids, np.asarray(ends, dtype=np.int64) + self._document_bytes, text)

    def _append(self, ids: np.ndarray, document_ends: np.ndarray, text: bytes) -> None:
        """Append ids with their byte ends from the document's start; a capped piece keeps the text up to the
        end of its last id kept, and once the cap is reached no text is kept."""
        if self.max_tokens is not None:
            room = max(0, self.max_tokens - self._kept() - self._buffered - self._spilled)
            if len(ids) > room or not room:
                ids, document_ends = ids[:room], document_ends[:room]
                text = text[: max(0, int(document_ends[-1]) - self._document_bytes)] if room else b""
        if text:
            self._text.append(text)
            self._document_bytes += len(text)
        if not len(ids):
            return
        if int(ids.max()) > np.iinfo(self.dtype).max:
            raise PipelineError(
                f"token id {int(ids.max())} does not fit {self.dtype}; this is a bug in the dtype choice"
            )
        self._buffer.append(ids.astype(self.dtype))
        self._buffered += len(ids)
        self._ends.append(document_ends)
        self._last_end = int(document_ends[-1])
        if self._buffered > self.buffer_tokens:
            self._spill()

    def _spill(self) -> None:
        """Write the buffered ids (and their ends and text) to the train files."""
        self._write(self.train_file, self._take_buffer())
        ends, text = self._take_text()
        self._write(self.train_offsets.ends, (ends + self.train_text_bytes).astype(ENDS_DTYPE))
        self.train_offsets.text.write(text)
        self._spilled += self._buffered
        self._buffered = 0

    def end_document(self, has_text: bool, eos: int) -> None:
        """Close the current document: appends EOS (ending where the last token ends) and splits it; one without
        text is dropped."""
        if not has_text:  # an empty or whitespace-only document adds nothing
            self.train_file.seek(self.train_tokens * self.dtype.itemsize)
            self.train_file.truncate()
            self.train_offsets.ends.seek(self.train_tokens * ENDS_DTYPE.itemsize)
            self.train_offsets.ends.truncate()
            self.train_offsets.text.seek(self.train_text_bytes)
            self.train_offsets.text.truncate()
            self._buffer, self._buffered, self._spilled = [], 0, 0
            self._reset_text()
            return
        self._append(np.array([eos], dtype=np.int64), np.array([self._last_end], dtype=np.int64), b"")
        length = self._spilled + self._buffered
        if not length:  # max_tokens was reached before this document
            self._reset_text()
            return
        n_val = int(round(length * self.val_fraction))
        cut = length - n_val
        if not self._spilled:
            ids = self._take_buffer()
            self._write(self.train_file, ids[:cut])
            self._write(self.val_file, ids[cut:])
            ends, text = self._take_text()
            cut_byte = int(ends[cut - 1]) if cut else 0  # where the document's train text ends, from its start
            self._write(self.train_offsets.ends, (ends[:cut] + self.train_text_bytes).astype(ENDS_DTYPE))
            self._write(self.val_offsets.ends, (ends[cut:] - cut_byte + self.val_text_bytes).astype(ENDS_DTYPE))
            self.train_offsets.text.write(text[:cut_byte])
            self.val_offsets.text.write(text[cut_byte:])
        else:
            self._spill()
            cut_byte = self._spilled_end(cut)
            text_cut = self.train_text_bytes + cut_byte
            ends_cut = (self.train_tokens + cut) * ENDS_DTYPE.itemsize
            self._move_tail(self.train_offsets.ends, self.val_offsets.ends, ends_cut, self.val_text_bytes - text_cut)
            self._move_tail(self.train_offsets.text, self.val_offsets.text, text_cut)
            self._move_tail(self.train_file, self.val_file, (self.train_tokens + cut) * self.dtype.itemsize)
        self.train_tokens += cut
        self.val_tokens += n_val
        self.documents += 1
        self.train_text_bytes += cut_byte
        self.val_text_bytes += self._document_bytes - cut_byte
        self._write(self.train_offsets.docs, np.array([self.train_tokens, self.train_text_bytes], ENDS_DTYPE))
        self._write(self.val_offsets.docs, np.array([self.val_tokens, self.val_text_bytes], ENDS_DTYPE))
        self._buffered = self._spilled = 0
        self._reset_text()

    def _take_buffer(self) -> np.ndarray:
        ids = np.concatenate(self._buffer) if self._buffer else np.zeros(0, self.dtype)
        self._buffer = []
        return ids

    def _take_text(self) -> tuple[np.ndarray, bytes]:
        """The buffered ids' byte ends (from the document's start) and the buffered text, both then cleared."""
        ends = np.concatenate(self._ends) if self._ends else np.zeros(0, np.int64)
        text = b"".join(self._text)
        self._ends, self._text = [], []
        return ends, text

    def _spilled_end(self, cut: int) -> int:
        """Byte end (from the document's start) of the spilled document's token `cut - 1`, read back from the
        train ends file (0 when cut is 0)."""
        if not cut:
            return 0
        ends = self.train_offsets.ends
        ends.flush()
        ends.seek((self.train_tokens + cut - 1) * ENDS_DTYPE.itemsize)
        return int(np.frombuffer(ends.read(ENDS_DTYPE.itemsize), ENDS_DTYPE)[0]) - self.train_text_bytes

    @staticmethod
    def _write(file, values: np.ndarray) -> None:
        file.write(values.tobytes())

    @staticmethod
    def _move_tail(source, destination, cut: int, shift: int | None = None) -> None:
        """Copy `source` from byte `cut` on to `destination` (block by block), then truncate it at cut. With
        `shift`, the bytes are ends (ENDS_DTYPE) and `shift` is added to each."""
        source.flush()
        block_bytes = max(ENDS_DTYPE.itemsize, MOVE_BLOCK_BYTES - MOVE_BLOCK_BYTES % ENDS_DTYPE.itemsize)
        position = cut
        while True:
            source.seek(position)
            block = source.read(block_bytes)
            if not block:
                break
            position += len(block)
            if shift is not None:
                block = (np.frombuffer(block, ENDS_DTYPE).astype(np.int64) + shift).astype(ENDS_DTYPE).tobytes()
            destination.write(block)
        source.seek(cut)
        source.truncate()


def batch_encoder(tokenizer):
    """pieces -> per piece (ids, byte ends, UTF-8 text), in one batched call of the fast tokenizer (parallel over
    the pieces)."""

    def encode(pieces: list[str]) -> list[tuple[list[int], np.ndarray | None, bytes]]:
        if not pieces:
            return []
        encoded = tokenizer(pieces, add_special_tokens=False, return_attention_mask=False)
        # The call's offset mapping (what return_offsets_mapping=True returns), read piece by piece from its
        # encodings: a whole batch's spans are never held as Python tuples at once.
        return [
            (ids, token_byte_ends(piece, encoding.offsets), piece.encode("utf-8"))
            for piece, ids, encoding in zip(pieces, encoded["input_ids"], encoded.encodings, strict=True)
        ]

    return encode


def tokenize_corpus(corpus: Corpus, tokenizer, writer: TokenSplitWriter) -> None:
    """Tokenize every document of the corpus into `writer`, in corpus order, with its text and token ends.

    Pieces of consecutive documents are encoded together, about ENCODE_BATCH_CHARS characters per call of
    the fast tokenizer (which spreads a batch over its threads), and the next batch is encoded while the
    previous one is written. Once `writer` is full, the rest of the corpus is not read."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise PipelineError("the tokenizer has no EOS token; documents cannot be joined")
    encode = batch_encoder(tokenizer)
    progress = tqdm(desc=f"tokenize {corpus.name}", unit="tok", unit_scale=True)

    def consume(items: list, encoded_future) -> None:
        encoded = iter(encoded_future.result())
        for item in items:
            if isinstance(item, _DocumentEnd):
                writer.end_document(item.has_text, eos)
            else:
                piece_ids, piece_ends, piece_text = next(encoded)
                writer.add(piece_ids, piece_ends, piece_text)
                progress.update(len(piece_ids))  # tokens read (a capped or blank document keeps fewer)

    with ThreadPoolExecutor(max_workers=1) as encoder:
        pending = None  # (items, future) of the batch being encoded
        items: list = []
        chars = 0

        def flush() -> None:
            nonlocal pending, items, chars
            future = encoder.submit(encode, [item for item in items if isinstance(item, str)])
            if pending is not None:
                consume(*pending)
            pending, items, chars = (items, future), [], 0

        for _, pieces in corpus.documents():
            has_text = False
            for piece in pieces:
                if has_text and writer.full:
                    break  # capped: the rest of this document would be dropped
                has_text = has_text or not piece.isspace()
                items.append(piece)
                chars += len(piece)
                if chars >= ENCODE_BATCH_CHARS:
                    flush()
            items.append(_DocumentEnd(has_text))
            if writer.full:
                flush()
                consume(*pending)
                pending = None
                if writer.full:
                    break
        if items:
            flush()
        if pending is not None:
            consume(*pending)
    progress.close()


def require_fast(tokenizer, what: str) -> None:
    """Token offsets come from a fast (Rust) tokenizer's offset mapping."""
    if not getattr(tokenizer, "is_fast", False):
        raise PipelineError(
            f"{what} is a slow (Python) tokenizer, which gives no token offsets; pass a model folder with a "
            "tokenizer.json (a fast tokenizer)"
        )


SPLIT_FILES = {"tokens": token_file, "text": text_file, "ends": ends_file, "docs": docs_file}  # kind -> its name


def sha256_key(split: str, kind: str) -> str:
    """meta.json's key for the sha256 of a split's file of this kind: train_sha256 for train.bin (as before
    offsets), train_text_sha256, train_ends_sha256 and train_docs_sha256 for the others."""
    return f"{split}_sha256" if kind == "tokens" else f"{split}_{kind}_sha256"


@contextlib.contextmanager
def atomic_split_files(out_dir: Path, kinds: tuple[str, ...]) -> Iterator[dict[tuple[str, str], Path]]:
    """Temp paths {(split, kind): path} of these kinds of file of every split, each renamed onto its final name
    when the block succeeds (the token files first); none of them is left behind when it fails."""
    with contextlib.ExitStack() as stack:
        paths = {}
        for kind in sorted(kinds, key=lambda kind: kind == "tokens"):  # entered last, renamed first: the tokens
            for split in SPLITS:
                paths[split, kind] = stack.enter_context(atomic_path(out_dir / SPLIT_FILES[kind](split)))
        yield paths


def file_hashes(paths: dict[tuple[str, str], Path]) -> dict[str, str]:
    """{sha256_key: sha256} of the files of atomic_split_files."""
    return {sha256_key(split, kind): sha256_file(path) for (split, kind), path in paths.items()}


def prepare_data(config: DataConfig) -> dict:
    """Tokenize the corpus into `config.out_dir`; a no-op when the same inputs are already there."""
    check(config)
    out_dir = Path(config.out_dir)
    with folder_lock(out_dir, "a data run"):
        for stale in out_dir.glob(".*.tmp"):  # temp files of a run killed mid-write (atomic_path)
            stale.unlink()
        corpus = resolve_corpus(config)
        if config.num_proc:  # the fast tokenizer's thread pool reads this when it starts (first batch)
            os.environ["RAYON_NUM_THREADS"] = str(config.num_proc)
        tokenizer = load_tokenizer(config.tokenizer)
        require_fast(tokenizer, f"the tokenizer of {config.tokenizer}")
        inputs = {
            "format_version": DATA_FORMAT_VERSION,
            "corpus": config.corpus,
            "corpus_name": corpus.name,
            "corpus_sha256": corpus.source_sha256,
            "tokenizer_hash": tokenizer_hash(tokenizer),
            "val_fraction": config.val_fraction,
            "max_tokens": config.max_tokens,
            "encoding": config.encoding,
        }
        meta_path = out_dir / META_FILE
        meta = up_to_date(out_dir, META_FILE, {"inputs": inputs}, data_file_bytes, touch=True)  # every file, by size
        if meta is not None:
            print(f"data: {out_dir} is up to date ({meta['train_tokens']} train / {meta['val_tokens']} val tokens)")
            return meta
        if meta_path.exists():
            print(f"data: inputs changed, rebuilding {out_dir}")
            meta_path.unlink()  # the old files no longer describe these inputs

        vocab_size = len(tokenizer)
        dtype = id_dtype_for(vocab_size)
        # Every file is written as the corpus is read, to temp names renamed once complete; meta.json, written
        # last, marks the folder finished (a killed run leaves temp files the next run deletes).
        with atomic_split_files(out_dir, tuple(SPLIT_FILES)) as paths:
            with contextlib.ExitStack() as opened:
                files = {key: opened.enter_context(open(path, "wb+")) for key, path in paths.items()}
                offsets = {
                    split: OffsetFiles(files[split, "ends"], files[split, "text"], files[split, "docs"])
                    for split in SPLITS
                }
                writer = TokenSplitWriter(
                    files["train", "tokens"],
                    files["val", "tokens"],
                    dtype,
                    config.val_fraction,
                    config.max_tokens,
                    DOCUMENT_BUFFER_TOKENS,
                    offsets["train"],
                    offsets["val"],
                )
                tokenize_corpus(corpus, tokenizer, writer)
            n_docs, n_train, n_val = writer.documents, writer.train_tokens, writer.val_tokens
            if n_docs == 0:
                raise PipelineError(
                    f"corpus {config.corpus} holds no text (it is empty or only whitespace); pass a non-empty UTF-8 "
                    "text corpus"
                )
            if n_train < 2 or n_val < 2:
                raise PipelineError(
                    f"corpus {config.corpus} holds too little text ({n_train + n_val} tokens after tokenizing); pass "
                    "a bigger UTF-8 text corpus or a larger --val-fraction"
                )
            hashes = file_hashes(paths)
        meta = {
            "inputs": inputs,
            "corpus_name": corpus.name,
            "tokenizer_name": str(config.tokenizer),
            "tokenizer_hash": inputs["tokenizer_hash"],
            "vocab_size": vocab_size,
            "eos_token_id": tokenizer.eos_token_id,
            "dtype": dtype.name,
            "documents": n_docs,
            "train_tokens": n_train,
            "val_tokens": n_val,
            "offsets": True,
            "ends_dtype": ENDS_DTYPE.name,
            "train_text_bytes": writer.train_text_bytes,
            "val_text_bytes": writer.val_text_bytes,
            **hashes,
        }
        save_config(out_dir, "data", to_flags(config))
        atomic_write_json(meta_path, meta)  # written last: its presence marks a complete data folder
    print(
        f"data: wrote {out_dir}: {n_docs} documents, {meta['train_tokens']} train / {meta['val_tokens']} val tokens "
        f"({dtype.name}), with their text and offsets"
    )
    return meta
