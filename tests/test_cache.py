"""Cache stage (pipeline/cache.py) on the tiny teacher: what is stored is the teacher's next-token
distribution, at the right positions, reproducibly, resumably and identically under torchrun.

Reference numbers are recomputed here directly with the model (float64 where it matters).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, make_tiny_teacher, make_tokenizer, one_torch_thread, run_cli, willows_text, written_files

from pipeline import cache_format
from pipeline.cache import (
    TeacherRunner,
    _build_shard,
    build_cache,
    common_attrs,
    row_seed,
    sampled_targets,
    shard_block,
)
from pipeline.cache_format import FORMAT_VERSION, CacheReader, read_manifest, read_shard_attrs, verify_cache
from pipeline.config import CacheConfig, DataConfig
from pipeline.data import prepare_data
from pipeline.errors import PipelineError
from pipeline.fsutil import read_json, sha256_file
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.rows import load_tokens, read_meta
from pipeline.teacher import teacher_identity, tokenizer_hash, weights_hash

SEQ_LEN, K, ROWS_PER_PART, BATCH = 32, 8, 2, 2
NUM_SAMPLES, SAMPLED_ROWS = 50, 6


def cache_args(data_dir, teacher, out_dir, *extra) -> list:
    return [
        "cache-logits",
        "--data-dir",
        data_dir,
        "--teacher",
        teacher,
        "--out-dir",
        out_dir,
        "--seq-len",
        SEQ_LEN,
        "--mode",
        "topk",
        "--k",
        K,
        "--rows-per-part",
        ROWS_PER_PART,
        "--batch-size",
        BATCH,
        "--dtype",  # float32: these tests check the stored numbers against float64 references
        "float32",
        *extra,
    ]


def cli_env() -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory, tiny_data, tiny_teacher) -> Path:
    """`python -m pipeline cache-logits` as one plain process (no launcher), every row of both splits."""
    out = tmp_path_factory.mktemp("cache") / "topk"
    run_cli(*cache_args(tiny_data, tiny_teacher, out), check=True)
    return out


@pytest.fixture(scope="module")
def sampled_cache(tmp_path_factory, tiny_data, tiny_teacher) -> Path:
    """The sampled mode, in-process (the CLI path is the same build_cache; topk_cache runs it as a subprocess)."""
    out = tmp_path_factory.mktemp("cache") / "sampled"
    with one_torch_thread():
        build_cache(
            config(tiny_data, tiny_teacher, out, mode="sampled", num_samples=NUM_SAMPLES, max_rows=SAMPLED_ROWS, seed=0)
        )
    return out


@pytest.fixture(scope="module")
def teacher_model(tiny_teacher):
    return load_causal_lm(tiny_teacher)


def dense_logprobs(model, tokens: np.ndarray, temperature: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    """[L+1] row -> [L, V] log-softmax of the teacher's logits / T at every input position."""
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(tokens[None, :-1])).logits[0]
    return torch.log_softmax(logits.to(dtype) / temperature, dim=-1)


def shard_bytes(cache_dir: Path) -> dict[str, str]:
    return {entry["file"]: sha256_file(cache_dir / entry["file"]) for entry in read_manifest(cache_dir)["shards"]}


def count_teacher_rows(monkeypatch) -> list[int]:
    """Record the number of rows of every teacher forward the cache stage makes."""
    calls: list[int] = []
    original = TeacherRunner.targets

    def counting(self, rows, row_seeds):
        calls.append(len(rows))
        return original(self, rows, row_seeds)

    monkeypatch.setattr(TeacherRunner, "targets", counting)
    return calls


def config(data_dir, teacher, out_dir, **options) -> CacheConfig:
    settings = dict(mode="topk", seq_len=SEQ_LEN, k=K, rows_per_part=ROWS_PER_PART, batch_size=BATCH, dtype="float32")
    settings.update(options)
    return CacheConfig(data_dir=str(data_dir), teacher=str(teacher), out_dir=str(out_dir), **settings)


# ---------------------------------------------------------------- what is stored


