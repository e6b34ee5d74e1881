"""Cross-tokenizer alignment: which bytes each token spells, teacher ids -> student ids, teacher positions ->
student positions, and the teacher's sparse targets carried over to the student's vocabulary.

A teacher and a student with different tokenizers read the same text. Everything here works on bytes, the one
thing both tokenizations share:
  - token_bytes: the exact UTF-8 bytes each id of a tokenizer spells (None for specials: EOS, BOS, pad, ...);
  - vocab_map / matching_rows: teacher id -> student id and back, by those bytes;
  - align_positions: student position -> the teacher position whose prefix ends at the same byte, from the
    per-token end offsets (`ends`) the data stage records for each split;
  - map_topk / map_sampled: a batch of cached teacher targets ([..., K] arrays) rewritten in student ids;
  - positions_inside / Continuations: targets for student positions that end inside a teacher token.

All numpy, and streaming: align_positions reads only the student rows it is asked for and binary-searches the
teacher's ends (a memmap is fine), so no whole-corpus array is ever built.

The approximations, in one place:
  - the "prefix" vocab map gives a teacher token's probability to the student token whose bytes are the longest
    prefix of the teacher token's bytes (the student token that begins the same text). The student's own
    tokenization of that text may differ: it could merge across the teacher token's end (teacher " the" + "re",
    student " there"), so the student-side distribution is the one-step approximation of the byte-level
    probability of Phan et al. 2024 (arXiv 2410.09303), not the exact marginal;
  - teacher tokens with no student token starting their text (no byte prefix in the student's vocabulary, or
    special tokens other than EOS) have their probability moved to the tail bucket, and the tail's own mass (the
    teacher ids outside its top-k) stays in the tail: it is never split among student ids;
  - for sampled targets, draws of unmapped teacher ids are dropped, so a row's counts may sum to less than
    num_samples, and the teacher's entropy is the entropy over the teacher's vocabulary, not the mapped one;
  - inside a teacher token (positions_inside, Continuations), the target is the teacher's at the boundary before,
    conditioned on the bytes read since: one teacher token deep, and the tail is assumed to continue those bytes
    as often as the top-k does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ZERO_MASS_LOGPROB = -80.0  # a cached log-prob at or below this is no mass (the cache's sentinels: -1e4, -inf)
BYTE_FALLBACK_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback pieces: <0xE6> is 0xE6
SENTENCEPIECE_DECODERS = {"Replace", "ByteFallback", "Fuse", "Strip", "Metaspace"}  # of a Sequence decoder

# ----------------------------------------------------------------------------- the bytes a token spells


def gpt2_unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: the printable character each byte is written as in a byte-level
    BPE's token strings ("Ġ" is the space, "Ċ" the newline) -> that byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in chars:  # control characters, space, and the rest: moved past 255, in byte order
            chars[byte] = chr(256 + shifted)
            shifted += 1
    return {char: byte for byte, char in chars.items()}


UNICODE_TO_BYTE = gpt2_unicode_to_byte()


def spell_byte_level(token: str) -> bytes:
    """A byte-level token string -> its bytes. A token with a character outside the table (an added token's
    literal text) is its own UTF-8, as the tokenizers library's ByteLevel decoder does."""
    try:
        return bytes(UNICODE_TO_BYTE[char] for char in token)
    except KeyError:
        return token.encode("utf-8")


def sentencepiece_speller(replacements: list[tuple[str, str]], byte_fallback: bool):
    """A function token string -> bytes for SentencePiece-style tokens: each (pattern, content) replaced in order
    ("▁" -> " "), and, with byte fallback, "<0xNN>" -> that one byte."""

    def spell(token: str) -> bytes:
        if byte_fallback and (match := BYTE_FALLBACK_TOKEN.fullmatch(token)):
            return bytes([int(match.group(1), 16)])
        for pattern, content in replacements:
            token = token.replace(pattern, content)
        return token.encode("utf-8")

    return spell


