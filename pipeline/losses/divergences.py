"""The divergences, stated once: per-row formulas on a few statistics of the student's logits, and the public
losses on whole [N,V] logits (hard_ce, topk_divergence, sampled_divergence; dense_kd_loss, the dense reference).

Every divergence sees the student's logits x [n,V] only through StudentStats, computed in float32 (float64 inputs
stay float64, for gradcheck):

    z        = x / T
    log q_v  = z_v - logsumexp_v(z)                              (full-vocabulary softmax)
    log q_o  = logsumexp_{v not in ids}(z_v) - logsumexp_v(z)    (the student's tail bucket)

The chunked losses (chunked.py) compute the same statistics a chunk at a time and run the same row formulas
(topk_rows, sampled_rows) on them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pipeline.losses.targets import SampledTargets, TopkTargets

# A teacher log-prob at or below this carries no mass. exp(-80) ~ 2e-35 is far below anything a
# divergence can feel, and the cut turns the cache's -inf / -1e4 sentinels into exact zeros
# instead of 0 * inf. It is also the finite stand-in used wherever log 0 would be needed.
LOG_ZERO = -80.0

KD_KINDS = ("forward-kl", "reverse-kl", "jsd")


class LossParts(NamedTuple):
    total: torch.Tensor  # alpha * ce + (1 - alpha) * T^2 * kd, or ce alone without a teacher
    ce: torch.Tensor  # hard-label cross-entropy at temperature 1
    kd: torch.Tensor  # the divergence itself, before its (1 - alpha) * T^2 weight


def check_options(
    alpha: float, temperature: float, kind: str, jsd_beta: float, mode: str | None = None, renormalize: bool = False
) -> None:
    """Raise one ValueError naming every argument out of range. The CLI validates the same options earlier
    (config.Loss), with the flags' names; this guards direct calls."""
    problems = []
    if not 0.0 <= alpha <= 1.0:  # also refuses NaN
        problems.append(f"alpha must be in [0, 1], got {alpha}")
    if temperature is None or not (temperature > 0 and math.isfinite(temperature)):
        problems.append(f"temperature must be positive, got {temperature}")
    if kind not in KD_KINDS:
        problems.append(f"kd_loss must be one of {', '.join(KD_KINDS)}, got {kind!r}")
    if not 0.0 < jsd_beta < 1.0:
        problems.append(f"jsd_beta must be in (0, 1), got {jsd_beta}")
    if mode == "sampled" and kind in KD_KINDS and kind != "forward-kl":
        problems.append(f"kd_loss {kind} needs top-k targets: sampled targets estimate forward-kl only")
    if mode == "sampled" and renormalize:
        problems.append("topk_renormalize applies to top-k targets, not sampled ones")
    if problems:
        raise ValueError("; ".join(problems))


def all_positions(mask: torch.Tensor | None, n: int, device) -> torch.Tensor:
    """mask [N] as bool on `device`; None means every position counts."""
    if mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    return mask.reshape(-1).to(device=device, dtype=torch.bool)


def compute_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """The dtype the losses compute in for logits of logits_dtype: float32, or float64 for float64."""
    return torch.promote_types(logits_dtype, torch.float32)


def masked_sum(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, rows, 0.0).sum()


