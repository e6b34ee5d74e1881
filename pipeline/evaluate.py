"""The one evaluator: models on held-out rows -> perplexity, KL to the teacher (exact and as the cache estimates
it), top-1 agreement. Training (every --eval-every steps), finetune-teacher, compare, export and bench all
call `evaluate`.

Rows are what the pipeline's datasets yield: `tokens` [L+1] (TokenRows), plus the cached teacher targets of the
row (CacheRows over a val cache). Per position j of a row the model reads tokens 0..j and is scored on
token j+1, in float32 whatever dtype the model computes in:

    val_ce         mean of -log q(label), q = softmax(logits)                     (val_ppl = exp(val_ce))
    val_bits_per_byte  sum of -log q(label) / the bytes of the text the labels spell / ln 2 (given `text_bytes`):
                   a unit that does not depend on the tokenizer
    kl_exact       mean of KL(p_T || q_T) over the full vocabulary, p the reference model's distribution
    kl_to_teacher  the same as the cache estimates it (the estimator training uses; rows with targets only)
    top1_agreement share of positions where argmax q = argmax p

Models may have output heads of different widths around one tokenizer (padded embeddings): p is the reference's
distribution over the tokenizer's ids (`vocab_size`; its padding columns left out and the rest renormalised, as the
sampled cache stores it), q each model's own softmax over all its columns (the distribution it samples from), so
mass a model puts on padding columns counts against it in kl_exact (the reference's own row included) and an argmax
on a padding column is a disagreement.

Each model runs once per batch; the reference (usually "teacher") runs first.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.batches import AlignedCacheRows, collate_rows
from pipeline.losses import sampled_divergence, teacher_targets, topk_divergence


def cache_kl(logits: torch.Tensor, targets: Mapping, temperature: float) -> torch.Tensor:
    """KL(teacher_T || model_T) as the cached targets estimate it, mean over positions; logits [N, V]."""
    if "topk_ids" in targets:
        return topk_divergence(
            logits, targets["topk_ids"], targets["topk_logprobs"], targets["tail_logprob"], temperature=temperature
        )
    return sampled_divergence(
        logits,
        targets["sample_ids"],
        targets["sample_counts"],
        targets["num_samples"],
        targets["teacher_entropy"],
        temperature=temperature,
    )


@torch.no_grad()
def evaluate(
    models: Mapping[str, torch.nn.Module],
    rows,
    *,
    count: int = 0,
    batch_size: int = 4,
    reference: str | None = None,
    temperature: float = 1.0,
    num_samples: int = 0,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    keep_label_logprobs: bool = False,
    desc: str | None = None,
    vocab_size: int | None = None,
    text_bytes: int | None = None,
) -> dict[str, dict]:
    """{label: figures} of each model over the first `count` rows (0: all), `batch_size` rows per forward.

    rows: a sequence of row dicts (TokenRows, CacheRows). reference: the label of the model the others are
    compared with (kl_exact and top1_agreement, at `temperature`); rows with cached targets also give
    kl_to_teacher (num_samples: the sampled cache's draws per position). autocast: a context factory the
    forwards run under (training passes the accelerator's). keep_label_logprobs: also return each model's
    log q(label) per position, [count, L] float64 on the CPU ("label_logprobs"; computed in float32).
    Every model must sit on the same device; each is put in eval mode and given back in its former mode.
    vocab_size: the tokenizer's length, the ids p lives on (None: the reference's full width). text_bytes: the UTF-8
    bytes of the text the labels of the `count` rows spell (rows.label_text_bytes): adds val_bits_per_byte.
    """
    count = len(rows) if count == 0 else min(count, len(rows))
    order = sorted(models, key=lambda label: label != reference)  # the reference first
    was_training = {label: models[label].training for label in order}
    for model in models.values():
        model.eval()
    device = next(models[order[0]].parameters()).device
    sums = {label: {"ce": 0.0, "kl_cache": 0.0, "kl_exact": 0.0, "agree": 0} for label in order}
    label_logprobs = {label: [] for label in order}
    positions, has_targets = 0, False
    starts = range(0, count, batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=desc is None):
        batch = collate_rows([rows[i] for i in range(start, min(count, start + batch_size))])
        tokens = batch["tokens"].to(device)
        labels = tokens[:, 1:].reshape(-1)
        n = labels.numel()
        targets = teacher_targets(batch, num_samples)
        if targets is not None:
            has_targets = True
            targets = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in targets.items()}
        reference_logp = reference_p = reference_argmax = None
        for label in order:
            with autocast() if autocast else contextlib.nullcontext():
                logits = models[label](input_ids=tokens[:, :-1]).logits
            flat = logits.float().reshape(n, -1)  # [N, V]
            logp = torch.log_softmax(flat, dim=-1)
            label_logp = logp.gather(1, labels[:, None]).squeeze(1)
            figures = sums[label]
            figures["ce"] -= float(label_logp.double().sum())
            if keep_label_logprobs:
                label_logprobs[label].append(label_logp.view(tokens.shape[0], -1).double().cpu())
            if targets is not None:
                figures["kl_cache"] += cache_kl(flat, targets, temperature).item() * n
            if reference is not None:
                logp_t = logp if temperature == 1.0 else torch.log_softmax(flat / temperature, dim=-1)
                argmax = flat.argmax(-1)
                if label == reference:
                    ids = min(vocab_size or flat.shape[1], flat.shape[1])
                    if ids == flat.shape[1]:  # no padding columns: p is the reference's softmax as it is
                        reference_logp, reference_argmax = logp_t, argmax
                    else:  # [N, ids]: renormalised over the tokenizer's ids
                        reference_logp = torch.log_softmax(flat[:, :ids] / temperature, dim=-1)
                        reference_argmax = flat[:, :ids].argmax(-1)
                    reference_p = reference_logp.exp()
                figures["kl_exact"] += float((reference_p * (reference_logp - logp_t[:, :ids])).sum())
                figures["agree"] += int((argmax == reference_argmax).sum())
        positions += n
    for label, training in was_training.items():
        models[label].train(training)

    results = {}
    for label, figures in sums.items():
        ce = figures["ce"] / max(positions, 1)
        result = {"val_ce": ce, "val_ppl": math.exp(min(ce, 50.0)), "positions": positions}
        if text_bytes:
            result["val_bits_per_byte"] = figures["ce"] / text_bytes / math.log(2)
        if reference is not None:
            result["kl_exact"] = figures["kl_exact"] / max(positions, 1)
            result["top1_agreement"] = figures["agree"] / max(positions, 1)
        if has_targets:
            result["kl_to_teacher"] = figures["kl_cache"] / max(positions, 1)
        if keep_label_logprobs:
            result["label_logprobs"] = torch.cat(label_logprobs[label]) if label_logprobs[label] else torch.zeros(0)
        results[label] = result
    return results


@torch.no_grad()
def aligned_figures(
    teacher: torch.nn.Module,
    models: Mapping[str, torch.nn.Module],
    rows,
    teacher_positions: Callable[[int], torch.Tensor],
    teacher_row: Callable[[int], torch.Tensor],
    teacher_seq_len: int,
    id_map: torch.Tensor,
    *,
    count: int,
    batch_size: int = 4,
    temperature: float = 1.0,
    chunk: int = 256,
) -> dict[str, dict]:
    """KL(teacher_T || model_T) and top-1 agreement of models with another tokenizer than the teacher's, at the
    positions where the two tokenizations align, and their coverage (aligned positions / positions).

    rows: the models' own val rows (TokenRows); teacher_positions(i): [L] the teacher position aligned with each
    position of row i (-1: none; AlignedCacheRows.teacher_positions_of); teacher_row(r): the teacher's row r of tokens
    [L_t + 1]. At an aligned position the teacher's full distribution (its row recomputed) is carried to the model's
    vocabulary through id_map (teacher id -> model id, -1: dropped, the rest renormalised), as the training targets
    are; p is that distribution, q the model's softmax over all its columns."""
    count = len(rows) if count == 0 else min(count, len(rows))
    device = next(teacher.parameters()).device
    labels = list(models)
    sums = {label: {"kl": 0.0, "agree": 0} for label in labels}
    aligned_count = positions = 0
    kept = id_map >= 0
    teacher_ids, model_ids = torch.nonzero(kept).squeeze(1).to(device), id_map[kept].to(device)
    for start in range(0, count, batch_size):
        indices = range(start, min(count, start + batch_size))
        batch = collate_rows([rows[i] for i in indices])
        tokens = batch["tokens"].to(device)
        aligned = torch.stack([torch.as_tensor(teacher_positions(i)) for i in indices]).to(device)  # [B, L]
        positions += aligned.numel()
        where = aligned >= 0
        aligned_count += int(where.sum())
        if not where.any():
            continue
        wanted = aligned[where]  # [n] teacher positions
        teacher_rows, columns = wanted // teacher_seq_len, wanted % teacher_seq_len
        unique_rows, row_of = torch.unique(teacher_rows, return_inverse=True)
        teacher_tokens = torch.stack([torch.as_tensor(teacher_row(int(r))) for r in unique_rows]).to(device)
        teacher_logits = teacher(input_ids=teacher_tokens[:, :-1]).logits.float()  # [R, L_t, V_t]
        model_logits = {label: models[label](input_ids=tokens[:, :-1]).logits.float()[where] for label in labels}
        for part in range(0, len(wanted), chunk):
            sl = slice(part, part + chunk)
            p_teacher = torch.softmax(teacher_logits[row_of[sl], columns[sl]] / temperature, dim=-1)
            p = torch.zeros(p_teacher.shape[0], model_logits[labels[0]].shape[1], device=device)
            p.index_add_(1, model_ids, p_teacher[:, teacher_ids])
            p = p / p.sum(1, keepdim=True).clamp_min(1e-30)
            for label in labels:
                logits = model_logits[label][sl]
                logq = torch.log_softmax(logits / temperature, dim=-1)
                sums[label]["kl"] += float((torch.xlogy(p, p) - p * logq[:, : p.shape[1]]).sum())
                sums[label]["agree"] += int((logits.argmax(-1) == p.argmax(-1)).sum())
    return {
        label: {
            "kl_exact": sums[label]["kl"] / max(aligned_count, 1),
            "top1_agreement": sums[label]["agree"] / max(aligned_count, 1),
            "coverage": aligned_count / max(positions, 1),
            "aligned_positions": aligned_count,
        }
        for label in labels
    }


def evaluate_across_tokenizers(
    teacher: torch.nn.Module,
    students: Mapping[str, torch.nn.Module],
    student_dir: str,
    data_dir: str,
    val_cache,
    maps,
    *,
    count: int,
    batch_size: int = 4,
    temperature: float = 1.0,
) -> dict:
    """Students with another tokenizer than the teacher's (their rows in student_dir), on their own val rows over the
    text of the teacher's first `count` val cache rows: perplexity (of their tokens) and bits per byte
    (`evaluate`); KL, agreement and coverage at the positions aligned with the teacher's (`aligned_figures`; maps:
    alignment.TokenizerMaps, whose id_map sends teacher ids to student ids). Returns {"models": {label: figures},
    "student_rows": n, "student_positions": n * L}."""
    seq_len = val_cache.seq_len
    rows = AlignedCacheRows(student_dir, data_dir, val_cache, maps)
    student_count = rows.rows_within(count)  # the student rows over the text of the teacher's `count` rows
    models = evaluate(
        students,
        rows.token_rows,
        count=student_count,
        batch_size=batch_size,
        desc="eval",
        text_bytes=rows.label_text_bytes(student_count),
    )
    aligned = aligned_figures(
        teacher,
        students,
        rows.token_rows,
        rows.teacher_positions_of,
        val_cache.tokens,
        seq_len,
        torch.from_numpy(np.asarray(maps.id_map)),
        count=student_count,
        batch_size=batch_size,
        temperature=temperature,
    )
    for label in models:
        models[label].update(aligned[label])
    return {"models": models, "student_rows": student_count, "student_positions": student_count * seq_len}
