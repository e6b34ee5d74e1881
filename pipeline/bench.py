"""`bench`: throughput, memory and quality of the pipeline's hot paths, measured in one process on the same batches.

Every timed path is the pipeline's own code: stage 1 runs cache.TeacherRunner (the object cache-logits runs),
stage 2 runs train.training_step (the step distill and baseline run) with losses.StepLoss, and quality is scored
by evaluate.evaluate (the evaluator of compare).

Sections (bench.json keys; bench.md and the terminal get the same tables):
  stage1  teacher forward alone (TeacherRunner.full_logits) vs the cache-logits path (TeacherRunner.targets: teacher
          body, output head in chunks with the sparse extraction of sparse_targets.py; part write on a thread) for
          each mode; ratio of tokens/s (target >= 0.95); bytes/token of each mode vs dense fp16 logits (2 V);
          on a GPU the forward's model FLOPs utilisation, (2 P + 4 n_layer d_attn L) tokens / time / peak.
  stage2  tokens/s of one training step (forward, loss, backward, clip, AdamW): (a) CE only, (b) KD from the
          topk cache, (c) KD from the sampled cache, (d) online KD: the teacher inside the step under
          no_grad and a dense full-vocabulary KL (losses.dense_kd_loss). Variants run interleaved a b c d a b c d
          (machine drift hits all alike); medians. Also the loss alone, forward + backward on fixed logits.
  data    CacheRows + StepBatches + collate_rows through a DataLoader, rows/s, against the rows/s a step eats.
  memory  per step variant: peak RSS (CPU; VmHWM reset through /proc/self/clear_refs before each variant) or
          peak allocated (GPU), and the [tokens, vocab] tensors the loss saves for backward (saved-tensor hook).
  fused_head  the output head fused with the loss (--fused-head on) vs unfused, for CE, topk and sampled KD, at the
          tokenizer's vocabulary and with a 128,256-row head: step tokens/s (interleaved), peak memory of a step at
          the batch and twice it, [tokens, vocab] tensors saved, the largest batch within --memory-budget-mb.
  quality (--quality) students trained for the same steps on the same rows with CE, topk+tail KD,
          topk-renormalised KD, sampled KD and online dense KD: val perplexity, KL to the teacher.

The stage 1 passes write real parts; they are assembled into small topk and sampled caches in
`out_dir/cache-topk` and `out_dir/cache-sampled`, which stages 2-3 read (or --topk-cache / --sampled-cache).

--teacher-shape NAME|FILE.json runs stage 1 alone with a randomly initialised teacher of that shape, built in memory
(e.g. llama-3.2-1b: speed and memory do not depend on the weights), on the data's token rows; its ids are bounded by
its own head's width, as if its tokenizer had that many tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import gc
import math
import os
import platform
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline import cache_format
from pipeline.batches import CacheRows, StepBatches, collate_rows
from pipeline.cache import TeacherRunner, common_attrs, compute_dtype, row_seed
from pipeline.cache_format import CacheReader, check_compatible, read_manifest, write_part
from pipeline.config import BenchConfig, CacheConfig, StudentConfig, check, to_flags
from pipeline.data import load_tokens, num_rows, read_meta, row_tokens
from pipeline.errors import PipelineError
from pipeline.evaluate import evaluate
from pipeline.fsutil import atomic_write_bytes, atomic_write_json
from pipeline.losses import LossParts, StepLoss, dense_kd_loss
from pipeline.machine import cpu_features, cpu_model
from pipeline.models import (
    config_from_json,
    count_parameters,
    load_causal_lm,
    logit_width,
    model_vocab_size,
    new_causal_lm,
)
from pipeline.student import build_student
from pipeline.teacher import teacher_identity
from pipeline.train import head_fusable, make_optimizer, resolve_mixed_precision, training_step, use_fused_head

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
TOKENS_PER_GPU_BATCH = 32768  # --batch-size auto on a GPU: rows = this // seq_len
CPU_AUTO_BATCH = 2
TARGET_CACHE_RATIO = 0.95  # cache-logits tokens/s over plain forward tokens/s
TARGET_STEP_RATIO = 1.05  # offline KD step time over CE step time

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

STEP_VARIANTS = {  # key: (label, cache mode read, topk renormalised, teacher inside the step)
    "ce": ("(a) CE only", None, False, False),
    "topk": ("(b) KD, topk cache", "topk", False, False),
    "sampled": ("(c) KD, sampled cache", "sampled", False, False),
    "online": ("(d) online dense KD", None, False, True),
}
QUALITY_VARIANTS = {
    "ce": ("CE only", None, False, False),
    "topk": ("KD topk + tail", "topk", False, False),
    "topk-renorm": ("KD topk renormalised", "topk", True, False),
    "sampled": ("KD sampled", "sampled", False, False),
    "online": ("online dense KD", None, False, True),
}


# ---------------------------------------------------------------- small helpers


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def resolve_batch_size(choice: str, seq_len: int, device) -> int:
    """auto: CPU_AUTO_BATCH rows on a CPU, TOKENS_PER_GPU_BATCH // seq_len rows on a GPU."""
    if choice != "auto":
        return int(choice)
    return max(1, TOKENS_PER_GPU_BATCH // seq_len) if device.type == "cuda" else CPU_AUTO_BATCH


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


def machine_info(device) -> dict:
    import accelerate
    import transformers

    return {
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_busy_start": cpu_busy_fraction(),
    }


def cpu_busy_fraction(seconds: float = 1.0) -> float | None:
    """Share of all cores busy during `seconds` (Linux /proc/stat), measured before the bench starts working:
    what other processes use now, unlike the load average, which still remembers a job that just ended."""

    def sample():
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def _rss_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of a block, isolated from what ran before it.

    GPU: torch.cuda.reset_peak_memory_stats, then max_memory_allocated. CPU: Linux keeps the process's
    peak RSS (VmHWM) and lets a process reset it to the current RSS by writing 5 to /proc/self/clear_refs,
    so each block gets a fresh peak (ru_maxrss cannot be reset). Where that fails, a thread samples RSS
    every millisecond. Results in MB: peak, before (at entry) and increase = peak - before. Freed pages
    the allocator keeps (small blocks) are in `before` and can be reused unseen, so the increase is a
    lower bound; tensors over glibc's mmap threshold (every [tokens, vocab] tensor) are always seen."""

    def __init__(self, device):
        self.device, self.method, self.result = device, None, {}

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated after reset_peak_memory_stats"
            return self
        self.before = (_rss_kb("VmRSS") or 0) * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "peak RSS: VmHWM reset via /proc/self/clear_refs before each variant"
            self._sampler = None
        except OSError:
            self._start_sampler()
        return self

    def _start_sampler(self):
        import threading

        import psutil

        process, self._peak, self._stop = psutil.Process(), self.before, threading.Event()

        def sample():
            while not self._stop.is_set():
                self._peak = max(self._peak, process.memory_info().rss)
                time.sleep(0.001)

        self._sampler = threading.Thread(target=sample, daemon=True)
        self._sampler.start()
        self.method = "peak RSS: psutil sampled every 1 ms"

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._sampler is None:
            peak = (_rss_kb("VmHWM") or 0) * 1024
        else:
            self._stop.set()
            self._sampler.join()
            peak = self._peak
        self.result = {
            "peak_mb": peak / 2**20,
            "before_mb": self.before / 2**20,
            "increase_mb": max(0, peak - self.before) / 2**20,
        }
        return False


class SavedTensorCounter:
    """Counts what autograd saves for backward inside the block (torch.autograd.graph.saved_tensors_hooks,
    which also sees custom Functions' save_for_backward). A tensor is "full-vocab" when numel >= tokens * vocab.
    Storages are counted once (views of one buffer are one buffer)."""

    def __init__(self, big_numel: int):
        self.big_numel, self.storages, self.big = big_numel, {}, {}

    def pack(self, tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.device.type)
        self.storages[key] = tensor.untyped_storage().nbytes()
        if tensor.numel() >= self.big_numel and tensor.is_floating_point():
            self.big[key] = str(tensor.dtype).replace("torch.", "")
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)

    def summary(self) -> dict:
        dtypes = sorted(self.big.values())
        return {
            "full_vocab_saved": len(dtypes),
            "full_vocab_float32_saved": dtypes.count("float32"),
            "full_vocab_dtypes": dtypes,
            "saved_mb": sum(self.storages.values()) / 2**20,
        }


