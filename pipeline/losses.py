"""Distillation losses of a student against a sparse teacher cache.

Shapes: N token positions (flatten batch x sequence first), V vocabulary, K stored top-k ids,
S distinct sampled ids. The student only enters through a few per-row statistics of its
logits x, all computed in float32 (float64 inputs stay float64, for gradcheck):

    z       = x / T
    log q_v = z_v - logsumexp_v(z)                                       (full-vocab softmax)
    log q_o = logsumexp_{v not in ids}(z_v) - logsumexp_v(z)             (the student's tail)

Masked-out positions are replaced by harmless dummies before any arithmetic, so garbage in
them (label -100, NaN log-probs) reaches neither the value nor the gradient; a mean over zero
positions is 0.
"""
from __future__ import annotations

import functools
import math
from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError

KD_KINDS = ("forward-kl", "reverse-kl", "jsd")

# A teacher log-prob at or below this carries no mass. exp(-80) ~ 2e-35 is far below anything a
# divergence can feel, and the cut turns the cache's -inf / -1e4 sentinels into exact zeros
# instead of 0 * inf. It is also the finite stand-in used wherever log 0 would be needed.
LOG_ZERO = -80.0


class LossParts(NamedTuple):
    total: torch.Tensor  # alpha * ce + (1 - alpha) * T^2 * kd, or ce alone without a teacher
    ce: torch.Tensor     # hard-label cross-entropy at temperature 1
    kd: torch.Tensor     # the divergence itself, before its (1 - alpha) * T^2 weight


def check_options(alpha: float, temperature: float, kd_loss: str, jsd_beta: float) -> None:
    """Raise PipelineError naming the command-line option that is out of range."""
    if not 0.0 <= alpha <= 1.0:
        raise PipelineError(f"--alpha must be in [0, 1] (weight of the hard-label loss), got {alpha}")
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise PipelineError(f"--temperature must be a finite number > 0, got {temperature}")
    if kd_loss not in KD_KINDS:
        raise PipelineError(f"--kd-loss must be one of {', '.join(KD_KINDS)}, got {kd_loss!r}")
    if not 0.0 < jsd_beta < 1.0:
        raise PipelineError(f"--jsd-beta must be strictly between 0 and 1, got {jsd_beta}")


def _check_sampled_kind(kind: str) -> None:
    if kind != "forward-kl":
        raise PipelineError(
            f"--kd-loss {kind} needs a top-k teacher cache: a sampled cache gives an unbiased "
            "estimate of forward KL only. Use --kd-loss forward-kl or build a top-k cache")


# ----------------------------------------------------------------------------- row statistics

def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