def masked_count(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum().clamp_min(1)  # all masked: the sums are 0, so the mean is 0 rather than 0/0


# ----------------------------------------------------------------------------- student statistics


class StudentStats(NamedTuple):
    """What the losses need from the student's logits x [n,V]; each None unless asked for. Differentiable when
    student_stats makes them; without a graph, per chunk, in chunked.chunk_stats (which also sets `redo`)."""

    lse: torch.Tensor | None  # [n,1] logsumexp(x)                  (CE)
    x_label: torch.Tensor | None  # [n,1] x at the label                 (CE)
    lse_t: torch.Tensor | None  # [n,1] logsumexp(z), z = x / T
    z_ids: torch.Tensor | None  # [n,K] z at the teacher's ids
    lse_out: torch.Tensor | None  # [n,1] logsumexp(z outside the ids); a finite stand-in if empty
    empty: torch.Tensor | None  # [n,1] bool: no vocabulary id lies outside the ids (K = V)
    redo: torch.Tensor | None = None  # [n,1] bool: a tail too small for the chunk's pass, summed again (chunked)


def student_stats(x, temperature: float, labels=None, ids=None, tail: bool = False) -> StudentStats:
    """Differentiable statistics of x [n,V] (compute dtype); labels [n], ids [n,K] long."""
    lse = x_label = lse_t = z_ids = lse_out = empty = None
    if labels is not None:
        lse = torch.logsumexp(x, dim=1, keepdim=True)
        x_label = x.gather(1, labels[:, None])
    if ids is not None:
        if temperature == 1.0 and lse is not None:
            z, lse_t = x, lse  # the KD softmax is the CE softmax: no second [n,V]
        else:
            z = x / temperature
            lse_t = torch.logsumexp(z, dim=1, keepdim=True)
        z_ids = z.gather(1, ids)
        if tail:
            lse_out, empty = logsumexp_outside(z, ids)
    return StudentStats(lse, x_label, lse_t, z_ids, lse_out, empty)


def logsumexp_outside(z, ids):
    """logsumexp over the entries of z [n,V] not in ids [n,K] -> ([n,1], empty [n,1]).

    Summed over the logits outside the ids rather than as log(1 - sum_k q_k): that subtraction
    loses every digit in float32 once the ids hold nearly all of the student's mass, which is
    when the tail term pulls hardest. An empty outside (K = V) gets the stand-in 0, with log(0)
    kept out of the graph so the gradient stays finite.
    """
    outside = z.scatter(1, ids, float("-inf"))
    shift = outside.detach().amax(dim=1, keepdim=True)  # any constant is exact; the max keeps exp <= 1
    empty = torch.isneginf(shift)
    shift = torch.where(empty, 0.0, shift)
    total = outside.sub_(shift).exp_().sum(dim=1, keepdim=True)  # in place: one [n,V] temporary; >= 1 unless empty
    return torch.where(empty, 1.0, total).log() + shift, empty


# ----------------------------------------------------------------------------- per-row divergences


def bucket_divergence(log_p, zero_p, log_q, zero_q, kind: str, beta: float) -> torch.Tensor:
    """Divergence between two distributions over B buckets, per row.

    log_p, log_q [n,B] log-masses; zero_p, zero_q [n,B] bool mark buckets with exactly zero mass
    (their log values are ignored). Returns [n]:
        forward-kl  KL(p||q) = sum_b p_b (log p_b - log q_b)
        reverse-kl  KL(q||p) = sum_b q_b (log q_b - log p_b)
        jsd         beta KL(p||m) + (1 - beta) KL(q||m),  m = beta p + (1 - beta) q
    with 0 log 0 = 0. Reverse KL against a teacher zero-mass bucket the student still fills would
    be infinite; it is charged as if the teacher held e^LOG_ZERO there, a large but finite pull.
    """
    # Finite stand-ins keep 0 * log 0 (and 0 * inf in the backward) out of the graph.
    log_p = torch.where(zero_p, LOG_ZERO, log_p)
    log_q = torch.where(zero_q, LOG_ZERO, log_q)
    p = torch.where(zero_p, 0.0, log_p.exp())
    q = torch.where(zero_q, 0.0, log_q.exp())
    if kind == "forward-kl":
        return (p * (log_p - log_q)).sum(1)
    if kind == "reverse-kl":
        return (q * (log_q - log_p)).sum(1)
    log_b, log_1mb = math.log(beta), math.log1p(-beta)
    # log m in log space (masses can sit below float32's range); the mixture with a zero-mass
    # side is just the other side, which also keeps the stand-ins out of m exactly.
    log_m = torch.logaddexp(log_p + log_b, log_q + log_1mb)
    log_m = torch.where(zero_p, log_q + log_1mb, log_m)
    log_m = torch.where(zero_q, log_p + log_b, log_m)
    return beta * (p * (log_p - log_m)).sum(1) + (1.0 - beta) * (q * (log_q - log_m)).sum(1)


def topk_rows(st: StudentStats, teacher: TopkTargets, kind: str, beta: float, renormalize: bool) -> torch.Tensor:
    """Per-row top-k divergence [n] of the student's statistics against the teacher's (masked) top-k targets."""
    t_logp, t_tail = teacher.logprobs, teacher.tail_logprob
    zero_ids = ~(t_logp > LOG_ZERO)  # also catches -inf and NaN
    if renormalize:
        # Both sides conditioned on the K ids: no tail bucket, and the student's softmax is over
        # the K gathered logits only.
        t_logp = torch.where(zero_ids, LOG_ZERO, t_logp)
        log_p = t_logp - torch.logsumexp(t_logp, dim=1, keepdim=True)
        log_q = st.z_ids - torch.logsumexp(st.z_ids, dim=1, keepdim=True)
        return bucket_divergence(log_p, zero_ids, log_q, torch.zeros_like(zero_ids), kind, beta)
    log_q = torch.cat([st.z_ids, st.lse_out], dim=1) - st.lse_t
    log_p = torch.cat([t_logp, t_tail[:, None]], dim=1)
    # An empty tail (K = V) is not a bucket: whatever tail mass the teacher reports is rounding.
    zero_q = torch.cat([torch.zeros_like(zero_ids), st.empty], dim=1)
    zero_p = torch.cat([zero_ids, ~(t_tail > LOG_ZERO)[:, None]], dim=1) | zero_q
    return bucket_divergence(log_p, zero_p, log_q, zero_q, kind, beta)


def sampled_rows(st: StudentStats, teacher: SampledTargets) -> torch.Tensor:
    """Per-row sampled forward-KL estimate [n] of the student's statistics against the teacher's (masked) draws.

    E[count_s / num_samples] = p(id_s), so the first term is an unbiased estimate of the
    cross-entropy H(p, q); subtracting the exact H(p) turns it into a KL estimate without
    changing its gradient. Padding entries have count 0 and drop out.
    """
    log_q = st.z_ids - st.lse_t
    return -(teacher.counts * log_q).sum(1) / teacher.num_samples - teacher.entropy


# ----------------------------------------------------------------------------- public losses on [N,V] logits


def hard_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over masked-in rows of -log softmax(logits)[label].

    logits [N,V] any float dtype, labels [N] int (anything, e.g. -100, where masked out),
    mask [N] bool (None: every row). Returns a float32 scalar.
    """
    mask = all_positions(mask, logits.shape[0], logits.device)
    st = student_stats(logits.to(compute_dtype(logits.dtype)), 1.0, labels=torch.where(mask, labels.long(), 0))
    return masked_sum((st.lse - st.x_label).squeeze(1), mask) / masked_count(mask)


def topk_divergence(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    kind: str = "forward-kl",
    jsd_beta: float = 0.5,
    renormalize: bool = False,
) -> torch.Tensor:
    """Mean over masked-in rows of a divergence between teacher and student on K+1 buckets.

    student_logits [N,V]; topk_ids [N,K] int; topk_logprobs [N,K] teacher log-probs at T over the
    full vocabulary; tail_logprob [N] = log(1 - sum exp(topk_logprobs)), the teacher's mass outside
    the ids (<= LOG_ZERO counts as none); mask [N] bool (None: every row).

    Buckets are the K ids plus the tail: p_k = exp(topk_logprobs), p_o = exp(tail_logprob);
    q = softmax(student_logits / T) over the full vocabulary, q_k gathered at the ids and
    q_o = 1 - sum_k q_k (see logsumexp_outside). The divergence (see bucket_divergence) is exact
    for this coarse-graining; with K = V it is the full-vocabulary divergence.

    renormalize=True is the common variant kept for comparison: p_k / sum_k p_k against
    softmax over the K gathered student logits, no tail bucket.
    """
    check_options(0.0, temperature, kind, jsd_beta)
    x = student_logits.to(compute_dtype(student_logits.dtype))
    mask = all_positions(mask, x.shape[0], x.device)
    teacher = TopkTargets(topk_ids, topk_logprobs, tail_logprob).masked(mask, x.dtype, x.device)
    st = student_stats(x, temperature, ids=teacher.ids, tail=not renormalize)
    return masked_sum(topk_rows(st, teacher, kind, jsd_beta, renormalize), mask) / masked_count(mask)


def sampled_divergence(
    student_logits: torch.Tensor,
    sample_ids: torch.Tensor,
    sample_counts: torch.Tensor,
    num_samples: int,
    teacher_entropy: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    kind: str = "forward-kl",
) -> torch.Tensor:
    """Unbiased estimate of KL(p||q) from sampled teacher ids (Anshumann et al. 2025), mean over rows.

        KL_hat = -sum_s (count_s / num_samples) log q(id_s) - H(p)

    student_logits [N,V]; sample_ids [N,S] int, the distinct ids drawn; sample_counts [N,S] how often
    each was drawn out of num_samples draws from the teacher at T (padding: count 0, any valid id);
    teacher_entropy [N] = H(p) at T; mask [N] bool (None: every row). q = softmax(student_logits / T).
    Only kind="forward-kl" exists: the samples say nothing unbiased about log p.
    """
    check_options(0.0, temperature, kind, 0.5, mode="sampled")
    x = student_logits.to(compute_dtype(student_logits.dtype))
    mask = all_positions(mask, x.shape[0], x.device)
    teacher = SampledTargets(sample_ids, sample_counts, teacher_entropy, int(num_samples)).masked(
        mask, x.dtype, x.device
    )
    st = student_stats(x, temperature, ids=teacher.ids)
    return masked_sum(sampled_rows(st, teacher), mask) / masked_count(mask)


def dense_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
) -> LossParts:
    """Online KD as most distillation scripts write it, for comparison: full-vocabulary softmaxes of both models
    in float32, total = alpha CE(student, labels) + (1 - alpha) T^2 KL(softmax(t/T) || softmax(s/T)), KL summed
    over V and averaged over the N positions. student_logits, teacher_logits [N,V]; labels [N]."""
    student = student_logits.float()
    ce = F.cross_entropy(student, labels)
    kd = F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher_logits.float() / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    return LossParts(total=alpha * ce + (1 - alpha) * temperature**2 * kd, ce=ce, kd=kd)