class Laps:
    """Seconds per named phase: `lap(name)` adds the time since the previous lap (or `start()`) to `name`,
    synchronising a GPU first so that each phase's kernels count in it. Passed as the `lap` callback of
    TeacherRunner and training_step."""

    def __init__(self, device):
        self.device, self.seconds, self._last = device, {}, 0.0

    def start(self) -> None:
        _sync(self.device)
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        _sync(self.device)
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now


# ---------------------------------------------------------------- stage 1: teacher forward vs cache-logits


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
    _sync(runner.device)
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
        _log(f"stage 1: pass {repeat + 1}/{config.repeats} ({', '.join(timings)}) over {rows} rows x {config.seq_len}")
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
        seconds = _median([t["seconds"] for t in timings[key]])
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
        seconds = _median([t["seconds"] for t in timings[mode]])
        per_batch = {
            f"{phase}_ms_per_batch": 1000 * _median([t[phase] for t in timings[mode]]) / len(batches)
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
        shard_attrs = {
            **attrs,
            "split": split,
            "tokens_sha256": attrs[f"{split}_tokens_sha256"],
            "shard_index": 0,
            "num_shards": 1,
            "row_start": 0,
            "rows": rows,
        }
        entry = cache_format.assemble_shard(cache_dir / name, shard_attrs, parts)
        entries.append({**entry, "split": split, "shard_index": 0, "num_shards": 1, "row_start": 0})
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


# ---------------------------------------------------------------- stage 2: training steps


class OnlineStepLoss:
    """Online KD, for comparison: the teacher runs inside the step (no_grad, the training precision) on the batch's
    tokens, then losses.dense_kd_loss. `lap` (profiling) is called with "teacher" after the teacher forward."""

    def __init__(self, teacher, accelerator, alpha: float, temperature: float, lap=None):
        self.teacher, self.accelerator, self.alpha, self.temperature, self.lap = (
            teacher,
            accelerator,
            alpha,
            temperature,
            lap,
        )

    def __call__(self, logits: torch.Tensor, batch: dict) -> LossParts:
        tokens = batch["tokens"]
        with torch.no_grad(), self.accelerator.autocast():
            teacher_logits = self.teacher(input_ids=tokens[:, :-1]).logits
        if self.lap is not None:
            self.lap("teacher")
        flat = logits.reshape(-1, logits.shape[-1])
        return dense_kd_loss(
            flat,
            teacher_logits[..., : flat.shape[-1]].reshape(
                flat.shape
            ),  # a padded teacher: its columns past the student's
            tokens[:, 1:].reshape(-1),
            alpha=self.alpha,
            temperature=self.temperature,
        )


class BenchStudent:
    """One student of a bench variant, prepared by Accelerate, with its loss (the step's loss_fn)."""

    def __init__(
        self,
        accelerator,
        spec: tuple,
        student_config: StudentConfig,
        config: BenchConfig,
        vocab: int,
        teacher,
        num_samples: int,
    ):
        label, cache_mode, renormalize, online = spec
        model = build_student(student_config, config.teacher, vocab, config.seed)
        # before prepare, as train() decides it: Accelerate's autocast wrapper changes the logits' precision
        self.fused_applies = head_fusable(model, vocab)
        fused = use_fused_head(config.loss.fused_head, model, vocab)
        optimizer = make_optimizer(model, config.optim)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.model.train()
        self.label, self.cache_mode = label, cache_mode
        if online:
            self.loss_fn = OnlineStepLoss(teacher, accelerator, config.loss.alpha, config.loss.temperature)
        else:
            self.loss_fn = StepLoss(
                alpha=config.loss.alpha,
                temperature=config.loss.temperature,
                kd_loss=config.loss.kd_loss if cache_mode == "topk" else "forward-kl",
                jsd_beta=config.loss.jsd_beta,
                topk_renormalize=renormalize,
                chunk_size=config.loss.loss_chunk,
                num_samples=num_samples,
                fused_head=fused,  # as distill runs it
            )

    def batch(self, batches: dict) -> dict:
        """CE and online steps read only tokens (those of the topk batch: the same rows)."""
        if self.cache_mode == "sampled":
            return batches["sampled"]
        return {"tokens": batches["topk"]["tokens"]} if self.cache_mode is None else batches["topk"]


def make_students(
    accelerator,
    variants: dict,
    student_config: StudentConfig,
    config: BenchConfig,
    vocab: int,
    teacher,
    num_samples: int,
) -> dict[str, BenchStudent]:
    """{key: BenchStudent}: the same initial student for every variant."""
    return {
        key: BenchStudent(accelerator, spec, student_config, config, vocab, teacher, num_samples)
        for key, spec in variants.items()
    }


def bench_step(
    accelerator,
    student: BenchStudent,
    batches: dict,
    config: BenchConfig,
    step: int,
    max_steps: int,
    laps: Laps | None = None,
) -> dict:
    """train.training_step on this student's batch; the seconds of each phase (with laps), and the loss."""
    lap = None
    if laps is not None:
        laps.seconds = {}
        lap = laps.lap
        laps.start()
    if isinstance(student.loss_fn, OnlineStepLoss):
        student.loss_fn.lap = lap
    loss = training_step(
        accelerator,
        student.model,
        student.optimizer,
        student.batch(batches),
        student.loss_fn,
        config.optim,
        step,
        max_steps,
        lap=lap,
    )
    times = dict(laps.seconds) if laps is not None else {}
    times["step"] = sum(times.values())
    times["loss_value"] = float(loss.total.detach())
    return times


def step_batches(readers: dict, batch_size: int, seed: int, count: int) -> list[dict]:
    """`count` collated steps of both caches, rows chosen by StepBatches (same rows in both when they match)."""
    rows = {mode: CacheRows(reader) for mode, reader in readers.items()}
    num = min(len(r) for r in rows.values())
    sampler = StepBatches(num, batch_size, 1, seed, 0, count)
    return [{mode: collate_rows([r[i] for i in indices]) for mode, r in rows.items()} for indices in sampler]


def run_stage2(accelerator, students: dict, batches: list[dict], config: BenchConfig) -> dict:
    """Warm-up round, then config.steps rounds of a b c d on the same batch; medians of each phase."""
    laps = Laps(accelerator.device)
    records = {key: [] for key in STEP_VARIANTS}
    for round_index, step in enumerate(batches):
        if round_index:
            _log(f"stage 2: round {round_index}/{len(batches) - 1} (ce, topk, sampled, online)")
        for key in STEP_VARIANTS:
            times = bench_step(accelerator, students[key], step, config, round_index, len(batches), laps)
            if round_index:  # round 0 warms up
                records[key].append(times)
    tokens = batches[0]["topk"]["tokens"][:, 1:].numel()
    variants = {}
    for key, spec in STEP_VARIANTS.items():
        step_s = _median([r["step"] for r in records[key]])
        phases = {
            f"{p}_ms": 1000 * _median([r[p] for r in records[key]])
            for p in records[key][0]
            if p not in ("step", "loss_value")
        }
        variants[key] = {
            "label": spec[0],
            "tokens_per_s": tokens / step_s,
            "step_ms": 1000 * step_s,
            "rows_per_s": tokens / config.seq_len / step_s,
            "steps_ms": [1000 * r["step"] for r in records[key]],
            **phases,
        }
    t = {key: v["step_ms"] for key, v in variants.items()}
    ratios = {
        "topk_over_ce_step_time": t["topk"] / t["ce"],
        "sampled_over_ce_step_time": t["sampled"] / t["ce"],
        "ce_over_online_speed": t["online"] / t["ce"],
        "topk_over_online_speed": t["online"] / t["topk"],
        "sampled_over_online_speed": t["online"] / t["sampled"],
        "target_step_time_ratio": TARGET_STEP_RATIO,
    }
    ratios["topk_meets_target"] = ratios["topk_over_ce_step_time"] <= TARGET_STEP_RATIO
    ratios["sampled_meets_target"] = ratios["sampled_over_ce_step_time"] <= TARGET_STEP_RATIO
    return {"tokens_per_step": tokens, "rounds": len(batches) - 1, "variants": variants, "ratios": ratios}


def loss_alone(accelerator, students: dict, batches: dict, repeats: int, teacher, config: BenchConfig) -> dict:
    """Each variant's loss, forward + backward, on one fixed batch of the CE student's logits (their real dtype
    under autocast; online: against teacher logits computed beforehand), interleaved; median ms. Isolates the loss
    from the model."""
    device = accelerator.device
    on_device = {mode: {k: v.to(device) for k, v in b.items()} for mode, b in batches.items()}
    tokens = on_device["topk"]["tokens"]
    with torch.no_grad():
        logits = students["ce"].model(input_ids=tokens[:, :-1]).logits.detach()
        with accelerator.autocast():
            teacher_logits = teacher(input_ids=tokens[:, :-1]).logits
    labels = tokens[:, 1:].reshape(-1)
    renormalized = dataclasses.replace(students["topk"].loss_fn, topk_renormalize=True)
    cases = {
        "ce": lambda x: students["ce"].loss_fn(x, {"tokens": tokens}),
        "topk": lambda x: students["topk"].loss_fn(x, on_device["topk"]),
        "topk-renorm": lambda x: renormalized(x, on_device["topk"]),
        "sampled": lambda x: students["sampled"].loss_fn(x, on_device["sampled"]),
        "online": lambda x: dense_kd_loss(
            x.reshape(-1, x.shape[-1]),
            teacher_logits.reshape(-1, x.shape[-1]),
            labels,
            alpha=config.loss.alpha,
            temperature=config.loss.temperature,
        ),
    }
    times = {key: {"forward": [], "backward": []} for key in cases}
    for repeat in range(repeats + 1):
        for key, loss_of in cases.items():
            x = logits.clone().requires_grad_(True)
            _sync(device)
            t0 = time.perf_counter()
            loss = loss_of(x)
            _sync(device)
            t1 = time.perf_counter()
            loss.total.backward()
            _sync(device)
            if repeat:
                times[key]["forward"].append(t1 - t0)
                times[key]["backward"].append(time.perf_counter() - t1)
    out = {
        "positions": labels.numel(),
        "vocab": logits.shape[-1],
        "logits_dtype": str(logits.dtype).replace("torch.", ""),
    }
    for key, t in times.items():
        out[key] = {"forward_ms": 1000 * _median(t["forward"]), "backward_ms": 1000 * _median(t["backward"])}
        out[key]["total_ms"] = out[key]["forward_ms"] + out[key]["backward_ms"]
    return out


# ---------------------------------------------------------------- data path and memory


def run_data_path(readers: dict, batch_size: int, config: BenchConfig, step_rows_per_s: dict, device) -> dict:
    """Rows/s of CacheRows + StepBatches + collate_rows through a DataLoader (with workers, and in-process)."""
    out = {}
    for mode, reader in readers.items():
        rows = CacheRows(reader)
        result = {"batch_size": batch_size, "num_workers": config.num_workers}
        for label, workers in (("workers", config.num_workers), ("in_process", 0)):
            sampler = StepBatches(len(rows), batch_size, 1, config.seed, 0, config.data_batches + 1)
            loader = DataLoader(
                rows,
                batch_sampler=sampler,
                collate_fn=collate_rows,
                num_workers=workers,
                pin_memory=device.type == "cuda",
                persistent_workers=False,
            )
            iterator = iter(loader)
            next(iterator)  # worker start-up is not part of the steady state
            start, count = time.perf_counter(), 0
            for batch in iterator:
                count += batch["tokens"].shape[0]
            result[f"rows_per_s_{label}"] = count / (time.perf_counter() - start)
            del iterator, loader
        result["step_rows_per_s"] = step_rows_per_s[mode]
        result["headroom"] = result["rows_per_s_workers"] / step_rows_per_s[mode]
        out[mode] = result
    return out


class _CountingLoss:
    """A step's loss_fn with the tensors it saves for backward counted (SavedTensorCounter)."""

    def __init__(self, loss_fn, counter: SavedTensorCounter):
        self.loss_fn, self.counter = loss_fn, counter
        self.fused_head = getattr(loss_fn, "fused_head", False)  # the step takes the path the loss takes

    def __call__(self, logits, batch):
        with self.counter.hooks():
            return self.loss_fn(logits, batch)

    def on_hidden(self, *args):
        with self.counter.hooks():
            return self.loss_fn.on_hidden(*args)


def run_memory(accelerator, students: dict, batches: dict, vocab: int, config: BenchConfig) -> dict:
    """One more step of each variant under PeakMemory, with the loss's saved tensors counted."""
    tokens = batches["topk"]["tokens"][:, 1:].numel()
    out, method = {}, None
    for key, student in students.items():
        counter = SavedTensorCounter(tokens * vocab)
        loss_fn, student.loss_fn = student.loss_fn, _CountingLoss(student.loss_fn, counter)
        with PeakMemory(accelerator.device) as peak:
            bench_step(accelerator, student, batches, config, 0, 1)
        student.loss_fn = loss_fn
        method = peak.method
        out[key] = {"label": student.label, **peak.result, **{f"loss_{k}": v for k, v in counter.summary().items()}}
    full_vocab_mb = tokens * vocab * 4 / 2**20
    return {"method": method, "tokens": tokens, "vocab": vocab, "float32_full_vocab_mb": full_vocab_mb, "variants": out}


# ---------------------------------------------------------------- fused output head + loss vs the unfused head

FUSED_WIDE_VOCAB = 128256  # Llama-3's head rows: the fused rows are also measured on a random student this wide
FUSED_MEMORY_TARGET = 0.40  # fused step memory increase over the unfused one's, at the wide vocabulary
FUSED_MODES = {"ce": None, "topk": "topk", "sampled": "sampled"}


def _doubled(batches: list[dict]) -> dict:
    """Two steps' rows as one batch of twice the rows (the second point of the memory line)."""
    return {
        mode: {key: torch.cat([b[mode][key] for b in batches[:2]]) for key in batches[0][mode]} for mode in batches[0]
    }


def _fused_memory(accelerator, variant: BenchStudent, batches: dict, vocab: int, config: BenchConfig) -> dict:
    """One step under PeakMemory with everything autograd saves counted (SavedTensorCounter over the model's
    forward and the loss: on the unfused path the head's float32 logits are saved by the loss)."""
    tokens = batches["topk"]["tokens"][:, 1:].numel()
    counter = SavedTensorCounter(tokens * vocab)
    with PeakMemory(accelerator.device) as peak, counter.hooks():
        bench_step(accelerator, variant, batches, config, 0, 1)
    return {**peak.result, "method": peak.method, **counter.summary()}


def run_fused_head(accelerator, student_config, config: BenchConfig, batches: list[dict], vocab: int, samples: int):
    """Fused output head + loss (--fused-head on) against the unfused head (today's logits, then the loss) for CE,
    topk KD and sampled KD, at the tokenizer's vocabulary and on a random student of the same width with a
    FUSED_WIDE_VOCAB-row head: step time (train.training_step, the six variants interleaved, medians), peak memory
    of one step at the bench batch and at twice it, the [tokens, vocab] tensors saved for backward, and the largest
    batch whose step fits --memory-budget-mb (from the line through those two points, its slope at least that of the
    saved tensors; over the step's start, i.e. beyond the model and the optimizer state)."""
    tokens = batches[0]["topk"]["tokens"][:, 1:].numel()
    rows_per_batch = batches[0]["topk"]["tokens"].shape[0]
    out = {"tokens_per_step": tokens, "rounds": len(batches) - 1, "memory_budget_mb": config.memory_budget_mb}
    out["heads"] = {}
    spec = student_config
    for rows in dict.fromkeys((vocab, FUSED_WIDE_VOCAB)):
        _log(f"fused head: student with a {rows:,}-row head")
        student = BenchStudent(accelerator, STEP_VARIANTS["ce"], spec, config, rows, None, samples)
        # the wide student: a random Llama of the first one's width
        width = accelerator.unwrap_model(student.model).config.hidden_size
        spec = dataclasses.replace(
            student_config, student=None, student_config=None, student_init="random", n_embd=width
        )
        head_rows = logit_width(accelerator.unwrap_model(student.model))
        applies = student.fused_applies
        variants = {}
        for key, mode in FUSED_MODES.items():
            loss_fn = dataclasses.replace(
                student.loss_fn,
                kd_loss=config.loss.kd_loss if mode == "topk" else "forward-kl",
                num_samples=samples,
            )
            for fused in (True, False) if applies else (False,):
                variant = copy.copy(student)  # the same model and optimizer: only the loss and the rows differ
                variant.cache_mode, variant.loss_fn = mode, dataclasses.replace(loss_fn, fused_head=fused)
                variants[(key, fused)] = variant
        times, laps = {name: [] for name in variants}, Laps(accelerator.device)
        for round_index, step in enumerate(batches):
            for name, variant in variants.items():
                record = bench_step(accelerator, variant, step, config, round_index, len(batches), laps)
                if round_index:  # round 0 warms up
                    times[name].append(record["step"])
        section = {"head_rows": head_rows, "fused_applies": applies, "variants": {}}
        for (key, fused), variant in variants.items():
            step_s = _median(times[(key, fused)])
            one = _fused_memory(accelerator, variant, batches[0], head_rows, config)
            two = _fused_memory(accelerator, variant, _doubled(batches), head_rows, config)
            # MB per row: the slope of peak RSS, but at least the slope of what autograd saves (exact, while RSS
            # moves by the allocator's reuse of freed pages, which can hide a few tens of MB)
            slope = max(two["increase_mb"] - one["increase_mb"], two["saved_mb"] - one["saved_mb"], 1e-3)
            per_row = slope / rows_per_batch
            fixed = max(0.0, one["increase_mb"] - per_row * rows_per_batch)
            section["variants"][f"{key}_{'fused' if fused else 'unfused'}"] = {
                "mode": key,
                "fused": fused,
                "step_ms": 1000 * step_s,
                "tokens_per_s": tokens / step_s,
                "peak_mb": one["peak_mb"],
                "increase_mb": one["increase_mb"],
                "increase_mb_2x": two["increase_mb"],
                "full_vocab_saved": one["full_vocab_saved"],
                "saved_mb": one["saved_mb"],
                "largest_batch": max(0, math.floor((config.memory_budget_mb - fixed) / per_row)),
            }
            out["memory_method"] = one["method"]
        v = section["variants"]
        if applies:
            section["memory_ratio"] = {
                k: _ratio(v[f"{k}_fused"]["increase_mb"], v[f"{k}_unfused"]["increase_mb"]) for k in FUSED_MODES
            }
            section["fused_over_unfused_ce_step_time"] = {
                k: _ratio(v[f"{k}_fused"]["step_ms"], v["ce_unfused"]["step_ms"]) for k in FUSED_MODES
            }
        out["heads"][str(head_rows)] = section
        del student, variants
        gc.collect()
    wide = out["heads"].get(str(FUSED_WIDE_VOCAB), {})
    memory = wide.get("memory_ratio", {})
    times = [r for s in out["heads"].values() for r in s.get("fused_over_unfused_ce_step_time", {}).values()]
    fused_rows = [v for s in out["heads"].values() for v in s["variants"].values() if v["fused"]]
    out["targets"] = {
        "fused_full_vocab_saved": sum(v["full_vocab_saved"] for v in fused_rows),
        "memory_ratio_target": FUSED_MEMORY_TARGET,
        "memory_meets_target": bool(memory)
        and all(r is not None and r <= FUSED_MEMORY_TARGET for r in memory.values()),
        "fused_not_slower": bool(times) and all(r is not None and r <= 1.0 for r in times),
    }
    return out


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


# ---------------------------------------------------------------- quality at equal budget


def run_quality(
    accelerator,
    config: BenchConfig,
    student_config: StudentConfig,
    readers: dict,
    val_reader,
    teacher,
    batch_size: int,
    vocab: int,
) -> dict:
    """Train one student per QUALITY_VARIANTS entry for --quality-steps steps on the same rows and schedule (the
    training step and learning-rate schedule of distill), then evaluate them all with the evaluator of compare."""
    steps = config.quality_steps
    batches = step_batches(readers, batch_size, config.seed, steps)
    num_samples = int(readers["sampled"].attrs["num_samples"])
    results, trained = {}, {}
    for key, spec in QUALITY_VARIANTS.items():
        student = BenchStudent(accelerator, spec, student_config, config, vocab, teacher, num_samples)
        start = time.perf_counter()
        for index, step in enumerate(batches):
            bench_step(accelerator, student, step, config, index, steps)
            if (index + 1) % max(1, steps // 4) == 0:
                _log(f"quality: {spec[0]} step {index + 1}/{steps}")
        seconds = time.perf_counter() - start
        trained[key] = accelerator.unwrap_model(student.model)
        tokens = batches[0]["topk"]["tokens"][:, 1:].numel()
        results[key] = {"label": spec[0], "train_tokens_per_s": steps * tokens / seconds}
    count = min(config.eval_rows, len(val_reader))
    figures = evaluate(
        {"teacher": teacher, **trained},
        CacheRows(val_reader),
        count=count,
        batch_size=batch_size,
        reference="teacher",
        temperature=float(val_reader.attrs["temperature"]),
        num_samples=int(val_reader.attrs.get("num_samples", 0)),
        desc="eval quality",
    )
    for key in trained:
        results[key].update(
            {
                "val_ppl": figures[key]["val_ppl"],
                "kl_cache": figures[key]["kl_to_teacher"],
                "kl_exact": figures[key]["kl_exact"],
                "top1_agreement": figures[key]["top1_agreement"],
            }
        )
    return {
        "steps": steps,
        "batch_size": batch_size,
        "train_rows": min(len(r) for r in readers.values()),
        "eval_rows": count,
        "eval_positions": figures["teacher"]["positions"],
        "kl_cache_estimator": f"{val_reader.mode} val cache (evaluate.evaluate)",
        "teacher_val_ppl": figures["teacher"]["val_ppl"],
        "variants": results,
    }


# ---------------------------------------------------------------- the command


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
    _log(f"building a randomly initialised {shape} teacher")
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
    _log(f"device {device}, batch {batch_size} x {config.seq_len}, mixed precision {accelerator.mixed_precision}")
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
        _log(f"quality: caching {train_rows - stage1_rows} more train rows and {val_rows} val rows")
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
        report.update(stage2=None, data=None, memory=None, fused_head=None, quality=None)
        return write_report(report, work_dir)

    # ---- stage 2: the four steps, interleaved, on the same batches
    readers = _open_caches(config, bench_caches, meta, vocab)
    num_samples = int(readers["sampled"].attrs["num_samples"])
    students = make_students(accelerator, STEP_VARIANTS, student_config, config, vocab, teacher, num_samples)
    report["resolved"]["student_parameters"] = count_parameters(accelerator.unwrap_model(students["ce"].model))
    batches = step_batches(readers, batch_size, config.seed, config.steps + 1)
    report["stage2"] = run_stage2(accelerator, students, batches, config)
    _log("stage 2: the loss alone")
    report["stage2"]["loss_alone"] = loss_alone(accelerator, students, batches[0], config.steps, teacher, config)

    # ---- data path, memory
    _log("data path and memory")
    step_rows = {mode: report["stage2"]["variants"][mode]["rows_per_s"] for mode in ("topk", "sampled")}
    report["data"] = run_data_path(readers, batch_size, config, step_rows, device)
    report["memory"] = run_memory(accelerator, students, batches[0], vocab, config)
    del students
    gc.collect()
    report["fused_head"] = run_fused_head(accelerator, student_config, config, batches, vocab, num_samples)

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


# ---------------------------------------------------------------- tables


def _fmt(value, spec: str = "{:,.0f}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return spec.format(value)


def _mark(ok: bool) -> str:
    return "ok" if ok else "MISS"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def busy_machine(machine: dict) -> bool:
    """CPU runs only: did other processes hold more than half the cores at the start (measured busy share over
    one second, else the load average), or at the end (1-minute load average less this run's own threads)?
    The load average lags, so the end check is a hint, not proof."""
    if machine["gpu"]:
        return False
    half = 0.5 * (machine["cpu_cores"] or 1)
    busy_start = machine.get("cpu_busy_start")
    if busy_start is not None:
        busy = busy_start > 0.5
    else:
        busy = bool(machine.get("load_average_start")) and machine["load_average_start"][0] > half
    end = machine.get("load_average_end")
    return busy or bool(end) and end[0] - machine["torch_threads"] > half


def render_markdown(report: dict) -> str:
    m, r, s1 = report["machine"], report["resolved"], report["stage1"]
    gpu = f", GPU {m['gpu']}" if m["gpu"] else ""
    out = [
        "# Benchmark",
        "",
        f"Machine: {m['cpu']} ({m['cpu_cores']} cores, {m['torch_threads']} torch threads; CPU features "
        f"{', '.join(m.get('cpu_features') or []) or 'unknown'}){gpu}; torch {m['torch']}, "
        f"transformers {m['transformers']}; {m['date']}; load average "
        f"{_fmt((m.get('load_average_start') or [None])[0], '{:.2f}')} at start.",
        f"Command: `{report['command']}`",
        "",
    ]
    if busy_machine(m):
        out += [
            f"**Warning: other processes shared the CPU (load average {m['load_average_start'][0]:.1f} at start, "
            f"{m['load_average_end'][0]:.1f} at the end, this run's own threads: {m['torch_threads']}, cores: "
            f"{m['cpu_cores']}), so these timings, ratios included, are unreliable: rerun on an idle machine.**",
            "",
        ]
    student = f", student {r['student_parameters'] / 1e6:.1f}M" if r.get("student_parameters") else ""
    out += [
        f"Teacher {r.get('teacher', '')} ({r['teacher_parameters'] / 1e6:.1f}M parameters, output head "
        f"{r.get('teacher_vocab_size', r['vocab_size']):,} rows){student}, "
        f"vocabulary {r['vocab_size']:,}; device {r['device']}, mixed precision {r['mixed_precision']}; batch "
        f"{r['batch_size']} rows x {report['options']['seq_len']} tokens.",
        "",
    ]

    out += [
        f"## Stage 1: teacher forward vs cache-logits ({s1['rows']} rows, {s1['tokens_per_pass']:,} tokens per pass, "
        f"median of {s1['repeats']} interleaved passes; the cache's teacher in {s1['teacher_dtype']}, measured against "
        "the fastest plain forward)",
        "",
    ]
    fastest = s1[s1["fastest_forward"]]["median_s"]
    rows = []
    for key, name in (
        ("forward", f"teacher forward, {s1['teacher_dtype']}"),
        ("forward_float32", "teacher forward, float32"),
    ):
        if key in s1:
            rows.append(
                [name, _fmt(s1[key]["tokens_per_s"]), _fmt(fastest / s1[key]["median_s"], "{:.3f}"), "", "-", "-"]
            )
    for mode, name in (
        ("topk", f"cache-logits topk K={report['options']['k']}"),
        ("sampled", f"cache-logits sampled N={report['options']['num_samples']}"),
    ):
        x = s1[mode]
        rows.append(
            [
                name,
                _fmt(x["tokens_per_s"]),
                _fmt(x["ratio_to_forward"], "{:.3f}"),
                f">= {x['target_ratio']} {_mark(x['meets_target'])}",
                _fmt(x["bytes_per_token"], "{:.1f}"),
                f"{x['dense_over_cache']:.0f}x smaller than dense fp16 ({x['dense_fp16_bytes_per_token']:,} B)",
            ]
        )
    out += _table(["path", "tokens/s", "vs fastest forward", "target", "bytes/token", "storage"], rows)
    out += [
        "",
        "Per batch, ms: forward alone "
        + _fmt(s1["forward"]["ms_per_batch"], "{:.1f}")
        + "; "
        + "; ".join(
            f"{mode}: teacher body {_fmt(s1[mode]['body_ms_per_batch'], '{:.1f}')}, output head + extraction "
            f"{_fmt(s1[mode]['head_extract_ms_per_batch'], '{:.1f}')}, part write "
            f"{_fmt(s1[mode]['write_ms_per_batch'], '{:.1f}')} "
            f"(on the writer thread; {_fmt(s1[mode]['write_wait_ms_per_batch'], '{:.1f}')} waited for at the end)"
            for mode in ("topk", "sampled")
        )
        + ".",
    ]
    if "memory" in s1["forward"]:
        dense_mb = r["batch_size"] * report["options"]["seq_len"] * r.get("teacher_vocab_size", r["vocab_size"]) * 4
        out += [
            "",
            f"Peak memory of one pass ({s1['memory_method']}), MB: "
            + "; ".join(
                f"{key} {_fmt(s1[key]['memory']['peak_mb'])} (+{_fmt(s1[key]['memory']['increase_mb'])} over its start)"
                for key in ("forward", "topk", "sampled")
            )
            + f". A float32 [tokens, vocab] tensor of one batch is {dense_mb / 2**20:,.0f} MB.",
        ]
    if s1.get("mfu"):
        u = s1["mfu"]
        cells = ", ".join(
            f"{k} {_fmt(u[k + '_tflops'], '{:.1f}')} TFLOP/s" + (f" = {u[k + '_mfu']:.1%} MFU" if u[k + "_mfu"] else "")
            for k in ("forward", "topk", "sampled")
        )
        out += [
            "",
            f"Model FLOPs utilisation on {u['device']} (peak {_fmt((u['peak_bf16_flops'] or 0) / 1e12, '{:.0f}')} "
            "TFLOP/s dense bf16; "
            f"target >= {u['target']:.0%}): {cells}.",
        ]
    if report.get("stage2") is None:  # --teacher-shape: stage 1 alone
        return "\n".join(out) + "\n"
    s2 = report["stage2"]

    out += [
        "",
        f"## Stage 2: training step ({s2['tokens_per_step']:,} tokens per step, median of {s2['rounds']} interleaved "
        "rounds)",
        "",
    ]
    phases = ["teacher", "forward", "loss", "backward", "optimizer"]
    rows = []
    for key, v in s2["variants"].items():
        ratio = v["step_ms"] / s2["variants"]["ce"]["step_ms"]
        target = "" if key in ("ce", "online") else f"<= {TARGET_STEP_RATIO} {_mark(ratio <= TARGET_STEP_RATIO)}"
        rows.append(
            [
                v["label"],
                _fmt(v["tokens_per_s"]),
                _fmt(v["step_ms"], "{:.1f}"),
                _fmt(ratio, "{:.3f}"),
                target,
                *(_fmt(v.get(f"{p}_ms"), "{:.1f}") for p in phases),
            ]
        )
    out += _table(["step", "tokens/s", "step ms", "step time vs (a)", "target", *(f"{p} ms" for p in phases)], rows)
    q = s2["ratios"]
    out += [
        "",
        f"Speed-up over online KD: (a) CE {q['ce_over_online_speed']:.2f}x, (b) topk KD "
        f"{q['topk_over_online_speed']:.2f}x, "
        f"(c) sampled KD {q['sampled_over_online_speed']:.2f}x.",
    ]
    la = s2["loss_alone"]
    out += [
        "",
        f"The loss alone on {la['positions']:,} positions x {la['vocab']:,} ({la['logits_dtype']} logits), forward + "
        "backward, ms:",
        "",
    ]
    out += _table(
        ["loss", "forward", "backward", "total"],
        [
            [
                k,
                _fmt(la[k]["forward_ms"], "{:.1f}"),
                _fmt(la[k]["backward_ms"], "{:.1f}"),
                _fmt(la[k]["total_ms"], "{:.1f}"),
            ]
            for k in ("ce", "topk", "topk-renorm", "sampled", "online")
        ],
    )

    d = report["data"]
    out += ["", "## Data path: CacheRows + StepBatches + collate_rows through a DataLoader", ""]
    out += _table(
        [
            "cache",
            f"rows/s (DataLoader, {d['topk']['num_workers']} worker(s))",
            "rows/s (in process)",
            "rows/s a step consumes",
            "headroom",
        ],
        [
            [
                mode,
                _fmt(x["rows_per_s_workers"]),
                _fmt(x["rows_per_s_in_process"]),
                _fmt(x["step_rows_per_s"], "{:,.1f}"),
                f"{x['headroom']:.0f}x",
            ]
            for mode, x in d.items()
        ],
    )

    mem = report["memory"]
    out += [
        "",
        f"## Memory of one step ({mem['method']})",
        "",
        f"A float32 [tokens, vocab] tensor here is {mem['float32_full_vocab_mb']:.0f} MB. 'Saved by the loss' counts "
        "the "
        "[tokens, vocab] tensors autograd keeps from the loss call to the backward (saved-tensor hook).",
        "",
    ]
    out += _table(
        [
            "step",
            "peak MB",
            "increase over step start MB",
            "full-vocab float32 saved by loss",
            "all full-vocab saved (dtypes)",
            "loss saved MB",
        ],
        [
            [
                v["label"],
                _fmt(v["peak_mb"]),
                _fmt(v["increase_mb"]),
                str(v["loss_full_vocab_float32_saved"]),
                f"{v['loss_full_vocab_saved']} ({', '.join(v['loss_full_vocab_dtypes']) or '-'})",
                _fmt(v["loss_saved_mb"]),
            ]
            for v in mem["variants"].values()
        ],
    )

    fused = report.get("fused_head")
    if fused:
        out += [
            "",
            f"## Output head fused with the loss vs unfused ({fused['tokens_per_step']:,} tokens a step, "
            f"{fused['rounds']} interleaved rounds; memory: {fused['memory_method']})",
            "",
            "Memory is the step's peak over its start (the model and optimizer state already there), at the bench "
            f"batch and at twice it; the largest batch is where the line through them reaches "
            f"{fused['memory_budget_mb']:,} MB. 'Saved' counts [tokens, vocab] tensors autograd keeps for the "
            "backward.",
            "",
        ]
        rows = []
        for head_rows, section in fused["heads"].items():
            for v in section["variants"].values():
                rows.append(
                    [
                        f"{int(head_rows):,}",
                        f"{v['mode']} {'fused' if v['fused'] else 'unfused'}",
                        _fmt(v["tokens_per_s"]),
                        _fmt(v["step_ms"]),
                        _fmt(v["increase_mb"]),
                        _fmt(v["increase_mb_2x"]),
                        str(v["full_vocab_saved"]),
                        _fmt(v["largest_batch"]),
                    ]
                )
        out += _table(
            ["head rows", "step", "tokens/s", "step ms", "memory +MB", "+MB at 2x batch", "saved", "largest batch"],
            rows,
        )
        t = fused["targets"]
        wide = fused["heads"].get(str(FUSED_WIDE_VOCAB), {})
        ratios = ", ".join(f"{k} {_fmt(r, '{:.0%}')}" for k, r in wide.get("memory_ratio", {}).items())
        times = "; ".join(
            f"{int(head_rows):,} rows: "
            + ", ".join(f"{k} {_fmt(r, '{:.2f}')}" for k, r in section["fused_over_unfused_ce_step_time"].items())
            for head_rows, section in fused["heads"].items()
            if "fused_over_unfused_ce_step_time" in section
        )
        out += [
            "",
            f"At {FUSED_WIDE_VOCAB:,} rows: fused memory increase over unfused {ratios or '-'} (target <= "
            f"{t['memory_ratio_target']:.0%}) {_mark(t['memory_meets_target'])}. Fused step time over the unfused CE "
            f"step, {times or '-'} (target <= 1) {_mark(t['fused_not_slower'])}. [tokens, vocab] tensors saved by "
            f"the fused steps: {t['fused_full_vocab_saved']} {_mark(t['fused_full_vocab_saved'] == 0)}.",
        ]

    qual = report.get("quality")
    if qual:
        out += [
            "",
            f"## Quality at equal budget ({qual['steps']} steps x {qual['batch_size']} rows, {qual['train_rows']} "
            "train rows; "
            f"{qual['eval_rows']} val rows, {qual['eval_positions']:,} positions; teacher val ppl "
            f"{qual['teacher_val_ppl']:.2f})",
            "",
        ]
        out += _table(
            [
                "student",
                "val ppl",
                "KL exact (full vocab)",
                "KL (cache estimator)",
                "top-1 agreement",
                "train tokens/s",
            ],
            [
                [
                    v["label"],
                    _fmt(v["val_ppl"], "{:.2f}"),
                    _fmt(v["kl_exact"], "{:.4f}"),
                    _fmt(v["kl_cache"], "{:.4f}"),
                    _fmt(v["top1_agreement"], "{:.1%}"),
                    _fmt(v["train_tokens_per_s"]),
                ]
                for v in qual["variants"].values()
            ],
        )
    return "\n".join(out) + "\n"
