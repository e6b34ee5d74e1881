"""The benchmark harness: a tiny end-to-end run of `bench` (every section, --quality included) on the tiny
teacher, checked for complete, sane output (no timing assertions), plus its measuring helpers."""

from __future__ import annotations

import json
import math
import os
import threading
import types

import numpy as np
import pytest
import torch
from conftest import run_cli

from pipeline.bench import (
    PeakMemory,
    SavedTensorCounter,
    busy_machine,
    cpu_busy_fraction,
    forward_flops,
    peak_bf16_flops,
    resolve_batch_size,
)
from pipeline.cache_format import CacheReader, verify_cache
from pipeline.config import BenchConfig, from_flags
from pipeline.losses import dense_kd_loss
from pipeline.rows import load_tokens

SEQ_LEN, BATCH, BATCHES, K, QUALITY_ROWS, EVAL_ROWS = 32, 2, 2, 16, 6, 2
STUDENT = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--n-kv-head", "2", "--mlp-size", "64"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, tiny_teacher, tiny_data):
    out = tmp_path_factory.mktemp("bench")
    result = run_cli(
        "bench",
        "--data-dir",
        tiny_data,
        "--teacher",
        tiny_teacher,
        "--out-dir",
        out,
        "--seq-len",
        SEQ_LEN,
        "--batch-size",
        BATCH,
        "--batches",
        BATCHES,
        "--repeats",
        2,
        "--steps",
        2,
        "--k",
        K,
        "--num-samples",
        20,
        "--data-batches",
        4,
        "--mixed-precision",
        "no",
        "--quality",
        "--quality-steps",
        3,
        "--quality-rows",
        QUALITY_ROWS,
        "--eval-rows",
        EVAL_ROWS,
        *STUDENT,
        timeout=300,
        check=True,
    )
    return types.SimpleNamespace(out=out, stdout=result.stdout, report=json.loads((out / "bench.json").read_text()))


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_report_has_every_section_with_machine_and_command(bench_run):
    report = bench_run.report
    assert {
        "machine",
        "command",
        "options",
        "student",
        "resolved",
        "stage1",
        "stage2",
        "data",
        "memory",
        "fused_head",
        "quality",
    } <= set(report)
    machine = report["machine"]
    assert machine["cpu"] and machine["cpu_cores"] >= 1 and machine["torch"] == torch.__version__ and machine["date"]
    assert machine["gpu"] is None if not torch.cuda.is_available() else machine["gpu"]
    assert "bench" in report["command"] and "--quality" in report["command"]
    assert report["options"]["seq_len"] == SEQ_LEN and report["options"]["k"] == K
    assert report["resolved"]["batch_size"] == BATCH and report["resolved"]["mixed_precision"] == "no"


@pytest.mark.slow
def test_stage1_throughput_and_storage_are_sane(bench_run, tiny_teacher):
    stage1 = bench_run.report["stage1"]
    assert stage1["rows"] == BATCH * BATCHES and stage1["tokens_per_pass"] == BATCH * BATCHES * SEQ_LEN
    assert len(stage1["forward"]["times_s"]) == 2
    assert ("forward_float32" in stage1) == (stage1["teacher_dtype"] != "float32")
    assert stage1["fastest_forward"] in ("forward", "forward_float32")
    assert stage1["fused_head"] is True  # the tiny Llama's logits are its head on the last hidden state
    vocab = bench_run.report["resolved"]["vocab_size"]
    for mode in ("topk", "sampled"):
        x = stage1[mode]
        assert _positive(x["tokens_per_s"]) and _positive(x["write_ms_per_batch"])
        assert _positive(x["body_ms_per_batch"]) and _positive(x["head_extract_ms_per_batch"])
        # measured against the fastest plain forward: float32 or the cache's compute dtype
        assert x["ratio_to_forward"] == pytest.approx(stage1[stage1["fastest_forward"]]["median_s"] / x["median_s"])
        assert x["tokens_per_s"] == pytest.approx(stage1["tokens_per_pass"] / x["median_s"])
        assert x["dense_fp16_bytes_per_token"] == 2 * vocab
        assert x["dense_over_cache"] == pytest.approx(2 * vocab / x["bytes_per_token"])
    # topk stores K ids (uint16) + K fp16 log-probs + a float32 tail per position, plus the token row and HDF5 overhead
    assert 4 * K + 4 <= stage1["topk"]["bytes_per_token"] < 4 * K + 4 + 200
    assert stage1["mfu"] is None or _positive(stage1["mfu"]["forward_tflops"])