def _count(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum().clamp_min(1)  # all masked: sums are 0, so the mean is 0 rather than 0/0


def _masked_sum(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, rows, 0.0).sum()


def _ce_rows(x: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log softmax(x)[label] per row. x [n,V], lse [n,1] = logsumexp(x), labels [n] -> [n]."""
    return (lse - x.gather(1, labels[:, None])).squeeze(1)


def _student_tail(z: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor):
    """log q_o = logsumexp(z outside ids) - logsumexp(z) per row [n], and whether the outside is empty.

    Summed over the logits outside the ids rather than as log(1 - sum_k q_k): the subtraction
    loses every digit in float32 once the ids hold nearly all of the student's mass, which is
    exactly when the tail term matters for the gradient. When the ids cover the whole vocabulary
    (K = V) the tail is empty; log(0) is kept out of the graph so its gradient stays finite.
    """
    outside = z.scatter(1, ids, float("-inf"))
    shift = outside.amax(dim=1, keepdim=True).detach()  # any constant works; the max keeps exp <= 1
    empty = torch.isneginf(shift)
    shift = torch.where(empty, 0.0, shift)
    total = torch.exp(outside - shift).sum(dim=1, keepdim=True)  # >= 1 unless empty
    total = torch.where(empty, 1.0, total)
    return (total.log() + shift - lse).squeeze(1), empty.squeeze(1)


def _bucket_divergence(log_p, zero_p, log_q, zero_q, kind: str, beta: float) -> torch.Tensor:
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
    # log m in log space (masses can sit below float32's range); the mixture of a zero-mass side
    # is just the other side, which also keeps the stand-ins out of m exactly.
    log_m = torch.logaddexp(log_p + log_b, log_q + log_1mb)
    log_m = torch.where(zero_p, log_q + log_1mb, log_m)
    log_m = torch.where(zero_q, log_p + log_b, log_m)
    return beta * (p * (log_p - log_m)).sum(1) + (1.0 - beta) * (q * (log_q - log_m)).sum(1)


def _topk_rows(z, lse, ids, t_logp, t_tail, kind, beta, renormalize) -> torch.Tensor:
    """Per-row top-k divergence [n]. z [n,V] = x/T, lse [n,1], ids/t_logp [n,K], t_tail [n]."""
    z_ids = z.gather(1, ids)
    zero_ids = ~(t_logp > LOG_ZERO)  # also catches -inf and NaN
    if renormalize:
        # Both sides conditioned on the K ids: no tail bucket, and the student's softmax is over
        # the K gathered logits only, so lse is not used.
        t_logp = torch.where(zero_ids, LOG_ZERO, t_logp)
        log_p = t_logp - torch.logsumexp(t_logp, dim=1, keepdim=True)
        log_q = torch.log_softmax(z_ids, dim=1)
        return _bucket_divergence(log_p, zero_ids, log_q, torch.zeros_like(zero_ids), kind, beta)
    log_q_tail, empty = _student_tail(z, ids, lse)
    log_q = torch.cat([z_ids - lse, log_q_tail[:, None]], dim=1)
    log_p = torch.cat([t_logp, t_tail[:, None]], dim=1)
    # An empty tail (K = V) is not a bucket: whatever tail mass the teacher reports is rounding.
    zero_q = torch.cat([torch.zeros_like(zero_ids), empty[:, None]], dim=1)
    zero_p = torch.cat([zero_ids, ~(t_tail > LOG_ZERO)[:, None]], dim=1) | zero_q
    return _bucket_divergence(log_p, zero_p, log_q, zero_q, kind, beta)


def _sampled_rows(z, lse, ids, counts, num_samples: int, entropy) -> torch.Tensor:
    """Per-row sampled forward-KL estimate [n]. z [n,V], lse [n,1], ids/counts [n,S], entropy [n].

    E[count_s / num_samples] = p(id_s), so the first term is an unbiased estimate of the
    cross-entropy H(p, q); subtracting the exact H(p) turns it into a KL estimate without
    changing its gradient. Padding entries have count 0 and drop out.
    """
    log_q = z.gather(1, ids) - lse
    return -(counts * log_q).sum(1) / num_samples - entropy


# ----------------------------------------------------------------------------- input handling

def _prepare_topk(ids, logp, tail, mask, dtype, device):
    """Cast, and give masked rows a valid dummy teacher (K distinct ids, uniform mass)."""
    ids, mask = ids.to(device=device, dtype=torch.long), mask.to(device=device, dtype=torch.bool)
    k = ids.shape[1]
    fill = -math.log(k + 1)
    ids = torch.where(mask[:, None], ids, torch.arange(k, device=device))
    logp = torch.where(mask[:, None], logp.to(device=device, dtype=dtype), fill)
    tail = torch.where(mask, tail.to(device=device, dtype=dtype), fill)
    return ids, logp, tail


def _prepare_sampled(ids, counts, entropy, mask, dtype, device):
    """Cast, and give masked rows count 0 (no terms) and entropy 0."""
    mask = mask.to(device=device, dtype=torch.bool)
    ids = torch.where(mask[:, None], ids.to(device=device, dtype=torch.long), 0)
    counts = torch.where(mask[:, None], counts.to(device=device, dtype=dtype), 0.0)
    entropy = torch.where(mask, entropy.to(device=device, dtype=dtype), 0.0)
    return ids, counts, entropy


def _scaled(logits: torch.Tensor, temperature: float):
    """(z, logsumexp(z)[n,1]) for z = logits / T in the compute dtype."""
    z = logits.to(_compute_dtype(logits)) / temperature
    return z, torch.logsumexp(z, dim=1, keepdim=True)


# ----------------------------------------------------------------------------- public losses

def hard_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked-in rows of -log softmax(logits)[label].

    logits [N,V] any float dtype, labels [N] int (anything, e.g. -100, where masked out),
    mask [N] bool. Returns a float32 scalar.
    """
    mask = mask.bool()
    x, lse = _scaled(logits, 1.0)
    rows = _ce_rows(x, lse, torch.where(mask, labels.long(), 0))
    return _masked_sum(rows, mask) / _count(mask)


def topk_divergence(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                    tail_logprob: torch.Tensor, mask: torch.Tensor, temperature: float,
                    kind: str = "forward-kl", jsd_beta: float = 0.5,
                    renormalize: bool = False) -> torch.Tensor:
    """Mean over masked-in rows of a divergence between teacher and student on K+1 buckets.

    student_logits [N,V]; topk_ids [N,K] int; topk_logprobs [N,K] teacher log-probs at T over the
    full vocabulary; tail_logprob [N] = log(1 - sum exp(topk_logprobs)), the teacher's mass outside
    the ids (<= LOG_ZERO counts as none); mask [N] bool.

    Buckets are the K ids plus the tail: p_k = exp(topk_logprobs), p_o = exp(tail_logprob);
    q = softmax(student_logits / T) over the full vocabulary, q_k gathered at the ids and
    q_o = 1 - sum_k q_k (see _student_tail). The divergence (see _bucket_divergence) is exact for
    this coarse-graining; with K = V it is the full-vocabulary divergence.

    renormalize=True is the common variant kept for comparison: p_k / sum_k p_k against
    softmax over the K gathered student logits, no tail bucket.
    """
    check_options(0.0, temperature, kind, jsd_beta)
    mask = mask.bool()
    z, lse = _scaled(student_logits, temperature)
    ids, logp, tail = _prepare_topk(topk_ids, topk_logprobs, tail_logprob, mask, z.dtype, z.device)
    rows = _topk_rows(z, lse, ids, logp, tail, kind, jsd_beta, renormalize)
    return _masked_sum(rows, mask) / _count(mask)


def sampled_divergence(student_logits: torch.Tensor, sample_ids: torch.Tensor, sample_counts: torch.Tensor,
                       num_samples: int, teacher_entropy: torch.Tensor, mask: torch.Tensor,
                       temperature: float, kind: str = "forward-kl") -> torch.Tensor:
    """Unbiased estimate of KL(p||q) from sampled teacher ids (Anshumann et al. 2025), mean over rows.

        KL_hat = -sum_s (count_s / num_samples) log q(id_s) - H(p)

    student_logits [N,V]; sample_ids [N,S] int, the distinct ids drawn; sample_counts [N,S] how often
    each was drawn out of num_samples draws from the teacher at T (padding: count 0, any valid id);
    teacher_entropy [N] = H(p) at T; mask [N] bool. q = softmax(student_logits / T).
    Only kind="forward-kl" exists: the samples say nothing unbiased about log p.
    """
    check_options(0.0, temperature, kind, 0.5)
    _check_sampled_kind(kind)
    mask = mask.bool()
    z, lse = _scaled(student_logits, temperature)
    ids, counts, entropy = _prepare_sampled(sample_ids, sample_counts, teacher_entropy, mask, z.dtype, z.device)
    rows = _sampled_rows(z, lse, ids, counts, int(num_samples), entropy)
    return _masked_sum(rows, mask) / _count(mask)


# ----------------------------------------------------------------------------- training loss

def _chunk_sums(logits, labels, mask, *teacher, mode, kind, beta, renormalize, temperature, num_samples):
    """[sum of CE] or [sum of CE, sum of KD] over the masked-in rows of one chunk (KD if mode is set)."""
    x = logits.to(_compute_dtype(logits))
    lse = torch.logsumexp(x, dim=1, keepdim=True)
    ce = _masked_sum(_ce_rows(x, lse, labels), mask)
    if mode is None:
        return [ce]
    # At T = 1 the KD softmax is the CE softmax: reuse it rather than build a second [chunk,V].
    if temperature == 1.0:
        z, lse_t = x, lse
    else:
        z = x / temperature
        lse_t = torch.logsumexp(z, dim=1, keepdim=True)
    if mode == "topk":
        rows = _topk_rows(z, lse_t, *teacher, kind, beta, renormalize)
    else:
        rows = _sampled_rows(z, lse_t, teacher[0], teacher[1], num_samples, teacher[2])
    return [ce, _masked_sum(rows, mask)]


class _ChunkedSums(torch.autograd.Function):
    """Sums of _chunk_sums over row chunks; the backward recomputes one chunk at a time.

    This is activation checkpointing done by hand. torch.utils.checkpoint over slices of the
    logits would save the same (nothing but the inputs), but every slice's backward materialises
    a zero-padded gradient the size of all the logits, which autograd then adds into theirs: a
    second [N,V] buffer. Here each chunk's gradient is written straight into one buffer.
    First-order gradients only.
    """

    @staticmethod
    def forward(ctx, step, chunks, logits, labels, mask, *teacher):
        ctx.step, ctx.chunks = step, chunks
        ctx.save_for_backward(logits, labels, mask, *teacher)
        sums = [torch.zeros((), dtype=_compute_dtype(logits), device=logits.device) for _ in range(2)]
        for rows in chunks:  # forward runs without a graph: the float32 temporaries die per chunk
            for i, part in enumerate(step(logits[rows], labels[rows], mask[rows], *(t[rows] for t in teacher))):
                sums[i] = sums[i] + part
        return tuple(sums)

    @staticmethod
    def backward(ctx, grad_ce, grad_kd):
        logits, labels, mask, *teacher = ctx.saved_tensors
        grad = torch.zeros_like(logits)  # rows of chunks with nothing masked in stay 0
        for rows in ctx.chunks:
            with torch.enable_grad():
                x = logits[rows].detach().requires_grad_(True)
                parts = ctx.step(x, labels[rows], mask[rows], *(t[rows] for t in teacher))
                (grad[rows],) = torch.autograd.grad(parts, x, [grad_ce, grad_kd][:len(parts)])
        return (None, None, grad, None, None) + (None,) * len(teacher)


def distillation_loss(student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                      targets: Mapping | None, alpha: float, temperature: float,
                      kd_loss: str = "forward-kl", jsd_beta: float = 0.5,
                      topk_renormalize: bool = False, chunk_size: int = 2048) -> LossParts:
    """The training loss: total = alpha * CE + (1 - alpha) * T^2 * KD, or CE alone if targets is None.

    student_logits [N,V] any float dtype (bf16 is fine; math is float32); labels [N] int; mask [N]
    bool; targets holds either topk_ids/topk_logprobs/tail_logprob ([N,K], [N,K], [N]) or
    sample_ids/sample_counts/teacher_entropy ([N,S], [N,S], [N]) plus num_samples (int).
    CE is at temperature 1; KD is topk_divergence / sampled_divergence at `temperature`, and T^2
    keeps its gradient on the scale of the CE's (Hinton et al. 2015).

    Memory: rows are processed in chunks of chunk_size and recomputed in the backward (see
    _ChunkedSums), so besides the logits and their gradient only a few float32 [chunk_size,V]
    temporaries ever exist. Per-chunk sums are divided by the masked-in count at the end, so the
    result equals the unchunked mean. Chunks with no masked-in row are skipped.
    """
    check_options(alpha, temperature, kd_loss, jsd_beta)
    if chunk_size < 1:
        raise PipelineError(f"chunk_size must be >= 1, got {chunk_size}")
    vocab = student_logits.shape[-1]
    logits = student_logits.reshape(-1, vocab)
    n, device = logits.shape[0], logits.device
    dtype = _compute_dtype(logits)
    mask = mask.reshape(-1).to(device=device, dtype=torch.bool)
    labels = torch.where(mask, labels.reshape(-1).to(device=device, dtype=torch.long), 0)

    mode, teacher, num_samples = None, (), 0
    if targets is not None:
        if "topk_ids" in targets:
            mode = "topk"
            teacher = _prepare_topk(targets["topk_ids"].reshape(n, -1), targets["topk_logprobs"].reshape(n, -1),
                                    targets["tail_logprob"].reshape(n), mask, dtype, device)
        elif "sample_ids" in targets:
            _check_sampled_kind(kd_loss)
            if topk_renormalize:
                raise PipelineError("--topk-renormalize applies to a top-k teacher cache, not a sampled one")
            mode, num_samples = "sampled", int(targets["num_samples"])
            if num_samples < 1:
                raise ValueError(f"num_samples must be >= 1, got {num_samples}")
            teacher = _prepare_sampled(targets["sample_ids"].reshape(n, -1), targets["sample_counts"].reshape(n, -1),
                                       targets["teacher_entropy"].reshape(n), mask, dtype, device)
        else:
            raise ValueError(f"targets holds neither topk_ids nor sample_ids: {sorted(targets)}")

    step = functools.partial(_chunk_sums, mode=mode, kind=kd_loss, beta=jsd_beta, renormalize=topk_renormalize,
                             temperature=float(temperature), num_samples=num_samples)
    n_chunks = -(-n // chunk_size)
    # One host sync for the whole batch, to skip chunks that are all padding.
    busy = F.pad(mask, (0, n_chunks * chunk_size - n)).view(n_chunks, chunk_size).any(1).tolist()
    chunks = [slice(i * chunk_size, (i + 1) * chunk_size) for i, b in enumerate(busy) if b]
    ce_sum, kd_sum = _ChunkedSums.apply(step, chunks, logits, labels, mask, *teacher)

    count = _count(mask)
    ce, kd = ce_sum / count, kd_sum / count
    if mode is None:
        return LossParts(total=ce, ce=ce, kd=kd)
    return LossParts(total=alpha * ce + (1.0 - alpha) * temperature ** 2 * kd, ce=ce, kd=kd)
