"""Tests for pipeline.cache_format: parts, shard assembly, manifest, verification and the reader."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline import cache_format as cf
from pipeline.cache_format import (
    FORMAT_VERSION,
    CacheReader,
    assemble_shard,
    check_compatible,
    id_dtype_for,
    read_manifest,
    read_part,
    shard_name,
    verify_cache,
    write_manifest,
    write_part,
)
from pipeline.errors import PipelineError
from pipeline.fsutil import sha256_file

SEQ_LEN, K, NUM_SAMPLES, VOCAB = 6, 4, 5, 1000
PART_ROWS = [(3, 2), (4,)]  # two shards: shard 0 from parts of 3 and 2 rows, shard 1 from one part of 4 rows


def base_attrs(mode: str, split: str = "train", vocab_size: int = VOCAB) -> dict:
    return {
        "mode": mode,
        "split": split,
        "teacher_name": "tiny-teacher",
        "teacher_hash": "t" * 8,
        "tokenizer_hash": "z" * 8,
        "vocab_size": vocab_size,
        "seq_len": SEQ_LEN,
        "temperature": 1.0,
        "k": K if mode == "topk" else 0,
        "num_samples": NUM_SAMPLES if mode == "sampled" else 0,
        "seed": 7,
        "tokens_sha256": "a" * 64,
    }


def topk_part(rng, rows: int, vocab_size: int = VOCAB) -> dict:
    return {
        "tokens": rng.integers(0, vocab_size, (rows, SEQ_LEN + 1)).astype(np.int64),
        "topk_ids": rng.integers(0, vocab_size, (rows, SEQ_LEN, K)).astype(np.int32),
        "topk_logprobs": -rng.random((rows, SEQ_LEN, K)).astype(np.float32) * 5,
        "tail_logprob": -rng.random((rows, SEQ_LEN)).astype(np.float32),
    }


def sampled_part(rng, rows: int) -> dict:
    ids, counts, num_distinct = [], [], np.zeros((rows, SEQ_LEN), np.int64)
    for r in range(rows):
        for j in range(SEQ_LEN):
            draws = rng.integers(0, 20, NUM_SAMPLES)  # small id range so repeats happen
            distinct, count = np.unique(draws, return_counts=True)
            ids.append(distinct)
            counts.append(count)
            num_distinct[r, j] = len(distinct)
    return {
        "tokens": rng.integers(0, VOCAB, (rows, SEQ_LEN + 1)),
        "sample_ids": np.concatenate(ids).astype(np.int64),
        "sample_counts": np.concatenate(counts).astype(np.int64),
        "num_distinct": num_distinct,
        "teacher_entropy": rng.random((rows, SEQ_LEN)).astype(np.float32),
    }


def build_cache(tmp_path: Path, mode: str, seed: int = 0):
    """Write parts, assemble two train shards and a manifest; return (cache_dir, per-row parts, entries)."""
    rng = np.random.default_rng(seed)
    cache_dir = tmp_path / "cache"
    rows_written, entries, row_start = [], [], 0
    for shard_index, part_sizes in enumerate(PART_ROWS):
        part_paths = []
        for p, rows in enumerate(part_sizes):
            arrays = topk_part(rng, rows) if mode == "topk" else sampled_part(rng, rows)
            path = tmp_path / "parts" / f"train-{shard_index}-{p}.npz"
            write_part(path, arrays)
            part_paths.append(path)
            rows_written.append(arrays)
        attrs = base_attrs(mode) | {"shard_index": shard_index, "num_shards": len(PART_ROWS), "row_start": row_start}
        final = cache_dir / shard_name("train", shard_index, len(PART_ROWS))
        entries.append(assemble_shard(final, attrs, part_paths))
        row_start += sum(part_sizes)
    write_manifest(cache_dir, base_attrs(mode), entries)
    return cache_dir, rows_written, entries


def expected_rows(parts: list[dict], mode: str) -> list[dict]:
    """Split parts back into per-row dicts in the reader's output form (sampled: unpadded lists)."""
    out = []
    for part in parts:
        entry = 0
        for r in range(part["tokens"].shape[0]):
            row = {"tokens": part["tokens"][r]}
            if mode == "topk":
                row |= {n: part[n][r] for n in ("topk_ids", "topk_logprobs", "tail_logprob")}
            else:
                positions = []
                for j in range(SEQ_LEN):
                    n = int(part["num_distinct"][r, j])
                    positions.append((part["sample_ids"][entry : entry + n], part["sample_counts"][entry : entry + n]))
                    entry += n
                row |= {"positions": positions, "teacher_entropy": part["teacher_entropy"][r]}
            out.append(row)
    return out


