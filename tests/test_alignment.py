"""pipeline.alignment against independent references: token bytes against the tokenizers' own decode and encode
round trips (byte-level BPE, SentencePiece-style with byte fallback, Llama-2-style decoder, character-level), the
vocab maps against brute force over the whole vocabularies, align_positions against a Python reference and against
real tokenizations of one text, and the carried-over targets against per-row dictionary sums in float64.

Every tokenizer is trained here, on the repository's Willows text: nothing is read from outside the repository.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_tokenizer, willows_text
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pipeline.alignment import (
    align_positions,
    map_sampled,
    map_topk,
    matching_rows,
    token_bytes,
    vocab_map,
)

SAMPLE = "Café au lait — naïve 日本語, «quoted» ‘curly’\n\ttabs  and  double spaces.  🙂 end\n"
EOS = "<|endoftext|>"


def training_text() -> str:
    return willows_text()[:40_000]


def documents() -> list[str]:
    """Three documents with the multi-byte sample inside, from Willows text the tokenizers were not trained on."""
    text = willows_text()
    return [text[60_000:61_500] + SAMPLE, SAMPLE + text[61_500:62_300], " " + text[62_300:63_000] + SAMPLE]


def as_fast(tokenizer: Tokenizer, eos: str = EOS) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, unk_token=eos)


def char_level_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of the training text and the documents, no decoder: a BPE without merges."""
    chars = sorted(set(training_text()) | set("".join(documents())))
    vocab = {EOS: 0, **{char: i + 1 for i, char in enumerate(chars)}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=EOS))
    tokenizer.add_special_tokens([EOS])
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="isolated")  # short words: fast BPE
    return as_fast(tokenizer)


def sentencepiece_spec() -> dict:
    """A Metaspace BPE trained on ASCII text, with the 256 byte pieces <0x00>..<0xFF> and byte fallback on, as
    tokenizer.json: every non-ASCII character falls back to its bytes."""
    tokenizer = Tokenizer(models.BPE(unk_token=EOS))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    ascii_text = "".join(char for char in training_text() if ord(char) < 128)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS], show_progress=False)
    tokenizer.train_from_iterator([ascii_text], trainer=trainer)
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    spec["model"]["byte_fallback"] = True
    spec["model"]["unk_token"] = None
    return spec


def llama2_style(spec: dict) -> dict:
    """The same model with Llama-2's wiring: a normalizer that prepends "▁" and writes spaces as "▁", and the
    decoder Sequence[Replace "▁" -> " ", ByteFallback, Fuse, Strip the first space]."""
    spec = json.loads(json.dumps(spec))
    probe = Tokenizer(models.BPE())
    probe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    probe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    probe.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    wiring = json.loads(probe.to_str())
    for part in ("normalizer", "pre_tokenizer", "decoder"):
        spec[part] = wiring[part]
    return spec


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, PreTrainedTokenizerFast]:
    spec = sentencepiece_spec()
    return {
        "byte-level-1000": make_tokenizer(training_text(), vocab_size=1000),
        "byte-level-300": make_tokenizer(training_text(), vocab_size=300),
        "char-level": char_level_tokenizer(),
        "sentencepiece": as_fast(Tokenizer.from_str(json.dumps(spec))),
        "llama2-style": as_fast(Tokenizer.from_str(json.dumps(llama2_style(spec)))),
    }


@pytest.fixture(scope="module")
def spelled(tokenizers) -> dict[str, list[bytes | None]]:
    return {name: token_bytes(tokenizer) for name, tokenizer in tokenizers.items()}


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- token_bytes


@pytest.mark.parametrize("name", ["byte-level-1000", "byte-level-300", "char-level", "sentencepiece"])
def test_token_bytes_reproduce_the_text(tokenizers, spelled, name):
    tokenizer, table = tokenizers[name], spelled[name]
    assert len(table) == len(tokenizer)
    assert table[tokenizer.eos_token_id] is None
    for text in [SAMPLE, *documents()]:
        ids = encode(tokenizer, text)
        assert b"".join(table[i] for i in ids) == text.encode("utf-8")


