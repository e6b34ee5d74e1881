"""fused_distillation_loss: the training loss with the student's output head inside it (FusedHeadLoss), so that
its [N,V] logits never exist: each chunk's logits are made from the final hidden states, run through the chunked
machinery (chunked.py) and freed, and the gradients go to the hidden states and the head (HeadGrads)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pipeline.buffers import WorkBuffers
from pipeline.losses.chunked import (
    BackwardInputs,
    PreparedInputs,
    loss_backward,
    loss_forward,
    loss_parts,
    prepare_inputs,
)
from pipeline.losses.divergences import LossParts, compute_dtype

# WorkBuffers keys: the chunk's logits, in the logits' dtype; the chunk's gradient cast to the logits' dtype, as the
# head's backward sees it; the head's weight in the logits' dtype, and its gradient summed over chunks in that dtype
# (these two only where the logits' dtype is not the weight's own)
HEAD_LOGITS, GRAD_CAST, HEAD_WEIGHT, HEAD_WEIGHT_GRAD = "head_logits", "grad_cast", "head_weight", "head_weight_grad"


class FusedHeadLoss(torch.autograd.Function):
    """ChunkedLoss with the student's output head inside: (sum of CE, sum of KD) from the final hidden states
    hidden [N,H] and the head's weight [V,H] (and bias [V]), logits = hidden @ weight.T + bias made one chunk at a
    time in `logits_dtype` (the dtype the head gives under autocast) and freed with the chunk. No [N,V] tensor ever
    exists. The gradients are
        d hidden[rows] = g @ weight,   d weight = sum over chunks of g.T @ hidden[rows],   d bias = sum of g
    with g the chunk's d loss / d logits, cast to logits_dtype as the head's own backward would see it.

    The divergence is a sum over rows, so a chunk's statistics, its part of the KD and its gradients need no other
    chunk: with `eager` (the spec's weights (a_ce, a_kd, a_rest) of the three sums in the loss that will be
    differentiated, alpha, (1 - alpha) T^2 and 1 - alpha; 1, 0 and 0 for CE alone), the forward runs loss_forward
    and loss_backward chunk by chunk while the chunk's logits exist, and keeps the [N,H] / [V,H] gradients: three
    head matmuls per chunk, as the unfused head takes, and no second pass. The backward scales them by the upstream
    gradient when it is (a_ce, a_kd, a_rest) times a number (it is for LossParts.total and for any multiple of it,
    e.g. under gradient accumulation); otherwise (a backward of one part alone, or a second backward) it makes every
    chunk's logits again from the kept statistics and computes the gradients for that upstream. The head's gradients
    are summed over chunks as HeadGrads says, then cast to the parameters' dtype."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, logits_dtype, eager: bool, inputs: PreparedInputs, buffers: WorkBuffers):
        dtype = compute_dtype(logits_dtype)
        w = weight
        if weight.dtype != logits_dtype:  # the cast .to() makes, into a kept buffer
            w = buffers.take(HEAD_WEIGHT, weight.shape, logits_dtype, weight.device).copy_(weight)
        logits_of = head_logits(hidden, w, bias, logits_dtype, buffers)
        grads = HeadGrads(hidden, w, bias, logits_dtype, weight.dtype, buffers) if eager else None
        ce_sum = kd_sum = rest_sum = torch.zeros((), dtype=dtype, device=hidden.device)
        kept_by_chunk, redo_by_chunk = [], []
        for rows in inputs.chunks:
            x = logits_of(rows)  # [chunk,V], the only vocabulary-sized tensors are this chunk's
            chunk = inputs.rows(rows)
            ce, kd, rest, kept, redo_rows = loss_forward(x.__getitem__, x.shape[0], dtype, x.device, chunk, buffers)
            ce_sum, kd_sum, rest_sum = ce_sum + ce, kd_sum + kd, rest_sum + rest
            kept_by_chunk += kept
            redo_by_chunk.append(redo_rows)
            if eager:
                emit = grads.for_chunk(rows)
                loss_backward(x.__getitem__, None, emit, chunk, kept, redo_rows, inputs.spec.weights, buffers)
            del x
        ctx.inputs, ctx.redo_by_chunk, ctx.logits_dtype = inputs, redo_by_chunk, logits_dtype
        # Not saved for backward: the backward scales them in place and hands them on, once.
        ctx.eager_grads = grads.result(weight, bias) if eager else None
        ctx.save_for_backward(hidden, weight, bias, *kept_by_chunk)
        return ce_sum, kd_sum, rest_sum

    @staticmethod
    def backward(ctx, grad_ce, grad_kd, grad_rest):
        hidden, weight, bias, *kept_by_chunk = ctx.saved_tensors
        eager_grads, ctx.eager_grads = ctx.eager_grads, None  # a second backward (retain_graph) recomputes
        nones = (None,) * 4  # logits_dtype, eager, inputs, buffers
        if eager_grads is not None:
            scale = upstream_scale(ctx.inputs.spec.weights, (grad_ce, grad_kd, grad_rest))
            if scale is not None:  # the kept gradients, scaled in place by the upstream's multiple of (a_ce, a_kd)
                return tuple(None if g is None else g.mul_(scale.to(g.dtype)) for g in eager_grads) + nones
        dtype, width = ctx.logits_dtype, len(BackwardInputs._fields)
        w, buffers = weight.to(dtype), WorkBuffers()
        logits_of = head_logits(hidden, w, bias, dtype, buffers)
        grads = HeadGrads(hidden, w, bias, dtype, weight.dtype, buffers)
        for i, rows in enumerate(ctx.inputs.chunks):
            x = logits_of(rows)
            kept = BackwardInputs(*kept_by_chunk[i * width : (i + 1) * width])
            chunk, redo_rows = ctx.inputs.rows(rows), ctx.redo_by_chunk[i]
            loss_backward(
                x.__getitem__,
                None,
                grads.for_chunk(rows),
                chunk,
                kept,
                redo_rows,
                (grad_ce, grad_kd, grad_rest),
                buffers,
            )
        return grads.result(weight, bias) + nones