# ----------------------------------------------------------------------------- round trips


def test_topk_round_trip_across_shards(tmp_path):
    cache_dir, parts, entries = build_cache(tmp_path, "topk")
    reader = CacheReader(cache_dir, "train", verify=True)
    want = expected_rows(parts, "topk")
    assert len(reader) == len(want) == 9
    assert reader.mode == "topk" and reader.seq_len == SEQ_LEN and reader.vocab_size == VOCAB
    assert reader.attrs["teacher_hash"] == "t" * 8 and type(reader.attrs["temperature"]) is float
    for i, w in enumerate(want):  # rows 0..4 in shard 0, 5..8 in shard 1
        got = reader.row(i)
        assert set(got) == {"tokens", "topk_ids", "topk_logprobs", "tail_logprob"}
        assert got["tokens"].dtype == np.int64 and got["tokens"].shape == (SEQ_LEN + 1,)
        np.testing.assert_array_equal(got["tokens"], w["tokens"])
        np.testing.assert_array_equal(reader.tokens(i), w["tokens"])
        assert got["topk_ids"].dtype == np.int64 and got["topk_ids"].shape == (SEQ_LEN, K)
        np.testing.assert_array_equal(got["topk_ids"], w["topk_ids"])
        assert got["topk_logprobs"].dtype == np.float32
        np.testing.assert_array_equal(got["topk_logprobs"], w["topk_logprobs"].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(got["tail_logprob"], w["tail_logprob"])
    np.testing.assert_array_equal(reader.row(-1)["tokens"], want[-1]["tokens"])
    with pytest.raises(IndexError):
        reader.row(len(want))


def test_sampled_round_trip_pads_with_zero_counts(tmp_path):
    cache_dir, parts, entries = build_cache(tmp_path, "sampled")
    reader = CacheReader(cache_dir, "train")
    want = expected_rows(parts, "sampled")
    max_distinct = max(int(p["num_distinct"].max()) for p in parts)
    assert reader.max_distinct == max_distinct
    assert len(reader) == len(want)
    for i, w in enumerate(want):
        got = reader.row(i)
        assert got["sample_ids"].shape == got["sample_counts"].shape == (SEQ_LEN, max_distinct)
        assert got["sample_ids"].dtype == np.int64 and got["sample_counts"].dtype == np.float32
        np.testing.assert_array_equal(got["tokens"], w["tokens"])
        np.testing.assert_array_equal(
            got["teacher_entropy"], w["teacher_entropy"].astype(np.float16).astype(np.float32)
        )
        for j, (ids, counts) in enumerate(w["positions"]):
            n = len(ids)
            np.testing.assert_array_equal(got["sample_ids"][j, :n], ids)
            np.testing.assert_array_equal(got["sample_counts"][j, :n], counts)
            assert (got["sample_counts"][j, n:] == 0).all() and (got["sample_ids"][j, n:] == 0).all()
        assert (got["sample_counts"].sum(axis=1) == NUM_SAMPLES).all()

    # each row's bytes are the spec's encoding of its entries (spec_pack_row below), at row_offsets
    rows_by_shard = [want[:5], want[5:]]
    for entry, shard_rows in zip(entries, rows_by_shard):
        with h5py.File(cache_dir / entry["file"], "r") as f:
            assert "sample_ids" not in f and "num_distinct" not in f
            offsets, packed_ids, packed_counts = f["row_offsets"][:], f["packed_ids"][:], f["packed_counts"][:]
            assert f.attrs["max_distinct"] == max(len(ids) for row in shard_rows for ids, _ in row["positions"])
        assert offsets.shape == (len(shard_rows) + 1, 2) and (offsets[0] == 0).all()
        assert tuple(offsets[-1]) == (len(packed_ids), len(packed_counts))
        for r, row in enumerate(shard_rows):
            want_ids, want_counts = spec_pack_row(row["positions"])
            assert packed_ids[offsets[r, 0] : offsets[r + 1, 0]].tobytes() == want_ids
            assert packed_counts[offsets[r, 1] : offsets[r + 1, 1]].tobytes() == want_counts


def spec_nibbles(value: int) -> list[int]:
    """The format's varint of one value, written from its description: 3-bit groups, low first, the top bit of
    every group but the last set."""
    groups = [value & 7]
    value >>= 3
    while value:
        groups.append(value & 7)
        value >>= 3
    return [g | (8 if i < len(groups) - 1 else 0) for i, g in enumerate(groups)]


def spec_bytes(nibbles: list[int]) -> bytes:
    """Two groups per byte, low nibble first; an odd count padded with a lone continuation group (8)."""
    if len(nibbles) % 2:
        nibbles = nibbles + [8]
    return bytes(low | high << 4 for low, high in zip(nibbles[0::2], nibbles[1::2]))


def spec_pack_row(positions) -> tuple[bytes, bytes]:
    """One row's packed_ids and packed_counts bytes, entry by entry, as the module docstring describes them."""
    id_nibbles, count_nibbles = [], []
    for ids, counts in positions:
        previous = 0
        for i, (token, count) in enumerate(zip(ids.tolist(), counts.tolist())):
            gap = token - previous if i else token
            previous = token
            id_nibbles += spec_nibbles(2 * gap + (count > 1))
            if count > 1:
                count_nibbles += spec_nibbles(count - 2)
    return spec_bytes(id_nibbles), spec_bytes(count_nibbles)


def test_varints_round_trip_every_size():
    rng = np.random.default_rng(11)
    values = np.concatenate(
        [np.arange(70), rng.integers(0, 2**20, 500), rng.integers(0, 2**40, 200), [2**33 - 1, 2**33, 8, 64, 512]]
    )
    for chunk in (values[:1], values[:2], values[:3], values):
        packed = cf.pack_varints(chunk)
        assert packed.dtype == np.uint8
        assert packed.tobytes() == spec_bytes([n for v in chunk.tolist() for n in spec_nibbles(v)])
        np.testing.assert_array_equal(cf.unpack_varints(packed), chunk)
    assert cf.unpack_varints(cf.pack_varints(np.zeros(0, np.int64))).shape == (0,)


def test_sampled_packing_reads_back_the_unpacked_arrays_at_the_limits(tmp_path):
    """Ids at both ends of a uint32 vocabulary, a position holding every draw once, a position with one id
    drawn N times, N = 255: the reader returns exactly the arrays the parts held (format 1 stored them as is)."""
    vocab, n, rows = 2**32, 255, 3
    rng = np.random.default_rng(4)
    ids, counts, num_distinct = [], [], np.zeros((rows, SEQ_LEN), np.int64)
    for r in range(rows):
        for j in range(SEQ_LEN):
            kind = (r * SEQ_LEN + j) % 4
            if kind == 0:  # all draws distinct, gaps of every size
                distinct = np.unique(rng.integers(0, vocab, n, dtype=np.int64))
                count = np.ones(len(distinct), np.int64)
                count[0] += n - len(distinct)
            elif kind == 1:  # one id drawn every time: the largest id
                distinct, count = np.array([vocab - 1]), np.array([n])
            else:
                distinct, count = np.unique(rng.integers(0, 1000, n), return_counts=True)
            ids.append(distinct)
            counts.append(count)
            num_distinct[r, j] = len(distinct)
    part = {
        "tokens": rng.integers(0, vocab, (rows, SEQ_LEN + 1), dtype=np.int64),
        "sample_ids": np.concatenate(ids),
        "sample_counts": np.concatenate(counts),
        "num_distinct": num_distinct,
        "teacher_entropy": rng.random((rows, SEQ_LEN)).astype(np.float32),
    }
    write_part(tmp_path / "p.npz", part)
    attrs = base_attrs("sampled", vocab_size=vocab) | {"num_samples": n, "shard_index": 0, "num_shards": 1}
    entry = assemble_shard(tmp_path / "c" / shard_name("train", 0, 1), attrs | {"row_start": 0}, [tmp_path / "p.npz"])
    write_manifest(tmp_path / "c", attrs, [entry])
    reader = CacheReader(tmp_path / "c", "train", verify=True)
    assert reader.attrs["id_dtype"] == "uint32" and reader.max_distinct == num_distinct.max() == n
    (want,) = [expected_rows([part], "sampled")]
    for r in range(rows):
        got = reader.row(r)
        for j, (position_ids, position_counts) in enumerate(want[r]["positions"]):
            k = len(position_ids)
            np.testing.assert_array_equal(got["sample_ids"][j, :k], position_ids)
            np.testing.assert_array_equal(got["sample_counts"][j, :k], position_counts)
            assert not got["sample_counts"][j, k:].any() and not got["sample_ids"][j, k:].any()
    old_layout_bytes = len(part["sample_ids"]) * 4 + len(part["sample_counts"]) + num_distinct.size
    print(f"packed {entry['bytes']} bytes for arrays of {old_layout_bytes} bytes in format 1 (uint32 ids)")


def test_unsorted_sample_ids_and_damaged_packed_rows_are_refused(tmp_path):
    part = sampled_part(np.random.default_rng(12), 2)
    first = int(part["num_distinct"][0, 0])
    assert first > 1
    part["sample_ids"][:first] = part["sample_ids"][:first][::-1].copy()  # position 0's ids descending
    write_part(tmp_path / "p.npz", part)
    attrs = base_attrs("sampled") | {"shard_index": 0, "num_shards": 1, "row_start": 0}
    with pytest.raises(PipelineError, match="not distinct and ascending"):
        assemble_shard(tmp_path / "c" / shard_name("train", 0, 1), dict(attrs), [tmp_path / "p.npz"])

    cache_dir, _, entries = build_cache(tmp_path / "ok", "sampled")
    shard = cache_dir / entries[0]["file"]
    with h5py.File(shard, "r+") as f:
        f["packed_counts"][0] = 0xFF  # continuation groups: a count runs into the next one
    write_manifest(cache_dir, base_attrs("sampled"), [dict(entries[0], bytes=shard.stat().st_size), entries[1]])
    reader = CacheReader(cache_dir, "train")
    with pytest.raises(PipelineError, match=r"train-00000-of-00002\.h5 is truncated or corrupted \(row 0 does not"):
        reader.row(0)


def test_format_version_1_is_refused_with_the_rebuild_command(tmp_path):
    cache_dir, _, _ = build_cache(tmp_path, "sampled")
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    (cache_dir / "manifest.json").write_text(json.dumps(manifest | {"format_version": 1}))
    with pytest.raises(
        PipelineError, match=r"format_version 1, this code reads 2: delete it and rerun make cache-logits"
    ):
        CacheReader(cache_dir, "train")


def test_reads_do_not_touch_h5py(tmp_path, monkeypatch):
    cache_dir, parts, _ = build_cache(tmp_path, "sampled")
    reader = CacheReader(cache_dir, "train")

    def no_h5py(*args, **kwargs):
        raise AssertionError("h5py used on the read path")

    monkeypatch.setattr(h5py, "File", no_h5py)
    monkeypatch.setattr(cf.reader.h5py, "File", no_h5py)
    for i in range(len(reader)):
        reader.row(i)
        reader.tokens(i)


def test_reader_pickles_and_still_reads(tmp_path):
    cache_dir, parts, _ = build_cache(tmp_path, "topk")
    reader = CacheReader(cache_dir, "train")
    before = reader.row(6)  # opens the memmaps; pickling must drop them
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._maps is None and len(clone) == len(reader)
    after = clone.row(6)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])


