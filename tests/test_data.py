"""Data stage: corpora -> train.bin / val.bin / meta.json.

Issue: "Re-running with the same inputs is a no-op; different inputs never silently reuse old files."
Expected token ids are computed independently here with the tokenizer (one call per document) and
compared with what the stage wrote; the CLI is run as a subprocess for the stage-level behaviour.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_teacher, run_cli, willows_text, written_files
from text8 import write_text8

from pipeline.config import DataConfig
from pipeline.corpora import Corpus, split_pieces, stream_pieces, strip_gutenberg
from pipeline.data import OffsetFiles, TokenSplitWriter, prepare_data, tokenize_corpus
from pipeline.errors import PipelineError
from pipeline.fsutil import sha256_file
from pipeline.rows import load_tokens, read_meta

GUTENBERG_HEADER = (
    "The Project Gutenberg eBook of Test Book\nThis eBook is for the use of anyone anywhere.\n"
    "*** START OF THE PROJECT GUTENBERG EBOOK TEST BOOK ***\n\n\n"
)
GUTENBERG_FOOTER = (
    "\n\n*** END OF THE PROJECT GUTENBERG EBOOK TEST BOOK ***\n"
    "Updated editions will replace the previous one. Project Gutenberg licence text.\n"
)
UNICODE_TEXT = (
    "Съешь же ещё этих мягких французских булок, да выпей чаю.\n"
    "中文测试：你好，世界。我们在这里测试分词器。\n"
    "Emoji: 😀🚀 thumbs 👍🏽 family 👨‍👩‍👧 and flags 🇫🇷.\n"
)


def build(corpus, tokenizer_dir, out_dir, **options) -> dict:
    """The data stage in-process (for fine-grained checks); returns meta.json."""
    return prepare_data(DataConfig(corpus=str(corpus), tokenizer=str(tokenizer_dir), out_dir=str(out_dir), **options))


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def expected_splits(tokenizer, documents: list[str], val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Each document tokenized in one call + EOS; its last round(len * val_fraction) ids go to val."""
    train, val = [], []
    for text in documents:
        ids = encode(tokenizer, text) + [tokenizer.eos_token_id]
        n_val = int(round(len(ids) * val_fraction))
        train += ids[: len(ids) - n_val]
        val += ids[len(ids) - n_val :]
    return np.array(train, dtype=np.int64), np.array(val, dtype=np.int64)


def split_ids(out_dir: Path, split: str) -> np.ndarray:
    return np.asarray(load_tokens(out_dir, split), dtype=np.int64)


