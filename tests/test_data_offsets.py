"""Token offsets of the data stage (<split>.txt / .ends / .docs) and the student token files built from them.

Issue: cross-tokenizer distillation aligns a student's positions with the teacher's by byte offsets, so the data
stage records the text every split's tokens cover and where each token ends in it. The expected ends are computed
independently here: each token of a byte-level BPE decoded on its own (GPT-2's bytes_to_unicode table, written
out below) gives its UTF-8 bytes, and their running sum is where it ends; a token that ends inside a multi-byte
character is expected to take the previous token's end (so that it is never the first token to end at a byte, and
never aligned). Documents are tokenized in one call each, as
test_data.py does, and the text of each document part is sliced from the document itself.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_teacher, make_tokenizer, willows_text

from pipeline import corpora, data, student_data
from pipeline.config import DataConfig
from pipeline.corpora import strip_gutenberg
from pipeline.data import (
    OffsetFiles,
    TokenSplitWriter,
    prepare_data,
    token_byte_ends,
    tokenize_corpus,
)
from pipeline.errors import PipelineError
from pipeline.fsutil import sha256_file
from pipeline.rows import (
    SPLITS,
    docs_path,
    ends_path,
    has_offsets,
    load_document_parts,
    load_ends,
    load_tokens,
    read_meta,
    require_offsets,
    text_path,
)
from pipeline.student_data import check_student_data, prepare_student_data
from pipeline.teacher import tokenizer_hash

MULTIBYTE_TEXT = (
    "Café crème — the Mole said, naïvely. 日本 is Japan; 日本語 its tongue. Ünïcödé “quotes” and ½ ¾.\n"
    "Съешь же ещё этих мягких французских булок, да выпей чаю. Emoji: 😀🚀 thumbs 👍🏽 and flags 🇫🇷.\n"
)
OFFSET_FILES = ("txt", "ends", "docs")
SPLIT_FILES = tuple(f"{split}.{suffix}" for split in SPLITS for suffix in ("bin", *OFFSET_FILES))


# ---------------------------------------------------------------- the independent reference


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the character a byte-level BPE vocabulary writes for each byte -> the
    byte. Printable Latin-1 bytes stand for themselves; the others are shifted to 256 and up, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    bytes_in_order, chars = list(printable), list(printable)
    for byte in range(256):
        if byte not in printable:
            bytes_in_order.append(byte)
            chars.append(256 + len(chars) - len(printable))
    return {chr(char): byte for byte, char in zip(bytes_in_order, chars)}


ALPHABET = byte_level_alphabet()


def token_bytes(tokenizer, ids) -> list[bytes]:
    """The UTF-8 bytes of each token of a byte-level BPE on its own; special tokens spell none."""
    special = set(tokenizer.all_special_ids)
    return [
        b"" if token_id in special else bytes(ALPHABET[char] for char in token)
        for token_id, token in zip(ids, tokenizer.convert_ids_to_tokens([int(i) for i in ids]))
    ]


def reference_ends(tokenizer, ids, text: bytes) -> np.ndarray:
    """Where each token ends in `text`: the running sum of its tokens' bytes; a token whose sum falls inside a
    character takes the previous token's end (no prefix of the text ends where it does)."""
    cumulative = np.cumsum([len(b) for b in token_bytes(tokenizer, ids)], dtype=np.int64)
    is_boundary = np.ones(len(text) + 1, dtype=bool)
    is_boundary[:-1] = (np.frombuffer(text, np.uint8) & 0xC0) != 0x80  # not a continuation byte
    return np.maximum.accumulate(np.where(is_boundary[cumulative], cumulative, 0))


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def document_splits(tokenizer, text: str, val_fraction: float) -> tuple[list[int], list[int], int]:
    """A document's train ids, val ids and the byte where its train text ends (its last train token's end)."""
    ids = encode(tokenizer, text) + [tokenizer.eos_token_id]
    cut = len(ids) - int(round(len(ids) * val_fraction))
    ends = reference_ends(tokenizer, ids, text.encode("utf-8"))
    return ids[:cut], ids[cut:], int(ends[cut - 1]) if cut else 0