# ----------------------------------------------------------------------------- file layout


def test_assembly_is_byte_identical(tmp_path):
    rng = np.random.default_rng(3)
    part_paths = []
    for p in range(2):
        part_paths.append(tmp_path / f"p{p}.npz")
        write_part(part_paths[-1], sampled_part(rng, 3))
    name = shard_name("train", 0, 1)
    attrs = base_attrs("sampled") | {"shard_index": 0, "num_shards": 1, "row_start": 0}
    first = assemble_shard(tmp_path / "a" / name, dict(attrs), part_paths)
    time.sleep(1.1)  # HDF5 timestamps have 1 s resolution: make any stored time differ
    second = assemble_shard(tmp_path / "b" / name, dict(attrs), part_paths)
    assert first["sha256"] == second["sha256"] == sha256_file(tmp_path / "b" / name)
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert not list((tmp_path / "a").glob(".*tmp"))  # no temp file left behind


def test_datasets_are_contiguous_and_allocated(tmp_path):
    cache_dir, _, entries = build_cache(tmp_path, "topk")
    with h5py.File(cache_dir / entries[0]["file"], "r") as f:
        assert set(f.keys()) == set(cf.SHARD_DATASETS["topk"])
        for name in f:
            ds = f[name]
            assert ds.chunks is None and ds.compression is None and ds.maxshape == ds.shape
            assert ds.id.get_offset() is not None
        assert f["tokens"].dtype == np.uint16 and f["topk_logprobs"].dtype == np.float16
        attrs = {k: f.attrs[k] for k in f.attrs}
    assert attrs["format_version"] == FORMAT_VERSION and attrs["rows"] == 5 and attrs["id_dtype"] == "uint16"
    assert attrs["max_distinct"] == 0 and attrs["row_start"] == 0 and isinstance(attrs["mode"], str)


