"""distillation_loss: the training loss on the student's logits [N,V], a chunk of rows at a time (ChunkedLoss)."""

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


class ChunkedLoss(torch.autograd.Function):
    """(sum of CE, sum of KD, sum of CE_rest) over the masked-in rows of logits [N,V], a chunk of rows at a time
    (CE_rest: the CE of the rows without a teacher target).

    Forward (loss_forward): per chunk, chunk_stats makes [chunk,1] and [chunk,K] statistics without a graph.
    Then, for all rows at once, the divergence goes through autograd on those small tensors only, and its
    gradients with respect to them are kept, [N] and [N,K] in all. Rows whose student tail is tiny
    (see tiny_tail) get lse_out summed again around their own maximum first (one host sync).
    Backward (loss_backward): per chunk, the gradient with respect to the logits is assembled from them,
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
    def forward(ctx, logits, inputs: PreparedInputs):
        n, dtype = logits.shape[0], compute_dtype(logits.dtype)
        ce_sum, kd_sum, rest_sum, kept, redo_rows = loss_forward(
            logits.__getitem__, n, dtype, logits.device, inputs, WorkBuffers()
        )
        ctx.inputs, ctx.redo_rows = inputs, redo_rows
        ctx.save_for_backward(logits, *kept)
        return ce_sum, kd_sum, rest_sum

    @staticmethod
    def backward(ctx, grad_ce, grad_kd, grad_rest):
        logits, *kept = ctx.saved_tensors
        n = logits.shape[0]
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        done = 0
        for rows in ctx.inputs.chunks:  # rows of chunks with nothing masked in get 0
            grad[done : rows.start].zero_()
            done = min(rows.stop, n)
        grad[done:].zero_()
        in_place = logits.dtype == compute_dtype(logits.dtype)  # float32 logits: g is written into grad directly

        def emit(rows, g):
            if not in_place:
                grad[rows] = g

        out_of = grad.__getitem__ if in_place else None
        kept = BackwardInputs(*kept)
        loss_backward(
            logits.__getitem__,
            out_of,
            emit,
            ctx.inputs,
            kept,
            ctx.redo_rows,
            (grad_ce, grad_kd, grad_rest),
            WorkBuffers(),
        )
        return grad, None


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
    sample_ids/sample_counts/teacher_entropy ([N,S], [N,S], [N]) plus num_samples (int), and optionally
    teacher_mask [N] bool, the positions that have a teacher target (cross-tokenizer distillation): CE is the mean
    over mask, KD the sum over mask & teacher_mask divided by the same count (0 where none), and the positions
    without a target take the soft loss's share as hard loss: total = alpha CE + (1 - alpha) (T^2 KD + CE_rest)
    (chunked.loss_parts); the other rows' targets reach no arithmetic.
    CE is at temperature 1; KD is topk_divergence / sampled_divergence at `temperature`, and T^2
    keeps its gradient on the scale of the CE's (Hinton et al. 2015).

    Memory and time: rows go through in chunks of chunk_size (see ChunkedLoss), so besides the
    logits and their gradient at most two float32 [chunk_size,V] temporaries exist at once (one at
    T = 1; none in the backward of float32 logits at T = 1). At T = 1 each chunk takes one exp pass
    forward and one backward, as CE alone does. Sums are divided by the masked-in count at the end,
    so the result equals the unchunked mean. Chunks with no masked-in row are skipped.
    """
    vocab = student_logits.shape[-1]
    logits = student_logits.reshape(-1, vocab)
    n, device, dtype = logits.shape[0], logits.device, compute_dtype(logits.dtype)
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
    return loss_parts(*ChunkedLoss.apply(logits, inputs), inputs)