def token_speller(spec: dict):
    """The function token string -> bytes for a tokenizer's JSON (tokenizer.json as a dict), chosen by its decoder.
    ValueError naming the decoder for the kinds whose tokens do not spell a piece of the text."""
    model, decoder = spec.get("model") or {}, spec.get("decoder")
    byte_fallback = bool(model.get("byte_fallback"))
    for marker in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(marker):
            raise ValueError(
                f"the tokenizer's {model.get('type')} model marks subwords with {marker}={model[marker]!r}: its "
                "tokens do not spell the text's bytes; cross-tokenizer alignment handles byte-level, SentencePiece "
                "(Metaspace / byte fallback) and plain (no decoder) tokenizers"
            )
    if decoder is None or decoder["type"] == "Fuse":  # Fuse joins the tokens with nothing between
        return sentencepiece_speller([], byte_fallback)  # the token string is its text (char-level, WordLevel)
    kind = decoder["type"]
    if kind == "ByteLevel":
        return spell_byte_level
    if kind == "Metaspace":
        return sentencepiece_speller([(decoder.get("replacement", "▁"), " ")], byte_fallback)
    if kind == "Sequence":
        kinds = [part["type"] for part in decoder["decoders"]]
        if set(kinds) <= {"ByteLevel", "Fuse"} and "ByteLevel" in kinds:
            return spell_byte_level
        if set(kinds) <= SENTENCEPIECE_DECODERS and all(
            "String" in part["pattern"] for part in decoder["decoders"] if part["type"] == "Replace"
        ):
            # Strip (Llama-2's: the space the normalizer prepended, off the decoded string's start) and Fuse act
            # on the whole decoded sequence, not on one token: they change nothing here.
            replacements = []
            for part in decoder["decoders"]:
                if part["type"] == "Replace":
                    replacements.append((part["pattern"]["String"], part["content"]))
                elif part["type"] == "Metaspace":
                    replacements.append((part.get("replacement", "▁"), " "))
            return sentencepiece_speller(replacements, byte_fallback or "ByteFallback" in kinds)
        kind = f"Sequence[{', '.join(kinds)}]"
    # WordPiece ("##" continuations) is refused rather than approximated by stripping "##": its pre-tokenizer
    # drops the whitespace and its normalizer usually lowercases and strips accents, so a word-initial token does
    # not say whether a space precedes it, and the tokens' bytes do not add up to the text.
    raise ValueError(
        f"cannot tell the bytes of the tokens of a tokenizer with the {kind} decoder; cross-tokenizer alignment "
        "handles byte-level (ByteLevel), SentencePiece (Metaspace, or Replace '▁' + ByteFallback) and plain "
        "(no decoder) tokenizers"
    )


