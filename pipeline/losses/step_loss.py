"""The loss of one training step: StepLoss turns the student's logits (or final hidden states and output head)
and a batch of rows into distillation_loss (or fused_distillation_loss); teacher_targets reads a batch's cached
teacher targets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from pipeline.buffers import WorkBuffers
from pipeline.losses.distillation import distillation_loss
from pipeline.losses.divergences import LossParts
from pipeline.losses.fused_head import fused_distillation_loss


def teacher_targets(batch: Mapping[str, torch.Tensor], num_samples: int) -> dict | None:
    """The cached teacher targets of a batch of rows, flattened to [B*L, ...] as distillation_loss takes them,
    or None for a batch of tokens only (the baseline). A batch's "teacher_mask" [B, L] bool (the positions with a
    teacher target) goes along flattened."""
    if "topk_ids" in batch:
        k = batch["topk_ids"].shape[-1]
        targets = {
            "topk_ids": batch["topk_ids"].reshape(-1, k),
            "topk_logprobs": batch["topk_logprobs"].reshape(-1, k),
            "tail_logprob": batch["tail_logprob"].reshape(-1),
        }
    elif "sample_ids" in batch:
        s = batch["sample_ids"].shape[-1]
        targets = {
            "sample_ids": batch["sample_ids"].reshape(-1, s),
            "sample_counts": batch["sample_counts"].reshape(-1, s),
            "teacher_entropy": batch["teacher_entropy"].reshape(-1),
            "num_samples": num_samples,
        }
    else:
        return None
    if "teacher_mask" in batch:
        targets["teacher_mask"] = batch["teacher_mask"].reshape(-1)
    return targets


# The fused head's chunk, in logits: 2^24 (64 MB of float32) is 341 rows at a 49,152 vocabulary, 130 at 128,256;
# the head's matmul on that many rows still runs at full speed, and the chunk's buffers (its logits, a float32 work
# buffer, the cast of its gradient; WorkBuffers) stay a few hundred MB whatever the batch.
FUSED_CHUNK_ELEMENTS = 2**24


@dataclass(frozen=True)
class StepLoss:
    """The loss of one training step: distillation_loss of the student's logits on a batch of rows (or, with
    fused_head, fused_distillation_loss of its final hidden states and output head: on_hidden).

    Called with logits [B, L, V] (the student on tokens[:, :-1]) and the batch (tokens [B, L+1], plus the cached
    teacher targets of the rows, if any): labels are tokens[:, 1:]; a batch without targets gives CE alone
    (the baseline); temperature and num_samples are the cache's."""

    alpha: float
    temperature: float
    kd_loss: str = "forward-kl"
    jsd_beta: float = 0.5
    topk_renormalize: bool = False
    chunk_size: int = 2048
    num_samples: int = 0
    fused_head: bool = False  # training_step hands the loss the final hidden states and the head (on_hidden)
    # The fused head's chunk buffers (a few hundred MB at most: FUSED_CHUNK_ELEMENTS), kept from step to step so that
    # no step faults their pages in anew. The unfused loss's [chunk_size, V] buffers stay per call: far larger.
    buffers: WorkBuffers = field(default_factory=WorkBuffers, compare=False, repr=False)

    def _options(self) -> dict:
        return {
            "alpha": self.alpha,
            "temperature": self.temperature,
            "kd_loss": self.kd_loss,
            "jsd_beta": self.jsd_beta,
            "topk_renormalize": self.topk_renormalize,
            "chunk_size": self.chunk_size,
        }

    def __call__(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> LossParts:
        return distillation_loss(
            logits.reshape(-1, logits.shape[-1]),
            batch["tokens"][:, 1:].reshape(-1),
            targets=teacher_targets(batch, self.num_samples),
            **self._options(),
        )

    def on_hidden(
        self, hidden: torch.Tensor, head: torch.nn.Linear, logits_dtype: torch.dtype, batch: Mapping[str, torch.Tensor]
    ) -> LossParts:
        """The same loss from the final hidden states [B, L, H] and the output head (fused_distillation_loss);
        logits_dtype: the dtype the head's logits have on the unfused path. Chunks are at most chunk_size rows and
        FUSED_CHUNK_ELEMENTS logits, so that the head's temporaries stay small at any vocabulary."""
        options = self._options()
        options["chunk_size"] = min(self.chunk_size, max(1, FUSED_CHUNK_ELEMENTS // head.weight.shape[0]))
        return fused_distillation_loss(
            hidden.reshape(-1, hidden.shape[-1]),
            head.weight,
            batch["tokens"][:, 1:].reshape(-1),
            targets=teacher_targets(batch, self.num_samples),
            head_bias=head.bias,
            logits_dtype=logits_dtype,
            buffers=self.buffers,
            **options,
        )
