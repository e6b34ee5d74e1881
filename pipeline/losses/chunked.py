"""The chunked autograd machinery both training losses run (distillation.py on logits, fused_head.py on hidden
states): rows go through in chunks, each chunk's statistics are made without a graph, and in the backward each
chunk's [chunk,V] gradient is built from saved [N,1] / [N,K] statistics.

    prepare_inputs   checks and casts the inputs once (PreparedInputs), with the LossSpec of the call
    loss_forward     per chunk chunk_stats (one exp pass at T = 1; StudentStats without a graph), then the
                     divergence by autograd on those small statistics only (kd_grads) -> BackwardInputs
    loss_backward    per chunk chunk_grad: the gradient w.r.t. the logits from BackwardInputs and the per-row
                     RowCoefficients, handed to the caller chunk by chunk

At T = 1 the CE, the KD softmax and the tail share one exp pass per chunk, forward and backward, as CE alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pipeline.buffers import WorkBuffers
from pipeline.losses.divergences import (
    LossParts,
    StudentStats,
    all_positions,
    check_options,
    compute_dtype,
    logsumexp_outside,
    masked_count,
    masked_sum,
    sampled_rows,
    topk_rows,
)
from pipeline.losses.targets import TeacherTargets, targets_from_mapping

# The chunk's [chunk,V] float32 work buffers (WorkBuffers keys), shared by the forward and the backward of a chunk:
SOFTMAX = "softmax"  # its logits, shifted and exponentiated in place (the KD softmax); in the backward its gradient
CE_SOFTMAX = "ce_softmax"  # only at T != 1, where the KD softmax is not the CE's: the CE's, from the float32 logits


@dataclass(frozen=True)
class LossSpec:
    """What one call of a chunked loss computes, checked: the targets' mode, the divergence, its weights, T and the
    chunk size."""

    mode: str | None  # "topk", "sampled" or None (CE only)
    kind: str  # forward-kl | reverse-kl | jsd
    beta: float  # jsd's beta
    renormalize: bool  # topk: the renormalised variant, no tail bucket
    alpha: float  # total = alpha CE + (1 - alpha) T^2 KD
    temperature: float
    chunk_size: int  # rows per chunk

    @classmethod
    def checked(
        cls,
        teacher: TeacherTargets | None,
        *,
        alpha: float,
        temperature: float,
        kd_loss: str,
        jsd_beta: float,
        topk_renormalize: bool,
        chunk_size: int,
    ) -> LossSpec:
        """The spec of a loss on these targets; a ValueError naming every argument out of range."""
        mode = None if teacher is None else teacher.mode
        check_options(alpha, temperature, kd_loss, jsd_beta, mode, topk_renormalize)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        return cls(mode, kd_loss, float(jsd_beta), bool(topk_renormalize), float(alpha), float(temperature), chunk_size)

    @property
    def weights(self) -> tuple[float, float, float]:
        """(a_ce, a_kd, a_rest): total = a_ce CE + a_kd KD + a_rest CE_rest, CE_rest the CE of the positions
        without a teacher target (which take the soft loss's share as hard loss)."""
        if self.mode is None:
            return 1.0, 0.0, 0.0
        return self.alpha, (1.0 - self.alpha) * self.temperature**2, 1.0 - self.alpha

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


class PreparedInputs(NamedTuple):
    """The inputs of a chunked loss, checked and cast: labels [N] long and mask [N] bool on the device (masked-out
    labels 0), kd_mask [N] bool, the positions the KD counts (mask and the teacher's `present`; mask itself, the
    same tensor, when every position has a target), rest_mask [N] bool, the masked-in positions outside kd_mask
    (None when there are none by construction), the teacher's targets (rows outside kd_mask given dummies; None
    for CE alone), the spec and the chunks of rows that hold a masked-in position."""

    labels: torch.Tensor
    mask: torch.Tensor
    kd_mask: torch.Tensor
    rest_mask: torch.Tensor | None
    teacher: TeacherTargets | None
    spec: LossSpec
    chunks: list[slice]

    def rows(self, rows: slice) -> PreparedInputs:
        """The inputs of one chunk's rows, as one chunk."""
        teacher = None if self.teacher is None else self.teacher.rows(rows)
        n = self.labels[rows].shape[0]
        mask = self.mask[rows]
        kd_mask = mask if self.kd_mask is self.mask else self.kd_mask[rows]
        rest_mask = None if self.rest_mask is None else self.rest_mask[rows]
        return PreparedInputs(self.labels[rows], mask, kd_mask, rest_mask, teacher, self.spec, [slice(0, n)])


def prepare_inputs(n: int, dtype, device, labels, mask, targets: Mapping | None, **options) -> PreparedInputs:
    """The checks, casts and dummies shared by distillation_loss and fused_distillation_loss (one place for both):
    the teacher's targets from their batch mapping, the call's LossSpec from `options` (LossSpec.checked's keywords);
    dtype is the compute dtype. The one place where the teacher's `present` (teacher_mask) meets the mask."""
    teacher = targets_from_mapping(targets, n)
    spec = LossSpec.checked(teacher, **options)
    every_position = mask is None
    mask = all_positions(mask, n, device)
    labels = torch.where(mask, labels.reshape(-1).to(device=device, dtype=torch.long), 0)
    kd_mask, rest_mask = mask, None
    if teacher is not None:
        if teacher.present is not None:  # the KD counts the positions with a teacher target only; the CE all
            present = teacher.present.to(device=device, dtype=torch.bool)
            kd_mask, rest_mask = mask & present, mask & ~present
        teacher = teacher.masked(kd_mask, dtype, device)
    chunk_size = spec.chunk_size
    n_chunks = -(-n // chunk_size)
    if every_position:
        busy = [True] * n_chunks
    else:  # one host sync for the whole batch, to skip chunks that are all padding
        busy = F.pad(mask, (0, n_chunks * chunk_size - n)).view(n_chunks, chunk_size).any(1).tolist()
    chunks = [slice(i * chunk_size, (i + 1) * chunk_size) for i, b in enumerate(busy) if b]
    return PreparedInputs(labels, mask, kd_mask, rest_mask, teacher, spec, chunks)


def loss_parts(ce_sum, kd_sum, rest_sum, inputs: PreparedInputs) -> LossParts:
    """The means and the total from the sums over the masked-in rows. With a teacher target at some positions only,
    the KD sums over those (kd_mask) and the positions without one take the soft loss's share as hard loss
    (rest_sum: their CE), both divided by the same count as the CE:

        total = alpha CE + (1 - alpha) (T^2 KD + CE_rest)

    so a position with a teacher target weighs what it weighs when every position has one, a position without one
    is trained as by the CE alone, and a batch's loss does not depend on how its rows are split over micro-batches
    or ranks."""
    count = masked_count(inputs.mask)
    ce, kd, rest = ce_sum / count, kd_sum / count, rest_sum / count
    if inputs.spec.mode is None:
        return LossParts(total=ce, ce=ce, kd=kd)
    a_ce, a_kd, a_rest = inputs.spec.weights
    return LossParts(total=a_ce * ce + a_kd * kd + a_rest * rest, ce=ce, kd=kd)


# ----------------------------------------------------------------------------- one chunk, forward


def tiny_tail(dtype: torch.dtype) -> float:
    """Student tail masses q_o below this (sqrt of the smallest normal float: 1e-19 in float32) are
    summed again around their own maximum (logsumexp_outside): summed around the row's maximum, their
    terms would reach float's subnormal range, and 1 / q_o must stay far from overflow."""
    return math.sqrt(torch.finfo(dtype).tiny)


def upcast(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """x in out's (the compute) dtype: x itself, or narrower x copied into out, a buffer of its shape."""
    return x if x.dtype == out.dtype else out.copy_(x)


def chunk_stats(x: torch.Tensor, spec: LossSpec, labels, ids, buffers: WorkBuffers) -> StudentStats:
    """The statistics of x [n,V] (any float dtype), without a graph, with one exp pass over [n,V] (two at T != 1).

        e = exp(x - m), m = max_v x:       lse = m + log sum_v e
        at T != 1, e = exp((x - m) / T):   lse_t = m / T + log sum_v e     (at T = 1, lse_t = lse)
        e zeroed at the ids:               lse_out = m / T + log sum_v e

    The tail sums its own terms, so it does not lose digits to 1 - sum_k q_k; it only loses them when
    its terms fall far below the row's maximum, and those rows are flagged in `redo`. lse_out is 0 where empty
    (the stand-in of logsumexp_outside). Works in one float32 [n,V] buffer (two at T != 1).
    """
    dtype = compute_dtype(x.dtype)
    softmax = buffers.take(SOFTMAX, x.shape, dtype, x.device)
    x_up = upcast(x, softmax)
    m = x_up.amax(dim=1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)  # as torch.logsumexp: an infinite max is no shift
    shifted = torch.sub(x_up, m, out=softmax)
    if spec.second_softmax:
        exps = torch.exp(shifted, out=buffers.take(CE_SOFTMAX, x.shape, dtype, x.device))
    else:
        exps = shifted.exp_()
    total = exps.sum(dim=1, keepdim=True)
    lse = total.log() + m
    x_label = x.gather(1, labels[:, None]).to(dtype)
    if ids is None:
        return StudentStats(lse, x_label, None, None, None, None, None)
    t = spec.temperature
    z_ids = x.gather(1, ids).to(dtype)
    z_ids = z_ids if t == 1.0 else z_ids / t
    if not spec.uses_lse_t:
        return StudentStats(lse, x_label, None, z_ids, None, None, None)
    shift, lse_t = m, lse
    if spec.second_softmax:
        shift = m / t
        total = torch.exp(shifted.div_(t), out=exps).sum(dim=1, keepdim=True)
        lse_t = total.log() + shift
    del shifted
    if not spec.tail:
        return StudentStats(lse, x_label, lse_t, z_ids, None, None, None)
    outside = exps.scatter_(1, ids, 0.0).sum(dim=1, keepdim=True)
    if ids.shape[1] >= x.shape[1]:  # K >= V: rows whose ids cover the vocabulary have no outside
        empty = torch.zeros_like(x, dtype=torch.bool).scatter_(1, ids, True).all(dim=1, keepdim=True)
    else:
        empty = torch.zeros_like(lse, dtype=torch.bool)
    redo = ~empty & (outside < tiny_tail(dtype) * total)  # total >= 1: it holds exp(0)
    outside = outside.clamp_min(torch.finfo(dtype).tiny)  # finite everywhere; exact where not redone
    lse_out = torch.where(empty, 0.0, outside.log() + shift)
    return StudentStats(lse, x_label, lse_t, z_ids, lse_out, empty, redo)


def redo_lse_out(logits_of, ids, spec: LossSpec, rows: list, lse_out) -> None:
    """lse_out at rows (a list of indices) summed around the outside's own maximum, in place; logits_of(index)
    gives those rows' logits."""
    index = torch.tensor(rows, dtype=torch.long, device=ids.device)
    for block in index.split(spec.chunk_size):
        x = logits_of(block)
        z = x.to(compute_dtype(x.dtype))
        z = z if spec.temperature == 1.0 else z.div_(spec.temperature)
        lse_out[block] = logsumexp_outside(z, ids[block])[0]


# ----------------------------------------------------------------------------- all rows: the divergence


class KdGrads(NamedTuple):
    """The KD sum over the rows in kd_mask and its gradients w.r.t. the statistics it reads (None where unread)."""

    kd_sum: torch.Tensor
    d_lse_t: torch.Tensor | None  # [N,1]
    d_z_ids: torch.Tensor | None  # [N,K]
    d_lse_out: torch.Tensor | None  # [N,1]


def kd_grads(spec: LossSpec, kd_mask, teacher: TeacherTargets, stats: StudentStats) -> KdGrads:
    """KD sum over the rows in kd_mask and its gradients w.r.t. (lse_t, z_ids, lse_out) (0 on the other rows), by
    autograd on the [N,1] / [N,K] statistics only."""
    with torch.enable_grad():
        lse_t = stats.lse_t.detach().requires_grad_(True) if spec.uses_lse_t else None
        z_ids = stats.z_ids.detach().requires_grad_(True)
        lse_out = stats.lse_out.detach().requires_grad_(True) if spec.tail else None
        leaves = [s for s in (lse_t, z_ids, lse_out) if s is not None]
        small = StudentStats(None, None, lse_t, z_ids, lse_out, stats.empty)
        if spec.mode == "topk":
            kd_rows = topk_rows(small, teacher, spec.kind, spec.beta, spec.renormalize)
        else:
            kd_rows = sampled_rows(small, teacher)
        kd_sum = masked_sum(kd_rows, kd_mask)
        grads = torch.autograd.grad(kd_sum, leaves, allow_unused=True)
    grads = iter([torch.zeros_like(s) if g is None else g for s, g in zip(leaves, grads)])
    d_lse_t = next(grads) if spec.uses_lse_t else None
    d_z_ids = next(grads)
    d_lse_out = next(grads) if spec.tail else None
    return KdGrads(kd_sum.detach(), d_lse_t, d_z_ids, d_lse_out)


class BackwardInputs(NamedTuple):
    """What loss_forward keeps for the backward: [N,1] / [N,K] tensors (None where the loss has none). A tuple of
    tensors, so that it goes through save_for_backward as it is."""

    ids: torch.Tensor | None  # the teacher's ids (masked rows: dummies)
    lse: torch.Tensor
    lse_t: torch.Tensor
    lse_out: torch.Tensor
    no_factor: torch.Tensor  # bool: empty or redone tails, whose term is not softmax(x/T) times a factor
    d_lse_t: torch.Tensor | None
    d_z_ids: torch.Tensor | None
    d_lse_out: torch.Tensor | None


def loss_forward(logits_of, n: int, dtype, device, inputs: PreparedInputs, buffers: WorkBuffers):
    """The forward of both chunked losses: (ce_sum, kd_sum, rest_sum, BackwardInputs, rows redone); rest_sum the CE
    of the rows in rest_mask (0 without one).

    logits_of(rows) gives the student's logits at rows (a slice of a chunk, or a LongTensor of rows redone), any
    float dtype; `dtype` is the compute dtype. Only [N,1] / [N,K] statistics outlive a chunk."""
    spec, teacher, mask, kd_mask = inputs.spec, inputs.teacher, inputs.mask, inputs.kd_mask
    ids = None if teacher is None else teacher.ids
    k = ids.shape[1] if ids is not None else 0
    lse, x_label, lse_t, lse_out = (torch.zeros(n, 1, dtype=dtype, device=device) for _ in range(4))
    z_ids = torch.zeros(n, k, dtype=dtype, device=device)
    empty, redo = (torch.zeros(n, 1, dtype=torch.bool, device=device) for _ in range(2))
    for rows in inputs.chunks:
        st = chunk_stats(logits_of(rows), spec, inputs.labels[rows], None if ids is None else ids[rows], buffers)
        lse[rows], x_label[rows] = st.lse, st.x_label
        if ids is not None:
            z_ids[rows] = st.z_ids
        if st.lse_t is not None:
            lse_t[rows] = st.lse_t
        if spec.tail:
            lse_out[rows], empty[rows], redo[rows] = st.lse_out, st.empty, st.redo
    ce_rows = (lse - x_label).squeeze(1)
    ce_sum = masked_sum(ce_rows, mask)
    rest_sum = ce_sum.new_zeros(()) if inputs.rest_mask is None else masked_sum(ce_rows, inputs.rest_mask)
    kd = KdGrads(torch.zeros((), dtype=dtype, device=device), None, None, None)
    redo_rows = []
    if spec.mode is not None:
        stats = StudentStats(None, None, lse_t, z_ids, lse_out, empty)
        kd = kd_grads(spec, kd_mask, teacher, stats)
        if spec.tail:
            redo &= kd_mask[:, None]  # rows outside it (their teacher a dummy) only need finite statistics
            redo_rows = redo.squeeze(1).nonzero().squeeze(1).tolist()  # the host sync; almost always []
        if redo_rows:
            redo_lse_out(logits_of, ids, spec, redo_rows, lse_out)
            kd = kd_grads(spec, kd_mask, teacher, stats)
    kept = BackwardInputs(ids, lse, lse_t, lse_out, empty | redo, kd.d_lse_t, kd.d_z_ids, kd.d_lse_out)
    return ce_sum, kd.kd_sum, rest_sum, kept, redo_rows


# ----------------------------------------------------------------------------- one chunk, backward


@dataclass(frozen=True)
class RowCoefficients:
    """Per-row coefficients of the softmax passes that make d loss / d logits (see chunk_grad); [N,1] except
    z_ids [N,K]; None where the loss has no such term."""

    ce: torch.Tensor  # w_ce: the CE's weight, upstream gradient times mask (plus the rest's on rest_mask)
    kd: torch.Tensor | None  # softmax(x/T)'s factor from lse_t
    outside: torch.Tensor | None  # softmax(x/T)'s factor outside the ids: kd's plus the tail's
    z_ids: torch.Tensor | None  # added at the ids
    tail: torch.Tensor | None  # the tail term's factor on rows whose tail was redone: exp(x/T - lse_out) times it

    @classmethod
    def of(cls, spec: LossSpec, mask, rest_mask, kept: BackwardInputs, grad_ce, grad_kd, grad_rest) -> RowCoefficients:
        dtype = kept.lse.dtype
        scale = grad_kd / spec.temperature  # dz/dx = 1/T
        w_ce = grad_ce * mask[:, None].to(dtype)
        if rest_mask is not None:  # the rows without a teacher target: their CE counts twice, in CE and in CE_rest
            w_ce = w_ce + grad_rest * rest_mask[:, None].to(dtype)
        c_kd = scale * kept.d_lse_t if spec.uses_lse_t else None
        c_out = c_kd
        c_tail = None
        if spec.tail:
            # exp(lse_t - lse_out) = 1 / q_o <= 1 / tiny_tail except where no_factor (empty / redone)
            cap = 1.0 - math.log(tiny_tail(dtype))
            factor = (kept.lse_t - kept.lse_out).clamp_max(cap).exp_()
            c_out = c_kd + torch.where(kept.no_factor, 0.0, scale * kept.d_lse_out * factor)
            c_tail = scale * kept.d_lse_out
        c_z_ids = scale * kept.d_z_ids if kept.ids is not None else None
        return cls(w_ce, c_kd, c_out, c_z_ids, c_tail)

    def rows(self, rows: slice) -> RowCoefficients:
        part = [None if t is None else t[rows] for t in (self.ce, self.kd, self.outside, self.z_ids, self.tail)]
        return RowCoefficients(*part)


def chunk_grad(
    spec: LossSpec, x, labels, ids, lse, lse_t, coef: RowCoefficients, out, buffers: WorkBuffers
) -> torch.Tensor:
    """d(grad_ce * CE sum + grad_kd * KD sum) / dx for one chunk x [n,V], into out ([n,V], compute dtype); labels
    [n], ids [n,K], lse and lse_t [n,1] and coef are the chunk's rows.

    Every entry outside the ids: coef.ce softmax(x) + coef.outside softmax(x/T), coef.outside holding the tail's
    factor (one pass at T = 1, where both softmaxes are one). At the ids, written over it:
    coef.ce softmax(x) + coef.kd softmax(x/T) + coef.z_ids. Then -coef.ce at the label.
    """
    dtype, t = out.dtype, spec.temperature
    w_ce, c_kd, c_out = coef.ce, coef.kd, coef.outside
    if spec.second_softmax:
        x_up = upcast(x, buffers.take(CE_SOFTMAX, x.shape, dtype, x.device))
        g = torch.add(-lse_t, x_up, alpha=1.0 / t, out=out).exp_().mul_(c_out)  # x/T - lse_t in one pass
        g.addcmul_(torch.sub(x_up, lse, out=buffers.take(CE_SOFTMAX, x.shape, dtype, x.device)).exp_(), w_ce)
    else:
        g = torch.sub(upcast(x, out), lse, out=out).exp_()
        g.mul_(w_ce if c_out is None else w_ce + c_out)
    if spec.tail:
        x_ids = x.gather(1, ids).to(dtype)
        if spec.second_softmax:
            at_ids = torch.sub(x_ids, lse).exp_().mul_(w_ce)
            at_ids.add_(torch.add(-lse_t, x_ids, alpha=1.0 / t).exp_().mul_(c_kd))
        else:
            at_ids = torch.sub(x_ids, lse).exp_().mul_(w_ce + c_kd)
        g.scatter_(1, ids, at_ids)
    if ids is not None:
        g.scatter_add_(1, ids, coef.z_ids)
    return g.scatter_add_(1, labels[:, None], -w_ce)


def outside_term(x, ids, lse_out, temperature: float) -> torch.Tensor:
    """exp(x/T - lse_out) [n,V], 0 at the ids: softmax of x/T over the outside of the ids."""
    z = x.to(compute_dtype(x.dtype))
    z = z if temperature == 1.0 else z.div_(temperature)
    # May overflow at the ids; they are zeroed.
    return z.sub_(lse_out).exp_().scatter_(1, ids, 0.0)


def loss_backward(
    logits_of,
    out_of: Callable | None,
    emit: Callable,
    inputs: PreparedInputs,
    kept: BackwardInputs,
    redo_rows: list[int],
    upstream: tuple,
    buffers: WorkBuffers,
) -> None:
    """The backward of both chunked losses, for upstream = (grad_ce, grad_kd, grad_rest): for each chunk,
    g = d loss / d logits [chunk,V] (chunk_grad, written into out_of(rows) when out_of is given, else into a
    buffer), handed to emit(rows, g) before the next chunk is made."""
    spec, dtype = inputs.spec, kept.lse.dtype
    coef = RowCoefficients.of(spec, inputs.mask, inputs.rest_mask, kept, *upstream)
    for rows in inputs.chunks:
        x = logits_of(rows)
        ids = None if kept.ids is None else kept.ids[rows]
        lse_t = None if kept.lse_t is None else kept.lse_t[rows]
        out = buffers.take(SOFTMAX, x.shape, dtype, x.device) if out_of is None else out_of(rows)
        g = chunk_grad(spec, x, inputs.labels[rows], ids, kept.lse[rows], lse_t, coef.rows(rows), out, buffers)
        local = [i - rows.start for i in redo_rows if rows.start <= i < rows.stop]
        if local:  # their tail term, left out of coef.outside: exp(x/T - lse_out) directly
            local = torch.tensor(local, dtype=torch.long, device=g.device)
            term = outside_term(x[local], ids[local], kept.lse_out[rows][local], spec.temperature)
            g.index_add_(0, local, term.mul_(coef.tail[rows][local]))
        emit(rows, g)