def token_bytes(tokenizer) -> list[bytes | None]:
    """The exact bytes each id of a transformers fast tokenizer spells, len(tokenizer) entries; None for the special
    tokens (EOS, BOS, pad, ...), which spell no text, and for ids the tokenizer has no token for.

    Read from the backend tokenizer's JSON, by its decoder:
      - ByteLevel (GPT-2, Llama-3, SmolLM2, Qwen2): each character of the token string through the inverse of
        GPT-2's bytes_to_unicode table; a token may hold part of a multi-byte character;
      - SentencePiece-style (Metaspace, or a Sequence of Replace "▁" -> " ", ByteFallback, Fuse, Strip: Llama-2,
        Gemma): "▁" is a space, a byte-fallback piece "<0xNN>" is that byte;
      - no decoder (a character-level WordLevel or BPE): the token string's UTF-8.
    Other decoders (WordPiece, BPEDecoder with "</w>", CTC, ...) raise ValueError naming them.

    Non-special added tokens spell their literal content (they match the raw text). The bytes are those of the
    text the tokenizer reads after its normalizer and pre-tokenizer: a space a tokenizer prepends itself (Metaspace
    with prepend_scheme "first"/"always", Llama-2's Prepend normalizer, ByteLevel add_prefix_space) is spelled by
    the first token of each piece though the text lacks it, and a normalizer that rewrites text (lowercasing, NFKC)
    makes tokens spell the rewritten text. Byte-level and byte-fallback tokenizers without those reproduce the
    text exactly: b"".join(bytes of the ids of encode(text)) == text.encode().
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spell = token_speller(spec)
    added = spec.get("added_tokens") or []
    special = {entry["id"] for entry in added if entry.get("special")} | set(tokenizer.all_special_ids)
    added_text = {entry["id"]: entry["content"].encode("utf-8") for entry in added if not entry.get("special")}
    backend = tokenizer.backend_tokenizer
    spelled: list[bytes | None] = []
    for token_id in range(len(tokenizer)):
        if token_id in special:
            spelled.append(None)
        elif token_id in added_text:
            spelled.append(added_text[token_id])
        else:
            token = backend.id_to_token(token_id)
            spelled.append(None if token is None else spell(token))
    return spelled


# ----------------------------------------------------------------------------- teacher ids <-> student ids


def lowest_id_of_bytes(spelled: Sequence[bytes | None]) -> dict[bytes, int]:
    """{bytes: the lowest id spelling them} of a vocabulary's token_bytes (None and empty left out)."""
    ids: dict[bytes, int] = {}
    for token_id, text in enumerate(spelled):
        if text:
            ids.setdefault(text, token_id)
    return ids


class StudentPrefixes:
    """The student token that is the longest prefix of a byte string (the student token that begins that text),
    memoised: the one lookup behind the prefix map and the continuations."""

    def __init__(self, student_bytes: Sequence[bytes | None]):
        self.ids = lowest_id_of_bytes(student_bytes)
        self.longest = max(map(len, self.ids), default=0)
        self._found: dict[bytes, int] = {}

    def first_token(self, text: bytes) -> int:
        """The id of the student token that is the longest prefix of text, -1 if none (tokens are short: a few
        lookups each)."""
        found = self._found.get(text)
        if found is None:
            found = next(
                (self.ids[text[:n]] for n in range(min(len(text), self.longest), 0, -1) if text[:n] in self.ids), -1
            )
            self._found[text] = found
        return found


def vocab_map(
    teacher_bytes: Sequence[bytes | None],
    student_bytes: Sequence[bytes | None],
    teacher_size: int,
    student_eos: int | None,
    teacher_eos: int | None,
    kind: str = "prefix",
) -> np.ndarray:
    """Teacher id -> student id, or -1 where a teacher token's probability has no student id to go to:
    int64 [teacher_size].

    kind "prefix": the student token whose bytes are the longest prefix of the teacher token's bytes, i.e. the
    student token that begins the same text (for a character-level student, the first character). Every teacher
    token whose first bytes some student token spells is mapped; several teacher tokens may share a student id
    (their probabilities are then summed by map_topk / map_sampled). See the module docstring for what this
    approximates. kind "exact": only where the bytes are identical.

    Teacher EOS -> student EOS; other special tokens (bytes None) -> -1, and so are the ids past
    len(teacher_bytes) of a teacher head padded to teacher_size. Among student ids with identical bytes the lowest
    is taken. Teacher and student bytes come from token_bytes.
    """
    if kind not in ("prefix", "exact"):
        raise ValueError(f"vocab_map kind must be 'prefix' or 'exact', not {kind!r}")
    if teacher_size < len(teacher_bytes):
        raise ValueError(f"teacher_size {teacher_size} is smaller than the teacher's {len(teacher_bytes)} tokens")
    prefixes = StudentPrefixes(student_bytes)
    id_map = np.full(teacher_size, -1, np.int64)
    for teacher_id, text in enumerate(teacher_bytes):
        if text:
            id_map[teacher_id] = prefixes.ids.get(text, -1) if kind == "exact" else prefixes.first_token(text)
    if teacher_eos is not None and student_eos is not None:
        id_map[teacher_eos] = student_eos
    return id_map