def assert_error_line(result, *fragments: str) -> None:
    """Exit code 2, no traceback, exactly one `error:` line on stderr naming every fragment."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def assert_nothing_written(out_dir: Path) -> None:
    for name in ("meta.json", "train.bin", "val.bin"):
        assert not (out_dir / name).exists(), f"{name} was written although the run failed"


# ---------------------------------------------------------------- outputs of each corpus kind


def test_txt_corpus_gives_tokens_of_the_text_joined_with_eos(tiny_data, tiny_corpus, tiny_tokenizer):
    """The session fixture ran `python -m pipeline data --corpus willows-slice.txt --val-fraction 0.1`."""
    meta = read_meta(tiny_data)
    text = tiny_corpus.read_text(encoding="utf-8")
    document = text.strip("\r\n ") + "\n"  # the stage trims the ends of a document to one newline
    train_expected, val_expected = expected_splits(tiny_tokenizer, [document], 0.1)
    train, val = split_ids(tiny_data, "train"), split_ids(tiny_data, "val")
    np.testing.assert_array_equal(train, train_expected)
    np.testing.assert_array_equal(val, val_expected)
    # val is the last ~10% of the document, which ends with EOS; the round trip gives the text back
    assert abs(len(val) / (len(train) + len(val)) - 0.1) < 1e-3
    assert val[-1] == tiny_tokenizer.eos_token_id and tiny_tokenizer.eos_token_id not in train
    assert tiny_tokenizer.decode(np.concatenate([train, val[:-1]])) == document
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(tiny_tokenizer) == 384
    assert (tiny_data / "train.bin").stat().st_size == 2 * len(train)
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val) and meta["documents"] == 1
    assert meta["train_sha256"] == sha256_file(tiny_data / "train.bin")
    assert meta["val_sha256"] == sha256_file(tiny_data / "val.bin")
    assert meta["inputs"]["corpus_sha256"] == sha256_file(tiny_corpus)
    assert meta["eos_token_id"] == tiny_tokenizer.eos_token_id


def test_txt_gz_corpus(tmp_path, tiny_teacher, tiny_tokenizer):
    """(The folder test below runs a .txt.gz through the CLI.)"""
    text = willows_text()[80_000:92_000].strip() + "\n"
    corpus = tmp_path / "slice.txt.gz"
    corpus.write_bytes(gzip.compress(text.encode("utf-8")))
    out = tmp_path / "gz"
    build(corpus, tiny_teacher, out, val_fraction=0.2)
    train_expected, val_expected = expected_splits(tiny_tokenizer, [text], 0.2)
    np.testing.assert_array_equal(split_ids(out, "train"), train_expected)
    np.testing.assert_array_equal(split_ids(out, "val"), val_expected)
    meta = read_meta(out)
    assert meta["corpus_name"] == "slice" and meta["inputs"]["corpus_sha256"] == sha256_file(corpus)
    assert meta["train_sha256"] == sha256_file(out / "train.bin")


def test_folder_of_txt_and_txt_gz_via_cli_strips_gutenberg_and_splits_every_document(
    tmp_path, tiny_teacher, tiny_tokenizer
):
    body_a = "It was a bright cold day in April, and the Rat was rowing.\nThe Mole sat in the stern.\n" * 30
    text_b = willows_text()[95_000:103_000].strip() + "\n"
    folder = tmp_path / "books"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(GUTENBERG_HEADER + body_a + GUTENBERG_FOOTER, encoding="utf-8")
    (folder / "sub" / "b.txt.gz").write_bytes(gzip.compress(text_b.encode("utf-8")))
    (folder / "notes.md").write_text("not a .txt: ignored\n", encoding="utf-8")
    out = tmp_path / "folder"
    run_cli(
        "data", "--corpus", folder, "--tokenizer", tiny_teacher, "--out-dir", out, "--val-fraction", "0.25", check=True
    )

    train_expected, val_expected = expected_splits(tiny_tokenizer, [body_a, text_b], 0.25)
    train, val = split_ids(out, "train"), split_ids(out, "val")
    np.testing.assert_array_equal(train, train_expected)
    np.testing.assert_array_equal(val, val_expected)
    # both documents end with EOS in val: the held-out range is the tail of every document
    eos = tiny_tokenizer.eos_token_id
    assert (val == eos).sum() == 2 and (train == eos).sum() == 0
    decoded = tiny_tokenizer.decode(np.concatenate([train, val]))
    assert "Gutenberg" not in decoded and "GUTENBERG" not in decoded and "licence" not in decoded
    assert read_meta(out)["documents"] == 2


def test_strip_gutenberg_keeps_only_the_body():
    body = "CHAPTER I\n\nThe Mole had been working very hard all the morning.\n"
    assert strip_gutenberg(GUTENBERG_HEADER + body + GUTENBERG_FOOTER) == body
    assert strip_gutenberg("\ufeff" + body) == body  # no markers: only the BOM and blank ends go
    assert strip_gutenberg(body.replace("\n", "\r\n")) == body.replace("\n", "\r\n").rstrip("\r\n") + "\n"


def test_unicode_text_works(tmp_path, tiny_teacher, tiny_tokenizer):
    corpus = tmp_path / "unicode.txt"
    corpus.write_text(UNICODE_TEXT * 20, encoding="utf-8")
    build(corpus, tiny_teacher, tmp_path / "unicode", val_fraction=0.1)
    train_expected, val_expected = expected_splits(tiny_tokenizer, [UNICODE_TEXT * 20], 0.1)
    train, val = split_ids(tmp_path / "unicode", "train"), split_ids(tmp_path / "unicode", "val")
    np.testing.assert_array_equal(train, train_expected)
    np.testing.assert_array_equal(val, val_expected)
    assert tiny_tokenizer.decode(np.concatenate([train, val[:-1]])) == UNICODE_TEXT * 20


# ---------------------------------------------------------------- pieces and streaming


def test_split_pieces_cut_only_where_tokenization_is_unchanged(tiny_tokenizer):
    """Cuts fall at the start of a whitespace run, never inside a word or inside a run of spaces, so
    tokenizing the pieces one by one gives exactly the ids of one call over the whole text."""
    text = ("The  Mole   had\tbeen working\n\nvery hard   all the\r\nmorning, " + UNICODE_TEXT + "  end \n") * 3
    for piece_chars in (1, 5, 16, 64, 1000):
        pieces = list(split_pieces(text, piece_chars))
        assert "".join(pieces) == text
        for piece in pieces[1:]:
            assert piece[0].isspace()
        for piece in pieces[:-1]:
            assert not piece[-1].isspace()
        ids = [i for piece in pieces for i in encode(tiny_tokenizer, piece)]
        assert ids == encode(tiny_tokenizer, text), piece_chars
    word = "x" * 50
    assert list(split_pieces(word + " tail", 10)) == [word, " tail"]  # a long word is never cut


def test_stream_pieces_of_one_huge_line_cut_only_at_spaces(tiny_tokenizer):
    rng = random.Random(0)
    words = willows_text()[:50_000].split()
    line = " ".join(rng.choice(words) for _ in range(40_000))  # ~230k characters, no newline
    pieces = list(stream_pieces(io.BytesIO(line.encode("utf-8")), piece_chars=4096))
    assert "".join(pieces) == line
    assert len(pieces) > 40 and max(len(p) for p in pieces) <= 4096 + 64
    assert all(p.startswith(" ") for p in pieces[1:]) and all(not p.endswith(" ") for p in pieces[:-1])
    small = line[:3000]
    small_pieces = list(stream_pieces(io.BytesIO(small.encode("utf-8")), piece_chars=100))
    assert [i for p in small_pieces for i in encode(tiny_tokenizer, p)] == encode(tiny_tokenizer, small)
    # multi-byte characters straddling block boundaries decode intact
    assert "".join(stream_pieces(io.BytesIO((UNICODE_TEXT * 50).encode()), piece_chars=7)) == UNICODE_TEXT * 50


def test_three_megabyte_single_line_file_is_streamed(tmp_path, tiny_teacher, tiny_tokenizer):
    """A file named text8 (one line, no newline) goes through the streaming reader."""
    rng = random.Random(1)
    words = sorted(set(willows_text().lower().split()))
    chunks = []
    while sum(map(len, chunks)) < 3_000_000:
        chunks.append(" " + " ".join(rng.choice(words) for _ in range(1000)))
    line = "".join(chunks)[1:]
    corpus = tmp_path / "text8"
    corpus.write_text(line, encoding="utf-8")
    assert corpus.stat().st_size >= 3_000_000 and "\n" not in line
    meta = build(corpus, tiny_teacher, tmp_path / "text8-data", val_fraction=0.05)
    ids = np.concatenate([split_ids(tmp_path / "text8-data", "train"), split_ids(tmp_path / "text8-data", "val")])
    # a head and a tail of the line cut at a space tokenize (in one call each) to the ends of the output
    head = encode(tiny_tokenizer, line[: line.index(" ", 200_000)])
    tail = encode(tiny_tokenizer, line[line.rindex(" ", 0, len(line) - 200_000) :])
    np.testing.assert_array_equal(ids[: len(head)], head)
    np.testing.assert_array_equal(ids[-len(tail) - 1 :], tail + [tiny_tokenizer.eos_token_id])
    assert (ids == tiny_tokenizer.eos_token_id).sum() == 1 and len(ids) > len(head) + len(tail)
    assert meta["documents"] == 1 and meta["val_tokens"] == round(len(ids) * 0.05)


def test_zip_with_one_member_like_text8_zip(tmp_path, tiny_teacher, tiny_tokenizer):
    line = " ".join(willows_text()[30_000:90_000].lower().split())
    archive = tmp_path / "text8.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("text8", line)
    meta = build(archive, tiny_teacher, tmp_path / "zip-data", val_fraction=0.1)
    train_expected, val_expected = expected_splits(tiny_tokenizer, [line], 0.1)
    np.testing.assert_array_equal(split_ids(tmp_path / "zip-data", "train"), train_expected)
    np.testing.assert_array_equal(split_ids(tmp_path / "zip-data", "val"), val_expected)
    assert meta["corpus_name"] == "text8" and meta["inputs"]["corpus_sha256"] == sha256_file(archive)


# ---------------------------------------------------------------- reruns


def test_rerun_is_a_noop_and_changed_inputs_rebuild(tmp_path, tiny_teacher, tiny_tokenizer):
    corpus = tmp_path / "story.txt"
    text = willows_text()[104_000:119_000].strip() + "\n"
    corpus.write_text(text, encoding="utf-8")
    out = tmp_path / "story"
    first = build(corpus, tiny_teacher, out, val_fraction=0.1)
    stamps = written_files(out / name for name in ("train.bin", "val.bin", "meta.json"))

    again = run_cli(
        "data", "--corpus", corpus, "--tokenizer", tiny_teacher, "--out-dir", out, "--val-fraction", "0.1", check=True
    )
    assert "up to date" in again.stdout
    assert written_files(out / name for name in stamps) == stamps
    assert read_meta(out) == first

    meta = build(corpus, tiny_teacher, out, val_fraction=0.2)
    assert meta["inputs"]["val_fraction"] == 0.2 and meta["val_tokens"] > first["val_tokens"]
    np.testing.assert_array_equal(split_ids(out, "val"), expected_splits(tiny_tokenizer, [text], 0.2)[1])

    # same path, new bytes: rebuilt, never reused
    new_text = text + "A new closing paragraph about the River Bank.\n"
    corpus.write_text(new_text, encoding="utf-8")
    rebuilt = build(corpus, tiny_teacher, out, val_fraction=0.2)
    assert rebuilt["inputs"]["corpus_sha256"] == sha256_file(corpus) != meta["inputs"]["corpus_sha256"]
    np.testing.assert_array_equal(split_ids(out, "val"), expected_splits(tiny_tokenizer, [new_text], 0.2)[1])

    # a damaged token file is noticed (size check) and rebuilt
    with open(out / "train.bin", "ab") as f:
        f.write(b"\0\0")
    build(corpus, tiny_teacher, out, val_fraction=0.2)
    assert sha256_file(out / "train.bin") == rebuilt["train_sha256"]


# ---------------------------------------------------------------- bad inputs


def test_missing_corpus_file_exits_2(tmp_path, tiny_teacher):
    out = tmp_path / "missing"
    result = run_cli("data", "--corpus", tmp_path / "no-such-file.txt", "--tokenizer", tiny_teacher, "--out-dir", out)
    assert_error_line(result, "no-such-file.txt", "does not exist")
    assert_nothing_written(out)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("image.txt", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8, "binary file .it contains NUL bytes"),
        ("empty.txt", b"", "holds no text"),
        ("blank.txt", b" \n\t\t  \r\n\n   \t\n" * 200, "holds no text"),
        ("latin1.txt", "Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade.\n".encode("latin-1") * 50, "not UTF-8"),
        ("late-nul.txt", b"plain words " * 100_000 + b"\x00", "binary"),
        ("broken.txt.gz", b"this is not gzip data at all", "valid .txt.gz"),
        ("broken.zip", b"PK but not really a zip archive", "not a valid zip"),
    ],
)
def test_bad_corpus_raises_one_line_error_and_writes_nothing(tmp_path, tiny_teacher, name, content, message):
    corpus = tmp_path / name
    corpus.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(PipelineError, match=message) as info:
        build(corpus, tiny_teacher, out)
    assert "\n" not in str(info.value)
    assert_nothing_written(out)


def test_failed_rebuild_leaves_no_meta(tmp_path, tiny_teacher):
    """A rebuild that fails removes the old meta.json: the folder never describes inputs it was not built from."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(willows_text()[5_000:9_000], encoding="utf-8")
    out = tmp_path / "out"
    build(corpus, tiny_teacher, out)
    corpus.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(PipelineError, match="not UTF-8"):
        build(corpus, tiny_teacher, out)
    corpus.write_text("   \n", encoding="utf-8")
    with pytest.raises(PipelineError, match="holds no text"):
        build(corpus, tiny_teacher, out)
    assert not (out / "meta.json").exists()


