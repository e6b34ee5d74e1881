"""Distillation losses of a student against a sparse teacher cache.

Shapes: N token positions (flatten batch x sequence first), V vocabulary, K stored top-k ids,
S distinct sampled ids. Every loss sees the student's logits x [N,V] only through a few
per-row statistics (_Stats), computed in float32 (float64 inputs stay float64, for gradcheck):

    z        = x / T
    log q_v  = z_v - logsumexp_v(z)                              (full-vocabulary softmax)
    log q_o  = logsumexp_{v not in ids}(z_v) - logsumexp_v(z)    (the student's tail bucket)

That is what lets distillation_loss go through the rows in chunks and, in the backward, build
each chunk's [chunk,V] gradient from saved [N] / [N,K] statistics (_ChunkedLoss), with the CE, the
KD softmax and the tail sharing one exp pass per chunk at T = 1 (_chunk_stats, _chunk_grad).
fused_distillation_loss takes the student's final hidden states and output head instead of its
logits and makes each chunk's logits itself (_FusedHeadLoss), so no [N,V] tensor exists at all;
both run the same _loss_forward / _loss_backward.

Masked-out positions are replaced by harmless dummies before any arithmetic, so garbage in
them (label -100, NaN log-probs, id -1) reaches neither the value nor the gradient; a mean over
zero positions is 0.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pipeline.config import cache_mode_problems, kd_problems
from pipeline.errors import PipelineError

# A teacher log-prob at or below this carries no mass. exp(-80) ~ 2e-35 is far below anything a
# divergence can feel, and the cut turns the cache's -inf / -1e4 sentinels into exact zeros
# instead of 0 * inf. It is also the finite stand-in used wherever log 0 would be needed.
LOG_ZERO = -80.0


class LossParts(NamedTuple):
    total: torch.Tensor  # alpha * ce + (1 - alpha) * T^2 * kd, or ce alone without a teacher
    ce: torch.Tensor  # hard-label cross-entropy at temperature 1
    kd: torch.Tensor  # the divergence itself, before its (1 - alpha) * T^2 weight


def _check_options(alpha: float, temperature: float, kd_loss: str, jsd_beta: float, cache_mode: str | None = None):
    """Raise one PipelineError naming every option out of range (the checks of config.Loss)."""
    if temperature is None:
        raise PipelineError("--temperature must be positive, got None")
    problems = kd_problems(alpha, temperature, kd_loss, jsd_beta)
    problems += cache_mode_problems(cache_mode, kd_loss, False) if cache_mode else []
    if problems:
        raise PipelineError("; ".join(problems))


def _all_positions(mask: torch.Tensor | None, n: int, device) -> torch.Tensor:
    """mask [N] as bool on `device`; None means every position counts."""
    if mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    return mask.reshape(-1).to(device=device, dtype=torch.bool)


# ----------------------------------------------------------------------------- student statistics


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


class _Stats(NamedTuple):
    """What the losses need from x [n,V]; each None unless asked for."""

    lse: torch.Tensor | None  # [n,1] logsumexp(x)                  (CE)
    x_label: torch.Tensor | None  # [n,1] x at the label                 (CE)
    lse_t: torch.Tensor | None  # [n,1] logsumexp(z), z = x / T
    z_ids: torch.Tensor | None  # [n,K] z at the teacher's ids
    lse_out: torch.Tensor | None  # [n,1] logsumexp(z outside the ids); a finite stand-in if empty
    empty: torch.Tensor | None  # [n,1] bool: no vocabulary id lies outside the ids (K = V)


def _student_stats(x, temperature: float, labels=None, ids=None, tail: bool = False) -> _Stats:
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
            lse_out, empty = _logsumexp_outside(z, ids)
    return _Stats(lse, x_label, lse_t, z_ids, lse_out, empty)


def _logsumexp_outside(z, ids):
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


# ----------------------------------------------------------------------------- divergences


def _masked_sum(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, rows, 0.0).sum()


def _count(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum().clamp_min(1)  # all masked: the sums are 0, so the mean is 0 rather than 0/0


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
    # log m in log space (masses can sit below float32's range); the mixture with a zero-mass
    # side is just the other side, which also keeps the stand-ins out of m exactly.
    log_m = torch.logaddexp(log_p + log_b, log_q + log_1mb)
    log_m = torch.where(zero_p, log_q + log_1mb, log_m)
    log_m = torch.where(zero_q, log_p + log_b, log_m)
    return beta * (p * (log_p - log_m)).sum(1) + (1.0 - beta) * (q * (log_q - log_m)).sum(1)


def _topk_rows(st: _Stats, t_logp, t_tail, kind: str, beta: float, renormalize: bool) -> torch.Tensor:
    """Per-row top-k divergence [n]; t_logp [n,K] and t_tail [n] are the teacher's."""
    zero_ids = ~(t_logp > LOG_ZERO)  # also catches -inf and NaN
    if renormalize:
        # Both sides conditioned on the K ids: no tail bucket, and the student's softmax is over
        # the K gathered logits only.
        t_logp = torch.where(zero_ids, LOG_ZERO, t_logp)
        log_p = t_logp - torch.logsumexp(t_logp, dim=1, keepdim=True)
        log_q = st.z_ids - torch.logsumexp(st.z_ids, dim=1, keepdim=True)
        return _bucket_divergence(log_p, zero_ids, log_q, torch.zeros_like(zero_ids), kind, beta)
    log_q = torch.cat([st.z_ids, st.lse_out], dim=1) - st.lse_t
    log_p = torch.cat([t_logp, t_tail[:, None]], dim=1)
    # An empty tail (K = V) is not a bucket: whatever tail mass the teacher reports is rounding.
    zero_q = torch.cat([torch.zeros_like(zero_ids), st.empty], dim=1)
    zero_p = torch.cat([zero_ids, ~(t_tail > LOG_ZERO)[:, None]], dim=1) | zero_q
    return _bucket_divergence(log_p, zero_p, log_q, zero_q, kind, beta)