def matching_rows(
    teacher_bytes: Sequence[bytes | None],
    student_bytes: Sequence[bytes | None],
    student_eos: int | None,
    teacher_eos: int | None,
    student_size: int | None = None,
) -> np.ndarray:
    """Student id -> the teacher id spelling identical bytes (the lowest such), or -1: int64 [student_size]
    (default len(student_bytes); the ids past it of a padded student head get -1). The student's EOS gets the
    teacher's EOS; other special tokens -1. Used to start the student's embedding rows from the teacher's."""
    size = len(student_bytes) if student_size is None else student_size
    teacher_ids = lowest_id_of_bytes(teacher_bytes)
    rows = np.full(size, -1, np.int64)
    for student_id, text in enumerate(student_bytes):
        if text:
            rows[student_id] = teacher_ids.get(text, -1)
    if teacher_eos is not None and student_eos is not None:
        rows[student_eos] = teacher_eos
    return rows


@dataclass(frozen=True)
class TokenizerMaps:
    """Between a teacher's tokenizer and a student's: teacher id -> student id ([teacher_size]: vocab_map), student
    id -> the teacher id with the same bytes ([student vocabulary]: matching_rows), and the continuations of
    teacher tokens the student has read part of (Continuations)."""

    id_map: np.ndarray
    teacher_rows: np.ndarray
    continuations: Continuations


def tokenizer_maps(teacher_tokenizer, student_tokenizer, teacher_size: int, kind: str = "prefix") -> TokenizerMaps:
    """The TokenizerMaps of two transformers tokenizers; teacher_size: the ids the cache holds."""
    teacher_bytes, student_bytes = token_bytes(teacher_tokenizer), token_bytes(student_tokenizer)
    teacher_eos, student_eos = teacher_tokenizer.eos_token_id, student_tokenizer.eos_token_id
    return TokenizerMaps(
        vocab_map(teacher_bytes, student_bytes, teacher_size, student_eos, teacher_eos, kind),
        matching_rows(teacher_bytes, student_bytes, student_eos, teacher_eos),
        Continuations(teacher_bytes, student_bytes),
    )


# ----------------------------------------------------------------------------- student positions -> teacher's


def align_positions(student_ends, start: int, count: int, teacher_ends, teacher_limit: int) -> np.ndarray:
    """For the student positions start .. start+count-1 (global token indices into the split): the global index
    of the teacher token whose prefix ends at the same byte, or -1. int64 [count].

    student_ends / teacher_ends [N] (arrays or memmaps, non-decreasing): the byte offset into the split's
    concatenated UTF-8 text where each token's text ends; a zero-width token (EOS, a special) repeats the previous
    end. teacher_limit: the teacher positions below it have cached targets.

    The rule is "the first token with that end", on both sides: student position p is alignable only if p == 0 or
    student_ends[p-1] < student_ends[p]; its teacher position g is the first index with teacher_ends[g] ==
    student_ends[p], kept if that end is there exactly and g < teacher_limit. Why the aligned targets predict the
    same thing: position p predicts token p+1 from tokens 0..p, which spell text[:ends[p]]; being the first token
    with its end, p is the token that spells the last of those bytes, not a zero-width token after it. The same
    holds for g, so both contexts are text[:e] (with the EOS tokens both data stages put between the same
    documents), and both targets are what follows byte e: the next token starts there on both sides, or is the
    EOS that ends the document on both sides (vocab_map sends EOS to EOS). A zero-width token's own position
    (ends[p-1] == ends[p]) is left unaligned. The teacher's cached target at g saw only its cache row's context,
    as with one tokenizer.

    This needs exact byte ends: a token that ends inside a multi-byte character (a byte-level token b" \\xe6", or a
    byte-fallback piece) must record the byte where it really ends. An end rounded to a character boundary (from
    character offsets) makes such a token look like it ends where it does not, and it can be the first with that
    end: its position would be aligned with a context it does not have.

    Reads only what it needs: the count + 1 student ends, and one binary search of the teacher's ends per
    alignable position (O(count log N)).
    """
    ends, first_with_end, searched = _student_window(student_ends, start, count, teacher_ends, teacher_limit)
    positions = np.full(count, -1, np.int64)
    if not len(searched) or not first_with_end.any():
        return positions
    wanted = ends[first_with_end]
    # searchsorted converts the searched array to the values' dtype when they differ, which would read (and copy)
    # the whole memmap: search with values of its own dtype, those past its range set aside (they match nothing).
    fits = wanted <= np.iinfo(searched.dtype).max if np.issubdtype(searched.dtype, np.integer) else True
    values = np.where(fits, wanted, 0).astype(searched.dtype)
    found = np.searchsorted(searched, values, side="left")
    inside = found < len(searched)
    matched = np.zeros(len(found), bool)
    matched[inside] = np.asarray(searched[found[inside]], dtype=np.int64) == wanted[inside]
    matched &= fits
    positions[np.flatnonzero(first_with_end)[matched]] = found[matched]
    return positions