def test_byte_fallback_pieces_spell_one_byte(tokenizers, spelled):
    tokenizer, table = tokenizers["sentencepiece"], spelled["sentencepiece"]
    pieces = tokenizer.convert_ids_to_tokens(encode(tokenizer, "日本"))
    assert pieces == [f"<0x{byte:02X}>" for byte in "日本".encode()]  # the fallback is really taken
    assert table[tokenizer.convert_tokens_to_ids("<0xE6>")] == b"\xe6"
    assert table[tokenizer.convert_tokens_to_ids("▁the")] == b" the"


def test_llama2_style_tokens_spell_the_prepended_space(tokenizers, spelled):
    """Llama-2's normalizer prepends a space the text lacks: the first token spells it, the rest is the text."""
    tokenizer, table = tokenizers["llama2-style"], spelled["llama2-style"]
    for text in [SAMPLE, *documents()]:
        assert b"".join(table[i] for i in encode(tokenizer, text)) == b" " + text.encode("utf-8")


@pytest.mark.parametrize("name", ["byte-level-1000", "char-level", "sentencepiece", "llama2-style"])
def test_token_bytes_agree_with_decode(tokenizers, spelled, name):
    """Every id whose bytes are whole UTF-8 decodes to them (Llama-2's decoder strips the leading space of the
    decoded string, so a token is decoded after an anchor token that does not start with one)."""
    tokenizer, table = tokenizers[name], spelled[name]
    anchor = [tokenizer.convert_tokens_to_ids("x")] if name == "llama2-style" else []  # (no decoder: joins with " ")
    assert [table[i] for i in anchor] == [b"x"] * len(anchor)
    checked = 0
    for token_id, text in enumerate(table):
        if text is None:
            continue
        try:
            expected = "x" * len(anchor) + text.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a piece of a multi-byte character: the encode round trips cover it
        if name == "sentencepiece" and tokenizer.convert_ids_to_tokens(token_id).startswith("<0x"):
            continue  # a lone Metaspace decoder writes byte pieces as "<0x0A>" (no ByteFallback); encoding reads them
        decoded = tokenizer.decode(anchor + [token_id], clean_up_tokenization_spaces=False)
        assert decoded == expected, (token_id, text)
        checked += 1
    assert checked > 0.5 * len(table)


def test_added_tokens_spell_their_text_and_specials_none(tokenizers):
    tokenizer = make_tokenizer(training_text()[:5_000], vocab_size=300)
    tokenizer.add_tokens(["[[note]]"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|sep|>"]})
    table = token_bytes(tokenizer)
    assert len(table) == len(tokenizer)
    assert table[tokenizer.convert_tokens_to_ids("[[note]]")] == b"[[note]]"
    assert table[tokenizer.convert_tokens_to_ids("<|sep|>")] is None
    text = "a [[note]] here"
    assert b"".join(table[i] for i in encode(tokenizer, text)) == text.encode()


def test_token_bytes_refuses_wordpiece_and_suffix_markers():
    wordpiece = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "hello": 1, "##s": 2}, unk_token="[UNK]"))
    wordpiece.decoder = decoders.WordPiece()
    with pytest.raises(ValueError, match="WordPiece"):
        token_bytes(as_fast(wordpiece, eos="[UNK]"))
    suffixed = Tokenizer(models.BPE(vocab={"<eos>": 0, "a</w>": 1}, merges=[], end_of_word_suffix="</w>"))
    suffixed.decoder = decoders.BPEDecoder()
    with pytest.raises(ValueError, match="end_of_word_suffix"):
        token_bytes(as_fast(suffixed, eos="<eos>"))


# ----------------------------------------------------------------------------- vocab_map, matching_rows


def brute_force_prefix_map(teacher, student) -> list[int]:
    """For each teacher token: the lowest student id among the longest student tokens its bytes start with."""
    expected = []
    for text in teacher:
        best = (0, -1)  # (length, -id): longest first, then lowest id
        for student_id, piece in enumerate(student):
            if text and piece and text.startswith(piece):
                best = max(best, (len(piece), -student_id))
        expected.append(-best[1] if best[0] else -1)
    return expected


