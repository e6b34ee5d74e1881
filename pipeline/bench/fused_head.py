"""The bench's fused-head section: the output head fused with the loss (--fused-head on) against the unfused head
for CE, topk and sampled KD, at the tokenizer's vocabulary and with a FUSED_WIDE_VOCAB-row head: step tokens/s,
peak memory of a step at the batch and twice it, [tokens, vocab] tensors saved, the largest batch within
--memory-budget-mb."""

from __future__ import annotations

import copy
import dataclasses
import gc
import math

import torch

from pipeline.bench.probes import Laps, PeakMemory, SavedTensorCounter, log, median
from pipeline.bench.stage2 import STEP_VARIANTS
from pipeline.bench.students import BenchStudent, bench_step
from pipeline.config import BenchConfig
from pipeline.models import logit_width

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
    head_student = student_config  # the first head: the student the options describe
    for rows in dict.fromkeys((vocab, FUSED_WIDE_VOCAB)):
        log(f"fused head: student with a {rows:,}-row head")
        student = BenchStudent(accelerator, STEP_VARIANTS["ce"], head_student, config, rows, None, samples)
        # the wide student: a random Llama of the first one's width
        width = accelerator.unwrap_model(student.model).config.hidden_size
        head_student = dataclasses.replace(
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
            step_s = median(times[(key, fused)])
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
