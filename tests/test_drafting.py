"""The student as the teacher's draft model: acceptance and speed of transformers' assisted generation."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.drafting import draft_figures

VOCAB = 97


def _tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger weights: peaked distributions, so the draft's confidence stop rarely cuts in
        model.lm_head.weight.mul_(40)
    return model


@pytest.fixture(scope="module")
def teacher():
    return _tiny_llama(0)


def _prompts(count: int = 3, length: int = 5) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (1, length), generator=generator) for _ in range(count)]


def test_the_teacher_as_its_own_draft_has_every_proposal_accepted(teacher):
    figures = draft_figures(teacher, {"self": copy.deepcopy(teacher)}, _prompts(), max_new_tokens=12, pad_token_id=0)
    own = figures["drafts"]["self"]
    assert figures["new_tokens"] == 3 * 12
    assert own["proposed"] > 0
    assert own["accepted"] == own["proposed"]
    assert own["acceptance_rate"] == 1.0
    assert own["same_output"] == 1.0
    assert own["teacher_forwards"] < figures["new_tokens"]  # fewer teacher forwards than tokens: drafts did work
    assert figures["teacher_tokens_per_s"] > 0 and own["tokens_per_s"] > 0


def test_a_draft_that_is_always_wrong_has_nothing_accepted_and_the_output_is_still_the_teachers(teacher):
    wrong = copy.deepcopy(teacher)
    with torch.no_grad():  # draft logit of id j = teacher logit of id j-1: its argmax is always the teacher's + 1
        wrong.lm_head.weight.copy_(torch.roll(teacher.lm_head.weight, shifts=1, dims=0))
    figures = draft_figures(teacher, {"wrong": wrong}, _prompts(), max_new_tokens=10, pad_token_id=0)
    drafted = figures["drafts"]["wrong"]
    assert drafted["proposed"] > 0
    assert drafted["accepted"] == 0 and drafted["acceptance_rate"] == 0.0
    assert drafted["teacher_forwards"] == figures["new_tokens"]  # one teacher forward per token, as alone
    assert drafted["same_output"] == 1.0


def test_a_better_draft_is_accepted_more_often(teacher):
    close = copy.deepcopy(teacher)
    other = _tiny_llama(5)
    with torch.no_grad():
        for p in close.parameters():
            p.add_(0.02 * torch.randn_like(p) * p.std())
    figures = draft_figures(teacher, {"close": close, "other": other}, _prompts(4), max_new_tokens=12, pad_token_id=0)
    rates = {label: d["acceptance_rate"] for label, d in figures["drafts"].items()}
    assert rates["close"] > rates["other"]
    assert all(d["same_output"] == 1.0 for d in figures["drafts"].values())


def test_no_prompts_gives_no_figures(teacher):
    assert draft_figures(teacher, {"self": teacher}, [], max_new_tokens=4)["drafts"] == {}
