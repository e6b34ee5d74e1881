"""`bench`: run every section in one process on the same batches and write bench.json and bench.md (run_bench).

The order: stage 1 (its passes write the parts of the bench caches, extended with more rows for --quality), the
bench caches assembled, then stage 2, the loss alone, the data path, memory, the fused head and quality, each reading
those caches (or --topk-cache / --sampled-cache). --teacher-shape stops after stage 1.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
from pathlib import Path

import torch

from pipeline.bench.cross_tokenizer import run_cross_tokenizer
from pipeline.bench.data_path import run_data_path
from pipeline.bench.fused_head import run_fused_head
from pipeline.bench.probes import log, machine_info
from pipeline.bench.quality import run_quality
from pipeline.bench.report import render_markdown
from pipeline.bench.stage1 import assemble_bench_cache, extend_parts, run_stage1, stage1_mfu, storage_figures
from pipeline.bench.stage2 import STEP_VARIANTS, loss_alone, run_memory, run_stage2
from pipeline.bench.students import make_students, step_batches
from pipeline.cache_format import CacheReader, check_compatible
from pipeline.config import BenchConfig, StudentConfig, check, to_flags
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_write_bytes, atomic_write_json
from pipeline.models import (
    config_from_json,
    count_parameters,
    load_causal_lm,
    logit_width,
    model_vocab_size,
    new_causal_lm,
)
from pipeline.rows import load_tokens, num_rows, read_meta
from pipeline.teacher import teacher_identity
from pipeline.train import resolve_mixed_precision

TOKENS_PER_GPU_BATCH = 32768  # --batch-size auto on a GPU: rows = this // seq_len
CPU_AUTO_BATCH = 2

# --teacher-shape: config.json values of public checkpoints, for a randomly initialised teacher of the same shape
TEACHER_SHAPES = {
    "llama-3.2-1b": {  # meta-llama/Llama-3.2-1B
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "tie_word_embeddings": True,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
}


def resolve_batch_size(choice: str, seq_len: int, device) -> int:
    """auto: CPU_AUTO_BATCH rows on a CPU, TOKENS_PER_GPU_BATCH // seq_len rows on a GPU."""
    if choice != "auto":
        return int(choice)
    return max(1, TOKENS_PER_GPU_BATCH // seq_len) if device.type == "cuda" else CPU_AUTO_BATCH


def _open_caches(config: BenchConfig, bench_caches: dict, meta: dict, vocab: int) -> dict:
    """CacheReaders (train) of the caches stages 2-3 read: --topk-cache / --sampled-cache, else the bench's."""
    readers = {}
    for mode, given in (("topk", config.topk_cache), ("sampled", config.sampled_cache)):
        reader = CacheReader(given or bench_caches[mode], "train")
        check_compatible(
            reader.attrs,
            {
                "mode": mode,
                "seq_len": config.seq_len,
                "vocab_size": vocab,
                "tokenizer_hash": meta["tokenizer_hash"],
                "train_tokens_sha256": meta["train_sha256"],
                "temperature": config.loss.temperature,
            },
            where=f"--{mode}-cache {given}" if given else f"the bench {mode} cache",
        )
        readers[mode] = reader
    return readers


def shaped_teacher(shape: str, device):
    """A randomly initialised teacher of a TEACHER_SHAPES name or a transformers config JSON, in float32 on device."""
    known = TEACHER_SHAPES.get(shape)
    if known is None and not shape.endswith(".json"):
        raise PipelineError(
            f"--teacher-shape {shape} is neither a known shape ({', '.join(TEACHER_SHAPES)}) nor a config .json file"
        )
    model_config, _ = config_from_json(known or shape, f"--teacher-shape {shape}")
    log(f"building a randomly initialised {shape} teacher")
    with torch.device(device):
        return new_causal_lm(model_config, f"--teacher-shape {shape}").eval()


def run_bench(config: BenchConfig, student_config: StudentConfig) -> dict:
    """Run every section, print the tables, write out_dir/bench.json and bench.md; returns the report."""
    from accelerate import Accelerator

    check(config, student_config)
    meta = read_meta(config.data_dir)
    vocab = int(meta["vocab_size"])  # the tokenizer's length: students' rows, the bound of the cached ids
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(config.optim.mixed_precision))
    device = accelerator.device
    batch_size = resolve_batch_size(config.batch_size, config.seq_len, device)
    train_available = num_rows(len(load_tokens(config.data_dir, "train")), config.seq_len)
    stage1_rows = config.batches * batch_size
    if train_available < stage1_rows:
        raise PipelineError(
            f"{config.data_dir} has {train_available} train rows of {config.seq_len + 1} tokens, the bench needs "
            f"--batches x --batch-size = {stage1_rows}; lower --batches, --batch-size or --seq-len"
        )
    work_dir = Path(config.out_dir)  # bench.json, bench.md, cache-topk/, cache-sampled/ and, while it runs, parts/
    shutil.rmtree(work_dir / "parts", ignore_errors=True)

    report = {
        "machine": machine_info(device),
        "command": " ".join(["python -m pipeline"] + sys.argv[1:]) if sys.argv else "",
        "options": to_flags(config),
        "student": to_flags(student_config),
    }
    log(f"device {device}, batch {batch_size} x {config.seq_len}, mixed precision {accelerator.mixed_precision}")
    if config.teacher_shape:
        teacher = shaped_teacher(config.teacher_shape, device)
        teacher_vocab = vocab = logit_width(teacher)
        identity = {"teacher_name": f"random {config.teacher_shape}", "teacher_hash": "", "tokenizer_hash": ""}
        if meta["vocab_size"] > vocab:
            raise PipelineError(
                f"--teacher-shape {config.teacher_shape} has {vocab} output rows, fewer than the {meta['vocab_size']} "
                f"tokens of {config.data_dir}'s tokenizer; pick a shape with a larger vocabulary"
            )
    else:
        teacher = load_causal_lm(config.teacher).to(device)
        teacher_vocab, identity = model_vocab_size(config.teacher), teacher_identity(config.teacher)
    report["resolved"] = {
        "device": str(device),
        "batch_size": batch_size,
        "mixed_precision": accelerator.mixed_precision,
        "teacher": f"random {config.teacher_shape}" if config.teacher_shape else config.teacher,
        "teacher_parameters": count_parameters(teacher),
        "vocab_size": vocab,
        "teacher_vocab_size": teacher_vocab,
    }

    # ---- stage 1, then the bench caches from its parts
    stage1, runners = run_stage1(config, teacher, device, batch_size, work_dir, vocab)
    stage1["mfu"] = stage1_mfu(stage1, teacher, device, config.seq_len)
    split_rows = {"train": stage1_rows}
    if config.quality and not (config.topk_cache and config.sampled_cache):
        train_rows = max(stage1_rows, min(config.quality_rows, train_available))
        val_rows = min(config.eval_rows, num_rows(len(load_tokens(config.data_dir, "val")), config.seq_len))
        if val_rows == 0:
            raise PipelineError(
                f"the val split of {config.data_dir} is shorter than one row of {config.seq_len + 1} tokens; lower "
                "--seq-len"
            )
        log(f"quality: caching {train_rows - stage1_rows} more train rows and {val_rows} val rows")
        extend_parts(config, runners, work_dir, "train", stage1_rows, train_rows - stage1_rows, batch_size)
        extend_parts(config, runners, work_dir, "val", 0, val_rows, batch_size)
        split_rows = {"train": train_rows, "val": val_rows}
    bench_caches = {
        mode: assemble_bench_cache(
            config, mode, batch_size, work_dir, split_rows, device, vocab, teacher_vocab, identity
        )
        for mode in ("topk", "sampled")
    }
    shutil.rmtree(work_dir / "parts", ignore_errors=True)
    for mode in ("topk", "sampled"):
        stage1[mode].update(storage_figures(bench_caches[mode], teacher_vocab))
    report["stage1"] = stage1
    if config.teacher_shape:  # stage 1 alone: training needs the teacher's own weights and tokenizer
        report.update(stage2=None, data=None, memory=None, fused_head=None, cross_tokenizer=None, quality=None)
        return write_report(report, work_dir)

    # ---- stage 2: the four steps, interleaved, on the same batches
    readers = _open_caches(config, bench_caches, meta, vocab)
    num_samples = int(readers["sampled"].attrs["num_samples"])
    students = make_students(accelerator, STEP_VARIANTS, student_config, config, vocab, teacher, num_samples)
    report["resolved"]["student_parameters"] = count_parameters(accelerator.unwrap_model(students["ce"].model))
    batches = step_batches(readers, batch_size, config.seed, config.steps + 1)
    report["stage2"] = run_stage2(accelerator, students, batches, config)
    log("stage 2: the loss alone")
    report["stage2"]["loss_alone"] = loss_alone(accelerator, students, batches[0], config.steps, teacher, config)

    # ---- data path, memory
    log("data path and memory")
    step_rows = {mode: report["stage2"]["variants"][mode]["rows_per_s"] for mode in ("topk", "sampled")}
    report["data"] = run_data_path(readers, batch_size, config, step_rows, device)
    report["memory"] = run_memory(accelerator, students, batches[0], vocab, config)
    del students
    gc.collect()
    report["fused_head"] = run_fused_head(accelerator, student_config, config, batches, vocab, num_samples)
    log("cross-tokenizer step")
    report["cross_tokenizer"] = run_cross_tokenizer(
        accelerator, config, student_config, readers, batch_size, vocab, num_samples
    )

    # ---- quality
    report["quality"] = None
    if config.quality:
        val_reader = CacheReader(config.topk_cache or bench_caches["topk"], "val")
        report["quality"] = run_quality(
            accelerator, config, student_config, readers, val_reader, teacher, batch_size, vocab
        )
    return write_report(report, work_dir)


def write_report(report: dict, work_dir: Path) -> dict:
    """Close the report (load at the end), print its tables and write bench.json and bench.md."""
    report["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    markdown = render_markdown(report)
    atomic_write_json(work_dir / "bench.json", report)
    atomic_write_bytes(work_dir / "bench.md", markdown.encode())
    print(markdown)
    print(f"bench: wrote {work_dir / 'bench.json'} and {work_dir / 'bench.md'}")
    return report
