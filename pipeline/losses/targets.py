"""The teacher's cached targets of N token positions, as the losses take them: TopkTargets or SampledTargets.

Callers hand the losses a mapping (teacher_targets of a batch: topk_ids/topk_logprobs/tail_logprob or
sample_ids/sample_counts/teacher_entropy/num_samples, and optionally teacher_mask); targets_from_mapping turns it
into one of these, and `masked` gives masked-out rows harmless dummies, so that garbage in them (id -1, NaN
log-probs) reaches no arithmetic.

`present` (the mapping's teacher_mask, [N] bool) marks the positions that have a teacher target at all (cross-tokenizer
distillation: where the two tokenizations align); elsewhere the loss is the hard loss alone. None: every position.
The losses fold it into their mask once (chunked.prepare_inputs), and `masked` then gives the rows without a target
their dummies too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TopkTargets:
    """A top-k cache's targets: the teacher's K most likely ids at each position and their log-probs."""

    ids: torch.Tensor  # [N,K] int
    logprobs: torch.Tensor  # [N,K] teacher log-probs at T over the full vocabulary
    tail_logprob: torch.Tensor  # [N] log(1 - sum exp(logprobs)), the mass outside the ids (<= LOG_ZERO: none)
    present: torch.Tensor | None = None  # [N] bool: positions with a teacher target (None: every position)

    mode = "topk"

    def masked(self, mask: torch.Tensor, dtype: torch.dtype, device) -> TopkTargets:
        """Cast (ids to long, log-probs to dtype), and give masked rows a valid dummy teacher (K distinct ids,
        uniform mass). `present` is not read: mask already holds it (prepare_inputs); the result has none."""
        ids, mask = self.ids.to(device=device, dtype=torch.long), mask.to(device=device, dtype=torch.bool)
        k = ids.shape[1]
        fill = -math.log(k + 1)
        ids = torch.where(mask[:, None], ids, torch.arange(k, device=device))
        logprobs = torch.where(mask[:, None], self.logprobs.to(device=device, dtype=dtype), fill)
        tail = torch.where(mask, self.tail_logprob.to(device=device, dtype=dtype), fill)
        return TopkTargets(ids, logprobs, tail)

    def rows(self, rows: slice) -> TopkTargets:
        return TopkTargets(self.ids[rows], self.logprobs[rows], self.tail_logprob[rows], _part(self.present, rows))


@dataclass(frozen=True)
class SampledTargets:
    """A sampled cache's targets: the distinct ids of num_samples draws from the teacher at T, and their counts."""

    ids: torch.Tensor  # [N,S] int, the distinct ids drawn (padding: count 0, any valid id)
    counts: torch.Tensor  # [N,S] how often each id was drawn
    entropy: torch.Tensor  # [N] the teacher's entropy H(p) at T
    num_samples: int  # draws per position
    present: torch.Tensor | None = None  # [N] bool: positions with a teacher target (None: every position)

    mode = "sampled"

    def masked(self, mask: torch.Tensor, dtype: torch.dtype, device) -> SampledTargets:
        """Cast (ids to long, counts and entropy to dtype), and give masked rows count 0 (no terms) and entropy 0.
        `present` is not read: mask already holds it (prepare_inputs); the result has none."""
        mask = mask.to(device=device, dtype=torch.bool)
        ids = torch.where(mask[:, None], self.ids.to(device=device, dtype=torch.long), 0)
        counts = torch.where(mask[:, None], self.counts.to(device=device, dtype=dtype), 0.0)
        entropy = torch.where(mask, self.entropy.to(device=device, dtype=dtype), 0.0)
        return SampledTargets(ids, counts, entropy, self.num_samples)

    def rows(self, rows: slice) -> SampledTargets:
        return SampledTargets(
            self.ids[rows], self.counts[rows], self.entropy[rows], self.num_samples, _part(self.present, rows)
        )


TeacherTargets = TopkTargets | SampledTargets


def _part(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if t is None else t[rows]


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.reshape(n, t.shape[-1])  # [..., K] -> [N,K]; explicit K so that N = 0 works


def targets_from_mapping(targets: Mapping | None, n: int) -> TeacherTargets | None:
    """The targets of a mapping (teacher_targets' keys) over n positions, flattened to [N, ...]; None for None.
    An optional "teacher_mask" ([N] or [B, L] bool) becomes `present`."""
    if targets is None:
        return None
    present = targets.get("teacher_mask")
    present = None if present is None else present.reshape(n)
    if "topk_ids" in targets:
        return TopkTargets(
            _rows(targets["topk_ids"], n),
            _rows(targets["topk_logprobs"], n),
            targets["tail_logprob"].reshape(n),
            present,
        )
    if "sample_ids" in targets:
        num_samples = int(targets["num_samples"])
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        return SampledTargets(
            _rows(targets["sample_ids"], n),
            _rows(targets["sample_counts"], n),
            targets["teacher_entropy"].reshape(n),
            num_samples,
            present,
        )
    raise ValueError(f"targets holds neither topk_ids nor sample_ids: {sorted(targets)}")
