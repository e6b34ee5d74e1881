"""Stage 1 of the bench: the teacher's plain forward against the cache-logits path (cache.TeacherRunner, the object
cache-logits runs) on the same batches, interleaved; each mode's bytes/token against dense fp16 logits; on a GPU the
forward's model FLOPs utilisation. Its passes write real parts, assembled into the small topk and sampled caches
(`out_dir/cache-topk`, `out_dir/cache-sampled`) that the training sections read."""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pipeline import cache_format
from pipeline.bench.probes import Laps, PeakMemory, log, median, sync
from pipeline.cache import TeacherRunner, common_attrs, compute_dtype, row_seed, shard_attrs
from pipeline.cache_format import read_manifest, write_part
from pipeline.config import BenchConfig, CacheConfig
from pipeline.models import count_parameters
from pipeline.rows import load_tokens, read_meta, row_tokens

# Dense bf16 tensor-core peak (FLOP/s, no sparsity) by device-name fragment, most specific first.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("L4", 121e12),
)
TARGET_CACHE_RATIO = 0.95  # cache-logits tokens/s over plain forward tokens/s


def peak_bf16_flops(device_name: str) -> float | None:
    """Datasheet dense bf16 FLOP/s of a known GPU, else None."""
    for fragment, flops in PEAK_BF16_FLOPS:
        if fragment in device_name:
            return flops
    return None


def forward_flops(model_config, params: int, tokens: int, seq_len: int) -> float:
    """Model FLOPs of a forward over `tokens` tokens in rows of seq_len: 2 P per token (matmuls, the tied
    output head included) + 4 n_layer (n_head head_dim) seq_len per token (QK^T and AV, PaLM's count)."""
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return 2.0 * params * tokens + 4.0 * model_config.num_hidden_layers * heads * head_dim * seq_len * tokens


def _cache_config(config: BenchConfig, mode: str, batch_size: int, rows: int, out_dir: Path) -> CacheConfig:
    return CacheConfig(
        data_dir=config.data_dir,
        teacher=config.teacher,
        out_dir=str(out_dir),
        mode=mode,
        k=config.k,
        num_samples=config.num_samples,
        temperature=config.loss.temperature,
        seq_len=config.seq_len,
        batch_size=batch_size,
        rows_per_part=batch_size,
        max_rows=rows,
        seed=config.seed,
        dtype=config.dtype,
    )


def _split_batches(config: BenchConfig, split: str, first_row: int, rows: int, batch_size: int):
    """[(row indices, rows [B, L+1] int64)] covering rows first_row .. first_row + rows - 1 of a split."""
    tokens = load_tokens(config.data_dir, split)
    out = []
    for start in range(first_row, first_row + rows, batch_size):
        indices = list(range(start, min(first_row + rows, start + batch_size)))
        out.append((indices, np.stack([row_tokens(tokens, i, config.seq_len) for i in indices])))
    return out


def _forward_pass(runner: TeacherRunner, batches) -> dict:
    """The plain teacher forward (the model's own logits, at the runner's precision)."""
    start = time.perf_counter()
    for _, rows in batches:
        runner.full_logits(rows[:, :-1])
    sync(runner.device)
    return {"seconds": time.perf_counter() - start}


def _cache_pass(runner: TeacherRunner, laps: Laps, batches, part_paths, split: str) -> dict:
    """What cache-logits does per batch: TeacherRunner.targets (teacher body, then the output head chunk by chunk
    with the sparse extraction) and the part write on a writer thread (overlapping the next forward, as in
    cache.py). Phases: "body" and "head_extract" (laps of the runner), "write" and "write_wait"."""

    def timed_write(path, arrays):
        began = time.perf_counter()
        write_part(path, arrays)
        return time.perf_counter() - began

    seed = runner.config.seed
    laps.seconds = {"body": 0.0, "head_extract": 0.0}
    phases = {"write": 0.0, "write_wait": 0.0}
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = []
        for (indices, rows), path in zip(batches, part_paths):
            laps.start()
            arrays = runner.targets(rows, [row_seed(seed, split, i) for i in indices])
            pending.append(writer.submit(timed_write, path, arrays))
        t_wait = time.perf_counter()
        for future in pending:
            phases["write"] += future.result()
        phases["write_wait"] = time.perf_counter() - t_wait
    seconds = time.perf_counter() - start
    return {"seconds": seconds, **phases, **laps.seconds}