def test_topk_row_j_is_the_teacher_distribution_of_token_j_plus_1(topk_cache, tiny_data, teacher_model):
    labels_in_top = 0
    for split, indices in (("train", (0, 1, 300)), ("val", (0, 67))):
        reader = CacheReader(topk_cache, split, verify=True)
        data = np.asarray(load_tokens(tiny_data, split), dtype=np.int64)
        assert len(reader) == (len(data) - 1) // SEQ_LEN
        for i in indices:
            row = reader.row(i)
            tokens = row["tokens"]
            np.testing.assert_array_equal(tokens, data[i * SEQ_LEN : i * SEQ_LEN + SEQ_LEN + 1])
            dense = dense_logprobs(teacher_model, tokens)  # [L, V] float64
            top = dense_logprobs(teacher_model, tokens, dtype=torch.float32).topk(K, dim=-1)
            np.testing.assert_array_equal(row["topk_ids"], top.indices.numpy())
            np.testing.assert_allclose(
                row["topk_logprobs"], np.take_along_axis(dense.numpy(), row["topk_ids"], -1), rtol=1e-3, atol=1e-3
            )
            top_mass = np.exp(np.take_along_axis(dense.numpy(), row["topk_ids"], -1)).sum(-1)
            np.testing.assert_allclose(row["tail_logprob"], np.log1p(-top_mass), rtol=1e-4, atol=1e-3)
            # position j conditions on tokens 0..j only: a forward over the prefix gives the same row
            for j in (0, 9, SEQ_LEN - 1):
                prefix = dense_logprobs(teacher_model, tokens[: j + 2])[-1]
                np.testing.assert_allclose(
                    row["topk_logprobs"][j], prefix[row["topk_ids"][j]].numpy(), rtol=1e-3, atol=1e-3
                )
            # ... and its label is tokens[j + 1]: the teacher's own shifted loss is the mean of -dense[j, tokens[j+1]]
            with torch.no_grad():
                hf_loss = teacher_model(
                    input_ids=torch.from_numpy(tokens[None, :-1]), labels=torch.from_numpy(tokens[None, :-1])
                ).loss.item()
            nll = -dense[np.arange(SEQ_LEN - 1), tokens[1:SEQ_LEN]].mean().item()
            assert abs(hf_loss - nll) < 1e-4
            in_top = row["topk_ids"] == tokens[1:, None]
            label_logprob = dense[np.arange(SEQ_LEN), tokens[1:]].numpy()
            np.testing.assert_allclose(
                row["topk_logprobs"][in_top], label_logprob[in_top.any(-1)], rtol=1e-3, atol=1e-3
            )
            labels_in_top += int(in_top.sum())
    assert labels_in_top > 0, "the sharp tiny teacher should rank some labels in its top-K"


def test_auto_dtype_is_bfloat16_exactly_where_the_hardware_multiplies_it_natively():
    from pipeline.cache import compute_dtype
    from pipeline.machine import cpu_features

    cpu = torch.device("cpu")
    native = bool({"avx512_bf16", "amx_bf16"} & set(cpu_features())) and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert compute_dtype("auto", cpu) == ("bfloat16" if native else "float32")
    assert compute_dtype("float32", cpu) == "float32" and compute_dtype("bfloat16", cpu) == "bfloat16"


@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_a_bfloat16_cache_holds_the_bfloat16_teachers_own_distribution(mode, tmp_path, tiny_data, tiny_teacher):
    """--dtype bfloat16: the teacher's weights, body and head in bf16 (what a plain bf16 forward computes), the
    extraction in float32 on those logits: the stored numbers are exact for the bf16 teacher's logits."""
    extra = ("--mode", mode, "--num-samples", NUM_SAMPLES) if mode == "sampled" else ()
    run_cli(
        *cache_args(tiny_data, tiny_teacher, tmp_path / "bf16", "--max-rows", 4, *extra, "--dtype", "bfloat16"),
        check=True,
    )
    assert read_manifest(tmp_path / "bf16")["compute_dtype"] == "bfloat16"
    model = load_causal_lm(tiny_teacher, dtype=torch.bfloat16)
    reader = CacheReader(tmp_path / "bf16", "train")
    for i in (0, 3):
        row = reader.row(i)
        dense = dense_logprobs(model, row["tokens"])  # float64 log-softmax of the bf16 model's own logits
        if mode == "topk":
            np.testing.assert_array_equal(row["topk_ids"], dense.float().topk(K, dim=-1).indices.numpy())
            np.testing.assert_allclose(
                row["topk_logprobs"], np.take_along_axis(dense.numpy(), row["topk_ids"], -1), rtol=1e-3, atol=1e-3
            )
            top_mass = np.exp(np.take_along_axis(dense.numpy(), row["topk_ids"], -1)).sum(-1)
            np.testing.assert_allclose(row["tail_logprob"], np.log1p(-top_mass), rtol=1e-4, atol=1e-3)
        else:
            entropy = -(dense.exp() * dense).sum(-1).numpy()
            np.testing.assert_allclose(row["teacher_entropy"], entropy, rtol=2e-3, atol=2e-3)  # float16 on disk
            drawn = np.take_along_axis(dense.numpy(), row["sample_ids"], -1)[row["sample_counts"] > 0]
            assert np.isfinite(drawn).all() and (drawn > -30).all()  # only ids the bf16 teacher gives mass