@pytest.mark.parametrize("student", ["byte-level-300", "char-level", "sentencepiece"])
def test_prefix_map_matches_brute_force(tokenizers, spelled, student):
    teacher_tok, teacher, students = tokenizers["byte-level-1000"], spelled["byte-level-1000"], spelled[student]
    teacher_eos, student_eos = teacher_tok.eos_token_id, tokenizers[student].eos_token_id
    id_map = vocab_map(teacher, students, len(teacher) + 24, student_eos, teacher_eos, "prefix")
    expected = brute_force_prefix_map(teacher, students)
    expected[teacher_eos] = student_eos
    assert id_map.dtype == np.int64 and id_map.shape == (len(teacher) + 24,)
    assert id_map[: len(teacher)].tolist() == expected
    assert (id_map[len(teacher) :] == -1).all()  # the ids of a padded head
    if student == "char-level":  # every teacher token goes to the character it starts with
        for teacher_id, text in enumerate(teacher):
            if text and teacher_id != teacher_eos:
                first_char = text.decode("utf-8", errors="ignore")[:1]
                if first_char.encode() in students and text.startswith(first_char.encode()):
                    assert students[id_map[teacher_id]] == first_char.encode()
                else:  # a byte of the alphabet, or a character the student lacks
                    assert id_map[teacher_id] == -1


def test_exact_map_and_duplicates():
    teacher = [None, b"a", b"ab", b"abc", b"zz", b"\xe6"]
    student = [b"ab", None, b"a", b"ab", b"abc", b"\xe6\x97", b""]  # b"ab" twice: the lowest id wins
    prefix = vocab_map(teacher, student, 8, student_eos=1, teacher_eos=0, kind="prefix")
    exact = vocab_map(teacher, student, 8, student_eos=1, teacher_eos=0, kind="exact")
    assert prefix.tolist() == [1, 2, 0, 4, -1, -1, -1, -1]
    assert exact.tolist() == [1, 2, 0, 4, -1, -1, -1, -1]
    assert vocab_map([b"abcd", b"b"], student, 2, None, None, "prefix").tolist() == [4, -1]
    assert vocab_map([b"abcd", b"b"], student, 2, None, None, "exact").tolist() == [-1, -1]
    with pytest.raises(ValueError, match="kind"):
        vocab_map(teacher, student, 8, 1, 0, "suffix")
    with pytest.raises(ValueError, match="teacher_size"):
        vocab_map(teacher, student, 3, 1, 0, "exact")


def test_matching_rows():
    teacher = [None, b"ab", b"a", b"ab", b"x"]
    student = [b"a", b"ab", None, b"q", None]
    rows = matching_rows(teacher, student, student_eos=2, teacher_eos=0, student_size=6)
    assert rows.dtype == np.int64
    assert rows.tolist() == [2, 1, 0, -1, -1, -1]
    assert matching_rows(teacher, student, None, None).tolist() == [2, 1, -1, -1, -1]


def test_matching_rows_of_trained_tokenizers(tokenizers, spelled):
    teacher, student = spelled["byte-level-1000"], spelled["byte-level-300"]
    student_eos, teacher_eos = tokenizers["byte-level-300"].eos_token_id, tokenizers["byte-level-1000"].eos_token_id
    rows = matching_rows(teacher, student, student_eos, teacher_eos)
    for student_id, text in enumerate(student):
        same = [teacher_id for teacher_id, piece in enumerate(teacher) if piece is not None and piece == text]
        expected = teacher_eos if student_id == student_eos else min(same, default=-1) if text else -1
        assert rows[student_id] == expected
    assert (rows >= 0).mean() > 0.95  # a smaller BPE of the same text: nearly every token is in the larger one


# ----------------------------------------------------------------------------- align_positions


def reference_alignment(student_ends, start, count, teacher_ends, teacher_limit) -> list[int]:
    """The rule written out in Python: a dict of each teacher end's first position, no binary search."""
    first_with_end: dict[int, int] = {}
    for g, end in enumerate(teacher_ends):
        first_with_end.setdefault(int(end), g)
    out = []
    for p in range(start, start + count):
        end = int(student_ends[p])
        first = first_with_end.get(end, teacher_limit)
        alignable = p == 0 or student_ends[p - 1] < end
        out.append(first if alignable and first < teacher_limit else -1)
    return out


