"""Distillation losses of a student against a sparse teacher cache.

Shapes: N token positions (flatten batch x sequence first), V vocabulary, K stored top-k ids,
S distinct sampled ids. Read in this order:

    targets.py       TopkTargets / SampledTargets: the teacher's cached targets, masked rows given dummies
    divergences.py   the formulas: per-row divergences on a few statistics of the student's logits
                     (StudentStats), and the public hard_ce, topk_divergence, sampled_divergence, dense_kd_loss
    chunked.py       the chunked autograd machinery: per-chunk statistics forward, per-chunk gradient backward,
                     from saved [N,1] / [N,K] statistics only
    distillation.py  distillation_loss on logits [N,V] (ChunkedLoss)
    fused_head.py    fused_distillation_loss on hidden states and the output head (FusedHeadLoss): no [N,V] at all
    step_loss.py     StepLoss, the loss of a training step, and teacher_targets of a batch

Masked-out positions are replaced by harmless dummies before any arithmetic, so garbage in
them (label -100, NaN log-probs, id -1) reaches neither the value nor the gradient; a mean over
zero positions is 0. The targets' optional teacher_mask marks the positions that have a teacher target at all: the
KD is the mean over those (in mask), the CE still the mean over mask, and the other rows' targets get dummies too.
Options out of range raise ValueError (the CLI validates them first, in config).
"""

from pipeline.losses.distillation import distillation_loss
from pipeline.losses.divergences import LOG_ZERO, LossParts, dense_kd_loss, hard_ce, sampled_divergence, topk_divergence
from pipeline.losses.fused_head import fused_distillation_loss
from pipeline.losses.step_loss import FUSED_CHUNK_ELEMENTS, StepLoss, teacher_targets
from pipeline.losses.targets import SampledTargets, TopkTargets

__all__ = [
    "FUSED_CHUNK_ELEMENTS",
    "LOG_ZERO",
    "LossParts",
    "SampledTargets",
    "StepLoss",
    "TopkTargets",
    "dense_kd_loss",
    "distillation_loss",
    "fused_distillation_loss",
    "hard_ce",
    "sampled_divergence",
    "teacher_targets",
    "topk_divergence",
]