def _part_paths(work_dir: Path, mode: str, split: str, first_batch: int, count: int) -> list[Path]:
    return [work_dir / "parts" / mode / split / f"part-{i:06d}.npz" for i in range(first_batch, first_batch + count)]


def run_stage1(config: BenchConfig, teacher, device, batch_size: int, work_dir: Path, vocab: int) -> tuple[dict, dict]:
    """Interleaved passes over the same batches: the plain forward in float32 and at the cache's compute dtype (when
    that is another), then cache-logits in each mode, measured against the faster forward; then one more pass of
    each for its peak memory. `teacher` (float32) stays float32: the cache's runners hold their own copy at the
    compute dtype. vocab: the tokenizer's length (the bound of the stored ids). Returns (section, runners)."""
    rows = config.batches * batch_size
    batches = _split_batches(config, "train", 0, rows, batch_size)
    laps = Laps(device)
    dtype = compute_dtype(config.dtype, device)
    cache_teacher = teacher if dtype == "float32" else copy.deepcopy(teacher).to(getattr(torch, dtype))
    runners = {
        mode: TeacherRunner(
            cache_teacher,
            _cache_config(config, mode, batch_size, rows, work_dir),
            device,
            lap=laps.lap,
            vocab_size=vocab,
        )
        for mode in ("topk", "sampled")
    }
    forwards = {"forward": runners["topk"]}  # the plain forward at the compute dtype, and in float32 if that differs
    if dtype != "float32":
        forwards["forward_float32"] = TeacherRunner(
            teacher, dataclasses.replace(runners["topk"].config, dtype="float32"), device
        )
    paths = {mode: _part_paths(work_dir, mode, "train", 0, len(batches)) for mode in runners}
    # Warm-up: one batch of each (kernel selection, allocator growth, first-touch of the weights).
    for runner in forwards.values():
        _forward_pass(runner, batches[:1])
    for mode, runner in runners.items():
        _cache_pass(runner, laps, batches[:1], paths[mode][:1], "train")
    timings = {**{key: [] for key in forwards}, "topk": [], "sampled": []}
    for repeat in range(config.repeats):
        log(f"stage 1: pass {repeat + 1}/{config.repeats} ({', '.join(timings)}) over {rows} rows x {config.seq_len}")
        for key, runner in forwards.items():
            timings[key].append(_forward_pass(runner, batches))
        for mode, runner in runners.items():
            timings[mode].append(_cache_pass(runner, laps, batches, paths[mode], "train"))

    tokens = rows * config.seq_len
    section = {
        "rows": rows,
        "tokens_per_pass": tokens,
        "batch_size": batch_size,
        "batches": len(batches),
        "repeats": config.repeats,
        "teacher_dtype": dtype,
        "fused_head": runners["topk"].fused_head,
    }
    for key in forwards:
        seconds = median([t["seconds"] for t in timings[key]])
        section[key] = {
            "tokens_per_s": tokens / seconds,
            "median_s": seconds,
            "times_s": [t["seconds"] for t in timings[key]],
            "ms_per_batch": 1000 * seconds / len(batches),
        }
    fastest = min(forwards, key=lambda key: section[key]["median_s"])
    section["fastest_forward"] = fastest
    forward_s = section[fastest]["median_s"]  # the cache passes are measured against the fastest plain forward
    for mode in ("topk", "sampled"):
        seconds = median([t["seconds"] for t in timings[mode]])
        per_batch = {
            f"{phase}_ms_per_batch": 1000 * median([t[phase] for t in timings[mode]]) / len(batches)
            for phase in ("body", "head_extract", "write", "write_wait")
        }
        section[mode] = {
            "tokens_per_s": tokens / seconds,
            "median_s": seconds,
            "times_s": [t["seconds"] for t in timings[mode]],
            "ratio_to_forward": forward_s / seconds,
            "target_ratio": TARGET_CACHE_RATIO,
            "meets_target": forward_s / seconds >= TARGET_CACHE_RATIO,
            **per_batch,
        }
    # Peak memory of one more pass of each (the runners' chunk buffers are already allocated, so "increase" is
    # what a pass adds beyond them: the forward's whole [tokens, V] logits, or the cache path's per-batch arrays).
    with PeakMemory(device) as peak:
        _forward_pass(runners["topk"], batches)
    section["forward"]["memory"] = peak.result
    for mode, runner in runners.items():
        with PeakMemory(device) as peak:
            _cache_pass(runner, laps, batches, paths[mode], "train")
        section[mode]["memory"] = peak.result
    section["memory_method"] = peak.method
    for runner in runners.values():
        runner.lap = None  # the untimed passes that follow (extend_parts) are not profiled
    return section, runners