@pytest.mark.slow
def test_bench_caches_hold_the_teacher_top_ids_of_the_real_rows(bench_run, tiny_data, tiny_teacher):
    from transformers import AutoModelForCausalLM

    cache_dir = bench_run.out / "cache-topk"
    verify_cache(cache_dir)
    reader = CacheReader(cache_dir, "train")
    assert len(reader) == QUALITY_ROWS and len(CacheReader(cache_dir, "val")) == EVAL_ROWS
    tokens = load_tokens(tiny_data, "train")
    row = reader.row(QUALITY_ROWS - 1)  # written by the quality extension, after the timed rows
    start = (QUALITY_ROWS - 1) * SEQ_LEN
    np.testing.assert_array_equal(row["tokens"], np.asarray(tokens[start : start + SEQ_LEN + 1], dtype=np.int64))
    # the teacher at the dtype the cache was computed in (bench --dtype auto: bf16 where the CPU has it)
    dtype = getattr(torch, json.loads((cache_dir / "manifest.json").read_text())["compute_dtype"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=dtype).eval()
    with torch.no_grad():
        logits = teacher(input_ids=torch.from_numpy(row["tokens"][None, :-1])).logits[0]
    np.testing.assert_array_equal(row["topk_ids"][:, 0], logits.argmax(-1).numpy())
    sampled = CacheReader(bench_run.out / "cache-sampled", "train")
    assert sampled.mode == "sampled" and len(sampled) == QUALITY_ROWS
    assert np.all(sampled.row(0)["sample_counts"].sum(-1) == 20)


@pytest.mark.slow
def test_stage2_steps_ratios_and_loss_alone(bench_run):
    stage2 = bench_run.report["stage2"]
    assert stage2["tokens_per_step"] == BATCH * SEQ_LEN and stage2["rounds"] == 2
    variants = stage2["variants"]
    assert set(variants) == {"ce", "topk", "sampled", "online"}
    for key, v in variants.items():
        assert _positive(v["tokens_per_s"]) and _positive(v["step_ms"]) and len(v["steps_ms"]) == 2
        assert v["tokens_per_s"] == pytest.approx(stage2["tokens_per_step"] / (v["step_ms"] / 1000))
        for phase in ("forward_ms", "loss_ms", "backward_ms", "optimizer_ms"):
            assert _positive(v[phase]), (key, phase)
    assert _positive(variants["online"]["teacher_ms"]) and "teacher_ms" not in variants["ce"]
    ratios = stage2["ratios"]
    assert ratios["topk_over_ce_step_time"] == pytest.approx(variants["topk"]["step_ms"] / variants["ce"]["step_ms"])
    assert ratios["ce_over_online_speed"] == pytest.approx(
        variants["ce"]["tokens_per_s"] / variants["online"]["tokens_per_s"]
    )
    assert ratios["topk_meets_target"] == (ratios["topk_over_ce_step_time"] <= ratios["target_step_time_ratio"])
    alone = stage2["loss_alone"]
    assert alone["positions"] == BATCH * SEQ_LEN and alone["logits_dtype"] == "float32"
    for key in ("ce", "topk", "topk-renorm", "sampled", "online"):
        assert _positive(alone[key]["total_ms"])


@pytest.mark.slow
def test_data_path_and_memory(bench_run):
    data = bench_run.report["data"]
    for mode in ("topk", "sampled"):
        x = data[mode]
        assert _positive(x["rows_per_s_workers"]) and _positive(x["rows_per_s_in_process"])
        assert x["step_rows_per_s"] == pytest.approx(bench_run.report["stage2"]["variants"][mode]["rows_per_s"])
        assert x["headroom"] == pytest.approx(x["rows_per_s_workers"] / x["step_rows_per_s"])
    memory = bench_run.report["memory"]
    assert memory["tokens"] == BATCH * SEQ_LEN and memory["method"]
    variants = memory["variants"]
    for v in variants.values():
        assert _positive(v["peak_mb"]) and v["increase_mb"] >= 0 and v["peak_mb"] >= v["increase_mb"]
    # The offline losses keep at most the logits themselves; the dense online KL keeps several [N, V] float32 tensors.
    for key in ("ce", "topk", "sampled"):
        assert variants[key]["loss_full_vocab_float32_saved"] <= 1, variants[key]
    assert variants["online"]["loss_full_vocab_float32_saved"] >= 2


@pytest.mark.slow
def test_cross_tokenizer_step_row(bench_run):
    cross = bench_run.report["cross_tokenizer"]
    assert cross["student_vocab"] > 256  # a byte-level BPE trained on the bench data's train text
    for mode in ("topk", "sampled"):
        x = cross[mode]
        assert (
            _positive(x["same_ms"])
            and _positive(x["cross_ms"])
            and x["ratio"] == pytest.approx(x["cross_ms"] / x["same_ms"])
        )
        assert x["cross_rows_ms"] < x["cross_ms"] and x["same_rows_ms"] < x["same_ms"] and 0 < x["coverage"] <= 1
    assert "Cross-tokenizer distill step" in (bench_run.out / "bench.md").read_text()


@pytest.mark.slow
def test_fused_head_rows(bench_run):
    fused = bench_run.report["fused_head"]
    vocab = bench_run.report["resolved"]["vocab_size"]
    assert fused["tokens_per_step"] == BATCH * SEQ_LEN and fused["rounds"] == 2 and fused["memory_method"]
    assert set(fused["heads"]) == {str(vocab), "128256"}
    for head_rows, section in fused["heads"].items():
        assert section["head_rows"] == int(head_rows) and section["fused_applies"] is True
        assert set(section["variants"]) == {f"{m}_{f}" for m in ("ce", "topk", "sampled") for f in ("fused", "unfused")}
        for key, v in section["variants"].items():
            assert _positive(v["tokens_per_s"]) and v["increase_mb"] >= 0 and v["largest_batch"] >= 0, key
            # the unfused path saves the float32 logits (the loss's input); the fused one nothing of that size
            assert v["full_vocab_saved"] == (0 if v["fused"] else 1), (head_rows, key, v["full_vocab_saved"])
        assert set(section["memory_ratio"]) == {"ce", "topk", "sampled"}
    assert fused["targets"]["fused_full_vocab_saved"] == 0
    assert "Output head fused with the loss" in (bench_run.out / "bench.md").read_text()


@pytest.mark.slow
def test_quality_section(bench_run):
    quality = bench_run.report["quality"]
    assert quality["steps"] == 3 and quality["eval_rows"] == EVAL_ROWS and quality["train_rows"] == QUALITY_ROWS
    assert set(quality["variants"]) == {"ce", "topk", "topk-renorm", "sampled", "online"}
    for key, v in quality["variants"].items():
        assert _positive(v["val_ppl"]) and v["val_ppl"] >= 1.0, key
        assert v["kl_exact"] >= -1e-5 and v["kl_cache"] >= -1e-5 and 0.0 <= v["top1_agreement"] <= 1.0
        assert v["kl_cache"] <= v["kl_exact"] + 1e-3  # K+1 buckets coarse-grain the vocabulary: KL can only shrink
        assert _positive(v["train_tokens_per_s"])


@pytest.mark.slow
def test_markdown_and_terminal_show_the_same_tables(bench_run):
    markdown = (bench_run.out / "bench.md").read_text()
    for title in ("## Stage 1", "## Stage 2", "## Data path", "## Memory", "## Quality at equal budget"):
        assert title in markdown
    topk_rate = f"{bench_run.report['stage1']['topk']['tokens_per_s']:,.0f}"
    assert f"| cache-logits topk K={K} | {topk_rate} |" in markdown
    assert markdown.strip() in bench_run.stdout


def test_too_few_rows_is_one_line_error(tiny_teacher, tiny_data, tmp_path):
    result = run_cli(
        "bench",
        "--data-dir",
        tiny_data,
        "--teacher",
        tiny_teacher,
        "--out-dir",
        tmp_path,
        "--seq-len",
        SEQ_LEN,
        "--batch-size",
        2,
        "--batches",
        100000,
        "--mixed-precision",
        "no",
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and "lower --batches" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_config_validate_lists_every_problem():
    assert BenchConfig().validate() == []
    problems = from_flags(
        BenchConfig, batch_size="many", seq_len=0, num_samples=300, mixed_precision="fp8", alpha=2.0
    ).validate()
    joined = "; ".join(problems)
    for flag in ("--batch-size", "--seq-len", "--num-samples", "--mixed-precision", "--alpha"):
        assert flag in joined
    assert len(problems) == 5


def test_batch_size_flops_and_peaks():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_batch_size("auto", 512, cpu) == 2 and resolve_batch_size("auto", 512, gpu) == 64
    assert resolve_batch_size("3", 512, gpu) == 3
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12 and peak_bf16_flops("Some CPU") is None
    config = types.SimpleNamespace(num_attention_heads=9, head_dim=64, hidden_size=576, num_hidden_layers=30)
    # 2 P per token + 4 * layers * (heads * head_dim) * seq_len per token
    assert forward_flops(config, 1000, 10, 512) == 2 * 1000 * 10 + 4 * 30 * 576 * 512 * 10


def test_saved_tensor_counter_sees_full_vocab_tensors():
    logits = torch.randn(64, 100, requires_grad=True)
    counter = SavedTensorCounter(64 * 100)
    with counter.hooks():
        torch.log_softmax(logits, -1).sum().backward()
    assert counter.summary()["full_vocab_float32_saved"] == 1  # log_softmax keeps its output
    counter = SavedTensorCounter(64 * 100)
    with counter.hooks():
        (logits * 2).sum().backward()  # multiplying by a constant saves nothing of the size of the logits
    assert counter.summary()["full_vocab_saved"] == 0


def test_dense_kd_loss_matches_the_definition():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(6, 11), torch.randn(6, 11), torch.randint(0, 11, (6,))
    parts = dense_kd_loss(student, teacher, labels, alpha=0.3, temperature=2.0)
    p, log_p, log_q = (teacher / 2).softmax(-1), (teacher / 2).log_softmax(-1), (student / 2).log_softmax(-1)
    kl = (p * (log_p - log_q)).sum(-1).mean()
    ce = -student.log_softmax(-1)[torch.arange(6), labels].mean()
    assert parts.kd.item() == pytest.approx(kl.item(), rel=1e-5)
    assert parts.total.item() == pytest.approx(0.3 * ce.item() + 0.7 * 4.0 * kl.item(), rel=1e-5)


def test_peak_memory_sees_a_fresh_allocation():
    big = torch.ones(1)
    with PeakMemory(torch.device("cpu")) as first:
        big = torch.ones(40 * 2**20 // 4)  # 40 MB
        big += 1
    del big
    with PeakMemory(torch.device("cpu")) as second:
        torch.ones(1)
    assert first.result["increase_mb"] >= 30
    assert second.result["increase_mb"] < 30  # the earlier peak does not leak into the next measurement


def test_busy_machine_flags_cpu_runs_that_shared_the_cores():
    idle = {
        "gpu": None,
        "cpu_cores": 2,
        "torch_threads": 2,
        "load_average_start": [0.3, 0, 0],
        "load_average_end": [2.2, 0, 0],
    }
    assert not busy_machine(idle)  # the run's own two threads are not "other processes"
    assert busy_machine({**idle, "load_average_start": [3.0, 0, 0]})
    assert busy_machine({**idle, "load_average_end": [4.5, 0, 0]})
    assert not busy_machine({**idle, "gpu": "NVIDIA H200", "load_average_end": [9.0, 0, 0]})
    # a job that just ended leaves a high load average but no busy cores: the measured share decides
    assert not busy_machine({**idle, "load_average_start": [1.8, 0, 0], "cpu_busy_start": 0.03})
    assert busy_machine({**idle, "load_average_start": [0.1, 0, 0], "cpu_busy_start": 0.97})


def test_cpu_busy_fraction_sees_a_busy_core():
    done = threading.Event()

    def spin():
        while not done.is_set():
            pass

    worker = threading.Thread(target=spin)
    worker.start()
    try:
        busy = cpu_busy_fraction(0.5)
    finally:
        done.set()
        worker.join()
    assert busy is not None and busy >= 0.9 / os.cpu_count()  # one spinning thread holds one core


@pytest.mark.slow
def test_teacher_shape_runs_stage_1_alone_with_a_random_teacher_of_that_shape(tiny_data, tmp_path):
    """--teacher-shape FILE.json: a random teacher built in memory (here a Llama-3-like one in miniature: 1,000 rows
    around the data's 384-token tokenizer, grouped-query attention); stage 1 with per-pass peak memory, ids bounded by
    its head's width, and no training sections."""
    shape = tmp_path / "shape.json"
    shape.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 70_000,
                "tie_word_embeddings": True,
            }
        )
    )
    out = tmp_path / "bench"
    result = run_cli(
        *("bench", "--data-dir", tiny_data, "--teacher", "does-not-exist", "--out-dir", out),
        *("--teacher-shape", shape, "--seq-len", SEQ_LEN, "--batch-size", BATCH, "--batches", 1, "--repeats", 1),
        *("--k", K, "--num-samples", 20, "--mixed-precision", "no"),
        timeout=300,
        check=True,
    )
    report = json.loads((out / "bench.json").read_text())
    assert (
        report["resolved"]["teacher_parameters"]
        == 70_000 * 32 + 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 64) + 32
    )
    assert report["resolved"]["vocab_size"] == report["resolved"]["teacher_vocab_size"] == 70_000
    stage1 = report["stage1"]
    for key in ("forward", "topk", "sampled"):
        assert _positive(stage1[key]["tokens_per_s"]) and _positive(stage1[key]["memory"]["peak_mb"])
    assert report["stage2"] is None and report["quality"] is None
    reader = CacheReader(out / "cache-topk", "train")
    assert reader.attrs["id_dtype"] == "uint32" and reader.vocab_size == 70_000  # its ids reach past uint16
    assert reader.row(0)["topk_ids"].max() >= 2**16
    markdown = (out / "bench.md").read_text()
    assert "## Stage 1" in markdown and "Peak memory of one pass" in markdown and "## Stage 2" not in markdown
    assert markdown.strip() in result.stdout

    unknown = run_cli("bench", "--data-dir", tiny_data, "--out-dir", out, "--teacher-shape", "llama-9t", timeout=120)
    assert unknown.returncode == 2 and "llama-3.2-1b" in unknown.stderr.strip().splitlines()[-1]


def test_bench_md_renders_again_from_bench_json(bench_run):
    """docs/benchmarks.md renders reports read back from bench.json (sorted keys): the page is the one the run wrote."""
    from pipeline.bench import render_markdown

    assert render_markdown(bench_run.report) == (bench_run.out / "bench.md").read_text()