def test_align_positions_matches_a_reference_on_random_ends():
    rng = np.random.default_rng(0)
    for trial in range(200):
        student_ends = np.cumsum(rng.integers(0, 4, size=int(rng.integers(1, 60))))
        teacher_ends = np.cumsum(rng.integers(0, 4, size=int(rng.integers(1, 60))))
        start = int(rng.integers(0, len(student_ends)))
        count = int(rng.integers(0, len(student_ends) - start + 1))
        limit = int(rng.integers(0, len(teacher_ends) + 3))
        dtype = [np.int64, np.uint32, np.int32][trial % 3]
        got = align_positions(student_ends, start, count, teacher_ends.astype(dtype), limit)
        assert got.dtype == np.int64 and got.shape == (count,)
        assert got.tolist() == reference_alignment(student_ends, start, count, teacher_ends, limit)


def test_align_positions_reads_memmaps(tmp_path):
    rng = np.random.default_rng(1)
    teacher_ends = np.cumsum(rng.integers(0, 5, size=5_000)).astype(np.uint32)
    student_ends = np.cumsum(rng.integers(0, 3, size=7_000)).astype(np.int64)
    teacher_ends.tofile(tmp_path / "teacher.ends")
    student_ends.tofile(tmp_path / "student.ends")
    teacher_map = np.memmap(tmp_path / "teacher.ends", dtype=np.uint32, mode="r")
    student_map = np.memmap(tmp_path / "student.ends", dtype=np.int64, mode="r")
    got = align_positions(student_map, 3_000, 512, teacher_map, 4_000)
    assert got.tolist() == reference_alignment(student_ends, 3_000, 512, teacher_ends.tolist(), 4_000)
    assert (got >= 0).any()


def test_align_positions_edges():
    assert align_positions(np.array([3, 5]), 2, 0, np.array([3]), 1).tolist() == []
    assert align_positions(np.array([0, 0, 2]), 0, 3, np.array([0, 2]), 2).tolist() == [0, -1, 1]
    assert align_positions(np.array([70_000]), 0, 1, np.array([4_464], np.uint16), 1).tolist() == [-1]
    assert align_positions(np.array([4_464]), 0, 1, np.array([4_464], np.uint16), 0).tolist() == [-1]
    with pytest.raises(ValueError, match="outside"):
        align_positions(np.array([1, 2]), 1, 2, np.array([1]), 1)


def tokenized_split(tokenizer, table) -> tuple[list[int], np.ndarray]:
    """The documents tokenized and joined with EOS, as the data stage writes a split, and each token's end: the
    cumulative byte length of the token bytes (EOS zero-width)."""
    ids = []
    for text in documents():
        ids += encode(tokenizer, text) + [tokenizer.eos_token_id]
    ends = np.cumsum([len(table[i] or b"") for i in ids])
    assert b"".join(table[i] or b"" for i in ids) == "".join(documents()).encode("utf-8")
    return ids, ends


@pytest.mark.parametrize("student", ["byte-level-300", "char-level", "sentencepiece"])
def test_align_positions_on_real_tokenizations(tokenizers, spelled, student):
    """Every aligned pair conditions on the same text and both next tokens are EOS or neither; every student
    position that is the first to end where a teacher position first ends (below the limit) is aligned."""
    text = "".join(documents()).encode("utf-8")
    teacher_ids, teacher_ends = tokenized_split(tokenizers["byte-level-1000"], spelled["byte-level-1000"])
    student_ids, student_ends = tokenized_split(tokenizers[student], spelled[student])
    teacher_eos, student_eos = tokenizers["byte-level-1000"].eos_token_id, tokenizers[student].eos_token_id
    limit = len(teacher_ids) - 40
    aligned = np.concatenate(  # in row-sized pieces, as the batches ask
        [
            align_positions(student_ends, start, min(128, len(student_ids) - start), teacher_ends, limit)
            for start in range(0, len(student_ids), 128)
        ]
    )
    assert aligned.tolist() == reference_alignment(student_ends, 0, len(student_ids), teacher_ends, limit)
    teacher_first_ends = {int(end): g for g, end in enumerate(teacher_ends) if g == 0 or teacher_ends[g - 1] < end}
    covered = 0
    for p, g in enumerate(aligned.tolist()):
        first_here = p == 0 or student_ends[p - 1] < student_ends[p]
        if g < 0:  # complete: nothing alignable was left out
            assert not (first_here and teacher_first_ends.get(int(student_ends[p]), limit) < limit), p
            continue
        covered += 1
        assert first_here and (g == 0 or teacher_ends[g - 1] < teacher_ends[g])
        assert teacher_ends[g] == student_ends[p]  # the same text before: ends are true byte offsets (checked above)
        if covered % 25 == 0:  # and spelled out, on a sample (each join is a pass over the prefix)
            teacher_before = b"".join(spelled["byte-level-1000"][i] or b"" for i in teacher_ids[: g + 1])
            student_before = b"".join(spelled[student][i] or b"" for i in student_ids[: p + 1])
            assert teacher_before == student_before == text[: student_ends[p]]
        if p + 1 < len(student_ids) and g + 1 < len(teacher_ids):
            assert (student_ids[p + 1] == student_eos) == (teacher_ids[g + 1] == teacher_eos)
    assert covered > 0.3 * len(student_ids)