def stage1_mfu(section: dict, teacher, device, seq_len: int) -> dict | None:
    """Model FLOPs utilisation of the plain forward and the cache passes (GPU with a known peak only)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = peak_bf16_flops(name)
    flops = forward_flops(teacher.config, count_parameters(teacher), section["tokens_per_pass"], seq_len)
    out = {"device": name, "peak_bf16_flops": peak, "flops_per_pass": flops, "target": 0.40}
    for key in ("forward", "topk", "sampled"):
        achieved = flops / section[key]["median_s"]
        out[f"{key}_tflops"] = achieved / 1e12
        out[f"{key}_mfu"] = achieved / peak if peak else None
    return out


def extend_parts(
    config: BenchConfig, runners: dict, work_dir: Path, split: str, first_row: int, rows: int, batch_size: int
) -> None:
    """Untimed parts for more rows (quality runs): one teacher forward per batch feeds both modes."""
    if rows <= 0:
        return
    batches = _split_batches(config, split, first_row, rows, batch_size)
    first_batch = first_row // batch_size
    paths = {mode: _part_paths(work_dir, mode, split, first_batch, len(batches)) for mode in runners}
    for b, (indices, tokens) in enumerate(batches):
        seeds = [row_seed(config.seed, split, i) for i in indices]
        targets = runners["topk"].targets_by_mode(tokens, seeds, ("sampled", "topk"))
        for mode, arrays in targets.items():
            write_part(paths[mode][b], arrays)


def assemble_bench_cache(
    config: BenchConfig,
    mode: str,
    batch_size: int,
    work_dir: Path,
    split_rows: dict,
    device,
    vocab: int,
    teacher_vocab: int,
    identity: dict,
) -> Path:
    """Assemble the parts of `mode` into a cache folder work_dir/cache-MODE (one shard per split) + manifest."""
    cache_dir = work_dir / f"cache-{mode}"
    shutil.rmtree(cache_dir, ignore_errors=True)
    meta = read_meta(config.data_dir)
    attrs = common_attrs(
        _cache_config(config, mode, batch_size, split_rows["train"], cache_dir),
        meta,
        identity,
        vocab,
        compute_dtype(config.dtype, device),
        teacher_vocab,
    )
    entries = []
    for split, rows in split_rows.items():
        parts = _part_paths(work_dir, mode, split, 0, -(-rows // batch_size))
        name = cache_format.shard_name(split, 0, 1)
        layout = shard_attrs(attrs, split, shard_index=0, num_shards=1, row_start=0, rows=rows)
        entry = cache_format.assemble_shard(cache_dir / name, layout, parts)
        entries.append(entry)
    cache_format.write_manifest(cache_dir, attrs, entries)
    return cache_dir


def storage_figures(cache_dir: Path, vocab: int) -> dict:
    """bytes/token of the cache's train split (shard size over positions, tokens row included) vs dense fp16 logits."""
    bytes_per_token = read_manifest(cache_dir)["splits"]["train"]["bytes_per_token"]
    return {
        "bytes_per_token": bytes_per_token,
        "dense_fp16_bytes_per_token": 2 * vocab,
        "dense_over_cache": 2 * vocab / bytes_per_token,
        "cache": str(cache_dir),
    }
