"""Stage 2 of the bench: tokens/s of one training step (forward, loss, backward, clip, AdamW) for CE, KD from each
cache and online dense KD, run interleaved a b c d a b c d on the same batches (machine drift hits all alike),
medians; the loss alone on fixed logits; and the peak memory of one step of each with the [tokens, vocab] tensors
the loss saves for backward."""

from __future__ import annotations

import dataclasses
import time

import torch

from pipeline.bench.probes import Laps, PeakMemory, SavedTensorCounter, log, median, sync
from pipeline.bench.students import StepVariant, bench_step
from pipeline.config import BenchConfig
from pipeline.losses import dense_kd_loss

TARGET_STEP_RATIO = 1.05  # offline KD step time over CE step time

STEP_VARIANTS = {
    "ce": StepVariant("(a) CE only"),
    "topk": StepVariant("(b) KD, topk cache", cache_mode="topk"),
    "sampled": StepVariant("(c) KD, sampled cache", cache_mode="sampled"),
    "online": StepVariant("(d) online dense KD", online=True),
}
# The losses timed alone on fixed logits (loss_alone), in the order of its table.
LOSS_ALONE_CASES = ("ce", "topk", "topk-renorm", "sampled", "online")


def run_stage2(accelerator, students: dict, batches: list[dict], config: BenchConfig) -> dict:
    """Warm-up round, then config.steps rounds of a b c d on the same batch; medians of each phase."""
    laps = Laps(accelerator.device)
    records = {key: [] for key in STEP_VARIANTS}
    for round_index, step in enumerate(batches):
        if round_index:
            log(f"stage 2: round {round_index}/{len(batches) - 1} (ce, topk, sampled, online)")
        for key in STEP_VARIANTS:
            times = bench_step(accelerator, students[key], step, config, round_index, len(batches), laps)
            if round_index:  # round 0 warms up
                records[key].append(times)
    tokens = batches[0]["topk"]["tokens"][:, 1:].numel()
    variants = {}
    for key, variant in STEP_VARIANTS.items():
        step_s = median([r["step"] for r in records[key]])
        phases = {
            f"{p}_ms": 1000 * median([r[p] for r in records[key]])
            for p in records[key][0]
            if p not in ("step", "loss_value")
        }
        variants[key] = {
            "label": variant.label,
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
            sync(device)
            t0 = time.perf_counter()
            loss = loss_of(x)
            sync(device)
            t1 = time.perf_counter()
            loss.total.backward()
            sync(device)
            if repeat:
                times[key]["forward"].append(t1 - t0)
                times[key]["backward"].append(time.perf_counter() - t1)
    out = {
        "positions": labels.numel(),
        "vocab": logits.shape[-1],
        "logits_dtype": str(logits.dtype).replace("torch.", ""),
    }
    for key, t in times.items():
        out[key] = {"forward_ms": 1000 * median(t["forward"]), "backward_ms": 1000 * median(t["backward"])}
        out[key]["total_ms"] = out[key]["forward_ms"] + out[key]["backward_ms"]
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