def test_manifest_contents(tmp_path):
    cache_dir, _, entries = build_cache(tmp_path, "topk")
    manifest = read_manifest(cache_dir)
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["teacher_hash"] == "t" * 8 and manifest["seq_len"] == SEQ_LEN
    common = cf.manifest_attrs(manifest)
    assert "row_start" not in common and "shards" not in common and common["temperature"] == 1.0
    assert [s["file"] for s in manifest["shards"]] == ["train-00000-of-00002.h5", "train-00001-of-00002.h5"]
    train = manifest["splits"]["train"]
    assert train["rows"] == 9 and train["tokens"] == 9 * SEQ_LEN
    assert train["bytes_per_token"] == pytest.approx(sum(e["bytes"] for e in entries) / (9 * SEQ_LEN))


# ----------------------------------------------------------------------------- verification


def test_verify_detects_truncation_flipped_byte_and_missing_shard(tmp_path):
    cache_dir, _, entries = build_cache(tmp_path, "topk")
    verify_cache(cache_dir)
    verify_cache(cache_dir, "train")
    shard = cache_dir / entries[1]["file"]
    original = shard.read_bytes()

    shard.write_bytes(original[:-10])
    with pytest.raises(PipelineError, match=r"train-00001-of-00002\.h5 is truncated or corrupted.*make cache-logits"):
        verify_cache(cache_dir)
    with pytest.raises(PipelineError, match=r"train-00001-of-00002\.h5 is truncated"):
        CacheReader(cache_dir, "train")

    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    shard.write_bytes(bytes(flipped))
    with pytest.raises(PipelineError, match=r"train-00001-of-00002\.h5 is truncated or corrupted \(sha256 mismatch\)"):
        verify_cache(cache_dir)
    with pytest.raises(PipelineError, match="sha256 mismatch"):
        CacheReader(cache_dir, "train", verify=True)

    shard.unlink()
    with pytest.raises(PipelineError, match=r"train-00001-of-00002\.h5 is missing"):
        verify_cache(cache_dir)
    with pytest.raises(PipelineError, match=r"train-00001-of-00002\.h5 is missing"):
        CacheReader(cache_dir, "train")


