"""Cross-tokenizer distillation end to end on the tiny teacher: student tokenizers trained on the train text
(byte-level BPE, characters), their rows aligned with the teacher's cache, distill / baseline / compare runs, the
embedding start, and the refusals."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, STUDENT_FLAGS, invoke_cli
from safetensors.torch import load_file
from test_data_offsets import ALPHABET

from pipeline.alignment import tokenizer_maps
from pipeline.batches import AlignedCacheRows, collate_rows
from pipeline.cache_format import CacheReader
from pipeline.config import StudentConfig
from pipeline.losses import distillation_loss, teacher_targets
from pipeline.models import input_embeddings, load_causal_lm, load_tokenizer, logit_width
from pipeline.rows import load_ends, load_tokens, read_meta
from pipeline.student import build_student, student_rows, teacher_embedding_projection
from pipeline.student_data import prepare_student_data
from pipeline.student_tokenizers import trained_tokenizer
from pipeline.teacher import tokenizer_hash

SEQ_LEN = 32
RUN_FLAGS = ["--seq-len", SEQ_LEN, "--max-steps", 4, "--batch-size", 2, "--eval-every", 2, "--eval-rows", 2,
             "--save-every", 2, "--warmup-steps", 1, "--log-every", 1]  # fmt: skip


@pytest.fixture(scope="module")
def cross_data(tmp_path_factory, tiny_data):
    """A copy of tiny_data (student folders are written inside the data folder; tiny_data stays unchanged)."""
    folder = tmp_path_factory.mktemp("cross") / "data"
    shutil.copytree(tiny_data, folder)
    return folder


@pytest.fixture(scope="module")
def student_tokenizers(tmp_path_factory, cross_data):
    """{kind: folder} of a byte-level BPE of 300 tokens and a character-level tokenizer (train-tokenizer)."""
    root = tmp_path_factory.mktemp("tokenizers")
    folders = {}
    for kind in ("bpe", "char"):
        folders[kind] = root / kind
        invoke_cli("train-tokenizer", "--data-dir", cross_data, "--kind", kind, "--vocab-size", 300,
                   "--out-dir", folders[kind], check=True)  # fmt: skip
    return folders


def decoded(tokenizer, ids) -> str:
    return tokenizer.decode(np.asarray(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_trained_tokenizers_cover_the_train_text(student_tokenizers, cross_data):
    text = (cross_data / "train.txt").read_text(encoding="utf-8")
    bpe, char = (load_tokenizer(student_tokenizers[kind]) for kind in ("bpe", "char"))
    assert len(bpe) == 300 and bpe.eos_token == "<|endoftext|>"
    assert len(char) == len(set(text)) + 2  # every character of the train text, unknown and EOS
    sample = text[:2000]
    for tokenizer in (bpe, char):
        assert decoded(tokenizer, tokenizer(sample, add_special_tokens=False)["input_ids"]) == sample
    assert len(char(sample, add_special_tokens=False)["input_ids"]) == len(sample)


def spelled(tokenizer) -> dict[int, bytes]:
    """Each id's bytes: a byte-level token's characters through GPT-2's byte alphabet (test_data_offsets writes
    it out), any other token decoded alone (a character)."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    if json.loads(tokenizer.backend_tokenizer.to_str())["decoder"]["type"] == "ByteLevel":
        return {i: bytes(ALPHABET[c] for c in token) for i, token in zip(ids, tokenizer.convert_ids_to_tokens(ids))}
    return {i: decoded(tokenizer, [i]).encode() for i in ids}


def reference_targets(cached: dict, column: int, mode: str, send) -> dict[int, float]:
    """{student id: probability (top-k) or count (sampled)} of one cached position, each teacher id sent by
    send(teacher id) -> student id or None, entries of one student id summed."""
    ids, weights = (
        (cached["topk_ids"][column], np.exp(cached["topk_logprobs"][column].astype(np.float64)))
        if mode == "topk"
        else (cached["sample_ids"][column], cached["sample_counts"][column].astype(np.float64))
    )
    out: dict[int, float] = {}
    for teacher_id, weight in zip(ids.tolist(), weights.tolist()):
        student_id = send(teacher_id)
        if student_id is not None and weight > 1e-30:
            out[student_id] = out.get(student_id, 0.0) + weight
    return out


def row_targets(row: dict, j: int, mode: str) -> dict[int, float]:
    """{student id: probability or count} of one position of a student row (its ids already the student's)."""
    return reference_targets(row, j, mode, lambda student_id: student_id)


