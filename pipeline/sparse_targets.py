"""Teacher logits -> the cache's sparse targets, one chunk of positions at a time.

Both functions take `logits` [n, V] float32 already divided by the cache temperature (any per-row
shift is fine: log-probs work as logits) and OVERWRITE it: the caller hands in its own buffer, so
top-k allocates no [n, V] temporary and sampling needs one scratch buffer of that size (passed in by
cache.TeacherRunner, which keeps it). Each touches the chunk in few passes, which is what lets the
cache stage run close to the speed of a plain teacher forward:
  - topk_with_tail: the K largest logits found inside the K blocks with the largest maxima (the top K
    always lie there), then one exp pass over everything else for the exact tail mass;
  - sampled_draws: one exp pass, block sums, and inverse-CDF sampling done in two levels (block, then
    position inside the block): the same draws as one cumulative sum over the whole vocabulary,
    without computing that sum.
"""

from __future__ import annotations

import torch

BLOCK = 64  # vocabulary ids per block of the two-level searches


def topk_with_tail(
    logits: torch.Tensor, k: int, id_bound: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [n, V] -> (log-probs [n, K] sorted high to low, ids [n, K] int64, log tail mass [n]).

    The K ids are the most likely among the first `id_bound` columns (the tokenizer's ids; None: all V), while the
    log-probs and the tail are normalised over all V columns: the mass of a padded head's columns past the tokenizer
    (ids no text can hold) lands in the tail. The tail is the log of the summed probability of the V - K other
    columns, computed from those columns (exact when the top-K mass is within 1e-7 of 1); -1e4 when there is nothing
    left (K == V)."""
    values, ids = _topk(logits if id_bound is None else logits[:, :id_bound], k)  # a view: no copy
    top_max = values[:, :1]
    top_mass = (values - top_max).exp().sum(-1)  # >= 1: the largest term is exp(0)
    logits.scatter_(-1, ids, float("-inf"))
    rest_mass = logits.sub_(top_max).exp_().sum(-1)
    log_normaliser = top_max.squeeze(1) + torch.log(top_mass + rest_mass)
    tail = torch.log(rest_mass) + top_max.squeeze(1) - log_normaliser
    return values - log_normaliser[:, None], ids, tail.nan_to_num(neginf=-1e4)


def _topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk over the last dimension, searched only inside the k blocks of BLOCK ids whose maxima
    are largest. Each of those blocks holds an id at least as large as the k-th largest block maximum,
    and every id outside them is at most that, so they contain a top k. Plain topk where it does not pay."""
    n, vocab = logits.shape
    if vocab % BLOCK or 4 * k * BLOCK > vocab:
        return logits.topk(k, dim=-1)
    # logits may be a column slice of a wider buffer (rows strided): splitting its unit-stride last dimension is a view
    blocks = logits.view(n, vocab // BLOCK, BLOCK)
    best_blocks = blocks.amax(-1).topk(k, dim=-1, sorted=False).indices  # [n, k], as a set
    candidates = blocks.gather(1, best_blocks[..., None].expand(-1, -1, BLOCK)).view(n, k * BLOCK)
    values, where = candidates.topk(k, dim=-1)
    ids = best_blocks.gather(1, where // BLOCK) * BLOCK + where % BLOCK
    return values, ids


def sampled_draws(
    logits: torch.Tensor, uniforms: torch.Tensor, scratch: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n, V], uniforms [n, N] float64 in [0, 1) -> (draws [n, N] int64, teacher entropy [n]).
    Draw s of position i is the id where the cumulative probability first exceeds uniforms[i, s]
    (inverse CDF), so the draws are a function of the uniforms alone: seeded and reproducible.
    `scratch` (same shape as logits) receives the unnormalised probabilities; allocated when None."""
    n, vocab = logits.shape
    shifted = logits.sub_(logits.amax(-1, keepdim=True))  # z - max <= 0
    mass = torch.exp(shifted, out=scratch) if scratch is not None else shifted.exp()
    # sum_v e_v (z_v - max), the product in place of the logits (not read again): one multiply-add pass. (A batched
    # [1, V] x [V, 1] matmul has no product tensor but runs several times slower on some CPUs: docs/history.md,
    # "2026-12-04: cache-logits / forward on the Xeon with a bf16 teacher".)
    product = shifted.mul_(mass)
    dot = product.sum(-1)
    if not torch.isfinite(dot).all():  # -inf logits (0 * -inf = nan): only hand-made distributions have them
        dot = product.nan_to_num_(nan=0.0).sum(-1)
    pad = -vocab % BLOCK
    blocks = torch.nn.functional.pad(mass, (0, pad)).view(n, -1, BLOCK) if pad else mass.view(n, -1, BLOCK)
    block_cdf = blocks.sum(-1).double().cumsum(-1)  # [n, G]
    total = block_cdf[:, -1:]
    entropy = torch.log(total).squeeze(1) - dot.double() / total.squeeze(1)  # -sum p log p, p = e / total

    targets = uniforms.to(block_cdf.device) * total  # [n, N] in [0, total)
    block = torch.searchsorted(block_cdf, targets, right=True).clamp_(max=block_cdf.shape[1] - 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    inside = blocks.gather(1, block[..., None].expand(-1, -1, BLOCK)).double().cumsum(-1)  # [n, N, BLOCK]
    offset = torch.searchsorted(inside, (targets - before)[..., None], right=True).squeeze(-1).clamp_(max=BLOCK - 1)
    draws = (block * BLOCK + offset).clamp_(max=vocab - 1)
    return draws, entropy.float()
