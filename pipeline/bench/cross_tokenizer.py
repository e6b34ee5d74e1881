"""The cross-tokenizer distill step against the same-tokenizer one, from the same bench caches.

Both students have the same shape (a head as wide as the larger vocabulary), so the two steps differ only in what
cross-tokenizer distillation adds: the student's rows aligned with the teacher's by bytes, the cached targets
carried to its vocabulary (AlignedCacheRows: binary searches, one to three cache rows read, map_topk / map_sampled)
and the loss's teacher_mask. A step is timed from its rows (read, aligned, collated) to the optimizer step; the
two students' steps alternate, after one warm-up round each, and the medians are reported.
"""

from __future__ import annotations

import time
from pathlib import Path
from statistics import median

import numpy as np

from pipeline.alignment import tokenizer_maps
from pipeline.batches import AlignedCacheRows, CacheRows, StepBatches, collate_rows
from pipeline.bench.probes import Laps
from pipeline.bench.students import BenchStudent, StepVariant, bench_step
from pipeline.config import BenchConfig, StudentConfig
from pipeline.models import load_tokenizer
from pipeline.student_data import prepare_student_data
from pipeline.student_tokenizers import trained_tokenizer

STUDENT_VOCAB = 8192  # the cross-tokenizer student's byte-level BPE, trained on the bench data's train text


def run_cross_tokenizer(
    accelerator,
    config: BenchConfig,
    student_config: StudentConfig,
    readers: dict,
    batch_size: int,
    vocab: int,
    num_samples: int,
) -> dict:
    """{"student_vocab", mode: {same_ms, cross_ms, ratio, same_rows_ms, cross_rows_ms, coverage}} per cache mode."""
    tokenizer = trained_tokenizer(config.data_dir, "bpe", STUDENT_VOCAB)
    student_dir = prepare_student_data(config.data_dir, tokenizer, Path(config.out_dir) / "student-data")
    maps = tokenizer_maps(load_tokenizer(config.teacher), tokenizer, vocab)
    head_rows = max(vocab, len(tokenizer))  # both students' head: wide enough for either tokenizer's ids
    out = {"student_vocab": len(tokenizer)}
    laps = Laps(accelerator.device)  # the step's phases, each GPU-synchronised; their sum is the step
    for mode, reader in readers.items():
        variant = StepVariant(f"{mode} KD", cache_mode=mode)
        cross_rows = AlignedCacheRows(str(student_dir), config.data_dir, reader, maps)
        runs = {}  # label: (rows, student, the row indices of each step)
        for label, rows, count in (
            ("same", CacheRows(reader), len(reader)),
            ("cross", cross_rows, cross_rows.rows_within(len(reader))),
        ):
            student = BenchStudent(accelerator, variant, student_config, config, head_rows, None, num_samples)
            runs[label] = (rows, student, list(StepBatches(count, batch_size, 1, config.seed, 0, config.steps + 1)))
        times = {label: {"rows": [], "step": []} for label in runs}
        coverage = []
        for step in range(config.steps + 1):
            for label, (rows, student, batches) in runs.items():
                start = time.perf_counter()
                batch = collate_rows([rows[i] for i in batches[step]])
                read = time.perf_counter() - start
                seconds = bench_step(accelerator, student, {mode: batch}, config, step, config.steps + 1, laps)["step"]
                if step == 0:
                    continue  # warm-up
                times[label]["rows"].append(read)
                times[label]["step"].append(read + seconds)
                if label == "cross":
                    coverage.append(float(batch["teacher_mask"].float().mean()))
        same, cross = median(times["same"]["step"]), median(times["cross"]["step"])
        out[mode] = {
            "same_ms": same * 1e3,
            "cross_ms": cross * 1e3,
            "ratio": cross / same,
            "same_rows_ms": median(times["same"]["rows"]) * 1e3,
            "cross_rows_ms": median(times["cross"]["rows"]) * 1e3,
            "coverage": float(np.mean(coverage)),
        }
    return out
