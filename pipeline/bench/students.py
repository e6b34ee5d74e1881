"""The students the bench trains and the step it times: a StepVariant names what one student's loss reads, a
BenchStudent is that student prepared by Accelerate with its loss, and bench_step runs train.training_step (the step
distill and baseline run) on it. Stage 2, the memory and fused-head sections and the quality runs share them."""

from __future__ import annotations

import dataclasses

import torch

from pipeline.batches import CacheRows, StepBatches, collate_rows
from pipeline.bench.probes import Laps
from pipeline.config import BenchConfig, StudentConfig
from pipeline.losses import LossParts, StepLoss, dense_kd_loss
from pipeline.student import build_student
from pipeline.train import head_fusable, make_optimizer, training_step, use_fused_head


@dataclasses.dataclass(frozen=True)
class StepVariant:
    """One loss the bench trains a student with."""

    label: str  # its row in the tables
    cache_mode: str | None = None  # the cache whose targets the loss reads (topk / sampled); None: the tokens alone
    topk_renormalize: bool = False  # topk KD over the K stored tokens renormalised, without the tail bucket
    online: bool = False  # the teacher runs inside the step (dense full-vocabulary KD), no cache

    @property
    def offline_kd(self) -> bool:
        """KD from a cache: the variants whose step time has a target against CE's."""
        return self.cache_mode is not None


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
        variant: StepVariant,
        student_config: StudentConfig,
        config: BenchConfig,
        vocab: int,
        teacher,
        num_samples: int,
    ):
        model = build_student(student_config, config.teacher, vocab, config.seed)
        # before prepare, as train() decides it: Accelerate's autocast wrapper changes the logits' precision
        self.fused_applies = head_fusable(model, vocab)
        fused = use_fused_head(config.loss.fused_head, model, vocab)
        optimizer = make_optimizer(model, config.optim)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.model.train()
        self.label, self.cache_mode = variant.label, variant.cache_mode
        if variant.online:
            self.loss_fn = OnlineStepLoss(teacher, accelerator, config.loss.alpha, config.loss.temperature)
        else:
            self.loss_fn = StepLoss(
                alpha=config.loss.alpha,
                temperature=config.loss.temperature,
                kd_loss=config.loss.kd_loss if variant.cache_mode == "topk" else "forward-kl",
                jsd_beta=config.loss.jsd_beta,
                topk_renormalize=variant.topk_renormalize,
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
    variants: dict[str, StepVariant],
    student_config: StudentConfig,
    config: BenchConfig,
    vocab: int,
    teacher,
    num_samples: int,
) -> dict[str, BenchStudent]:
    """{key: BenchStudent}: the same initial student for every variant."""
    return {
        key: BenchStudent(accelerator, variant, student_config, config, vocab, teacher, num_samples)
        for key, variant in variants.items()
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