# ---------------------------------------------------------------- vocabularies beyond uint16


def make_big_vocab_teacher(folder: Path, vocab_words: int = 70_000) -> tuple[Path, object]:
    """A word-level tokenizer with vocab_words + 2 tokens (ids above 65535) and a matching tiny Llama."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(vocab_words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", bos_token="<eos>"
    )
    make_tiny_teacher(folder, tokenizer, hidden=8, layers=1, max_positions=64)
    return folder, tokenizer


def test_vocabulary_over_65536_is_stored_as_uint32_through_data_and_cache(tmp_path):
    from pipeline.cache import build_cache
    from pipeline.cache_format import CacheReader
    from pipeline.config import CacheConfig

    teacher, tokenizer = make_big_vocab_teacher(tmp_path / "big-teacher")
    rng = np.random.default_rng(0)
    word_ids = np.concatenate([rng.integers(65_530, 70_000, 300), rng.integers(0, 70_000, 300)])
    text = " ".join(f"w{i}" for i in word_ids) + "\n"
    corpus = tmp_path / "words.txt"
    corpus.write_text(text, encoding="utf-8")
    meta = build(corpus, teacher, tmp_path / "big-data", val_fraction=0.2)
    assert meta["vocab_size"] == 70_002 and meta["dtype"] == "uint32"
    ids = np.concatenate([split_ids(tmp_path / "big-data", "train"), split_ids(tmp_path / "big-data", "val")])
    np.testing.assert_array_equal(ids, np.append(word_ids + 2, 0))  # not wrapped modulo 65536
    assert ids.max() >= 65_536 and (tmp_path / "big-data" / "train.bin").stat().st_size == 4 * meta["train_tokens"]

    build_cache(
        CacheConfig(
            data_dir=str(tmp_path / "big-data"),
            teacher=str(teacher),
            out_dir=str(tmp_path / "big-cache"),
            mode="topk",
            k=4,
            seq_len=16,
            max_rows=3,
            batch_size=3,
            rows_per_part=3,
        )
    )
    reader = CacheReader(tmp_path / "big-cache", "train", verify=True)
    assert reader.attrs["id_dtype"] == "uint32" and reader.vocab_size == 70_002
    for index in range(len(reader)):
        row = reader.row(index)
        np.testing.assert_array_equal(row["tokens"], ids[index * 16 : index * 16 + 17])
    assert reader.row(0)["tokens"].max() >= 65_536


def test_encoding_option_reads_latin1(tmp_path, tiny_teacher):
    """A latin-1 file is refused as UTF-8 (naming the byte and the --encoding option) and read with
    --encoding latin-1."""
    from conftest import run_cli

    text = "Caf\u00e9 na\u00efve r\u00e9sum\u00e9, the Mole said. " * 200
    path = tmp_path / "latin1.txt"
    path.write_bytes(text.encode("latin-1"))
    refused = run_cli("data", "--corpus", path, "--tokenizer", tiny_teacher, "--out-dir", tmp_path / "a")
    assert refused.returncode == 2 and "--encoding" in refused.stderr and "at byte 3" in refused.stderr
    assert not (tmp_path / "a" / "meta.json").exists()
    run_cli(
        "data",
        "--corpus",
        path,
        "--tokenizer",
        tiny_teacher,
        "--out-dir",
        tmp_path / "b",
        "--encoding",
        "latin-1",
        check=True,
    )
    from transformers import AutoTokenizer

    from pipeline.rows import load_tokens

    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    ids = np.concatenate([load_tokens(tmp_path / "b", "train"), load_tokens(tmp_path / "b", "val")])
    from pipeline.corpora import strip_gutenberg

    assert tokenizer.decode(ids[:-1]) == strip_gutenberg(text)  # the decoded text, EOS excluded


# ---------------------------------------------------------------- streaming: corpora of any size


def documents_corpus(texts: list[str], piece_chars: int = 50) -> Corpus:
    """A corpus of these documents, each cut in pieces of about piece_chars characters."""
    return Corpus("docs", "test", lambda: ((f"doc{i}", split_pieces(t, piece_chars)) for i, t in enumerate(texts)))


def write_splits(tmp_path: Path, corpus: Corpus, tokenizer, val_fraction: float, max_tokens=None, buffer_tokens=7):
    with contextlib.ExitStack() as files:
        train_file, val_file = (files.enter_context(open(tmp_path / name, "wb+")) for name in ("train", "val"))
        offsets = [
            OffsetFiles(
                *(files.enter_context(open(tmp_path / f"{split}.{kind}", "wb+")) for kind in ("ends", "txt", "docs"))
            )
            for split in ("train", "val")
        ]
        writer = TokenSplitWriter(
            train_file, val_file, np.dtype("uint16"), val_fraction, max_tokens, buffer_tokens, *offsets
        )
        tokenize_corpus(corpus, tokenizer, writer)
    train, val = (np.fromfile(tmp_path / name, dtype=np.uint16).astype(np.int64) for name in ("train", "val"))
    assert (writer.train_tokens, writer.val_tokens) == (len(train), len(val))
    return train, val, writer.documents


@pytest.mark.parametrize("buffer_tokens", [1, 7, 100_000])
def test_documents_longer_than_the_buffer_are_split_like_in_memory(tmp_path, tiny_tokenizer, buffer_tokens):
    """A document spilled to the train file (its val tail moved at its end) gives the bytes of splitting it
    in memory; whitespace-only documents, spilled or not, leave nothing."""
    texts = [
        willows_text()[1_000:4_000],
        "  \n\t\n   " * 40,  # whitespace only: skipped, even when longer than the buffer
        "",
        willows_text()[9_000:9_400],
        "Rat.",
        willows_text()[20_000:26_000],
    ]
    kept = [t for t in texts if t.strip()]
    train, val, documents = write_splits(tmp_path, documents_corpus(texts), tiny_tokenizer, 0.1, None, buffer_tokens)
    want_train, want_val = expected_splits(tiny_tokenizer, kept, 0.1)
    np.testing.assert_array_equal(train, want_train)
    np.testing.assert_array_equal(val, want_val)
    assert documents == len(kept)


@pytest.mark.parametrize("max_tokens", [50, 700, 701, 1_000, 10**6])
def test_max_tokens_cuts_the_document_that_reaches_it_then_splits_it(tmp_path, tiny_tokenizer, max_tokens):
    texts = [willows_text()[30_000:32_000], "   \n" * 30, willows_text()[40_000:43_000], willows_text()[50_000:51_000]]
    train, val, documents = write_splits(tmp_path, documents_corpus(texts), tiny_tokenizer, 0.2, max_tokens)
    want_train, want_val, total, want_documents = [], [], 0, 0  # the rule, document by document
    for text in texts:
        if not text.strip():
            continue
        ids = (encode(tiny_tokenizer, text) + [tiny_tokenizer.eos_token_id])[: max_tokens - total]
        n_val = int(round(len(ids) * 0.2))
        want_train += ids[: len(ids) - n_val]
        want_val += ids[len(ids) - n_val :]
        total += len(ids)
        want_documents += 1
        if total >= max_tokens:
            break
    np.testing.assert_array_equal(train, want_train)
    np.testing.assert_array_equal(val, want_val)
    assert documents == want_documents and len(train) + len(val) == min(total, max_tokens)


def test_memory_does_not_grow_with_a_one_line_corpus(tmp_path, tiny_teacher, monkeypatch):
    """Python and numpy allocations (tracemalloc) while a one-line text8-format file is read, tokenized and
    written are the same for 1 MB and 4 MB, and far below the corpus's ids (small pieces, batches and buffer here:
    a piece's offset mapping is held as Python tuples while it is converted; docs/history.md, "the data stage at
    scale", measures the defaults on 100 MB)."""
    import tracemalloc

    from pipeline import corpora, data

    monkeypatch.setattr(corpora, "PIECE_CHARS", 1 << 13)
    monkeypatch.setattr(data, "ENCODE_BATCH_CHARS", 1 << 15)
    monkeypatch.setattr(data, "DOCUMENT_BUFFER_TOKENS", 1 << 12)
    monkeypatch.setattr(data, "MOVE_BLOCK_BYTES", 1 << 16)
    peaks = []

    def measured(*args):
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        tokenize_corpus(*args)
        peaks.append(tracemalloc.get_traced_memory()[1] - before)

    monkeypatch.setattr(data, "tokenize_corpus", measured)
    tracemalloc.start()
    try:
        for megabytes in (1, 4):
            corpus = write_text8(tmp_path / f"{megabytes}" / "text8", megabytes * 1_000_000, seed=megabytes)
            meta = build(corpus, tiny_teacher, tmp_path / f"data-{megabytes}")
            tokens = meta["train_tokens"] + meta["val_tokens"]
            print(f"{megabytes} MB: {tokens} tokens, peak {peaks[-1] / 1e6:.2f} MB while tokenizing")
    finally:
        tracemalloc.stop()
    assert peaks[1] < 8 * tokens / 8  # an eighth of the corpus's ids as int64, which the stage used to hold
    assert peaks[1] < 1.25 * peaks[0], peaks