def test_missing_manifest_and_split_give_the_make_hint(tmp_path):
    with pytest.raises(PipelineError, match=r"no cache at .*: run make cache-logits"):
        read_manifest(tmp_path / "nowhere")
    with pytest.raises(PipelineError, match="make cache-logits"):
        CacheReader(tmp_path / "nowhere", "train")
    cache_dir, _, _ = build_cache(tmp_path, "topk")
    with pytest.raises(PipelineError, match="no val split: run make cache-logits"):
        CacheReader(cache_dir, "val")
    (cache_dir / "manifest.json").write_text("{not json")
    with pytest.raises(PipelineError, match="run make cache-logits"):
        verify_cache(cache_dir)


def test_manifest_rejects_row_gaps(tmp_path):
    cache_dir, _, entries = build_cache(tmp_path, "topk")
    broken = [dict(entries[0]), dict(entries[1], row_start=entries[1]["row_start"] + 1)]
    with pytest.raises(PipelineError, match="gap or overlap"):
        write_manifest(cache_dir, base_attrs("topk"), broken)
    with pytest.raises(PipelineError, match="incomplete or duplicated"):
        write_manifest(cache_dir, base_attrs("topk"), entries[1:])


def test_check_compatible_lists_every_mismatch(tmp_path):
    attrs = base_attrs("topk")
    check_compatible(attrs, {"teacher_hash": "t" * 8, "temperature": 1.0, "seq_len": SEQ_LEN})
    with pytest.raises(PipelineError) as err:
        check_compatible(attrs, {"teacher_hash": "other", "seq_len": 128, "temperature": 2.0, "mode": "topk", "k": 8})
    message = str(err.value)
    assert "\n" not in message and "make cache-logits" in message
    for line in (
        "teacher_hash: cache has 'tttttttt', expected 'other'",
        "seq_len: cache has 6, expected 128",
        "temperature: cache has 1.0, expected 2.0",
        "k: cache has 4, expected 8",
    ):
        assert line in message
    assert "mode:" not in message