def same_targets(got: dict, want: dict) -> bool:
    return got.keys() == want.keys() and all(math.isclose(got[i], want[i], rel_tol=1e-5, abs_tol=1e-7) for i in got)


@pytest.mark.parametrize("kind", ["bpe", "char"])
@pytest.mark.parametrize("cache", ["tiny_topk_cache", "tiny_sampled_cache"])
def test_student_rows_carry_the_teacher_targets_of_the_same_text(request, kind, cache, student_tokenizers, cross_data):
    """Against references from decoded tokens and the cache rows themselves:
    - aligned positions: the two prefixes decode to the same text; the target is the cached one at that teacher
      position with each teacher token sent to the student token that is the longest prefix of its bytes;
    - positions inside a teacher token: the teacher's prefix up to its boundary plus the bytes the student read past
      it decode to the student's prefix; the target is the cached one at the boundary restricted to the teacher
      tokens that start with those bytes and go on, each sent to the longest student token that begins the rest,
      scaled back to the top-k's mass (top-k) or to num_samples draws (sampled)."""
    reader = CacheReader(request.getfixturevalue(cache), "train")
    teacher_tokenizer = load_tokenizer(read_meta(cross_data)["tokenizer_name"])
    tokenizer = load_tokenizer(student_tokenizers[kind])
    student_dir = prepare_student_data(cross_data, tokenizer)
    maps = tokenizer_maps(teacher_tokenizer, tokenizer, int(reader.attrs["vocab_size"]))
    rows = AlignedCacheRows(str(student_dir), str(cross_data), reader, maps)
    teacher_tokens, student_tokens = load_tokens(cross_data, "train"), load_tokens(student_dir, "train")
    teacher_bytes, student_ids = spelled(teacher_tokenizer), {b: i for i, b in sorted(spelled(tokenizer).items())[::-1]}

    teacher_ends = np.cumsum([len(teacher_bytes.get(t, b"")) for t in teacher_tokens.tolist()])  # decoded alone
    eos = teacher_tokenizer.eos_token_id

    def longest_student_prefix(text: bytes):
        return next((student_ids[text[:n]] for n in range(len(text), 0, -1) if text[:n] in student_ids), None)

    counts = {"aligned": 0, "inside": 0, "positions": 0}
    for index in (0, 1, 3):
        row = rows[index]
        assert row["tokens"].tolist() == student_tokens[index * SEQ_LEN : index * SEQ_LEN + SEQ_LEN + 1].tolist()
        teacher_positions = rows.teacher_positions_of(index)
        assert (row["aligned_mask"] == (teacher_positions >= 0)).all()
        assert (row["teacher_mask"] >= row["aligned_mask"]).all()
        counts["positions"] += SEQ_LEN
        for j in np.flatnonzero(row["teacher_mask"]):
            student_prefix = decoded(tokenizer, student_tokens[: index * SEQ_LEN + j + 1]).encode()
            if row["aligned_mask"][j]:
                counts["aligned"] += 1
                g = int(teacher_positions[j])
                assert decoded(teacher_tokenizer, teacher_tokens[: g + 1]).encode() == student_prefix

                def send(t):
                    return tokenizer.eos_token_id if t == eos else longest_student_prefix(teacher_bytes.get(t, b""))
            else:
                counts["inside"] += 1
                # the last teacher boundary before the student's end, from each teacher token's decoded length: the
                # first teacher token whose text ends there (zero-width EOS after it does not count)
                g = int(np.searchsorted(teacher_ends, len(student_prefix), side="left")) - 1
                g = int(np.searchsorted(teacher_ends, teacher_ends[g], side="left"))
                boundary_text = decoded(teacher_tokenizer, teacher_tokens[: g + 1]).encode()
                assert student_prefix.startswith(boundary_text) and len(boundary_text) < len(student_prefix)
                read = student_prefix[len(boundary_text) :]

                def send(t, read=read):
                    spelled_t = teacher_bytes.get(t)
                    if spelled_t is None or len(spelled_t) <= len(read) or not spelled_t.startswith(read):
                        return None
                    return longest_student_prefix(spelled_t[len(read) :])

            cached = reader.row(g // SEQ_LEN)
            want = reference_targets(cached, g % SEQ_LEN, reader.mode, send)
            if not row["aligned_mask"][j]:  # conditioned: scaled back to the top-k's mass or to num_samples draws
                whole = reference_targets(cached, g % SEQ_LEN, reader.mode, lambda t: 0)[0]
                total = reader.num_samples if reader.mode == "sampled" else whole
                want = {i: w * total / sum(want.values()) for i, w in want.items()}
            assert same_targets(row_targets(row, j, reader.mode), want), (index, j)
            if reader.mode == "sampled":  # the reported KD's constant: the cached entropy or the carried draws' own
                carried_as_cached = row["aligned_mask"][j] and sorted(want.values()) == sorted(
                    c for c in cached["sample_counts"][g % SEQ_LEN].tolist() if c > 0
                )
                frequencies = np.array(list(want.values())) / reader.num_samples
                entropy = (
                    cached["teacher_entropy"][g % SEQ_LEN]
                    if carried_as_cached
                    else -(frequencies * np.log(frequencies)).sum()
                )
                assert row["teacher_entropy"][j] == pytest.approx(entropy, rel=1e-5, abs=1e-6), (index, j)
    if kind == "bpe":
        assert counts["aligned"] > 0.5 * counts["positions"]
    else:  # characters: a position ends where a teacher token does, or inside one
        assert counts["aligned"] > 0.15 * counts["positions"] and counts["inside"] > 0
    if reader.mode == "topk":  # the rest: inside a teacher token none of the 16 cached ids (a random teacher) continues
        assert counts["aligned"] + counts["inside"] > 0.6 * counts["positions"]


@pytest.mark.parametrize("cache", ["tiny_topk_cache", "tiny_sampled_cache"])
def test_the_teachers_own_tokenizer_as_the_other_gives_the_same_targets_and_loss(request, cache, cross_data):
    """The teacher's tokenizer taken through the cross-tokenizer path: the same rows, every position whose token ends
    past the one before aligned with its own teacher position (zero-width tokens and tokens ending inside a character
    are not, by the alignment's rule), the cached targets unchanged (identity map), and so the loss of a
    batch the same as the same-tokenizer loss."""
    reader = CacheReader(request.getfixturevalue(cache), "train")
    tokenizer = load_tokenizer(read_meta(cross_data)["tokenizer_name"])
    student_dir = prepare_student_data(cross_data, tokenizer, cross_data.parent / "teacher-as-student")
    assert (load_tokens(student_dir, "train") == load_tokens(cross_data, "train")).all()
    maps = tokenizer_maps(tokenizer, tokenizer, int(reader.attrs["vocab_size"]))
    rows = AlignedCacheRows(str(student_dir), str(cross_data), reader, maps)
    full_rows, ends = [], load_ends(cross_data, "train")
    for index in range(len(reader)):
        row, cached = rows[index], reader.row(index)
        assert (row["tokens"] == cached["tokens"]).all()
        # the positions whose token ends past the one before it (not zero-width, not inside a character)
        own = ends[index * SEQ_LEN : (index + 1) * SEQ_LEN].astype(np.int64)
        before = np.concatenate([ends[index * SEQ_LEN - 1 : index * SEQ_LEN] if index else [-1], own[:-1]])
        spells = own > before
        assert (row["aligned_mask"] == spells).all() and (row["teacher_mask"] == spells).all()
        assert (rows.teacher_positions_of(index)[spells] == index * SEQ_LEN + np.flatnonzero(spells)).all()
        if reader.mode == "topk":  # the same entries (map_topk orders them by mass) and the same tail
            entries = [zip(source["topk_ids"][spells].tolist(), source["topk_logprobs"][spells].tolist())
                       for source in (row, cached)]  # fmt: skip
            for got, want in zip(*entries):
                assert sorted(zip(*got)) == sorted(zip(*want))
            assert np.array_equal(row["tail_logprob"][spells], cached["tail_logprob"][spells])
        else:
            for name in ("sample_ids", "sample_counts", "teacher_entropy"):
                assert np.array_equal(row[name][spells], cached[name][spells]), name
        if spells.all():
            full_rows.append((row, cached))
    assert len(full_rows) >= 2  # rows without an EOS position: the whole loss compares

    def loss(batch):
        batch = collate_rows(batch)
        vocab = int(reader.attrs["vocab_size"])
        logits = torch.randn(*batch["tokens"][:, :-1].shape, vocab, generator=torch.Generator().manual_seed(0))
        targets = teacher_targets(batch, reader.num_samples)
        return distillation_loss(logits.reshape(-1, vocab), batch["tokens"][:, 1:].reshape(-1), None, targets,
                                 alpha=0.3, temperature=float(reader.attrs["temperature"]))  # fmt: skip

    cross, same = loss([row for row, _ in full_rows[:2]]), loss([cached for _, cached in full_rows[:2]])
    for a, b in zip(cross, same):  # top-k entries in another order: the same sums up to rounding
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_new_student_embeddings_start_from_the_teachers_rows_of_the_same_bytes(tiny_teacher, cross_data):
    tokenizer = trained_tokenizer(str(cross_data), "bpe", 600)  # more merges than the teacher's 384 tokens hold
    teacher_rows = tokenizer_maps(
        load_tokenizer(tiny_teacher), tokenizer, len(load_tokenizer(tiny_teacher))
    ).teacher_rows
    config = StudentConfig(n_layer=1, n_embd=16, n_head=2, n_kv_head=2, mlp_size=32)
    model = build_student(config, str(tiny_teacher), len(tokenizer), 0, 32, tokenizer, teacher_rows)
    assert logit_width(model) == student_rows(len(tokenizer))
    start = model.get_input_embeddings().weight.detach()
    std = model.config.initializer_range
    projected = teacher_embedding_projection(input_embeddings(tiny_teacher), start.shape[1], std)
    shared = np.flatnonzero(teacher_rows >= 0)
    assert 50 < len(shared) < len(tokenizer)  # the byte alphabet and common merges are in both vocabularies
    assert torch.equal(start[shared], projected[teacher_rows[shared]])
    others = np.setdiff1d(np.arange(len(tokenizer)), shared)
    assert not torch.isclose(start[others][:, None], projected[None]).all(-1).any()  # random: none is a teacher row


def test_distill_baseline_compare_with_another_tokenizer(
    tmp_path, tiny_teacher, cross_data, tiny_topk_cache, student_tokenizers
):
    tokenizer_dir = student_tokenizers["bpe"]
    common = ["--data-dir", cross_data, "--teacher", tiny_teacher, "--student-tokenizer", tokenizer_dir,
              *RUN_FLAGS, *STUDENT_FLAGS]  # fmt: skip
    distilled = invoke_cli("distill", *common, "--cache-dir", tiny_topk_cache, "--out-dir", tmp_path / "d", check=True)
    assert "its own tokenizer (300 tokens" in distilled.output
    assert "embedding rows start from the teacher's" in distilled.output
    invoke_cli("baseline", *common, "--out-dir", tmp_path / "b", check=True)
    student_hash = tokenizer_hash(load_tokenizer(tokenizer_dir))
    for run in ("d", "b"):
        run_config = json.loads((tmp_path / run / "run_config.json").read_text())
        assert run_config["resolved"]["inputs"]["student_tokenizer_hash"] == student_hash
        assert tokenizer_hash(load_tokenizer(tmp_path / run)) == student_hash  # the run folder holds its tokenizer
        assert logit_width(load_causal_lm(tmp_path / run)) == student_rows(300)
    kd = [m["kd"] for m in map(json.loads, (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()) if "kd" in m]
    assert kd and all(value > 0 for value in kd)

    invoke_cli("compare", "--data-dir", cross_data, "--cache-dir", tiny_topk_cache, "--teacher", tiny_teacher,
               "--distilled", tmp_path / "d", "--baseline", tmp_path / "b", "--out-dir", tmp_path / "c",
               "--eval-rows", 4, "--max-new-tokens", 4, "--num-prompts", 1, check=True)  # fmt: skip
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    for label in ("teacher", "distilled", "baseline"):
        assert 0 < report["models"][label]["val_bits_per_byte"] < 20
    for label in ("distilled", "baseline"):
        figures = report["models"][label]
        assert 0.3 < figures["coverage"] <= 1.0
        assert figures["kl_exact"] > 0 and 0 <= figures["top1_agreement"] <= 1
    assert report["eval"]["student_rows"] >= 1
    assert report["draft"] is None
    assert "coverage" in (tmp_path / "c" / "report.md").read_text()
    invoke_cli("export", "--model", tmp_path / "d", "--formats", "int8", "--eval-rows", 2, "--max-new-tokens", 4,
               check=True)  # fmt: skip  # measured on the student's own val rows
    export = json.loads((tmp_path / "d" / "export" / "export_report.json").read_text())
    assert export["data_dir"].endswith(f"student-{student_hash[:12]}")
    assert math.isfinite(export["variants"]["int8"]["val_ppl"])
    card = (tmp_path / "d" / "README.md").read_text()
    assert "its own (this folder's), not the teacher's" in card and "positions aligned with the teacher's" in card


def test_cross_tokenizer_refusals(tmp_path, tiny_teacher, cross_data, tiny_topk_cache, student_tokenizers):
    common = ["--data-dir", cross_data, "--teacher", tiny_teacher, "--student-tokenizer", student_tokenizers["char"],
              *RUN_FLAGS, *STUDENT_FLAGS, "--cache-dir", tiny_topk_cache]  # fmt: skip
    result = invoke_cli("distill", *common, "--kd-loss", "reverse-kl", "--out-dir", tmp_path / "r")
    assert result.exit_code == 2 and "forward-kl" in result.output
    result = invoke_cli("distill", *common, "--student-init", "teacher-layers", "--out-dir", tmp_path / "t")
    assert result.exit_code == 2 and "--student-tokenizer" in result.output

    old = tmp_path / "old-data"  # a data folder from before byte offsets
    shutil.copytree(cross_data, old, ignore=shutil.ignore_patterns("student-*", "*.txt", "*.ends", "*.docs"))
    meta = json.loads((old / "meta.json").read_text())
    meta.pop("offsets", None)
    (old / "meta.json").write_text(json.dumps(meta))
    result = invoke_cli("distill", *common[2:], "--data-dir", old, "--out-dir", tmp_path / "o")
    assert result.exit_code == 2 and "make data" in result.output
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_sweep_of_another_tokenizer_ranks_by_bits_per_byte(
    tmp_path, tiny_teacher, cross_data, tiny_topk_cache, student_tokenizers
):
    """A sweep's students with the BPE tokenizer: scored on their own rows, coverage given, ranked by bits per byte
    (the order of perplexity within one tokenizer), ratios against the baseline of the same tokenizer."""
    invoke_cli("sweep", "--data-dir", cross_data, "--teacher", tiny_teacher, "--cache-dir", tiny_topk_cache,
               "--student-tokenizer", student_tokenizers["bpe"], *RUN_FLAGS, *STUDENT_FLAGS,
               "--out-dir", tmp_path / "s", "--grid", "alpha=0.2,0.8", check=True)  # fmt: skip
    ranked = json.loads((tmp_path / "s" / "sweep.json").read_text())["ranked"]
    assert len(ranked) == 3 and {row["name"] for row in ranked} >= {"baseline"}
    bits = [row["val_bits_per_byte"] for row in ranked]
    assert bits == sorted(bits)
    assert [row["val_ppl"] for row in ranked] == sorted(row["val_ppl"] for row in ranked)  # one tokenizer: same order
    for row in ranked:
        assert 0.3 < row["coverage"] <= 1 and row["ratio_to_baseline"] is not None
    assert "coverage" in (tmp_path / "s" / "sweep.md").read_text()


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_across_tokenizers(
    tmp_path, tiny_teacher, cross_data, tiny_topk_cache, student_tokenizers
):
    """Two ranks of batch 1 train a cross-tokenizer student like one process of batch 2 over the same rows (equal up
    to float reduction order); the ranks' student rows are built once, by the main process, in a fresh data copy."""
    fresh = tmp_path / "data"
    shutil.copytree(cross_data, fresh, ignore=shutil.ignore_patterns("student-*"))
    common = ["--teacher", tiny_teacher, "--cache-dir", tiny_topk_cache, "--student-tokenizer",
              student_tokenizers["bpe"], *RUN_FLAGS, *STUDENT_FLAGS]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    invoke_cli(
        "distill", "--data-dir", cross_data, *common, "--out-dir", one, check=True
    )  # --batch-size 2 in RUN_FLAGS
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pipeline"]
    args = ["distill", "--data-dir", fresh, *common, "--out-dir", two, "--batch-size", 1]
    result = subprocess.run(launch + [str(a) for a in args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 0, errors or result.stderr[-2000:]
    assert result.stdout.count("data: wrote") == 1  # the student rows, built by the main process alone
    (student_dir,) = fresh.glob("student-*")
    (reference_dir,) = [p for p in cross_data.glob("student-*") if p.name == student_dir.name]
    for name in ("train.bin", "train.ends", "val.bin", "val.ends"):
        assert (student_dir / name).read_bytes() == (reference_dir / name).read_bytes()
    records_one = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    records_two = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    for got, want in zip(records_two, records_one):
        if "val_ce" in want:
            assert got["val_ce"] == pytest.approx(want["val_ce"], rel=1e-3)
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    worst = max(((b[n] - a[n]).abs().max() / a[n].abs().max()).item() for n in a)
    assert worst < 5e-2, worst
