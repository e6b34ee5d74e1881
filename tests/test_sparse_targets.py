"""Chunked extraction of the cache's targets (pipeline/sparse_targets.py, cache.TeacherRunner): the fast
paths give what the direct float64 computation over the full vocabulary gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.cache import TeacherRunner, row_seed, sampled_targets
from pipeline.config import CacheConfig
from pipeline.models import load_causal_lm
from pipeline.sparse_targets import BLOCK, _topk, sampled_draws, topk_with_tail


def peaked_logits(rows: int, vocab: int, seed: int, scale: float = 4.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=generator) * scale


@pytest.mark.parametrize("vocab, k", [(4096, 1), (4096, 16), (49152 // 4, 48), (1000, 8), (4096, 40)])
def test_block_topk_equals_torch_topk(vocab, k):
    """Blockwise where vocab % BLOCK == 0 and 4 k BLOCK <= vocab (first three cases), plain topk otherwise."""
    logits = peaked_logits(37, vocab, seed=vocab + k)
    logits[0, 3 * BLOCK : 3 * BLOCK + min(k, BLOCK)] += 100.0  # row 0: the top ids crowd into one block
    logits[1] = 0.0
    logits[1, torch.arange(k) * (vocab // k)] = 5.0  # row 1: one winner per block, the rest tied at 0
    want = logits.topk(k, dim=-1)
    values, ids = _topk(logits.clone(), k)
    torch.testing.assert_close(values, want.values, rtol=0, atol=0)
    assert torch.equal(ids[2:], want.indices[2:]) and torch.equal(ids[0].sort().values, want.indices[0].sort().values)
    assert torch.equal(logits.gather(1, ids), values)  # row 1 ties: any ids holding the k largest values


def test_topk_with_tail_is_exact_in_float64():
    logits = peaked_logits(64, 4096, seed=1)
    logits[:8, 0] += 60.0  # top-K mass within ~1e-15 of 1: the tail comes from the tail ids, not 1 - top mass
    dense = torch.log_softmax(logits.double(), -1)
    values, ids, tail = topk_with_tail(logits.clone(), 16)
    torch.testing.assert_close(values.double(), dense.gather(1, ids), rtol=0, atol=2e-5)
    rest = dense.scatter(1, ids, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(tail.double(), rest, rtol=1e-5, atol=2e-5)
    assert (tail[:8] < -30).all() and tail.isfinite().all()  # 1 - top mass is 0 in float32
    # K == V: nothing is left, the tail is the stored -1e4 sentinel
    _, _, no_tail = topk_with_tail(logits[:4, :64].clone(), 64)
    assert torch.equal(no_tail, torch.full((4,), -1e4))


@pytest.mark.parametrize("vocab", [4096, 1000, 7])  # a whole number of blocks, a padded last block, less than a block
def test_sampled_draws_equal_one_inverse_cdf_over_the_vocabulary(vocab):
    logits = peaked_logits(128, vocab, seed=vocab, scale=2.0)
    uniforms = torch.rand(128, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probs = torch.softmax(logits.double(), -1)
    cdf = probs.cumsum(-1)
    want = torch.searchsorted(cdf / cdf[:, -1:], uniforms, right=True)
    draws, entropy = sampled_draws(logits.clone(), uniforms, scratch=torch.empty_like(logits))
    # Only a uniform within float32 rounding of a CDF step can land on the neighbour: none of these 6,400.
    assert torch.equal(draws, want), (draws != want).sum()
    torch.testing.assert_close(entropy.double(), -(probs * probs.log()).sum(-1), rtol=1e-5, atol=1e-5)


def test_sampled_draws_never_pick_zero_probability_ids():
    logits = torch.full((16, 300), float("-inf"))
    logits[:, [5, 77, 299]] = torch.tensor([0.0, 1.0, 2.0])
    uniforms = torch.rand(16, 200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    draws, entropy = sampled_draws(logits.clone(), uniforms)
    assert set(draws.unique().tolist()) == {5, 77, 299}
    probs = torch.softmax(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), 0)
    torch.testing.assert_close(entropy.double(), (-(probs * probs.log()).sum()).expand(16), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def teacher_model(tiny_teacher):
    return load_causal_lm(tiny_teacher)


def runner_targets(model, mode: str, rows: np.ndarray, chunk: int, fused: bool | None, temperature: float) -> dict:
    config = CacheConfig(
        data_dir="unused",
        teacher="unused",
        out_dir="unused",
        mode=mode,
        k=8,
        num_samples=20,
        temperature=temperature,
        dtype="float32",
    )
    runner = TeacherRunner(model, config, torch.device("cpu"))
    runner.head_chunk, runner.extract_chunk, runner.fused_head = chunk, max(1, chunk // 2), fused
    out = runner.targets(rows, [row_seed(0, "train", i) for i in range(len(rows))])
    return {**out, "fused_head": runner.fused_head}


@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_runner_gives_the_same_targets_whatever_the_chunking_and_head_path(mode, teacher_model):
    rows = np.random.default_rng(0).integers(0, 384, size=(3, 41))
    whole = runner_targets(teacher_model, mode, rows, chunk=10_000, fused=None, temperature=1.5)
    assert whole["fused_head"] is True  # a Llama's logits are its head on the last hidden state
    for other in (
        runner_targets(teacher_model, mode, rows, chunk=7, fused=None, temperature=1.5),
        runner_targets(teacher_model, mode, rows, chunk=7, fused=False, temperature=1.5),
    ):
        for name, array in whole.items():
            if name in ("topk_logprobs", "tail_logprob", "teacher_entropy"):
                np.testing.assert_allclose(other[name], array, rtol=1e-5, atol=1e-5)
            elif name != "fused_head":
                np.testing.assert_array_equal(other[name], array)
    with torch.no_grad():
        dense = torch.log_softmax(teacher_model(torch.from_numpy(rows[:, :-1])).logits.double() / 1.5, -1)
    if mode == "topk":
        np.testing.assert_array_equal(whole["topk_ids"], dense.topk(8, -1).indices.numpy())
        np.testing.assert_allclose(whole["topk_logprobs"], dense.topk(8, -1).values.numpy(), atol=1e-5)
    else:
        np.testing.assert_allclose(whole["teacher_entropy"], -(dense.exp() * dense).sum(-1).numpy(), atol=1e-5)
        assert whole["sample_counts"].sum() == 3 * 40 * 20


def test_a_model_whose_logits_are_not_its_head_output_is_cached_from_its_logits(teacher_model):
    """Logit soft-capping or scaling after the head (Gemma 2, Cohere) fails the probe: the full logits are used."""
    rows = np.random.default_rng(1).integers(0, 384, size=(2, 33))
    handle = teacher_model.register_forward_hook(
        lambda module, args, output: output.__setitem__("logits", 30 * torch.tanh(output.logits / 30) * 2)
    )
    try:
        out = runner_targets(teacher_model, "topk", rows, chunk=16, fused=None, temperature=1.0)
        with torch.no_grad():
            dense = torch.log_softmax(teacher_model(torch.from_numpy(rows[:, :-1])).logits.double(), -1)
    finally:
        handle.remove()
    assert out["fused_head"] is False
    np.testing.assert_array_equal(out["topk_ids"], dense.topk(8, -1).indices.numpy())
    np.testing.assert_allclose(out["topk_logprobs"], dense.topk(8, -1).values.numpy(), atol=1e-5)


# ---------------------------------------------------------------- a head padded past the tokenizer


def test_topk_with_an_id_bound_picks_tokenizer_ids_and_keeps_the_padding_mass_in_the_tail():
    """Columns from id_bound on (a padded embedding's rows) are never picked, but their mass is in the tail: the
    log-probs are normalised over every column, as the full-vocabulary softmax gives them."""
    logits = peaked_logits(40, 448, seed=5)
    logits[:, 384:] += 6.0  # padding columns with a real share of the mass
    dense = torch.log_softmax(logits.double(), -1)
    values, ids, tail = topk_with_tail(logits.clone(), 16, id_bound=384)
    want = dense[:, :384].topk(16, -1)
    assert torch.equal(ids, want.indices) and int(ids.max()) < 384
    torch.testing.assert_close(values.double(), want.values, rtol=0, atol=2e-5)
    rest = dense.scatter(1, ids, float("-inf")).logsumexp(-1)  # everything but the K ids, padding included
    torch.testing.assert_close(tail.double(), rest, rtol=1e-5, atol=2e-5)
    assert (dense[:, 384:].logsumexp(-1) < tail.double()).all() and (dense[:, 384:].logsumexp(-1) > -3).all()


@pytest.fixture(scope="module")
def padded_model(tmp_path_factory, tiny_tokenizer):
    """The tiny Llama with its embedding padded to 448 rows around the 384-token tokenizer (the padding rows as
    trained as the rest: random), untied so that the head is its own Linear."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=448,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
    )
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.eval()