# ----------------------------------------------------------------------------- ids and dtypes


def test_id_dtype_boundaries():
    assert id_dtype_for(65536) == np.uint16
    assert id_dtype_for(65537) == np.uint32
    assert id_dtype_for(2**32) == np.uint32
    with pytest.raises(PipelineError):
        id_dtype_for(2**32 + 1)


def test_out_of_range_id_raises_instead_of_wrapping(tmp_path):
    rng = np.random.default_rng(5)
    arrays = topk_part(rng, 2, vocab_size=65536)
    arrays["topk_ids"][1, 2, 3] = 65536  # would wrap to 0 as uint16
    write_part(tmp_path / "p.npz", arrays)
    attrs = base_attrs("topk", vocab_size=65536) | {"shard_index": 0, "num_shards": 1, "row_start": 0}
    final = tmp_path / "cache" / shard_name("train", 0, 1)
    with pytest.raises(PipelineError, match=r"p\.npz: topk_ids holds id 65536.*uint16"):
        assemble_shard(final, attrs, [tmp_path / "p.npz"])
    assert not final.exists() and not list(final.parent.iterdir())  # the temp file is gone too


def test_part_problems_are_reported(tmp_path):
    rng = np.random.default_rng(6)
    attrs = base_attrs("topk") | {"shard_index": 0, "num_shards": 1, "row_start": 0}
    final = tmp_path / "cache" / shard_name("train", 0, 1)
    bad = topk_part(rng, 2)
    bad["topk_logprobs"][0, 0, 0] = np.nan
    write_part(tmp_path / "nan.npz", bad)
    with pytest.raises(PipelineError, match="topk_logprobs holds NaN"):
        assemble_shard(final, dict(attrs), [tmp_path / "nan.npz"])
    wrong_k = topk_part(rng, 2)
    wrong_k["topk_ids"] = wrong_k["topk_ids"][..., :2]
    write_part(tmp_path / "k.npz", wrong_k)
    with pytest.raises(PipelineError, match="topk_ids has shape"):
        assemble_shard(final, dict(attrs), [tmp_path / "k.npz"])
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(PipelineError, match=r"junk\.npz is unreadable"):
        read_part(tmp_path / "junk.npz")
    with pytest.raises(PipelineError, match="should be named"):
        assemble_shard(tmp_path / "cache" / "x.h5", dict(attrs), [tmp_path / "nan.npz"])