def test_rounded_ends_would_misalign_a_token_ending_mid_character():
    """Why ends must be exact bytes: a byte-level token b" \\xe6" (a space and the first byte of 日) ends at byte 2
    of " 日"; rounded up to the character's end it would be the first token ending after 日, and be aligned with a
    student position whose text holds all of 日."""
    student_ends = np.array([1, 4])  # " ", "日"
    exact_teacher_ends = np.array([2, 4])  # b" \xe6", b"\x97\xa5"
    rounded_teacher_ends = np.array([4, 4])
    assert align_positions(student_ends, 0, 2, exact_teacher_ends, 2).tolist() == [-1, 1]
    assert align_positions(student_ends, 0, 2, rounded_teacher_ends, 2).tolist() == [-1, 0]  # the wrong pair


# ----------------------------------------------------------------------------- map_topk, map_sampled


def random_topk(rng, rows: int, k: int, vocab: int):
    logits = rng.normal(scale=3.0, size=(rows, vocab))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids = np.argsort(-logp, axis=1)[:, :k]
    top = np.take_along_axis(logp, ids, axis=1)
    tail = np.log1p(-np.exp(top).sum(-1))
    return ids, top, tail


def test_map_topk_matches_dictionary_sums():
    rng = np.random.default_rng(0)
    vocab, k = 40, 8
    id_map = rng.integers(-1, 9, size=vocab)  # collisions and unmapped ids
    ids, logprobs, tail = random_topk(rng, 3 * 7, k, vocab)
    logprobs[2, 5:] = -np.inf  # K past the teacher's support
    logprobs[4, 6:] = -1e4  # the cache's sentinel
    tail[5], tail[6] = -np.inf, -1e4
    ids[7] = [i for i in range(vocab) if id_map[i] == -1][:1] * k  # every id unmapped
    shape = (3, 7, k)
    got_ids, got_logp, got_tail = map_topk(
        ids.reshape(shape), logprobs.reshape(shape).astype(np.float32), tail.reshape(3, 7).astype(np.float32), id_map
    )
    assert got_ids.shape == shape and got_ids.dtype == np.int64
    assert got_logp.shape == shape and got_logp.dtype == np.float32
    assert got_tail.shape == (3, 7) and got_tail.dtype == np.float32
    got_ids, got_logp, got_tail = got_ids.reshape(-1, k), got_logp.reshape(-1, k), got_tail.reshape(-1)
    logprobs32, tail32 = logprobs.astype(np.float32).astype(np.float64), tail.astype(np.float32)
    for row in range(len(ids)):
        expected: dict[int, float] = {}
        unmapped = 0.0
        for teacher_id, lp in zip(ids[row].tolist(), logprobs32[row].tolist()):
            p = np.exp(lp) if lp > -80 else 0.0
            if id_map[teacher_id] < 0:
                unmapped += p
            elif p > 0:
                expected[int(id_map[teacher_id])] = expected.get(int(id_map[teacher_id]), 0.0) + p
        kept = np.isfinite(got_logp[row])
        assert len(set(got_ids[row][kept].tolist())) == kept.sum()  # one entry per student id
        got = dict(zip(got_ids[row][kept].tolist(), np.exp(got_logp[row][kept].astype(np.float64)).tolist()))
        assert got.keys() == expected.keys()
        for student_id, p in expected.items():
            assert got[student_id] == pytest.approx(p, rel=1e-6)
        assert (np.diff(got_logp[row][kept]) <= 0).all() and kept[: kept.sum()].all()  # high to low, then padding
        padding_ids = set(got_ids[row][~kept].tolist())
        assert padding_ids <= (set(got_ids[row][kept].tolist()) if kept.any() else {0})
        tail_mass = np.exp(float(tail32[row])) if tail32[row] > -80 else 0.0
        if unmapped > 0:
            assert np.exp(float(got_tail[row])) == pytest.approx(tail_mass + unmapped, rel=1e-6)
        else:
            assert got_tail[row] == tail32[row]  # nothing added: the sentinel kept as given
        before = np.exp(logprobs32[row][logprobs32[row] > -80]).sum() + tail_mass
        after = np.exp(got_logp[row].astype(np.float64)).sum() + np.exp(float(got_tail[row]))
        assert after == pytest.approx(before, abs=1e-6)
    assert not np.isfinite(got_logp[7]).any() and (got_ids[7] == 0).all()
    assert np.exp(float(got_tail[7])) == pytest.approx(1.0, rel=1e-6)