def test_text8_file_and_text8_zip_give_the_same_tokens_with_the_tail_held_out(tmp_path, tiny_teacher, tiny_tokenizer):
    """The real text8.zip layout (one member named text8) and the bare file: one document, streamed."""
    plain = write_text8(tmp_path / "plain" / "text8", 2_000_000, seed=3)
    archive = write_text8(tmp_path / "text8.zip", 2_000_000, seed=3)
    with zipfile.ZipFile(archive) as zf:
        assert zf.namelist() == ["text8"] and zf.read("text8") == plain.read_bytes()
    line = plain.read_text(encoding="ascii")
    assert (
        line.startswith(" ")
        and "\n" not in line
        and "  " not in line
        and set(line) <= set(" abcdefghijklmnopqrstuvwxyz")
    )
    metas = {name: build(path, tiny_teacher, tmp_path / name) for name, path in (("plain", plain), ("zip", archive))}
    for split in ("train", "val"):
        assert sha256_file(tmp_path / "plain" / f"{split}.bin") == sha256_file(tmp_path / "zip" / f"{split}.bin")
    ids = np.concatenate([split_ids(tmp_path / "zip", "train"), split_ids(tmp_path / "zip", "val")])
    val = split_ids(tmp_path / "zip", "val")
    assert metas["zip"]["documents"] == 1 and len(val) == round(len(ids) * 0.05)
    tail = encode(tiny_tokenizer, line[line.rindex(" ", 0, len(line) - 150_000) :]) + [tiny_tokenizer.eos_token_id]
    np.testing.assert_array_equal(ids[-len(tail) :], tail)  # val is the end of the line, then EOS
    np.testing.assert_array_equal(val, tail[-len(val) :])