def _student_window(student_ends, start: int, count: int, teacher_ends, teacher_limit: int):
    """The student positions' byte ends (int64 [count]), which of them are the first token with their end, and the
    teacher's ends that have cached targets (a view: nothing read)."""
    if start < 0 or count < 0 or start + count > len(student_ends):
        raise ValueError(f"positions {start}..{start + count} lie outside the {len(student_ends)} student tokens")
    first = max(start - 1, 0)
    window = np.asarray(student_ends[first : start + count], dtype=np.int64)
    ends = window[start - first :]
    previous = window[:-1] if start > 0 else np.concatenate([[-1], window[:-1]])[:count]
    searched = teacher_ends[: max(0, min(teacher_limit, len(teacher_ends)))]
    return ends, previous < ends, searched


def positions_inside(student_ends, start: int, count: int, teacher_ends, teacher_limit: int, within: int):
    """For the student positions start .. start+count-1 that align with no teacher position: the teacher position
    of the last teacher token boundary before them (g = -1 where there is none within `within` bytes, in
    [0, teacher_limit)) and the bytes they have read past it.

    Position p ends e = student_ends[p] inside the teacher token that follows boundary g (the first teacher token
    with end E < e, the largest such E): the teacher's target at g is its distribution over that next token, and the
    student has read e - E of its bytes. `continuation_ids` conditions that distribution on those bytes. Positions
    that align exactly (align_positions) and zero-width ones get -1, as do those with no boundary before them.
    Returns (g [count], spans [count, 2]): g the boundary, spans the bytes read past it, (E, e), in the split's
    text."""
    ends, first_with_end, searched = _student_window(student_ends, start, count, teacher_ends, teacher_limit)
    boundary = np.full(count, -1, np.int64)
    spans = np.zeros((count, 2), np.int64)
    if not len(searched) or not count:
        return boundary, spans
    dtype = searched.dtype
    last = np.searchsorted(searched, ends.astype(dtype), side="left") - 1  # the last teacher token ending before e
    has = last >= 0
    last_end = np.zeros(count, np.int64)
    last_end[has] = np.asarray(searched[last[has]], dtype=np.int64)
    consumed = ends - last_end
    inside = has & first_with_end & (consumed > 0) & (consumed <= within)
    boundary[inside] = np.searchsorted(searched, last_end[inside].astype(dtype), side="left")  # first with that end
    spans[inside] = np.stack([last_end[inside], ends[inside]], axis=1)
    return boundary, spans