def padded_runner(model, modes: tuple[str, ...], rows, chunk: int, fused: bool | None) -> dict:
    config = CacheConfig(
        data_dir="-", teacher="-", out_dir="-", mode=modes[-1], k=8, num_samples=20, temperature=1.5, dtype="float32"
    )
    runner = TeacherRunner(model, config, torch.device("cpu"), vocab_size=384)
    runner.head_chunk, runner.extract_chunk, runner.fused_head = chunk, max(1, chunk // 2), fused
    return runner.targets_by_mode(rows, [row_seed(0, "train", i) for i in range(len(rows))], modes)


def test_runner_on_a_padded_head_bounds_ids_by_the_tokenizer(padded_model):
    """topk: the tokenizer's top ids, normalised over all 448 columns; sampled: drawn from the tokenizer's 384
    columns renormalised (what cache.sampled_targets gives on those columns of the dense logits). The same whatever
    the chunking, the head path (fused or the model's logits) and whether one forward serves both modes."""
    rows = np.random.default_rng(3).integers(0, 384, size=(3, 41))
    both = padded_runner(padded_model, ("sampled", "topk"), rows, chunk=10_000, fused=None)
    for modes, chunk, fused in ((("topk",), 7, None), (("sampled",), 7, False), (("topk", "sampled"), 16, False)):
        other = padded_runner(padded_model, modes, rows, chunk=chunk, fused=fused)
        for mode in modes:
            for name, array in both[mode].items():
                if name in ("topk_logprobs", "tail_logprob", "teacher_entropy"):
                    np.testing.assert_allclose(other[mode][name], array, rtol=1e-5, atol=1e-5)
                else:
                    np.testing.assert_array_equal(other[mode][name], array)
    with torch.no_grad():
        logits = padded_model(torch.from_numpy(rows[:, :-1])).logits.double() / 1.5  # [3, 40, 448]
    dense = torch.log_softmax(logits, -1)
    want = dense[..., :384].topk(8, -1)
    np.testing.assert_array_equal(both["topk"]["topk_ids"], want.indices.numpy())
    np.testing.assert_allclose(both["topk"]["topk_logprobs"], want.values.numpy(), atol=1e-5)
    tail = dense.scatter(-1, want.indices, float("-inf")).logsumexp(-1)
    np.testing.assert_allclose(both["topk"]["tail_logprob"], tail.numpy(), rtol=1e-5, atol=1e-5)
    assert dense[..., 384:].exp().sum(-1).min() > 0.01  # the padding columns hold mass worth keeping out
    expected = sampled_targets(logits[..., :384].float().clone(), 20, [row_seed(0, "train", i) for i in range(3)])
    for name in ("sample_ids", "sample_counts", "num_distinct"):
        np.testing.assert_array_equal(both["sampled"][name], expected[name])
    np.testing.assert_allclose(both["sampled"]["teacher_entropy"], expected["teacher_entropy"], rtol=1e-4)
    assert int(both["sampled"]["sample_ids"].max()) < 384