# ---------------------------------------------------------------- Hugging Face datasets, streamed


@pytest.fixture(scope="module")
def dataset_texts() -> list[str]:
    text = willows_text()
    return [text[i : i + 2_500 + 37 * (i % 7)] for i in range(0, 60_000, 3_000)] + ["", "   \n"]


def test_saved_dataset_and_jsonl_streamed_or_not_give_the_same_tokens(
    tmp_path, tiny_teacher, tiny_tokenizer, dataset_texts
):
    import datasets

    saved, saved_dict = tmp_path / "saved", tmp_path / "saved-dict"
    dataset = datasets.Dataset.from_dict({"text": dataset_texts, "n": list(range(len(dataset_texts)))})
    dataset.save_to_disk(saved)
    other = datasets.Dataset.from_dict({"text": ["not this split"], "n": [0]})
    datasets.DatasetDict({"validation": other, "train": dataset}).save_to_disk(saved_dict)  # its train split is read
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(dataset_texts)))
    want_train, want_val = expected_splits(tiny_tokenizer, [t for t in dataset_texts if t.strip()], 0.1)
    runs = {
        "saved": (saved, []),
        "saved-streamed": (saved, ["--streaming"]),
        "saved-dict-streamed": (saved_dict, ["--streaming"]),
        "jsonl-streamed": (jsonl, ["--streaming", "--text-column", "body"]),
    }
    for name, (corpus, flags) in runs.items():
        run_cli(
            "data", "--corpus", corpus, "--tokenizer", tiny_teacher, "--out-dir", tmp_path / name,
            "--val-fraction", "0.1", *flags, check=True,
        )  # fmt: skip
        np.testing.assert_array_equal(split_ids(tmp_path / name, "train"), want_train, err_msg=name)
        np.testing.assert_array_equal(split_ids(tmp_path / name, "val"), want_val, err_msg=name)
        assert read_meta(tmp_path / name)["documents"] == len(dataset_texts) - 2
    # the same data with or without --streaming is the same corpus: the second is a no-op
    assert read_meta(tmp_path / "saved")["inputs"] == read_meta(tmp_path / "saved-streamed")["inputs"]
    assert read_meta(tmp_path / "jsonl-streamed")["inputs"]["corpus_sha256"].startswith(sha256_file(jsonl))