def upstream_scale(weights: tuple[float, ...], upstream: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """s where upstream = s weights (the loss's (a_ce, a_kd, a_rest) and the gradients reaching its three sums);
    None when there is no such s. One host sync."""
    first = next(i for i, a in enumerate(weights) if a != 0)  # a_ce, or a_kd when alpha is 0
    scale = upstream[first] / weights[first]
    expected = torch.stack([scale * a for a in weights])
    same = torch.allclose(torch.stack(list(upstream)).to(expected.dtype), expected, rtol=1e-6, atol=0.0)
    return scale if same else None


class HeadGrads:
    """The head's gradients summed over chunks, from each chunk's g = d loss / d logits [chunk,V]: d hidden [N,H]
    (hidden's dtype), d weight [V,H] summed in the logits' dtype by the matmul itself (addmm_: no [V,H] temporary
    and no extra pass per chunk; in bf16 that rounds once per chunk rather than once, which measured 0.35% relative
    error against 0.17% for one bf16 matmul over the whole batch at 8 chunks of 130 x 128,256), d bias [V] in
    float32 (float64 for float64)."""

    def __init__(self, hidden, w, bias, dtype, weight_dtype, buffers: WorkBuffers):
        self.h, self.w, self.dtype, self.buffers = hidden.to(dtype), w, dtype, buffers
        self.hidden = torch.zeros_like(hidden)  # rows of chunks with nothing masked in get 0
        if dtype == weight_dtype:  # handed on as the gradient itself: a tensor of its own
            self.weight = torch.zeros(w.shape, dtype=dtype, device=w.device)
        else:  # handed on cast to weight_dtype: a kept buffer will do
            self.weight = buffers.take(HEAD_WEIGHT_GRAD, w.shape, dtype, w.device).zero_()
        acc = compute_dtype(dtype)
        self.bias = None if bias is None else torch.zeros(w.shape[0], dtype=acc, device=w.device)

    def for_chunk(self, rows: slice):
        """loss_backward's emit for the chunk of `rows` (its g comes with the chunk's own rows)."""
        return lambda _chunk_rows, g: self.add(rows, g)

    def add(self, rows: slice, g: torch.Tensor) -> None:
        """Add the gradients of the chunk of `rows`, from its g [chunk,V]."""
        if g.dtype != self.dtype:  # what the head's backward receives on the unfused path
            g = self.buffers.take(GRAD_CAST, g.shape, self.dtype, g.device).copy_(g)
        self.hidden[rows] = g @ self.w
        self.weight.addmm_(g.T, self.h[rows])
        if self.bias is not None:
            self.bias.add_(g.sum(0))

    def result(self, weight, bias) -> tuple:
        return self.hidden, self.weight.to(weight.dtype), None if bias is None else self.bias.to(bias.dtype)


def head_logits(hidden, weight, bias, dtype, buffers: WorkBuffers):
    """rows -> logits of those rows, hidden[rows] @ weight.T (+ bias), in dtype (as an autocast Linear), in a buffer
    that the next call overwrites."""
    weight = weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)

    def logits_of(rows):
        h = hidden[rows].to(dtype)
        x = torch.mm(h, weight.T, out=buffers.take(HEAD_LOGITS, (h.shape[0], weight.shape[0]), dtype, h.device))
        return x if bias is None else x.add_(bias)

    return logits_of


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
    buffers: WorkBuffers | None = None,
) -> LossParts:
    """distillation_loss of logits = hidden @ head_weight.T + head_bias, with the output head inside the loss: the
    logits exist one chunk of chunk_size rows at a time, in the forward and again in the backward
    (FusedHeadLoss), so no [N,V] tensor is ever made or kept, and the gradients go to hidden and the head.

    hidden [..., H] the student's final hidden states (what its output head takes); head_weight [V,H], head_bias
    [V] or None; logits_dtype the dtype the head's logits have on the unfused path (bf16 under bf16 autocast; None:
    hidden's dtype); buffers: the chunks' work buffers, to keep from one call to the next (StepLoss does: fresh
    [chunk,V] pages every step cost page faults, as many as the allocator's state makes them; None: this call's
    own). Everything else as distillation_loss, and the result equals it on those logits.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    logits_dtype = logits_dtype or hidden.dtype
    n, device, dtype = hidden.shape[0], hidden.device, compute_dtype(logits_dtype)
    inputs = prepare_inputs(
        n,
        dtype,
        device,
        labels,
        mask,
        targets,
        alpha=alpha,
        temperature=temperature,
        kd_loss=kd_loss,
        jsd_beta=jsd_beta,
        topk_renormalize=topk_renormalize,
        chunk_size=chunk_size,
    )
    # the gradients in the forward when a backward will follow (see FusedHeadLoss), for total's weights
    eager = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, head_weight, head_bias))
    buffers = WorkBuffers() if buffers is None else buffers
    sums = FusedHeadLoss.apply(hidden, head_weight, head_bias, logits_dtype, eager, inputs, buffers)
    return loss_parts(*sums, inputs)