class Continuations:
    """Where a teacher token's probability goes when the student has already read the first bytes of it: for the
    consumed bytes c, teacher token t counts only if its bytes start with c and go on past it, and then goes to the
    student token that is the longest prefix of the rest of t (the prefix map, one step on). The teacher's target at
    the boundary before c conditioned on c (Phan et al. 2024's byte-level probability, one token deep): targets for
    the positions inside a teacher token, which a character-level student has most of."""

    def __init__(self, teacher_bytes: Sequence[bytes | None], student_bytes: Sequence[bytes | None]):
        self.teacher_bytes = list(teacher_bytes)
        self.prefixes = StudentPrefixes(student_bytes)
        self.within = max((len(b) for b in self.teacher_bytes if b), default=0) - 1  # bytes that can be consumed

    def continuation_ids(self, teacher_ids: np.ndarray, consumed: Sequence[bytes]) -> np.ndarray:
        """[n, K] teacher ids and each row's consumed bytes -> the student ids their probability goes to, -1 for
        the teacher tokens that do not continue the consumed bytes (their mass is conditioned away)."""
        out = np.full(teacher_ids.shape, -1, np.int64)
        for row, (ids, text) in enumerate(zip(teacher_ids.tolist(), consumed)):
            n = len(text)
            for column, teacher_id in enumerate(ids):
                spelled = self.teacher_bytes[teacher_id] if 0 <= teacher_id < len(self.teacher_bytes) else None
                if spelled is not None and len(spelled) > n and spelled.startswith(text):
                    out[row, column] = self.prefixes.first_token(spelled[n:])
        return out


# ----------------------------------------------------------------------------- teacher targets -> student ids


NO_STUDENT_ID = 1 << 40  # the sort key of an unmapped entry (-1): after every student id