def test_streamed_dataset_without_the_text_column_is_one_error_line(tmp_path, tiny_teacher, dataset_texts):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(dataset_texts)))
    out = tmp_path / "out"
    result = run_cli("data", "--corpus", jsonl, "--tokenizer", tiny_teacher, "--out-dir", out, "--streaming")
    assert_error_line(result, "has no column 'text'", "columns: ['id', 'body']", "--text-column")
    assert_nothing_written(out)
    result = run_cli(
        "data", "--corpus", jsonl, "--tokenizer", tiny_teacher, "--out-dir", out, "--streaming", "--text-column", "id"
    )
    assert_error_line(result, "column 'id'", "holds int values, not text", "--text-column")
    assert_nothing_written(out)
    assert not list(out.glob(".*.tmp"))


def test_num_proc_gives_the_same_bytes_and_is_checked(tmp_path, tiny_teacher, tiny_data, tiny_corpus):
    out = tmp_path / "one-thread"
    run_cli(
        "data", "--corpus", tiny_corpus, "--tokenizer", tiny_teacher, "--out-dir", out, "--val-fraction", "0.1",
        "--num-proc", "1", check=True,
    )  # fmt: skip
    for split in ("train", "val"):
        assert sha256_file(out / f"{split}.bin") == sha256_file(tiny_data / f"{split}.bin")
    with pytest.raises(PipelineError, match="--num-proc must be 0 .every core. or positive, got -2"):
        build(tiny_corpus, tiny_teacher, tmp_path / "bad", num_proc=-2)