def build(corpus, tokenizer_dir, out_dir, **options) -> dict:
    return prepare_data(DataConfig(corpus=str(corpus), tokenizer=str(tokenizer_dir), out_dir=str(out_dir), **options))


def split_arrays(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, bytes, np.ndarray]:
    """ids, ends, text and document parts of a split, as int64 arrays and bytes."""
    return (
        np.asarray(load_tokens(folder, split), dtype=np.int64),
        np.asarray(load_ends(folder, split), dtype=np.int64),
        text_path(folder, split).read_bytes(),
        np.asarray(load_document_parts(folder, split), dtype=np.int64),
    )


def part_ranges(parts: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(token start, token end, byte start, byte end) of each document part."""
    starts = np.vstack([[0, 0], parts[:-1]])
    return [(int(t0), int(t1), int(b0), int(b1)) for (t0, b0), (t1, b1) in zip(starts, parts)]


def file_bytes(folder: Path, names=SPLIT_FILES) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in names}


@pytest.fixture(scope="module")
def three_documents(tmp_path_factory) -> tuple[Path, list[str]]:
    """A folder corpus of three documents: English, a multi-byte one and an empty one; and the two kept texts as
    the stage reads them."""
    folder = tmp_path_factory.mktemp("corpus") / "three"
    folder.mkdir()
    texts = {
        "a.txt": willows_text()[10_000:14_000],
        "b.txt": MULTIBYTE_TEXT * 6 + willows_text()[30_000:31_000],
        "c.txt": "",
    }
    for name, text in texts.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder, [strip_gutenberg(texts["a.txt"]), strip_gutenberg(texts["b.txt"])]


@pytest.fixture(scope="module")
def three_data(tmp_path_factory, three_documents, tiny_teacher) -> Path:
    """three_documents tokenized by the data stage with a fifth held out."""
    out = tmp_path_factory.mktemp("data") / "three"
    build(three_documents[0], tiny_teacher, out, val_fraction=0.2)
    return out


# ---------------------------------------------------------------- ends of one piece


def test_token_byte_ends_of_ascii_text_are_the_running_sum_of_the_decoded_tokens(tiny_tokenizer):
    text = "".join(c for c in willows_text()[2_000:9_000] if c.isascii()) + "  \t\ttabs\n\n\n<|endoftext|> literally"
    assert text.isascii()
    encoded = tiny_tokenizer([text], add_special_tokens=False, return_offsets_mapping=True)
    ids, spans = encoded["input_ids"][0], encoded["offset_mapping"][0]
    ends = token_byte_ends(text, spans)
    want = np.cumsum([len(b) for b in token_bytes(tiny_tokenizer, ids)])
    eos_literal = ids.index(tiny_tokenizer.eos_token_id)  # parsed as the special token, with its text's span
    want[eos_literal:] += len("<|endoftext|>")
    np.testing.assert_array_equal(ends, want)
    assert ends[-1] == len(text.encode("utf-8"))


def test_token_byte_ends_of_multibyte_text_are_exact_at_character_boundaries(tiny_tokenizer):
    text = MULTIBYTE_TEXT * 3
    raw = text.encode("utf-8")
    encoded = tiny_tokenizer([text], add_special_tokens=False, return_offsets_mapping=True)
    ids, spans = encoded["input_ids"][0], encoded["offset_mapping"][0]
    ends = token_byte_ends(text, spans)
    running = np.cumsum([len(b) for b in token_bytes(tiny_tokenizer, ids)])
    assert b"".join(token_bytes(tiny_tokenizer, ids)) == raw
    on_boundary = np.array([end == len(raw) or (raw[end] & 0xC0) != 0x80 for end in running])
    assert 0 < on_boundary.sum() < len(ids)  # the tiny vocabulary splits some characters between tokens
    np.testing.assert_array_equal(ends[on_boundary], running[on_boundary])
    np.testing.assert_array_equal(ends, reference_ends(tiny_tokenizer, ids, raw))  # elsewhere: the character's start
    assert np.all(np.diff(ends) >= 0) and ends[-1] == len(raw)
    for char in ("é", "—", "日本"):  # each such run of tokens ends exactly after the characters
        start = text.index(char)
        end_byte = len(text[: start + len(char)].encode("utf-8"))
        assert end_byte in set(ends.tolist()), char


def test_token_byte_ends_clamp_shared_spans_and_give_zero_width_tokens_the_previous_end():
    text = "ab日c"  # bytes: a b (3 bytes) c -> 6 bytes
    spans = [(0, 1), (1, 2), (2, 3), (2, 3), (0, 0), (2, 3), (3, 4)]  # 日 in three tokens; a zero-width token
    np.testing.assert_array_equal(token_byte_ends(text, spans), [1, 2, 2, 2, 2, 5, 6])
    assert token_byte_ends("", []).shape == (0,)


# ---------------------------------------------------------------- the data stage's offsets files


def test_text_ends_and_parts_of_a_folder_corpus(three_data, three_documents, tiny_tokenizer):
    """Each split's text is its document parts in order, cut where the last train token ends; the ends are the
    reference ends of each part; the parts end where the documents' EOS tokens are."""
    _, texts = three_documents
    meta = read_meta(three_data)
    eos = tiny_tokenizer.eos_token_id
    splits = [document_splits(tiny_tokenizer, text, 0.2) for text in texts]
    want = {
        "train": [(train, text.encode("utf-8")[:cut]) for text, (train, _, cut) in zip(texts, splits)],
        "val": [(val, text.encode("utf-8")[cut:]) for text, (_, val, cut) in zip(texts, splits)],
    }
    assert meta["documents"] == 2 and meta["offsets"] is True and meta["ends_dtype"] == "uint64"
    assert meta["inputs"]["format_version"] == data.DATA_FORMAT_VERSION == 2
    for split in SPLITS:
        ids, ends, text, parts = split_arrays(three_data, split)
        np.testing.assert_array_equal(ids, [i for part_ids, _ in want[split] for i in part_ids])  # as before
        assert text == b"".join(part_text for _, part_text in want[split])
        assert len(ends) == len(ids) == meta[f"{split}_tokens"] and len(text) == meta[f"{split}_text_bytes"]
        assert parts.shape == (2, 2) and parts[-1].tolist() == [len(ids), len(text)]
        assert np.all(np.diff(ends) >= 0)
        for (t0, t1, b0, b1), (part_ids, part_text) in zip(part_ranges(parts), want[split]):
            assert ids[t0:t1].tolist() == part_ids and text[b0:b1] == part_text
            np.testing.assert_array_equal(ends[t0:t1] - b0, reference_ends(tiny_tokenizer, part_ids, part_text))
        assert ends[(ids == eos)].tolist() == ends[np.flatnonzero(ids == eos) - 1].tolist()  # zero-width EOS
        for kind in ("", "text_", "ends_", "docs_"):
            name = {"": "bin", "text_": "txt", "ends_": "ends", "docs_": "docs"}[kind]
            assert meta[f"{split}_{kind}sha256"] == sha256_file(three_data / f"{split}.{name}")
    # every document's tail, EOS last, is in val; no EOS in train; the multi-byte document's text is whole
    val_ids, _, val_text, val_parts = split_arrays(three_data, "val")
    np.testing.assert_array_equal(np.flatnonzero(val_ids == eos), val_parts[:, 0] - 1)
    assert eos not in split_arrays(three_data, "train")[0]
    train_text, train_parts = split_arrays(three_data, "train")[2:]
    second = train_text[train_parts[0, 1] :] + val_text[val_parts[0, 1] :]
    assert second.decode("utf-8") == texts[1]


def test_token_files_with_offsets_are_the_tokenizers_ids(tmp_path, three_documents, tiny_tokenizer):
    """The cache keys on train.bin's sha256: recording offsets changes no token byte (the ids are the tokenizer's
    own, split as before)."""
    corpus = corpora.folder_corpus(three_documents[0])
    folder = tmp_path / "written"
    folder.mkdir()
    with open(folder / "train.bin", "wb+") as train, open(folder / "val.bin", "wb") as val:
        split_offsets = [
            OffsetFiles(*(open(folder / f"{split}.{suffix}", "wb+") for suffix in ("ends", "txt", "docs")))
            for split in SPLITS
        ]
        writer = TokenSplitWriter(train, val, np.dtype("uint16"), 0.2, None, 5, *split_offsets)
        tokenize_corpus(corpus, tiny_tokenizer, writer)
        for files in split_offsets:
            for file in (files.ends, files.text, files.docs):
                file.close()
    written = file_bytes(folder, ("train.bin", "val.bin"))
    want_train = [i for text in three_documents[1] for i in document_splits(tiny_tokenizer, text, 0.2)[0]]
    np.testing.assert_array_equal(np.frombuffer(written["train.bin"], np.uint16), want_train)


@pytest.mark.parametrize("buffer_tokens", [1, 9])
def test_spilled_documents_give_the_files_of_the_in_memory_split(
    tmp_path, tiny_teacher, three_documents, three_data, monkeypatch, buffer_tokens
):
    """Documents longer than the buffer are spilled to the train files and their val tails moved (in blocks that
    are no multiple of an end's size); small pieces. Every file is byte-identical to the in-memory path, and a
    whitespace-only document spilled before its end leaves nothing."""
    folder = tmp_path / "corpus"
    shutil.copytree(three_documents[0], folder)
    (folder / "d.txt").write_text("  \n\t\n   " * 40, encoding="utf-8")
    monkeypatch.setattr(data, "DOCUMENT_BUFFER_TOKENS", buffer_tokens)
    monkeypatch.setattr(data, "MOVE_BLOCK_BYTES", 20)
    monkeypatch.setattr(corpora, "PIECE_CHARS", 40)
    build(folder, tiny_teacher, tmp_path / "spilled", val_fraction=0.2)
    assert file_bytes(tmp_path / "spilled") == file_bytes(three_data)


@pytest.mark.parametrize("cap", ["inside-first", "all-but-eos", "first", "inside-second", "beyond"])
def test_max_tokens_cuts_the_text_where_the_last_kept_token_ends(
    tmp_path, tiny_teacher, tiny_tokenizer, three_documents, monkeypatch, cap
):
    _, texts = three_documents
    eos = tiny_tokenizer.eos_token_id
    documents = [encode(tiny_tokenizer, text) + [eos] for text in texts]
    first = len(documents[0])
    max_tokens = {
        "inside-first": first // 2,
        "all-but-eos": first - 1,
        "first": first,
        "inside-second": first + len(documents[1]) // 3,
        "beyond": first + len(documents[1]) + 100,
    }[cap]
    for buffer_tokens in (data.DOCUMENT_BUFFER_TOKENS, 7):
        monkeypatch.setattr(data, "DOCUMENT_BUFFER_TOKENS", buffer_tokens)
        meta = build(
            three_documents[0], tiny_teacher, tmp_path / str(buffer_tokens), val_fraction=0.2, max_tokens=max_tokens
        )
    assert file_bytes(tmp_path / "7") == file_bytes(tmp_path / str(data.DOCUMENT_BUFFER_TOKENS))
    splits = {split: split_arrays(tmp_path / "7", split) for split in SPLITS}
    total = 0
    for index, (text, all_ids) in enumerate(zip(texts, documents)):  # the rule, document by document
        ids = all_ids[: max_tokens - total]
        raw = text.encode("utf-8")
        kept_text = raw[: reference_ends(tiny_tokenizer, ids, raw)[-1]] if len(ids) < len(all_ids) else raw
        cut = len(ids) - int(round(len(ids) * 0.2))
        cut_byte = int(reference_ends(tiny_tokenizer, ids, raw)[cut - 1])
        for split, want_ids, want_text in (
            ("train", ids[:cut], kept_text[:cut_byte]),
            ("val", ids[cut:], kept_text[cut_byte:]),
        ):
            split_ids, _, split_text, split_parts = splits[split]
            t0, t1, b0, b1 = part_ranges(split_parts)[index]
            assert split_ids[t0:t1].tolist() == want_ids and split_text[b0:b1] == want_text, (split, index)
        assert (ids[-1] == eos) == (cap in ("first", "beyond") or index == 0 and cap == "inside-second")
        total += len(ids)
        if total >= max_tokens:
            break
    assert meta["documents"] == index + 1 and meta["train_tokens"] + meta["val_tokens"] == total
    assert [len(splits[split][3]) for split in SPLITS] == [index + 1] * 2
    assert total == min(max_tokens, sum(map(len, documents)))


@pytest.mark.parametrize(
    "target, call", [("TokenSplitWriter.add", 3), ("TokenSplitWriter._move_tail", 2), ("sha256_file", 5)]
)
def test_a_run_that_fails_mid_write_leaves_no_data_files(
    tmp_path, tiny_teacher, three_documents, monkeypatch, target, call
):
    """An exception while the files are written (while tokenizing, while moving a spilled tail, while hashing
    the complete temp files) leaves neither final files nor temp files."""
    owner, _, name = target.rpartition(".")
    holder = getattr(data, owner) if owner else data
    original, calls = getattr(holder, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError("fault injected")
        return original(*args, **kwargs)

    static = isinstance(inspect.getattr_static(holder, name), staticmethod)
    monkeypatch.setattr(holder, name, staticmethod(failing) if static else failing)
    monkeypatch.setattr(data, "DOCUMENT_BUFFER_TOKENS", 5)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="fault injected"):
        build(three_documents[0], tiny_teacher, out, val_fraction=0.2)
    assert len(calls) == call
    assert sorted(p.name for p in out.iterdir()) == []


def test_a_changed_offsets_file_is_noticed_and_rebuilt(tmp_path, tiny_teacher, three_documents, three_data):
    out = tmp_path / "data"
    shutil.copytree(three_data, out)
    with open(out / "val.ends", "ab") as f:
        f.write(b"\0" * 8)
    (out / "train.txt").write_bytes((out / "train.txt").read_bytes()[:-1])
    build(three_documents[0], tiny_teacher, out, val_fraction=0.2)
    assert file_bytes(out) == file_bytes(three_data)


# ---------------------------------------------------------------- folders from before offsets


def strip_offsets(folder: Path) -> None:
    """Make a data folder look like one the data stage wrote before offsets (format 1)."""
    meta = read_meta(folder)
    for split in SPLITS:
        for suffix in OFFSET_FILES:
            (folder / f"{split}.{suffix}").unlink()
    old = {key: value for key, value in meta.items() if key in ("inputs", "corpus_name", "tokenizer_name")}
    old |= {key: meta[key] for key in ("tokenizer_hash", "vocab_size", "eos_token_id", "dtype", "documents")}
    old |= {key: meta[key] for key in ("train_tokens", "val_tokens", "train_sha256", "val_sha256")}
    old["inputs"] = {**meta["inputs"], "format_version": 1}
    (folder / "meta.json").write_text(json.dumps(old))


def test_a_folder_from_before_offsets_is_refused_by_name_and_rebuilt_by_the_data_stage(
    tmp_path, tiny_teacher, three_documents, three_data
):
    old = tmp_path / "old"
    shutil.copytree(three_data, old)
    strip_offsets(old)
    assert not has_offsets(read_meta(old)) and has_offsets(read_meta(three_data))
    for refuse in (require_offsets, lambda folder: load_ends(folder, "train")):
        with pytest.raises(PipelineError) as info:
            refuse(old)
        message = str(info.value)
        assert "\n" not in message and str(old) in message and "make data" in message, message
        assert (
            f"python -m pipeline data ... --out-dir {old}" in message and "same-tokenizer runs keep working" in message
        )
    with pytest.raises(PipelineError, match="make data"):
        prepare_student_data(old, make_tokenizer(willows_text()[:20_000], vocab_size=300))
    np.testing.assert_array_equal(load_tokens(old, "val"), load_tokens(three_data, "val"))  # still readable
    build(three_documents[0], tiny_teacher, old, val_fraction=0.2)  # its format version changed: rebuilt
    assert file_bytes(old) == file_bytes(three_data)


# ---------------------------------------------------------------- student token files


def char_tokenizer(text: str):
    """A character-level fast tokenizer: one token per character of `text` (a BPE without merges), with EOS."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{char: index + 2 for index, char in enumerate(sorted(set(text)))}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


def check_student_folder(student: Path, teacher: Path, tokenizer) -> None:
    """Same parts and byte split as the teacher, ends into the teacher's text, each part re-tokenized alone with
    the student's EOS after every part whose teacher tokens ended with the teacher's."""
    teacher_meta, meta = read_meta(teacher), read_meta(student)
    assert meta["text_dir"] == os.path.relpath(teacher, student) and meta["teacher_data_dir"] == str(teacher)
    assert meta["documents"] == teacher_meta["documents"] and meta["tokenizer_hash"] == tokenizer_hash(tokenizer)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(tokenizer)
    for split in SPLITS:
        assert not (student / f"{split}.txt").exists()
        assert text_path(student, split).resolve() == (teacher / f"{split}.txt").resolve()
        teacher_ids, _, text, teacher_parts = split_arrays(teacher, split)
        ids, ends, student_text, parts = split_arrays(student, split)
        assert student_text == text and meta[f"{split}_text_sha256"] == teacher_meta[f"{split}_text_sha256"]
        np.testing.assert_array_equal(parts[:, 1], teacher_parts[:, 1])  # the same split by bytes
        assert len(ids) == meta[f"{split}_tokens"] and np.all(np.diff(ends) >= 0)
        for (t0, t1, b0, b1), (s0, s1, _, _) in zip(part_ranges(teacher_parts), part_ranges(parts)):
            with_eos = t1 > t0 and teacher_ids[t1 - 1] == teacher_meta["eos_token_id"]
            want = encode(tokenizer, text[b0:b1].decode("utf-8")) + [tokenizer.eos_token_id] * int(with_eos)
            assert ids[s0:s1].tolist() == want
            assert s1 == s0 or ends[s1 - 1] == b1  # the part's last token ends where its text does
        for kind, suffix in (("", "bin"), ("ends_", "ends"), ("docs_", "docs")):
            assert meta[f"{split}_{kind}sha256"] == sha256_file(student / f"{split}.{suffix}")


def test_student_data_of_a_byte_level_bpe_with_another_vocabulary(three_data, tmp_path, capsys):
    teacher = tmp_path / "teacher-data"
    shutil.copytree(three_data, teacher)
    tokenizer = make_tokenizer(willows_text()[:60_000] + MULTIBYTE_TEXT, vocab_size=700)
    student = prepare_student_data(teacher, tokenizer)
    assert student == teacher / f"student-{tokenizer_hash(tokenizer)[:12]}"
    assert "data: wrote" in capsys.readouterr().out
    check_student_folder(student, teacher, tokenizer)
    for split in SPLITS:  # ends against the decoded tokens, part by part
        ids, ends, text, parts = split_arrays(student, split)
        for s0, s1, b0, b1 in part_ranges(parts):
            np.testing.assert_array_equal(ends[s0:s1] - b0, reference_ends(tokenizer, ids[s0:s1], text[b0:b1]))
    assert read_meta(student)["val_tokens"] != read_meta(teacher)["val_tokens"]  # another tokenization


def test_student_data_of_a_character_tokenizer_advances_a_character_a_token(three_data, tmp_path, monkeypatch):
    """Ends move by each character's UTF-8 length; parts longer than a piece are streamed in pieces (small
    pieces here) and give the files of reading them whole."""
    teacher = tmp_path / "teacher-data"
    shutil.copytree(three_data, teacher)
    text = "".join(text_path(teacher, split).read_text(encoding="utf-8") for split in SPLITS)
    tokenizer = char_tokenizer(text)
    student = prepare_student_data(teacher, tokenizer, tmp_path / "chars")
    assert read_meta(student)["text_dir"] == "../teacher-data"
    for split in SPLITS:
        ids, ends, split_text, parts = split_arrays(student, split)
        chars = tokenizer.convert_ids_to_tokens(ids.tolist())
        widths = [0 if char == "<eos>" else len(char.encode("utf-8")) for char in chars]
        starts = np.concatenate([[0], ends[:-1]])
        np.testing.assert_array_equal(ends - starts, widths)
        assert ends[-1] == len(split_text) == parts[-1, 1]
        assert len(ids) == len(split_text.decode("utf-8")) + (ids == tokenizer.eos_token_id).sum()
    check_student_folder(student, teacher, tokenizer)
    monkeypatch.setattr(corpora, "PIECE_CHARS", 64)
    monkeypatch.setattr(data, "ENCODE_BATCH_CHARS", 200)
    streamed = prepare_student_data(teacher, tokenizer, tmp_path / "chars-streamed")
    names = [f"{split}.{suffix}" for split in SPLITS for suffix in ("bin", "ends", "docs")]
    assert file_bytes(streamed, names) == file_bytes(student, names)


def test_student_data_is_built_once_and_follows_its_teacher_data(
    tmp_path, tiny_teacher, three_documents, three_data, capsys, monkeypatch
):
    teacher = tmp_path / "teacher-data"
    shutil.copytree(three_data, teacher)
    tokenizer = char_tokenizer("".join(three_documents[1]))
    tokenizer_dir = make_tiny_teacher(tmp_path / "student-model", tokenizer, hidden=8, layers=1, max_positions=16)
    student = prepare_student_data(teacher, tokenizer_dir)  # a folder works as the tokenizer too
    assert read_meta(student)["tokenizer_name"] == str(tokenizer_dir)
    stamps = {p.name: p.stat().st_mtime_ns for p in student.iterdir()}
    capsys.readouterr()

    rebuilt = lambda *a, **k: pytest.fail("an up-to-date folder was rebuilt")  # noqa: E731
    monkeypatch.setattr(student_data, "_tokenize_parts", rebuilt)
    assert prepare_student_data(teacher, tokenizer) == student
    assert "is up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in student.iterdir()} == stamps
    assert check_student_data(student, teacher)["tokenizer_hash"] == tokenizer_hash(tokenizer)
    monkeypatch.undo()

    build(three_documents[0], tiny_teacher, teacher, val_fraction=0.3)  # the teacher data changes
    with pytest.raises(PipelineError) as info:
        check_student_data(student, teacher)
    assert "\n" not in str(info.value) and "train_sha256" in str(info.value) and str(student) in str(info.value)
    prepare_student_data(teacher, tokenizer)
    assert "rebuilding" in capsys.readouterr().out
    check_student_data(student, teacher)
    check_student_folder(student, teacher, tokenizer)

    (student / "val.ends").write_bytes(b"")  # a damaged file is noticed by its size
    prepare_student_data(teacher, tokenizer)
    check_student_folder(student, teacher, tokenizer)
    with pytest.raises(PipelineError, match="no student data in"):
        check_student_data(tmp_path / "nowhere", teacher)


def test_a_student_tokenizer_without_eos_is_refused(three_data):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab={"<unk>": 0, "a": 1}, merges=[], unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(PipelineError, match="has no EOS token") as info:
        prepare_student_data(three_data, tokenizer, three_data.parent / "never")
    assert "\n" not in str(info.value) and not (three_data.parent / "never").exists()


def test_readers_of_the_offsets_files(three_data):
    meta = read_meta(three_data)
    ends = load_ends(three_data, "train")
    parts = load_document_parts(three_data, "val")
    assert isinstance(ends, np.memmap) and ends.dtype == np.uint64 and ends.shape == (meta["train_tokens"],)
    assert parts.dtype == np.uint64 and parts.shape == (meta["documents"], 2)
    assert ends_path(three_data, "val") == three_data / "val.ends" and docs_path(three_data, "val").name == "val.docs"
    assert text_path(three_data, "train") == three_data / "train.txt"
