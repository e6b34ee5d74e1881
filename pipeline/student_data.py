"""The data stage's second entry point: a cross-tokenizer student's token files, built from a data folder's text.

`prepare_student_data(data_dir, tokenizer)` tokenizes the text every document part of the teacher's data covers
(`<split>.txt`, `<split>.docs`: data.py) with the student's tokenizer, part by part, and writes a data folder of the
same layout (rows.py) in `<data_dir>/student-<hash>/`: the same documents, the same split by bytes, byte ends into
the same text, so the student's positions align with the teacher's (alignment.py). Built once, checked by hash at
every later stage (`check_student_data`). `student_rows_for` is what a training run's student reads: its tokenizer and
rows (the run's data folder with the teacher's tokenizer, its own folder with another), and the two id maps.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import corpora, data
from pipeline.alignment import TokenizerMaps, tokenizer_maps
from pipeline.cache_format import id_dtype_for
from pipeline.config import StudentConfig, TrainConfig
from pipeline.corpora import split_pieces, stream_pieces
from pipeline.data import (
    DATA_FORMAT_VERSION,
    SPLITS,
    atomic_split_files,
    batch_encoder,
    file_hashes,
    require_fast,
    sha256_key,
)
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_write_json, folder_lock, read_json
from pipeline.models import load_tokenizer
from pipeline.rows import (
    ENDS_DTYPE,
    META_FILE,
    data_file_bytes,
    load_document_parts,
    load_tokens,
    read_meta,
    require_offsets,
    text_path,
)
from pipeline.runs import up_to_date
from pipeline.student import student_tokenizer
from pipeline.teacher import tokenizer_hash

REBUILD_TEACHER_DATA = "rerun `make data` (or `python -m pipeline data ... --out-dir DIR`) to rebuild it"


class _FileRange(io.RawIOBase):
    """Bytes [start, end) of an open binary file, as a readable stream (one document part of a split's text)."""

    def __init__(self, file, start: int, end: int):
        super().__init__()
        self.file, self.position, self.end = file, start, end

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        size = min(len(buffer), self.end - self.position)
        if size <= 0:
            return 0
        self.file.seek(self.position)
        block = self.file.read(size)
        buffer[: len(block)] = block
        self.position += len(block)
        return len(block)


def _part_pieces(text_file, start: int, end: int, name: str) -> Iterator[str]:
    """The text of bytes [start, end) of a split's text file in pieces cut at whitespace_cut (a part of any size
    is streamed, never read whole)."""
    if end - start <= corpora.PIECE_CHARS:  # read at call time, like corpora.split_pieces
        text_file.seek(start)
        yield from split_pieces(text_file.read(end - start).decode("utf-8"))
    else:
        yield from stream_pieces(io.BufferedReader(_FileRange(text_file, start, end)), name=name)


@dataclass
class _PartEnd:
    """Marks the end of a document part among the pieces of a student tokenizer batch."""

    byte_end: int  # where the part's text ends in the split's text
    with_eos: bool  # the teacher's tokens of the part ended with its EOS


def _tokenize_parts(data_dir: Path, split: str, teacher_eos: int, tokenizer, dtype: np.dtype, files: dict) -> int:
    """Tokenize the text of every document part of the teacher's split with the student tokenizer into
    files["tokens"], files["ends"] and files["docs"] (open binary files); returns the tokens written.

    Each part is tokenized on its own, in pieces (batched like the data stage), its ends offset into the same
    <split>.txt; the student's EOS (ending at the part's byte end) follows a part whose teacher tokens ended
    with the teacher's EOS."""
    parts = load_document_parts(data_dir, split)
    teacher_tokens = load_tokens(data_dir, split)
    encode = batch_encoder(tokenizer)
    student_eos, id_max = tokenizer.eos_token_id, np.iinfo(dtype).max
    path = text_path(data_dir, split)
    written = position = 0  # tokens written; byte of the split's text the next piece starts at
    pending: list = []  # pieces and _PartEnd marks not yet encoded
    chars = 0

    def flush() -> None:
        nonlocal written, position, chars
        encoded = iter(encode([item for item in pending if isinstance(item, str)]))
        for item in pending:
            if isinstance(item, str):
                ids, ends, text = next(encoded)
                ids = np.asarray(ids, dtype=np.int64)
                if len(ids) and int(ids.max()) > id_max:
                    raise PipelineError(
                        f"token id {int(ids.max())} does not fit {dtype}; this is a bug in the dtype choice"
                    )
                files["tokens"].write(ids.astype(dtype).tobytes())
                files["ends"].write((ends + position).astype(ENDS_DTYPE).tobytes())
                written += len(ids)
                position += len(text)
                continue
            if position != item.byte_end:
                raise PipelineError(f"{path} does not hold the text its document parts name; {REBUILD_TEACHER_DATA}")
            if item.with_eos:
                files["tokens"].write(np.array([student_eos], dtype).tobytes())
                files["ends"].write(np.array([item.byte_end], ENDS_DTYPE).tobytes())
                written += 1
            files["docs"].write(np.array([written, item.byte_end], ENDS_DTYPE).tobytes())
        pending.clear()
        chars = 0

    with open(path, "rb") as text_file:
        token_start = byte_start = 0
        for token_end, byte_end in np.asarray(parts, dtype=np.int64).tolist():
            for piece in _part_pieces(text_file, byte_start, byte_end, str(path)):
                pending.append(piece)
                chars += len(piece)
                if chars >= data.ENCODE_BATCH_CHARS:
                    flush()
            with_eos = token_end > token_start and int(teacher_tokens[token_end - 1]) == teacher_eos
            pending.append(_PartEnd(byte_end, with_eos))
            token_start, byte_start = token_end, byte_end
        flush()
    return written


STUDENT_DIR_PREFIX = "student-"  # + the first 12 hex digits of the student tokenizer's hash
# What a student folder is built from: the teacher's tokens (their EOS), text and document parts.
TEACHER_DATA_KEYS = tuple(sha256_key(split, kind) for split in SPLITS for kind in ("tokens", "text", "docs"))


def student_data_dir(data_dir: str | Path, tokenizer) -> Path:
    """Where prepare_student_data puts a tokenizer's rows by default: <data_dir>/student-<its hash, 12 digits>."""
    return Path(data_dir) / f"{STUDENT_DIR_PREFIX}{tokenizer_hash(tokenizer)[:12]}"


def prepare_student_data(data_dir: str | Path, tokenizer, out_dir: str | Path | None = None) -> Path:
    """Token files of the teacher's data for a student with another tokenizer; returns their folder.

    data_dir: a teacher data folder written with offsets (`python -m pipeline data`).
    tokenizer: the student's fast tokenizer, or a model folder holding one; it must have an EOS token.
    out_dir: default <data_dir>/student-<first 12 hex digits of the tokenizer's hash>.

    Writes the layout of a data folder (rows.py): train.bin / val.bin in the student vocabulary's id dtype, their
    .ends and .docs, and meta.json last, but no text: meta["text_dir"] names data_dir (relative to out_dir), whose
    <split>.txt the ends index, so student and teacher ends compare directly. The same documents and the same
    byte split: every teacher document part is tokenized from its own text, and gets the student's EOS when its
    teacher tokens ended with the teacher's. A no-op when out_dir was built from the same teacher files and
    tokenizer; changed ones rebuild it."""
    data_dir = Path(data_dir)
    teacher_meta = require_offsets(data_dir)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer_name, tokenizer = str(tokenizer), load_tokenizer(tokenizer)
    else:
        tokenizer_name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    require_fast(tokenizer, f"the student tokenizer {tokenizer_name}")
    if tokenizer.eos_token_id is None:
        raise PipelineError(
            f"the student tokenizer {tokenizer_name} has no EOS token, so documents cannot be ended; pass a "
            "tokenizer with an eos_token"
        )
    student_hash = tokenizer_hash(tokenizer)
    out_dir = Path(out_dir) if out_dir is not None else student_data_dir(data_dir, tokenizer)
    inputs = {
        "format_version": DATA_FORMAT_VERSION,
        "teacher_data": {key: teacher_meta[key] for key in TEACHER_DATA_KEYS},
        "tokenizer_hash": student_hash,
    }
    with folder_lock(out_dir, "a student data run"):
        for stale in out_dir.glob(".*.tmp"):  # temp files of a run killed mid-write (atomic_path)
            stale.unlink()
        meta_path = out_dir / META_FILE
        meta = up_to_date(out_dir, META_FILE, {"inputs": inputs}, data_file_bytes)
        if meta is not None:
            print(f"data: {out_dir} is up to date ({meta['train_tokens']} train / {meta['val_tokens']} val tokens)")
            return out_dir
        if meta_path.exists():
            print(f"data: inputs changed, rebuilding {out_dir}")
            meta_path.unlink()

        vocab_size = len(tokenizer)
        dtype = id_dtype_for(vocab_size)
        tokens = {}
        with atomic_split_files(out_dir, ("tokens", "ends", "docs")) as paths:
            for split in SPLITS:
                with contextlib.ExitStack() as opened:
                    files = {
                        kind: opened.enter_context(open(paths[split, kind], "wb"))
                        for kind in ("tokens", "ends", "docs")
                    }
                    tokens[split] = _tokenize_parts(
                        data_dir, split, teacher_meta["eos_token_id"], tokenizer, dtype, files
                    )
            hashes = file_hashes(paths)
        meta = {
            "inputs": inputs,
            "teacher_data_dir": str(data_dir),
            "text_dir": os.path.relpath(data_dir.resolve(), out_dir.resolve()),
            "corpus_name": teacher_meta["corpus_name"],
            "tokenizer_name": tokenizer_name,
            "tokenizer_hash": student_hash,
            "vocab_size": vocab_size,
            "eos_token_id": tokenizer.eos_token_id,
            "dtype": dtype.name,
            "documents": teacher_meta["documents"],
            "train_tokens": tokens["train"],
            "val_tokens": tokens["val"],
            "offsets": True,
            "ends_dtype": ENDS_DTYPE.name,
            **{f"{split}_text_bytes": teacher_meta[f"{split}_text_bytes"] for split in SPLITS},
            **{sha256_key(split, "text"): teacher_meta[sha256_key(split, "text")] for split in SPLITS},
            **hashes,
        }
        atomic_write_json(meta_path, meta)  # written last: its presence marks a complete data folder
    print(
        f"data: wrote {out_dir}: {meta['documents']} documents, {tokens['train']} train / {tokens['val']} val tokens "
        f"({dtype.name}) of the student tokenizer over the text of {data_dir}"
    )
    return out_dir


def check_student_data(student_dir: str | Path, data_dir: str | Path) -> dict:
    """The student data folder's meta.json, once its recorded teacher files match what data_dir's meta.json says
    now; else a one-line PipelineError naming what changed and the rebuild."""
    student_dir = Path(student_dir)
    if not (student_dir / META_FILE).exists():
        raise PipelineError(
            f"no student data in {student_dir} (meta.json missing); build it with "
            f"pipeline.student_data.prepare_student_data({str(data_dir)!r}, TOKENIZER)"
        )
    student_meta = read_json(student_dir / META_FILE)
    teacher_meta = read_meta(data_dir)
    recorded = student_meta["inputs"]["teacher_data"]
    changed = sorted(key for key, value in recorded.items() if teacher_meta.get(key) != value)
    if changed:
        raise PipelineError(
            f"student data {student_dir} was built from other teacher data than {data_dir} holds now "
            f"({', '.join(changed)} differ); rebuild it with pipeline.student_data.prepare_student_data, which reruns "
            "when its inputs change"
        )
    return student_meta


# ---------------------------------------------------------------- what a training run's student reads


@dataclass(frozen=True)
class StudentRows:
    """What the student reads: its tokenizer and the data folder of its rows. With the teacher's tokenizer that is the
    run's --data-dir; with another (cross-tokenizer) a folder of its own built from the data folder's text
    (prepare_student_data), plus the maps between the two tokenizers (alignment.TokenizerMaps: teacher id ->
    student id, the student's embedding rows that start from the teacher's, continuations)."""

    tokenizer: object
    data_dir: str
    meta: dict
    maps: TokenizerMaps | None = None

    @property
    def cross_tokenizer(self) -> bool:
        return self.maps is not None


def student_rows_for(config: TrainConfig, student_config: StudentConfig, meta: dict, accelerator) -> StudentRows:
    """The student's tokenizer and rows; a cross-tokenizer student's folder is built once (main process) and checked
    against the data folder at every later run."""
    tokenizer = student_tokenizer(student_config, config.teacher)
    if tokenizer_hash(tokenizer) == meta["tokenizer_hash"]:
        return StudentRows(tokenizer, config.data_dir, meta)
    if accelerator.is_main_process:
        prepare_student_data(config.data_dir, tokenizer)
    accelerator.wait_for_everyone()
    return built_student_rows(  # built by the main process
        config.data_dir, load_tokenizer(config.teacher), tokenizer, int(meta["vocab_size"]), config.loss.vocab_map
    )


def built_student_rows(
    data_dir: str, teacher_tokenizer, tokenizer, teacher_vocab: int, vocab_map: str = "prefix"
) -> StudentRows:
    """A cross-tokenizer student's rows that prepare_student_data built from data_dir, checked against it (one
    error line naming the rebuild otherwise), with the maps between the two tokenizers (teacher_vocab: the ids the
    cache holds)."""
    student_dir = student_data_dir(data_dir, tokenizer)
    student_meta = check_student_data(student_dir, data_dir)
    maps = tokenizer_maps(teacher_tokenizer, tokenizer, teacher_vocab, vocab_map)
    return StudentRows(tokenizer, str(student_dir), student_meta, maps)


def cross_tokenizer_note(student: StudentRows, student_config: StudentConfig) -> str:
    """The first line's words on a cross-tokenizer student: its tokenizer, and where its embeddings start."""
    if not student.cross_tokenizer:
        return ""
    note = f"; its own tokenizer ({len(student.tokenizer)} tokens, not the teacher's: rows aligned by bytes"
    if not student_config.student and student_config.student_init == "teacher-embeddings":
        shared = int((student.maps.teacher_rows >= 0).sum())
        others = len(student.tokenizer) - shared
        note += f"; {shared} embedding rows start from the teacher's (same bytes), the other {others} random"
    return note + ")"