def test_write_part_round_trip(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.uint16).reshape(2, 3), "b": np.ones(4, np.float16)}
    write_part(tmp_path / "part.npz", arrays)
    back = read_part(tmp_path / "part.npz")
    assert set(back) == {"a", "b"}
    for name in arrays:
        assert back[name].dtype == arrays[name].dtype
        np.testing.assert_array_equal(back[name], arrays[name])
    assert [p.name for p in tmp_path.iterdir()] == ["part.npz"]


def test_sampled_counts_must_add_up_to_num_samples(tmp_path):
    arrays = sampled_part(np.random.default_rng(8), 2)
    arrays["sample_counts"][0] += 1
    write_part(tmp_path / "p.npz", arrays)
    attrs = base_attrs("sampled") | {"shard_index": 0, "num_shards": 1, "row_start": 0}
    with pytest.raises(PipelineError, match="do not add up to num_samples=5"):
        assemble_shard(tmp_path / "cache" / shard_name("train", 0, 1), attrs, [tmp_path / "p.npz"])


def test_reader_refuses_shards_from_different_runs(tmp_path):
    cache_dir, _, entries = build_cache(tmp_path, "topk")
    rng = np.random.default_rng(9)
    write_part(tmp_path / "other.npz", topk_part(rng, 4))
    attrs = base_attrs("topk") | {"teacher_hash": "different", "shard_index": 1, "num_shards": 2, "row_start": 5}
    entries[1] = assemble_shard(cache_dir / entries[1]["file"], attrs, [tmp_path / "other.npz"])
    write_manifest(cache_dir, base_attrs("topk"), entries)
    with pytest.raises(PipelineError, match=r"train-00001-of-00002\.h5 disagrees with .* teacher_hash"):
        CacheReader(cache_dir, "train")


def test_memmap_reader_returns_the_rows_h5py_reads(tmp_path):
    """The np.memmap views at ds.id.get_offset() give exactly what h5py itself reads from the shards."""
    import h5py

    cache_dir, _, _ = build_cache(tmp_path, "topk")
    reader = CacheReader(cache_dir, "train")
    global_row = 0
    for shard in sorted(cache_dir.glob("train-*.h5")):
        with h5py.File(shard, "r") as f:
            for local in range(f["tokens"].shape[0]):
                row = reader.row(global_row)
                np.testing.assert_array_equal(row["tokens"], f["tokens"][local])
                np.testing.assert_array_equal(row["topk_ids"], f["topk_ids"][local])
                np.testing.assert_array_equal(row["topk_logprobs"], f["topk_logprobs"][local].astype(np.float32))
                np.testing.assert_array_equal(row["tail_logprob"], f["tail_logprob"][local])
                global_row += 1
    assert global_row == len(reader) > 0