def sort_rows(rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row of the int64 rank [R, K] sorted ascending, ties by column -> (sorted ranks, the column each came
    from), both [R, K]. Rank and column are packed into one int64 key (rank << bits | column) and the keys sorted
    by value: a plain sort of unique keys, several times faster than a stable argsort along short rows. Ranks must
    stay below 2**(62 - bits) in magnitude, bits = the bit length of K - 1."""
    bits = max((rank.shape[1] - 1).bit_length(), 1)
    key = (rank << bits) | np.arange(rank.shape[1])
    key.sort(axis=1)
    return key >> bits, key & ((1 << bits) - 1)  # (an arithmetic shift: negative ranks come back)


def merge_equal_ids(student_ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of student_ids [R, K] (-1: no student id) and float64 weights [R, K], the entries grouped by id ->
    (sorted_ids, columns, sums), all [R, K] in each row's id order (ascending, the -1s last as NO_STUDENT_ID):
    columns holds the original column of each entry, sums the float64 sum of the weights of the id at the id's
    first entry (ties go by column: its first occurrence in the row) and 0 at every other entry and at the -1s.
    Vectorized: one sort along the rows and one add.reduceat over every (row, id) group at once."""
    rows, k = student_ids.shape
    sorted_ids, columns = sort_rows(np.where(student_ids < 0, NO_STUDENT_ID, student_ids))
    starts = np.ones((rows, k), bool)  # the first entry of each (row, id) group; every row starts one
    np.not_equal(sorted_ids[:, 1:], sorted_ids[:, :-1], out=starts[:, 1:])
    heads = np.flatnonzero(starts)
    sums = np.zeros(rows * k)
    sums[heads] = np.add.reduceat(
        np.take_along_axis(weights, columns, axis=1).reshape(-1), heads
    )  # each group's sum, in order
    sums = sums.reshape(rows, k)
    sums[sorted_ids == NO_STUDENT_ID] = 0.0
    return sorted_ids, columns, sums


def map_topk(
    ids: np.ndarray, logprobs: np.ndarray, tail_logprob: np.ndarray, id_map: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A top-k cache's targets in teacher ids -> the same distribution in student ids, K kept.

    ids [..., K] teacher ids, logprobs [..., K] (at or below ZERO_MASS_LOGPROB, -inf included: no mass),
    tail_logprob [...] the log mass outside the ids, id_map from vocab_map. Returns (ids int64 [..., K],
    logprobs [..., K] in logprobs' dtype, tail_logprob [...] in its dtype):
      - the probabilities of teacher ids mapping to the same student id are summed into one entry;
      - the mass of unmapped ids (-1) joins the tail: log(exp(tail) + sum of their p) (a tail with nothing
        added is returned as given, its sentinel included);
      - the entries are sorted by probability, high to low; the freed slots are padding: log-prob -inf and the
        id of the row's most likely entry (a duplicate id with zero mass, so the set of ids outside the top-k
        stays what the merged entries make it);
      - a row with no mapped mass is all padding (id 0): the caller masks it.
    Total mass (sum exp(logprobs) + exp(tail)) is preserved. Sums are taken in float64.
    """
    return merge_topk(id_map[np.asarray(ids)], logprobs, tail_logprob)


def merge_topk(
    student_ids: np.ndarray, logprobs: np.ndarray, tail_logprob: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """map_topk given each entry's student id ([..., K], -1: none) instead of a map."""
    shape, k = student_ids.shape, student_ids.shape[-1]
    student_ids = student_ids.reshape(-1, k)  # [R, K]
    logp = np.asarray(logprobs, np.float64).reshape(-1, k)
    tail = np.asarray(tail_logprob).reshape(-1)
    with np.errstate(under="ignore"):
        mass = np.exp(logp)
        mass[~(logp > ZERO_MASS_LOGPROB)] = 0.0  # sentinels, -inf and NaN: no mass
        tail_mass = np.where(tail > ZERO_MASS_LOGPROB, np.exp(tail.astype(np.float64)), 0.0)
    unmapped_mass = np.einsum("rk,rk->r", mass, student_ids < 0)
    with np.errstate(divide="ignore"):
        new_tail = np.where(unmapped_mass > 0, np.log(tail_mass + unmapped_mass), tail).astype(tail.dtype)

    sorted_ids, _, sums = merge_equal_ids(student_ids, mass)
    # Kept entries first, largest first, padding (rank 0) after: ranked by minus the float32 bit pattern of the
    # mass, which orders positive floats as their values (a kept mass is >= exp(ZERO_MASS_LOGPROB), a normal float).
    rank, columns = sort_rows(-sums.astype(np.float32).view(np.int32).astype(np.int64))
    out_ids = np.take_along_axis(sorted_ids, columns, axis=1)
    out_kept = rank < 0
    padding_id = np.where(out_kept[:, 0], out_ids[:, 0], 0)
    out_ids = np.where(out_kept, out_ids, padding_id[:, None])
    with np.errstate(divide="ignore"):
        out_logp = np.log(np.take_along_axis(sums, columns, axis=1))  # padding: log 0 = -inf
    return (
        out_ids.reshape(shape),
        out_logp.astype(np.asarray(logprobs).dtype).reshape(shape),
        new_tail.reshape(shape[:-1]),
    )


def map_sampled(ids: np.ndarray, counts: np.ndarray, id_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A sampled cache's targets in teacher ids -> student ids: (ids int64 [..., S], counts [..., S] in counts'
    dtype).

    ids [..., S] the distinct teacher ids drawn, counts [..., S] how often (0: padding), id_map from vocab_map.
    The counts of teacher ids mapping to the same student id are summed into one entry; draws of unmapped ids
    (-1) are dropped, so a row's counts may sum to less than num_samples. The entries come first, in the order
    of their first occurrence in the row, then padding: id 0 with count 0 (the cache's own padding).
    """
    return merge_sampled(id_map[np.asarray(ids)], counts)


def merge_sampled(student_ids: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """map_sampled given each entry's student id ([..., S], -1: none) instead of a map."""
    shape, s = student_ids.shape, student_ids.shape[-1]
    student_ids = student_ids.reshape(-1, s)
    weights = np.asarray(counts, np.float64).reshape(-1, s)
    sorted_ids, columns, sums = merge_equal_ids(student_ids, weights)
    _, by_first = sort_rows(np.where(sums > 0, columns, s))  # kept first, by first occurrence
    out_counts = np.take_along_axis(sums, by_first, axis=1)
    out_ids = np.where(out_counts > 0, np.take_along_axis(sorted_ids, by_first, axis=1), 0)
    return out_ids.reshape(shape), out_counts.astype(np.asarray(counts).dtype).reshape(shape)