def test_map_topk_identity_keeps_the_targets():
    rng = np.random.default_rng(1)
    ids, logprobs, tail = random_topk(rng, 16, 6, 30)
    got_ids, got_logp, got_tail = map_topk(ids, logprobs, tail, np.arange(30))
    assert (got_ids == ids).all()
    np.testing.assert_allclose(got_logp, logprobs, rtol=1e-12)
    assert (got_tail == tail).all()


def test_map_sampled_matches_dictionary_sums():
    rng = np.random.default_rng(2)
    vocab, s, rows = 30, 10, 50
    id_map = rng.integers(-1, 6, size=vocab)
    id_map[0] = 3  # the cache's padding id maps somewhere: its zero counts must not make an entry
    ids = np.zeros((rows, s), np.int64)
    counts = np.zeros((rows, s), np.float32)
    for row in range(rows):
        distinct = rng.choice(np.arange(1, vocab), size=int(rng.integers(0, s + 1)), replace=False)
        ids[row, : len(distinct)] = distinct
        counts[row, : len(distinct)] = rng.integers(1, 6, size=len(distinct))
    got_ids, got_counts = map_sampled(ids.reshape(5, 10, s), counts.reshape(5, 10, s), id_map)
    assert got_ids.shape == (5, 10, s) and got_ids.dtype == np.int64 and got_counts.dtype == np.float32
    got_ids, got_counts = got_ids.reshape(rows, s), got_counts.reshape(rows, s)
    for row in range(rows):
        expected: dict[int, float] = {}
        for teacher_id, count in zip(ids[row].tolist(), counts[row].tolist()):
            if count > 0 and id_map[teacher_id] >= 0:
                student_id = int(id_map[teacher_id])
                expected[student_id] = expected.get(student_id, 0.0) + count
        n = len(expected)
        assert got_ids[row, :n].tolist() == list(expected)  # in order of first occurrence
        assert got_counts[row, :n].tolist() == list(expected.values())
        assert (got_ids[row, n:] == 0).all() and (got_counts[row, n:] == 0).all()


def test_map_topk_and_sampled_take_one_row():
    ids, counts = map_sampled(np.array([4, 1, 2, 0]), np.array([2, 3, 1, 0]), np.array([5, 7, 5, 9, -1]))
    assert ids.tolist() == [7, 5, 0, 0] and counts.tolist() == [3, 1, 0, 0]
    ids, logp, tail = map_topk(np.array([1, 2, 4]), np.log([0.5, 0.2, 0.1]), np.log(0.2), np.array([5, 7, 5, 9, -1]))
    assert ids.tolist() == [7, 5, 7]
    np.testing.assert_allclose(np.exp(logp), [0.5, 0.2, 0.0])
    assert np.exp(tail) == pytest.approx(0.3)
