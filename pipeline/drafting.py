"""A student as the teacher's draft model: transformers' assisted generation, timed and counted.

Assisted (speculative) greedy decoding: the draft proposes a few tokens, the teacher checks them in one forward and
keeps the longest prefix that matches its own greedy choice, plus one token of its own. The output is the teacher's
greedy output whatever the draft proposes; the draft only changes how many teacher forwards it takes.

    acceptance_rate = accepted draft tokens / proposed draft tokens
    speedup         = assisted teacher tokens/s / teacher-alone tokens/s

A teacher whose output head is wider than its tokenizer (padded rows) and a draft of another width share one
tokenizer, but transformers tells them apart by their vocabulary sizes alone and then asks for universal assisted
decoding (the draft's text re-tokenized for the teacher): it is given the one tokenizer on both sides, and the
figures say so ("universal": true).

Counting: every teacher forward of an assisted `generate` is one verification round that adds (accepted + 1) tokens,
so accepted = new tokens - rounds; proposed is what the draft's own `generate` calls returned. Both are counted
around the models (a forward pre-hook on the teacher, a wrapper on the draft's `generate`), not read from
transformers' internals.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def _counted_forwards(model: torch.nn.Module) -> Iterator[list[int]]:
    """[count] of the model's forward calls while inside."""
    calls = [0]

    def count(_module, _args):
        calls[0] += 1

    handle = model.register_forward_pre_hook(count)
    try:
        yield calls
    finally:
        handle.remove()


@contextlib.contextmanager
def _counted_proposals(draft: torch.nn.Module) -> Iterator[list[int]]:
    """[tokens] the draft's `generate` calls proposed while inside (new tokens past each call's input)."""
    proposed = [0]
    original = draft.generate

    def generate(*args, **kwargs):
        output = original(*args, **kwargs)
        sequences = output if torch.is_tensor(output) else output.sequences
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        proposed[0] += sequences.shape[1] - input_ids.shape[1]
        return output

    draft.generate = generate  # an instance attribute: the assisted decoder calls draft.generate
    try:
        yield proposed
    finally:
        del draft.generate


def _greedy_kwargs(max_new_tokens: int, pad_token_id: int | None) -> dict:
    # min_new_tokens: every prompt gets exactly max_new_tokens, alone and assisted (EOS suppressed until then)
    return {
        "do_sample": False,
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": max_new_tokens,
        "pad_token_id": pad_token_id,
    }


@torch.inference_mode()
def draft_figures(
    teacher: torch.nn.Module,
    drafts: dict[str, torch.nn.Module],
    prompt_ids: list[torch.Tensor],
    max_new_tokens: int,
    pad_token_id: int | None = None,
    tokenizer=None,
) -> dict:
    """Teacher greedy generation alone and with each draft as its assistant, over `prompt_ids` ([1, n] each).

    Returns {"teacher_tokens_per_s", "new_tokens", "drafts": {label: {"tokens_per_s", "speedup", "proposed",
    "accepted", "acceptance_rate", "teacher_forwards", "same_output"}}}. same_output: the share of prompts whose
    assisted output equals the teacher's own (1.0 up to float ties; greedy assisted decoding is exact).
    Every model must sit on the teacher's device; the first prompt is run once before timing as a warm-up.
    tokenizer: the one tokenizer of teacher and drafts, needed only where their vocabulary sizes differ.
    """
    kwargs = _greedy_kwargs(max_new_tokens, pad_token_id)
    if not prompt_ids:
        return {"teacher_tokens_per_s": None, "new_tokens": 0, "drafts": {}}
    warm_up = {**kwargs, "max_new_tokens": 4, "min_new_tokens": 4}

    def run(prompts_in_order, **extra) -> tuple[list[torch.Tensor], float]:
        outputs, elapsed = [], 0.0
        for ids in prompts_in_order:
            start = time.perf_counter()
            out = teacher.generate(ids, attention_mask=torch.ones_like(ids), **kwargs, **extra)
            elapsed += time.perf_counter() - start
            outputs.append(out[0, ids.shape[1] :])
        return outputs, elapsed

    teacher.generate(prompt_ids[0], attention_mask=torch.ones_like(prompt_ids[0]), **warm_up)
    alone, alone_s = run(prompt_ids)
    new_tokens = sum(len(o) for o in alone)
    figures = {"teacher_tokens_per_s": new_tokens / max(alone_s, 1e-9), "new_tokens": new_tokens, "drafts": {}}
    for label, draft in drafts.items():
        draft.generation_config.num_assistant_tokens_schedule = "constant"  # the same draft length in every run
        universal = draft.config.get_text_config().vocab_size != teacher.config.get_text_config().vocab_size
        if universal and tokenizer is None:
            raise ValueError(f"draft {label!r} has another vocabulary size than the teacher: pass their tokenizer")
        assist = {"assistant_model": draft}
        if universal:
            assist.update(tokenizer=tokenizer, assistant_tokenizer=tokenizer)
        teacher.generate(prompt_ids[0], attention_mask=torch.ones_like(prompt_ids[0]), **assist, **warm_up)
        with _counted_forwards(teacher) as forwards, _counted_proposals(draft) as proposed:
            assisted, assisted_s = run(prompt_ids, **assist)
        assisted_tokens = sum(len(o) for o in assisted)
        accepted = assisted_tokens - forwards[0]
        tokens_per_s = assisted_tokens / max(assisted_s, 1e-9)
        figures["drafts"][label] = {
            "tokens_per_s": tokens_per_s,
            "speedup": tokens_per_s / figures["teacher_tokens_per_s"],
            "proposed": proposed[0],
            "accepted": accepted,
            "acceptance_rate": accepted / proposed[0] if proposed[0] else None,
            "teacher_forwards": forwards[0],
            "same_output": sum(torch.equal(a, b) for a, b in zip(assisted, alone)) / len(alone),
            "universal": universal,
        }
    return figures