def test_text_files_above_the_limit_are_streamed_gz_by_its_uncompressed_size(tmp_path, tiny_teacher, monkeypatch):
    """Files with more text than STREAMED_FILE_BYTES (lowered here) are never read whole: a .gz counts its
    uncompressed size. Same tokens as the whole-file path for a text without a Gutenberg header; a damaged .gz
    is one error line."""
    from pipeline import corpora

    text = willows_text()[60_000:80_000].strip() + "\n"
    raw, packed = text.encode("utf-8"), gzip.compress(text.encode("utf-8"))
    assert len(packed) < 10_000 < len(raw)
    (tmp_path / "a.txt").write_bytes(raw)
    (tmp_path / "a.txt.gz").write_bytes(packed)
    whole = {name: build(tmp_path / name, tiny_teacher, tmp_path / f"whole-{name}") for name in ("a.txt", "a.txt.gz")}

    monkeypatch.setattr(corpora, "STREAMED_FILE_BYTES", 10_000)
    monkeypatch.setattr(corpora, "_read_text_file", lambda *a, **k: pytest.fail("a big file was read whole"))
    for name in ("a.txt", "a.txt.gz"):
        meta = build(tmp_path / name, tiny_teacher, tmp_path / f"streamed-{name}")
        for split in ("train", "val"):
            assert meta[f"{split}_sha256"] == whole[name][f"{split}_sha256"], (name, split)
    monkeypatch.setattr(corpora, "STREAMED_FILE_BYTES", 0)  # whatever its trailer says
    (tmp_path / "broken.txt.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(PipelineError, match=r"broken\.txt\.gz cannot be read \(EOFError.*valid \.txt\.gz") as info:
        build(tmp_path / "broken.txt.gz", tiny_teacher, tmp_path / "broken")
    assert "\n" not in str(info.value)
    assert_nothing_written(tmp_path / "broken")