def _sampled_rows(st: _Stats, counts, num_samples: int, entropy) -> torch.Tensor:
    """Per-row sampled forward-KL estimate [n]; counts [n,S] at the ids, entropy [n].

    E[count_s / num_samples] = p(id_s), so the first term is an unbiased estimate of the
    cross-entropy H(p, q); subtracting the exact H(p) turns it into a KL estimate without
    changing its gradient. Padding entries have count 0 and drop out.
    """
    log_q = st.z_ids - st.lse_t
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


# ----------------------------------------------------------------------------- public losses


def hard_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over masked-in rows of -log softmax(logits)[label].

    logits [N,V] any float dtype, labels [N] int (anything, e.g. -100, where masked out),
    mask [N] bool (None: every row). Returns a float32 scalar.
    """
    mask = _all_positions(mask, logits.shape[0], logits.device)
    st = _student_stats(logits.to(_compute_dtype(logits)), 1.0, labels=torch.where(mask, labels.long(), 0))
    return _masked_sum((st.lse - st.x_label).squeeze(1), mask) / _count(mask)


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
    q_o = 1 - sum_k q_k (see _logsumexp_outside). The divergence (see _bucket_divergence) is exact
    for this coarse-graining; with K = V it is the full-vocabulary divergence.

    renormalize=True is the common variant kept for comparison: p_k / sum_k p_k against
    softmax over the K gathered student logits, no tail bucket.
    """
    _check_options(0.0, temperature, kind, jsd_beta)
    x = student_logits.to(_compute_dtype(student_logits))
    mask = _all_positions(mask, x.shape[0], x.device)
    ids, logp, tail = _prepare_topk(topk_ids, topk_logprobs, tail_logprob, mask, x.dtype, x.device)
    st = _student_stats(x, temperature, ids=ids, tail=not renormalize)
    return _masked_sum(_topk_rows(st, logp, tail, kind, jsd_beta, renormalize), mask) / _count(mask)


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
    _check_options(0.0, temperature, kind, 0.5, cache_mode="sampled")
    x = student_logits.to(_compute_dtype(student_logits))
    mask = _all_positions(mask, x.shape[0], x.device)
    ids, counts, entropy = _prepare_sampled(sample_ids, sample_counts, teacher_entropy, mask, x.dtype, x.device)
    st = _student_stats(x, temperature, ids=ids)
    return _masked_sum(_sampled_rows(st, counts, int(num_samples), entropy), mask) / _count(mask)


# ----------------------------------------------------------------------------- training loss


@dataclass(frozen=True)
class _Config:
    mode: str | None  # "topk", "sampled" or None (CE only)
    kind: str
    beta: float
    renormalize: bool
    temperature: float
    num_samples: int
    chunk_size: int

    @property
    def tail(self) -> bool:
        return self.mode == "topk" and not self.renormalize

    @property
    def uses_lse_t(self) -> bool:
        return self.mode is not None and not (self.mode == "topk" and self.renormalize)

    @property
    def second_softmax(self) -> bool:
        """The KD softmax at T != 1 is not the CE's: a second exp pass per chunk."""
        return self.uses_lse_t and self.temperature != 1.0


def _tiny_tail(dtype: torch.dtype) -> float:
    """Student tail masses q_o below this (sqrt of the smallest normal float: 1e-19 in float32) are
    summed again around their own maximum (_logsumexp_outside): summed around the row's maximum, their
    terms would reach float's subnormal range, and 1 / q_o must stay far from overflow."""
    return math.sqrt(torch.finfo(dtype).tiny)


class _ChunkStats(NamedTuple):
    """No-graph statistics of one chunk x [n,V]; all [n,1] except z_ids [n,K]; None where not asked."""

    lse: torch.Tensor
    x_label: torch.Tensor
    lse_t: torch.Tensor | None
    z_ids: torch.Tensor | None
    lse_out: torch.Tensor | None  # 0 where empty (the stand-in of _logsumexp_outside)
    empty: torch.Tensor | None  # bool: no vocabulary id lies outside the ids
    redo: torch.Tensor | None  # bool: q_o < _tiny_tail, lse_out to be summed again


class _Buffers:
    """[rows, V] work tensors kept from one chunk to the next, by name: on a CPU a fresh [chunk, V] tensor per pass
    costs more than the pass itself (its pages are faulted in anew), and an op mixing bf16 logits with float32
    statistics runs at a fraction of a same-dtype one, so narrower logits are copied into a float32 buffer first
    and worked on in place. A view of a buffer lives until the next take of its name."""

    def __init__(self):
        self._held: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, int], dtype: torch.dtype, device) -> torch.Tensor:
        """An uninitialised [rows, V] tensor."""
        rows, cols = shape
        buf = self._held.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.dtype != dtype:
            buf = torch.empty(rows, cols, dtype=dtype, device=device)
            self._held[name] = buf
        return buf[:rows]