def test_cache_attributes_identify_teacher_tokenizer_and_tokens(topk_cache, tiny_data, tiny_teacher):
    meta = read_meta(tiny_data)
    manifest = read_manifest(topk_cache)
    expected = {
        "format_version": FORMAT_VERSION,
        "mode": "topk",
        "k": K,
        "num_samples": 0,
        "seq_len": SEQ_LEN,
        "temperature": 1.0,
        "vocab_size": 384,
        "teacher_hash": weights_hash(tiny_teacher),
        "tokenizer_hash": tokenizer_hash(load_tokenizer(tiny_teacher)),
        "compute_dtype": "float32",
    }
    assert expected["tokenizer_hash"] == meta["tokenizer_hash"]
    assert {k: manifest[k] for k in expected} == expected
    assert (
        manifest["train_tokens_sha256"] == meta["train_sha256"] and manifest["val_tokens_sha256"] == meta["val_sha256"]
    )
    for split in ("train", "val"):
        (entry,) = [e for e in manifest["shards"] if e["split"] == split]
        attrs = read_shard_attrs(topk_cache / entry["file"])
        assert {k: attrs[k] for k in expected} == expected
        assert attrs["tokens_sha256"] == meta[f"{split}_sha256"] == entry["tokens_sha256"]
        assert attrs["id_dtype"] == "uint16" and attrs["split"] == split
    assert not (topk_cache / ".parts").exists() and not list(topk_cache.glob("*.entry.json"))
    assert not (topk_cache / ".lock").exists()
    verify_cache(topk_cache)


def test_temperature_is_applied_before_the_cut(tmp_path, tiny_data, tiny_teacher, teacher_model):
    build_cache(config(tiny_data, tiny_teacher, tmp_path / "t2", temperature=2.0, max_rows=2))
    hot = CacheReader(tmp_path / "t2", "train")
    assert hot.attrs["temperature"] == 2.0
    build_cache(config(tiny_data, tiny_teacher, tmp_path / "t1", max_rows=2))
    cold = CacheReader(tmp_path / "t1", "train")
    for i in range(2):
        row = hot.row(i)
        dense = dense_logprobs(teacher_model, row["tokens"], temperature=2.0)  # log_softmax(z / 2)
        np.testing.assert_array_equal(row["topk_ids"], dense.float().topk(K, dim=-1).indices.numpy())
        np.testing.assert_allclose(
            row["topk_logprobs"], np.take_along_axis(dense.numpy(), row["topk_ids"], -1), rtol=1e-3, atol=1e-3
        )
        top_mass = np.exp(np.take_along_axis(dense.numpy(), row["topk_ids"], -1)).sum(-1)
        np.testing.assert_allclose(row["tail_logprob"], np.log1p(-top_mass), rtol=1e-4, atol=1e-3)
        # a hotter distribution leaves more mass outside the top K than the T=1 cache does
        assert (row["tail_logprob"] > cold.row(i)["tail_logprob"]).mean() > 0.9


# ---------------------------------------------------------------- sampled mode