def _upcast(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """x in out's (the compute) dtype: x itself, or narrower x copied into out, a buffer of its shape."""
    return x if x.dtype == out.dtype else out.copy_(x)


def _chunk_stats(x: torch.Tensor, cfg: _Config, labels, ids, buffers: _Buffers) -> _ChunkStats:
    """The statistics of x [n,V] (any float dtype), with one exp pass over [n,V] (two at T != 1).

        e = exp(x - m), m = max_v x:       lse = m + log sum_v e
        at T != 1, e = exp((x - m) / T):   lse_t = m / T + log sum_v e     (at T = 1, lse_t = lse)
        e zeroed at the ids:               lse_out = m / T + log sum_v e

    The tail sums its own terms, so it does not lose digits to 1 - sum_k q_k; it only loses them when
    its terms fall far below the row's maximum, and those rows are flagged in `redo`. Works in one
    float32 [n,V] buffer (two at T != 1).
    """
    dtype = _compute_dtype(x)
    a = buffers.take("a", x.shape, dtype, x.device)
    x_up = _upcast(x, a)
    m = x_up.amax(dim=1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)  # as torch.logsumexp: an infinite max is no shift
    d = torch.sub(x_up, m, out=a)
    e = torch.exp(d, out=buffers.take("b", x.shape, dtype, x.device)) if cfg.second_softmax else d.exp_()
    total = e.sum(dim=1, keepdim=True)
    lse = total.log() + m
    x_label = x.gather(1, labels[:, None]).to(dtype)
    if ids is None:
        return _ChunkStats(lse, x_label, None, None, None, None, None)
    t = cfg.temperature
    z_ids = x.gather(1, ids).to(dtype)
    z_ids = z_ids if t == 1.0 else z_ids / t
    if not cfg.uses_lse_t:
        return _ChunkStats(lse, x_label, None, z_ids, None, None, None)
    shift, lse_t = m, lse
    if cfg.second_softmax:
        shift = m / t
        total = torch.exp(d.div_(t), out=e).sum(dim=1, keepdim=True)
        lse_t = total.log() + shift
    del d
    if not cfg.tail:
        return _ChunkStats(lse, x_label, lse_t, z_ids, None, None, None)
    outside = e.scatter_(1, ids, 0.0).sum(dim=1, keepdim=True)
    if ids.shape[1] >= x.shape[1]:  # K >= V: rows whose ids cover the vocabulary have no outside
        empty = torch.zeros_like(x, dtype=torch.bool).scatter_(1, ids, True).all(dim=1, keepdim=True)
    else:
        empty = torch.zeros_like(lse, dtype=torch.bool)
    redo = ~empty & (outside < _tiny_tail(dtype) * total)  # total >= 1: it holds exp(0)
    outside = outside.clamp_min(torch.finfo(dtype).tiny)  # finite everywhere; exact where not redone
    lse_out = torch.where(empty, 0.0, outside.log() + shift)
    return _ChunkStats(lse, x_label, lse_t, z_ids, lse_out, empty, redo)


def _kd_grads(cfg: _Config, mask, teacher, lse_t, z_ids, lse_out, empty):
    """KD sum over the masked-in rows and its gradients w.r.t. (lse_t, z_ids, lse_out), by autograd on
    the [N,1] / [N,K] statistics only."""
    with torch.enable_grad():
        leaves = [s.detach().requires_grad_(True) for s in (lse_t, z_ids, lse_out) if s is not None]
        lse_t_, z_ids_ = (leaves[0], leaves[1]) if cfg.uses_lse_t else (None, leaves[0])
        small = _Stats(None, None, lse_t_, z_ids_, leaves[2] if cfg.tail else None, empty)
        if cfg.mode == "topk":
            kd_rows = _topk_rows(small, *teacher[1:], cfg.kind, cfg.beta, cfg.renormalize)
        else:
            kd_rows = _sampled_rows(small, teacher[1], cfg.num_samples, teacher[2])
        kd_sum = _masked_sum(kd_rows, mask)
        grads = torch.autograd.grad(kd_sum, leaves, allow_unused=True)
    grads = [torch.zeros_like(s) if g is None else g for s, g in zip(leaves, grads)]
    d_lse_t, d_z_ids = (grads[0], grads[1]) if cfg.uses_lse_t else (None, grads[0])
    return kd_sum.detach(), d_lse_t, d_z_ids, grads[2] if cfg.tail else None


def _loss_forward(logits_of, n: int, dtype, device, labels, mask, cfg: _Config, chunks, teacher, buffers: _Buffers):
    """The forward of both chunked losses: (ce_sum, kd_sum, what the backward needs).

    logits_of(rows) gives the student's logits at rows (a slice of a chunk, or a LongTensor of rows redone), any
    float dtype; `dtype` is the compute dtype. Only [N,1] / [N,K] statistics outlive a chunk."""
    ids = teacher[0] if cfg.mode is not None else None
    k = ids.shape[1] if ids is not None else 0
    lse, x_label, lse_t, lse_out = (torch.zeros(n, 1, dtype=dtype, device=device) for _ in range(4))
    z_ids = torch.zeros(n, k, dtype=dtype, device=device)
    empty, redo = (torch.zeros(n, 1, dtype=torch.bool, device=device) for _ in range(2))
    for rows in chunks:
        st = _chunk_stats(logits_of(rows), cfg, labels[rows], None if ids is None else ids[rows], buffers)
        lse[rows], x_label[rows] = st.lse, st.x_label
        if ids is not None:
            z_ids[rows] = st.z_ids
        if st.lse_t is not None:
            lse_t[rows] = st.lse_t
        if cfg.tail:
            lse_out[rows], empty[rows], redo[rows] = st.lse_out, st.empty, st.redo
    ce_sum = _masked_sum((lse - x_label).squeeze(1), mask)
    kd_sum, d_lse_t, d_z_ids, d_lse_out = torch.zeros((), dtype=dtype, device=device), None, None, None
    redo_rows = []
    if cfg.mode is not None:
        stats = (lse_t if cfg.uses_lse_t else None, z_ids, lse_out if cfg.tail else None, empty)
        kd_sum, d_lse_t, d_z_ids, d_lse_out = _kd_grads(cfg, mask, teacher, *stats)
        if cfg.tail:
            redo &= mask[:, None]  # masked-out rows only need finite statistics
            redo_rows = redo.squeeze(1).nonzero().squeeze(1).tolist()  # the host sync; almost always []
        if redo_rows:
            _redo_lse_out(logits_of, ids, cfg, redo_rows, lse_out)
            kd_sum, d_lse_t, d_z_ids, d_lse_out = _kd_grads(cfg, mask, teacher, *stats)
    saved = _Saved(ids, lse, lse_t, lse_out, empty | redo, d_lse_t, d_z_ids, d_lse_out)
    return ce_sum, kd_sum, saved, redo_rows


class _Saved(NamedTuple):
    """What _loss_forward keeps for the backward: [N,1] / [N,K] tensors (None where the loss has none)."""

    ids: torch.Tensor | None
    lse: torch.Tensor
    lse_t: torch.Tensor
    lse_out: torch.Tensor
    no_factor: torch.Tensor  # bool: empty or redone tails, whose term is not softmax(x/T) times a factor
    d_lse_t: torch.Tensor | None
    d_z_ids: torch.Tensor | None
    d_lse_out: torch.Tensor | None


def _loss_backward(
    logits_of, out_of, emit, labels, mask, cfg: _Config, chunks, redo_rows, s: _Saved, grad_ce, grad_kd, buffers
):
    """The backward of both chunked losses: for each chunk, g = d loss / d logits [chunk,V] (_chunk_grad, written
    into out_of(rows) when out_of is given, else into a buffer), handed to emit(rows, g) before the next chunk is
    made."""
    dtype = s.lse.dtype
    # Per-row coefficients of the softmax passes, [N,1]; see _chunk_grad.
    scale = grad_kd / cfg.temperature  # dz/dx = 1/T
    w_ce = grad_ce * mask[:, None].to(dtype)
    c_kd = scale * s.d_lse_t if cfg.uses_lse_t else None
    c_out = c_kd
    if cfg.tail:
        # exp(lse_t - lse_out) = 1 / q_o <= 1 / _tiny_tail except where no_factor (empty / redone)
        cap = 1.0 - math.log(_tiny_tail(dtype))
        factor = (s.lse_t - s.lse_out).clamp_max(cap).exp_()
        c_out = c_kd + torch.where(s.no_factor, 0.0, scale * s.d_lse_out * factor)
    c_z_ids = scale * s.d_z_ids if s.ids is not None else None
    for rows in chunks:
        part = functools.partial(_chunk_of, rows=rows)
        x = logits_of(rows)
        g = _chunk_grad(
            cfg,
            x,
            labels[rows],
            part(s.ids),
            s.lse[rows],
            part(s.lse_t),
            w_ce[rows],
            part(c_kd),
            part(c_out),
            part(c_z_ids),
            buffers.take("a", x.shape, dtype, x.device) if out_of is None else out_of(rows),
            buffers,
        )
        local = [i - rows.start for i in redo_rows if rows.start <= i < rows.stop]
        if local:  # their tail term, left out of c_out: exp(x/T - lse_out) directly
            local = torch.tensor(local, dtype=torch.long, device=g.device)
            term = _outside_term(x[local], s.ids[rows][local], s.lse_out[rows][local], cfg.temperature)
            g.index_add_(0, local, term.mul_(scale * s.d_lse_out[rows][local]))
        emit(rows, g)


class _ChunkedLoss(torch.autograd.Function):
    """(sum of CE, sum of KD) over the masked-in rows of logits [N,V], a chunk of rows at a time.

    Forward (_loss_forward): per chunk, _chunk_stats makes [chunk,1] and [chunk,K] statistics without a graph.
    Then, for all rows at once, the divergence goes through autograd on those small tensors only, and its
    gradients with respect to them are kept, [N] and [N,K] in all. Rows whose student tail is tiny
    (see _tiny_tail) get lse_out summed again around their own maximum first (one host sync).
    Backward (_loss_backward): per chunk, the gradient with respect to the logits is assembled from them,
        d logsumexp(x) / dx      = softmax(x)
        d x_label / dx           = onehot(label)
        d logsumexp(x/T) / dx    = softmax(x/T) / T
        d z_ids / dx             = onehot(ids) / T
        d lse_out / dx           = softmax(x/T restricted to the outside of ids) / T
                                 = softmax(x/T) exp(lse_t - lse_out) / T outside the ids
    so every term outside the ids is one softmax times a per-row coefficient: one exp pass per chunk
    at T = 1 (the CE's softmax), two otherwise, written straight into the gradient buffer (float32
    logits) or one float32 temporary. At the ids the exact values, recomputed from the [chunk,K]
    gathered logits, are written over the pass's (which carry the tail factor that does not belong
    there); rows redone in the forward get their tail term from exp(x/T - lse_out) directly.
    First-order gradients only.
    """

    @staticmethod
    def forward(ctx, logits, labels, mask, cfg: _Config, chunks, *teacher):
        n, dtype = logits.shape[0], _compute_dtype(logits)
        ce_sum, kd_sum, saved, redo_rows = _loss_forward(
            logits.__getitem__, n, dtype, logits.device, labels, mask, cfg, chunks, teacher, _Buffers()
        )
        ctx.cfg, ctx.chunks, ctx.redo_rows = cfg, chunks, redo_rows
        ctx.save_for_backward(logits, labels, mask, *saved)
        return ce_sum, kd_sum

    @staticmethod
    def backward(ctx, grad_ce, grad_kd):
        logits, labels, mask, *saved = ctx.saved_tensors
        n = logits.shape[0]
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        done = 0
        for rows in ctx.chunks:  # rows of chunks with nothing masked in get 0
            grad[done : rows.start].zero_()
            done = min(rows.stop, n)
        grad[done:].zero_()
        in_place = logits.dtype == _compute_dtype(logits)  # float32 logits: g is written into grad directly

        def emit(rows, g):
            if not in_place:
                grad[rows] = g

        _loss_backward(
            logits.__getitem__,
            grad.__getitem__ if in_place else None,
            emit,
            labels,
            mask,
            ctx.cfg,
            ctx.chunks,
            ctx.redo_rows,
            _Saved(*saved),
            grad_ce,
            grad_kd,
            _Buffers(),
        )
        return (grad, None, None, None, None) + (None,) * (len(ctx.needs_input_grad) - 5)


class _FusedHeadLoss(torch.autograd.Function):
    """_ChunkedLoss with the student's output head inside: (sum of CE, sum of KD) from the final hidden states
    hidden [N,H] and the head's weight [V,H] (and bias [V]), logits = hidden @ weight.T + bias made one chunk at a
    time in `logits_dtype` (the dtype the head gives under autocast) and freed with the chunk. No [N,V] tensor ever
    exists. The gradients are
        d hidden[rows] = g @ weight,   d weight = sum over chunks of g.T @ hidden[rows],   d bias = sum of g
    with g the chunk's d loss / d logits, cast to logits_dtype as the head's own backward would see it.

    The divergence is a sum over rows, so a chunk's statistics, its part of the KD and its gradients need no other
    chunk: with `eager` = (a_ce, a_kd), the weights of the two sums in the loss that will be differentiated (alpha and
    (1 - alpha) T^2; 1 and 0 for CE alone), the forward runs _loss_forward and _loss_backward chunk by chunk while the
    chunk's logits exist, and keeps the [N,H] / [V,H] gradients: three head matmuls per chunk, as the unfused head
    takes, and no second pass. The backward scales them by the upstream gradient when it is (a_ce, a_kd) times a
    number (it is for LossParts.total and for any multiple of it, e.g. under gradient accumulation); otherwise (a
    backward of one part alone) it makes every chunk's logits again from the kept statistics and computes the
    gradients for that upstream. The head's gradients are summed over chunks as _HeadGrads says, then cast to the
    parameters' dtype."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, logits_dtype, eager, labels, mask, cfg: _Config, chunks, *teacher):
        dtype = torch.promote_types(logits_dtype, torch.float32)
        w, buffers = weight.to(logits_dtype), _Buffers()
        logits_of = _head_logits(hidden, w, bias, logits_dtype, buffers)
        grads = _HeadGrads(hidden, w, bias, logits_dtype, buffers) if eager else None
        ce_sum = kd_sum = torch.zeros((), dtype=dtype, device=hidden.device)
        saved, redo = [], []
        for rows in chunks:
            x = logits_of(rows)  # [chunk,V], the only vocabulary-sized tensors are this chunk's
            one = [slice(0, x.shape[0])]
            part = (labels[rows], mask[rows], cfg, one)
            ce, kd, stats, redo_rows = _loss_forward(
                x.__getitem__, x.shape[0], dtype, x.device, *part, tuple(t[rows] for t in teacher), buffers
            )
            ce_sum, kd_sum = ce_sum + ce, kd_sum + kd
            saved += stats
            redo.append(redo_rows)
            if eager:
                emit = functools.partial(grads.add, rows)
                _loss_backward(x.__getitem__, None, emit, *part, redo_rows, stats, *eager, buffers)
            del x
        ctx.cfg, ctx.chunks, ctx.redo, ctx.logits_dtype, ctx.eager = cfg, chunks, redo, logits_dtype, eager
        ctx.has_bias, ctx.kept_used = bias is not None, False
        kept = grads.result(weight, bias) if eager else (None, None, None)
        ctx.save_for_backward(hidden, weight, bias, labels, mask, *kept, *saved)
        return ce_sum, kd_sum

    @staticmethod
    def backward(ctx, grad_ce, grad_kd):
        hidden, weight, bias, labels, mask, *rest = ctx.saved_tensors
        kept, saved = rest[:3], rest[3:]
        nones = (None,) * (len(ctx.needs_input_grad) - 3)
        scale = _upstream_scale(ctx.eager, grad_ce, grad_kd) if not ctx.kept_used else None
        if scale is not None:  # the kept gradients, scaled in place by the upstream's multiple of (a_ce, a_kd)
            ctx.kept_used = True  # a second backward (retain_graph) recomputes
            return tuple(None if g is None else g.mul_(scale.to(g.dtype)) for g in kept) + nones
        dtype, width = ctx.logits_dtype, len(_Saved._fields)
        w, buffers = weight.to(dtype), _Buffers()
        logits_of = _head_logits(hidden, w, bias, dtype, buffers)
        grads = _HeadGrads(hidden, w, bias, dtype, buffers)
        for i, rows in enumerate(ctx.chunks):
            x = logits_of(rows)
            part = (labels[rows], mask[rows], ctx.cfg, [slice(0, x.shape[0])], ctx.redo[i])
            stats = _Saved(*saved[i * width : (i + 1) * width])
            emit = functools.partial(grads.add, rows)
            _loss_backward(x.__getitem__, None, emit, *part, stats, grad_ce, grad_kd, buffers)
        return grads.result(weight, bias) + nones


def _upstream_scale(eager, grad_ce, grad_kd) -> torch.Tensor | None:
    """s where (grad_ce, grad_kd) = s (a_ce, a_kd), eager = (a_ce, a_kd); None when there is no such s (or no eager
    gradients). One host sync."""
    if eager is None:
        return None
    a_ce, a_kd = eager
    scale = grad_ce / a_ce if a_ce != 0 else grad_kd / a_kd
    expected = torch.stack([scale * a_ce, scale * a_kd])
    same = torch.allclose(torch.stack([grad_ce, grad_kd]).to(expected.dtype), expected, rtol=1e-6, atol=0.0)
    return scale if same else None


class _HeadGrads:
    """The head's gradients summed over chunks, from each chunk's g = d loss / d logits [chunk,V]: d hidden [N,H]
    (hidden's dtype), d weight [V,H] summed in the logits' dtype by the matmul itself (addmm_: no [V,H] temporary
    and no extra pass per chunk; in bf16 that rounds once per chunk rather than once, which measured 0.35% relative
    error against 0.17% for one bf16 matmul over the whole batch at 8 chunks of 130 x 128,256), d bias [V] in
    float32 (float64 for float64)."""

    def __init__(self, hidden, w, bias, dtype, buffers: _Buffers):
        self.h, self.w, self.dtype, self.buffers = hidden.to(dtype), w, dtype, buffers
        self.hidden = torch.zeros_like(hidden)  # rows of chunks with nothing masked in get 0
        self.weight = torch.zeros(w.shape, dtype=dtype, device=w.device)
        acc = torch.promote_types(dtype, torch.float32)
        self.bias = None if bias is None else torch.zeros(w.shape[0], dtype=acc, device=w.device)

    def add(self, rows, _local_rows, g) -> None:
        if g.dtype != self.dtype:  # what the head's backward receives on the unfused path
            g = self.buffers.take("cast", g.shape, self.dtype, g.device).copy_(g)
        self.hidden[rows] = g @ self.w
        self.weight.addmm_(g.T, self.h[rows])
        if self.bias is not None:
            self.bias.add_(g.sum(0))

    def result(self, weight, bias) -> tuple:
        return self.hidden, self.weight.to(weight.dtype), None if bias is None else self.bias.to(bias.dtype)


def _head_logits(hidden, weight, bias, dtype, buffers: _Buffers):
    """rows -> logits of those rows, hidden[rows] @ weight.T (+ bias), in dtype (as an autocast Linear), in a buffer
    that the next call overwrites."""
    weight = weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)

    def logits_of(rows):
        h = hidden[rows].to(dtype)
        x = torch.mm(h, weight.T, out=buffers.take("logits", (h.shape[0], weight.shape[0]), dtype, h.device))
        return x if bias is None else x.add_(bias)

    return logits_of


def _chunk_of(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if t is None else t[rows]


def _chunk_grad(cfg: _Config, x, labels, ids, lse, lse_t, w_ce, c_kd, c_out, c_z_ids, out, buffers) -> torch.Tensor:
    """d(grad_ce * CE sum + grad_kd * KD sum) / dx for one chunk x [n,V], into out ([n,V], compute dtype).

    Every entry outside the ids: w_ce softmax(x) + c_out softmax(x/T), c_out holding the tail's
    factor (one pass at T = 1, where both softmaxes are one). At the ids, written over it:
    w_ce softmax(x) + c_kd softmax(x/T) + c_z_ids. Then -w_ce at the label.
    """
    dtype, t = out.dtype, cfg.temperature
    if cfg.second_softmax:
        x_up = _upcast(x, buffers.take("b", x.shape, dtype, x.device))
        g = torch.add(-lse_t, x_up, alpha=1.0 / t, out=out).exp_().mul_(c_out)  # x/T - lse_t in one pass
        g.addcmul_(torch.sub(x_up, lse, out=buffers.take("b", x.shape, dtype, x.device)).exp_(), w_ce)
    else:
        g = torch.sub(_upcast(x, out), lse, out=out).exp_()
        g.mul_(w_ce if c_out is None else w_ce + c_out)
    if cfg.tail:
        x_ids = x.gather(1, ids).to(dtype)
        if cfg.second_softmax:
            at_ids = torch.sub(x_ids, lse).exp_().mul_(w_ce)
            at_ids.add_(torch.add(-lse_t, x_ids, alpha=1.0 / t).exp_().mul_(c_kd))
        else:
            at_ids = torch.sub(x_ids, lse).exp_().mul_(w_ce + c_kd)
        g.scatter_(1, ids, at_ids)
    if ids is not None:
        g.scatter_add_(1, ids, c_z_ids)
    return g.scatter_add_(1, labels[:, None], -w_ce)


def _outside_term(x, ids, lse_out, temperature: float) -> torch.Tensor:
    """exp(x/T - lse_out) [n,V], 0 at the ids: softmax of x/T over the outside of the ids."""
    z = x.to(_compute_dtype(x))
    z = z if temperature == 1.0 else z.div_(temperature)
    # May overflow at the ids; they are zeroed.
    return z.sub_(lse_out).exp_().scatter_(1, ids, 0.0)


def _redo_lse_out(logits_of, ids, cfg: _Config, rows: list, lse_out) -> None:
    """lse_out at rows (a list of indices) summed around the outside's own maximum, in place; logits_of(index)
    gives those rows' logits."""
    index = torch.tensor(rows, dtype=torch.long, device=ids.device)
    for block in index.split(cfg.chunk_size):
        x = logits_of(block)
        z = x.to(_compute_dtype(x))
        z = z if cfg.temperature == 1.0 else z.div_(cfg.temperature)
        lse_out[block] = _logsumexp_outside(z, ids[block])[0]


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.reshape(n, t.shape[-1])  # [..., K] -> [N,K]; explicit K so that N = 0 works


class _Prepared(NamedTuple):
    """The inputs of a chunked loss, checked and cast: labels [N] long and mask [N] bool on the device (masked-out
    labels 0), the teacher's tensors (_prepare_topk / _prepare_sampled; () for CE alone), the config and the
    chunks of rows that hold a masked-in position."""

    labels: torch.Tensor
    mask: torch.Tensor
    teacher: tuple
    cfg: _Config
    chunks: list


def _prepare_loss(
    n, dtype, device, labels, mask, targets, alpha, temperature, kd_loss, jsd_beta, topk_renormalize, chunk_size
) -> _Prepared:
    """Checks and preparation shared by distillation_loss and fused_distillation_loss (one place for both)."""
    cache_mode = None if targets is None else "topk" if "topk_ids" in targets else "sampled"
    _check_options(alpha, temperature, kd_loss, jsd_beta, cache_mode)
    if cache_mode == "sampled" and topk_renormalize:
        raise PipelineError("; ".join(cache_mode_problems("sampled", kd_loss, topk_renormalize)))
    if chunk_size < 1:
        raise PipelineError(f"--loss-chunk must be positive, got {chunk_size}")
    every_position = mask is None
    mask = _all_positions(mask, n, device)
    labels = torch.where(mask, labels.reshape(-1).to(device=device, dtype=torch.long), 0)

    mode, teacher, num_samples = None, (), 0
    if targets is not None:
        if "topk_ids" in targets:
            mode = "topk"
            teacher = _prepare_topk(
                _rows(targets["topk_ids"], n),
                _rows(targets["topk_logprobs"], n),
                targets["tail_logprob"].reshape(n),
                mask,
                dtype,
                device,
            )
        elif "sample_ids" in targets:
            mode, num_samples = "sampled", int(targets["num_samples"])
            if num_samples < 1:
                raise ValueError(f"num_samples must be >= 1, got {num_samples}")
            teacher = _prepare_sampled(
                _rows(targets["sample_ids"], n),
                _rows(targets["sample_counts"], n),
                targets["teacher_entropy"].reshape(n),
                mask,
                dtype,
                device,
            )
        else:
            raise ValueError(f"targets holds neither topk_ids nor sample_ids: {sorted(targets)}")

    cfg = _Config(mode, kd_loss, float(jsd_beta), bool(topk_renormalize), float(temperature), num_samples, chunk_size)
    n_chunks = -(-n // chunk_size)
    if every_position:
        busy = [True] * n_chunks
    else:  # one host sync for the whole batch, to skip chunks that are all padding
        busy = F.pad(mask, (0, n_chunks * chunk_size - n)).view(n_chunks, chunk_size).any(1).tolist()
    chunks = [slice(i * chunk_size, (i + 1) * chunk_size) for i, b in enumerate(busy) if b]
    return _Prepared(labels, mask, teacher, cfg, chunks)


def _loss_parts(ce_sum, kd_sum, prep: _Prepared, alpha: float, temperature: float) -> LossParts:
    count = _count(prep.mask)
    ce, kd = ce_sum / count, kd_sum / count
    if prep.cfg.mode is None:
        return LossParts(total=ce, ce=ce, kd=kd)
    return LossParts(total=alpha * ce + (1.0 - alpha) * temperature**2 * kd, ce=ce, kd=kd)


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    targets: Mapping | None = None,
    *,
    alpha: float,
    temperature: float,
    kd_loss: str = "forward-kl",
    jsd_beta: float = 0.5,
    topk_renormalize: bool = False,
    chunk_size: int = 2048,
) -> LossParts:
    """The training loss: total = alpha * CE + (1 - alpha) * T^2 * KD, or CE alone if targets is None.

    student_logits [N,V] any float dtype (bf16 is fine; math is float32); labels [N] int; mask [N]
    bool (None: every position); targets holds either topk_ids/topk_logprobs/tail_logprob ([N,K], [N,K], [N]) or
    sample_ids/sample_counts/teacher_entropy ([N,S], [N,S], [N]) plus num_samples (int).
    CE is at temperature 1; KD is topk_divergence / sampled_divergence at `temperature`, and T^2
    keeps its gradient on the scale of the CE's (Hinton et al. 2015).

    Memory and time: rows go through in chunks of chunk_size (see _ChunkedLoss), so besides the
    logits and their gradient at most two float32 [chunk_size,V] temporaries exist at once (one at
    T = 1; none in the backward of float32 logits at T = 1). At T = 1 each chunk takes one exp pass
    forward and one backward, as CE alone does. Sums are divided by the masked-in count at the end,
    so the result equals the unchunked mean. Chunks with no masked-in row are skipped.
    """
    vocab = student_logits.shape[-1]
    logits = student_logits.reshape(-1, vocab)
    n, device, dtype = logits.shape[0], logits.device, _compute_dtype(logits)
    prep = _prepare_loss(
        n, dtype, device, labels, mask, targets, alpha, temperature, kd_loss, jsd_beta, topk_renormalize, chunk_size
    )
    ce_sum, kd_sum = _ChunkedLoss.apply(logits, prep.labels, prep.mask, prep.cfg, prep.chunks, *prep.teacher)
    return _loss_parts(ce_sum, kd_sum, prep, alpha, temperature)


def fused_distillation_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    targets: Mapping | None = None,
    *,
    alpha: float,
    temperature: float,
    head_bias: torch.Tensor | None = None,
    logits_dtype: torch.dtype | None = None,
    kd_loss: str = "forward-kl",
    jsd_beta: float = 0.5,
    topk_renormalize: bool = False,
    chunk_size: int = 2048,
) -> LossParts:
    """distillation_loss of logits = hidden @ head_weight.T + head_bias, with the output head inside the loss: the
    logits exist one chunk of chunk_size rows at a time, in the forward and again in the backward
    (_FusedHeadLoss), so no [N,V] tensor is ever made or kept, and the gradients go to hidden and the head.

    hidden [..., H] the student's final hidden states (what its output head takes); head_weight [V,H], head_bias
    [V] or None; logits_dtype the dtype the head's logits have on the unfused path (bf16 under bf16 autocast; None:
    hidden's dtype). Everything else as distillation_loss, and the result equals it on those logits.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    logits_dtype = logits_dtype or hidden.dtype
    n, device, dtype = hidden.shape[0], hidden.device, torch.promote_types(logits_dtype, torch.float32)
    prep = _prepare_loss(
        n, dtype, device, labels, mask, targets, alpha, temperature, kd_loss, jsd_beta, topk_renormalize, chunk_size
    )
    # the gradients in the forward when a backward will follow (see _FusedHeadLoss), for total's weights
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, head_weight, head_bias)
    )
    eager = None
    if differentiable:
        eager = (1.0, 0.0) if prep.cfg.mode is None else (float(alpha), (1.0 - alpha) * temperature**2)
    ce_sum, kd_sum = _FusedHeadLoss.apply(
        hidden,
        head_weight,
        head_bias,
        logits_dtype,
        eager,
        prep.labels,
        prep.mask,
        prep.cfg,
        prep.chunks,
        *prep.teacher,
    )
    return _loss_parts(ce_sum, kd_sum, prep, alpha, temperature)


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


# ----------------------------------------------------------------------------- the loss of a training step


def teacher_targets(batch: Mapping[str, torch.Tensor], num_samples: int) -> dict | None:
    """The cached teacher targets of a batch of rows, flattened to [B*L, ...] as distillation_loss takes them,
    or None for a batch of tokens only (the baseline)."""
    if "topk_ids" in batch:
        k = batch["topk_ids"].shape[-1]
        return {
            "topk_ids": batch["topk_ids"].reshape(-1, k),
            "topk_logprobs": batch["topk_logprobs"].reshape(-1, k),
            "tail_logprob": batch["tail_logprob"].reshape(-1),
        }
    if "sample_ids" in batch:
        s = batch["sample_ids"].shape[-1]
        return {
            "sample_ids": batch["sample_ids"].reshape(-1, s),
            "sample_counts": batch["sample_counts"].reshape(-1, s),
            "teacher_entropy": batch["teacher_entropy"].reshape(-1),
            "num_samples": num_samples,
        }
    return None


# The fused head's chunk, in logits: 2^24 (64 MB of float32) is 341 rows at a 49,152 vocabulary, 130 at 128,256;
# the head's matmul on that many rows still runs at full speed, and the chunk's buffers (its logits, a float32 work
# buffer, the cast of its gradient; _Buffers) stay a few hundred MB whatever the batch.
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
            **options,
        )