def test_sampled_targets_draw_from_the_distribution():
    """Many positions sharing one distribution, each with its own seed: frequencies -> probabilities."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0, 0.0], dtype=torch.float64)
    rows, length, draws = 8, 50, 40
    logprobs = probs.log().float().expand(rows, length, -1).clone()
    out = sampled_targets(logprobs.clone(), draws, [row_seed(3, "train", i) for i in range(rows)])  # overwrites
    num_distinct = out["num_distinct"].reshape(-1).astype(np.int64)
    counts, ids = out["sample_counts"].astype(np.int64), out["sample_ids"]
    starts = np.concatenate([[0], np.cumsum(num_distinct)[:-1]])
    assert (np.add.reduceat(counts, starts) == draws).all()
    totals = np.bincount(ids, weights=counts, minlength=6)
    assert totals[4:].sum() == 0  # zero-probability ids are never drawn
    frequencies = totals / totals.sum()
    assert np.abs(frequencies - probs.numpy()).max() < 0.02  # 16000 draws: 4+ standard deviations
    entropy = -(probs[:4] * probs[:4].log()).sum().item()
    np.testing.assert_allclose(out["teacher_entropy"], entropy, rtol=1e-5)
    again = sampled_targets(logprobs.clone(), draws, [row_seed(3, "train", i) for i in range(rows)])
    assert all(np.array_equal(out[k], again[k]) for k in out)


def test_row_seeds_never_repeat_across_rows_splits_and_seeds():
    seeds = {row_seed(seed, split, i) for seed in range(3) for split in ("train", "val") for i in range(20_000)}
    assert len(seeds) == 3 * 2 * 20_000 and max(seeds) < 2**63


def test_sampled_cache_counts_entropy_and_frequencies(sampled_cache, tiny_data, teacher_model):
    reader = CacheReader(sampled_cache, "train", verify=True)
    assert reader.attrs["num_samples"] == NUM_SAMPLES and reader.attrs["k"] == 0 and len(reader) == SAMPLED_ROWS
    data = np.asarray(load_tokens(tiny_data, "train"), dtype=np.int64)
    chi2 = []
    for i in range(len(reader)):
        row = reader.row(i)
        np.testing.assert_array_equal(row["tokens"], data[i * SEQ_LEN : i * SEQ_LEN + SEQ_LEN + 1])
        np.testing.assert_array_equal(row["sample_counts"].sum(-1), NUM_SAMPLES)
        dense = dense_logprobs(teacher_model, row["tokens"])
        probs = dense.exp().numpy()
        entropy = -(probs * dense.numpy()).sum(-1)
        np.testing.assert_allclose(row["teacher_entropy"], entropy, rtol=2e-3, atol=2e-3)
        for j in range(SEQ_LEN):
            frequency = np.zeros(probs.shape[-1])
            np.add.at(frequency, row["sample_ids"][j], row["sample_counts"][j] / NUM_SAMPLES)
            # E[N |f - p|^2] = 1 - |p|^2 for multinomial frequencies
            chi2.append(NUM_SAMPLES * ((frequency - probs[j]) ** 2).sum() / (1 - (probs[j] ** 2).sum()))
    print(f"mean normalised squared error of the sampled frequencies: {np.mean(chi2):.3f} over {len(chi2)} positions")
    assert 0.7 < np.mean(chi2) < 1.3, np.mean(chi2)


def test_sampled_draws_reproduce_with_the_seed_and_change_with_another(
    tmp_path, sampled_cache, tiny_data, tiny_teacher
):
    options = dict(mode="sampled", num_samples=NUM_SAMPLES, max_rows=SAMPLED_ROWS)
    build_cache(config(tiny_data, tiny_teacher, tmp_path / "same", seed=0, **options))
    assert shard_bytes(tmp_path / "same") == shard_bytes(sampled_cache)  # byte-identical shards
    # the draws depend on the row, not on how rows are batched into forwards and parts
    build_cache(
        config(tiny_data, tiny_teacher, tmp_path / "rebatched", seed=0, batch_size=3, rows_per_part=5, **options)
    )
    build_cache(config(tiny_data, tiny_teacher, tmp_path / "other", seed=1, **options))
    same, rebatched, other = (CacheReader(tmp_path / name, "train") for name in ("same", "rebatched", "other"))
    differing = 0
    for i in range(SAMPLED_ROWS):
        a, b, c = same.row(i), rebatched.row(i), other.row(i)
        np.testing.assert_array_equal(a["sample_ids"], b["sample_ids"])
        np.testing.assert_array_equal(a["sample_counts"], b["sample_counts"])
        np.testing.assert_array_equal(a["tokens"], c["tokens"])
        np.testing.assert_allclose(a["teacher_entropy"], c["teacher_entropy"], rtol=1e-3)
        differing += sum(
            not np.array_equal(a["sample_ids"][j], c["sample_ids"][j])
            or not np.array_equal(a["sample_counts"][j], c["sample_counts"][j])
            for j in range(SEQ_LEN)
        )
    assert differing > SAMPLED_ROWS * SEQ_LEN // 2, differing
    assert other.attrs["seed"] == 1 and same.attrs["seed"] == 0


# ---------------------------------------------------------------- settings the teacher cannot serve


def test_k_larger_than_the_vocabulary_exits_2(tmp_path, tiny_data, tiny_teacher):
    out = tmp_path / "bad-k"
    result = run_cli(
        "cache-logits",
        "--data-dir",
        tiny_data,
        "--teacher",
        tiny_teacher,
        "--out-dir",
        out,
        "--seq-len",
        SEQ_LEN,
        "--mode",
        "topk",
        "--k",
        1000,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--k 1000 is larger than the tokenizer's vocabulary" in errors[0], result.stderr[-2000:]
    assert not out.exists()


def test_seq_len_beyond_the_teacher_context_and_foreign_tokenizer_are_refused(
    tmp_path, tiny_data, tiny_teacher, tiny_corpus
):
    with pytest.raises(PipelineError, match=r"--seq-len 300 is longer than the teacher's context \(256\)") as info:
        build_cache(config(tiny_data, tiny_teacher, tmp_path / "long", seq_len=300))
    assert "\n" not in str(info.value) and not (tmp_path / "long").exists()

    other = make_tiny_teacher(tmp_path / "other-teacher", make_tokenizer(willows_text()[:40_000], vocab_size=300))
    prepare_data(
        DataConfig(
            corpus=str(tiny_corpus), tokenizer=str(other), out_dir=str(tmp_path / "other-data"), val_fraction=0.1
        )
    )
    with pytest.raises(PipelineError, match="tokenized with another tokenizer") as info:
        build_cache(config(tmp_path / "other-data", tiny_teacher, tmp_path / "foreign"))
    assert "\n" not in str(info.value) and not (tmp_path / "foreign").exists()


# ---------------------------------------------------------------- reruns, resume, processes


def test_rerun_is_a_noop_and_changed_settings_rebuild(tmp_path, tiny_data, tiny_teacher, monkeypatch):
    out = tmp_path / "cache"
    calls = count_teacher_rows(monkeypatch)
    build_cache(config(tiny_data, tiny_teacher, out, max_rows=5))
    assert sum(calls) == 10  # 5 train + 5 val rows
    manifest = read_json(out / "manifest.json")
    stamps = written_files(p for p in out.iterdir() if p.is_file())

    calls.clear()
    build_cache(config(tiny_data, tiny_teacher, out, max_rows=5, batch_size=1, rows_per_part=1))  # layout only
    assert calls == [] and read_json(out / "manifest.json") == manifest
    assert written_files(p for p in out.iterdir() if p.is_file()) == stamps

    build_cache(config(tiny_data, tiny_teacher, out, max_rows=5, k=4))
    assert (
        sum(calls) == 10
        and read_manifest(out)["k"] == 4
        and CacheReader(out, "train").row(0)["topk_ids"].shape == (SEQ_LEN, 4)
    )

    calls.clear()
    (out / "val-00000-of-00001.h5").unlink()  # a shard gone: rebuilt, not "up to date"
    build_cache(config(tiny_data, tiny_teacher, out, max_rows=5, k=4))
    assert sum(calls) == 10
    verify_cache(out)


def test_killed_run_resumes_to_byte_identical_shards(tmp_path, topk_cache, tiny_data, tiny_teacher, monkeypatch):
    out = tmp_path / "killed"
    parts = out / ".parts" / "train-00000-of-00001.h5"  # one folder of parts per shard
    log = open(tmp_path / "log.txt", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *map(str, cache_args(tiny_data, tiny_teacher, out))],
        cwd=REPO,
        env=cli_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while not list(parts.glob("part-*.npz")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, (
        f"the run ended before it could be killed:\n{(tmp_path / 'log.txt').read_text()[-2000:]}"
    )
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    log.close()
    assert not (out / "manifest.json").exists()
    done = sum(np.load(p)["tokens"].shape[0] for p in parts.glob("part-*.npz"))
    total = sum(read_manifest(topk_cache)["splits"][s]["rows"] for s in ("train", "val"))
    print(f"killed after {done} of {total} rows")
    assert 0 < done < total - 100, done
    assert (out / ".lock").exists()  # left by the killed process: a stale lock the rerun takes over

    calls = count_teacher_rows(monkeypatch)
    build_cache(config(tiny_data, tiny_teacher, out))
    assert sum(calls) == total - done  # finished parts are reused, not recomputed
    assert shard_bytes(out) == shard_bytes(topk_cache)
    assert read_manifest(out)["shards"] == read_manifest(topk_cache)["shards"]
    assert not (out / ".parts").exists() and not (out / ".lock").exists() and not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_torchrun_two_processes_write_two_shards_equal_to_one_process(tmp_path, topk_cache, tiny_data, tiny_teacher):
    out = tmp_path / "ddp"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "pipeline",
            *map(str, cache_args(tiny_data, tiny_teacher, out)),
        ],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    manifest = read_manifest(out)
    for split in ("train", "val"):
        files = sorted(e["file"] for e in manifest["shards"] if e["split"] == split)
        assert files == [f"{split}-00000-of-00002.h5", f"{split}-00001-of-00002.h5"]
        assert manifest["splits"][split]["rows"] == read_manifest(topk_cache)["splits"][split]["rows"]
        multi, single = CacheReader(out, split, verify=True), CacheReader(topk_cache, split)
        assert len(multi) == len(single)
        for i in range(len(single)):
            a, b = multi.row(i), single.row(i)
            for name in ("tokens", "topk_ids", "topk_logprobs", "tail_logprob"):
                np.testing.assert_array_equal(a[name], b[name], err_msg=f"{split} row {i} {name}")
    expected = ["config.yaml", "manifest.json"] + [e["file"] for e in manifest["shards"]]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)


def test_shard_blocks_cover_every_part_once():
    for num_parts in range(1, 12):
        for processes in range(1, 6):
            blocks = [shard_block(num_parts, rank, processes) for rank in range(processes)]
            used = [b for b in blocks if b is not None]
            assert len(used) == min(processes, num_parts)
            assert [b[0] for b in used] == list(range(len(used))) and {b[1] for b in used} == {len(used)}
            assert used[0][2] == 0 and used[-1][3] == num_parts
            assert all(b[2] < b[3] for b in used) and all(x[3] == y[2] for x, y in zip(used, used[1:]))


def test_split_with_fewer_parts_than_processes(tmp_path, topk_cache, tiny_data, tiny_teacher, teacher_model):
    """Two jobs run in one process: val (68 rows) fits one part, so only job 0 writes a val shard."""
    cfg = config(tiny_data, tiny_teacher, tmp_path, rows_per_part=100, max_rows=150)
    meta = read_meta(tiny_data)
    attrs = common_attrs(cfg, meta, teacher_identity(tiny_teacher), 384, "float32")
    runner = TeacherRunner(teacher_model, cfg, torch.device("cpu"))
    entries = []
    for rank in range(2):
        for split in ("train", "val"):
            entry = _build_shard(runner, cfg, attrs, split, rank, 2, show_progress=False)
            assert (entry is None) == (split == "val" and rank == 1)
            entries += [entry] if entry else []
    cache_format.write_manifest(tmp_path, attrs, entries)
    assert sorted(e["file"] for e in entries) == [
        "train-00000-of-00002.h5",
        "train-00001-of-00002.h5",
        "val-00000-of-00001.h5",
    ]
    for split, rows in (("train", 150), ("val", 68)):
        reader, single = CacheReader(tmp_path, split, verify=True), CacheReader(topk_cache, split)
        assert len(reader) == rows
        for i in (0, rows // 2, rows - 1):
            a, b = reader.row(i), single.row(i)
            for name in a:
                np.testing.assert_array_equal(a[name], b[name])
