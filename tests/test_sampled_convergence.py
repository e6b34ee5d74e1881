"""The sampled cache (pipeline.cache.sampled_targets): the cross-entropy estimate built from its counts,
-sum_s (count_s / N) log q(id_s), converges to the exact H(p, q) as the number of draws N grows."""

from __future__ import annotations

import torch

from pipeline.cache import sampled_targets


def test_sampled_cross_entropy_estimate_converges_with_more_draws():
    torch.manual_seed(0)
    positions, vocab = 64, 500
    teacher_logprobs = torch.log_softmax(torch.randn(1, positions, vocab) * 2.0, dim=-1)  # [1, L, V]
    student_logprobs = torch.log_softmax(torch.randn(positions, vocab), dim=-1)
    exact = -(teacher_logprobs[0].exp() * student_logprobs).sum(-1)  # [L] exact H(p, q)

    def mean_abs_error(num_samples: int, seeds: range) -> float:
        errors = []
        for seed in seeds:
            sparse = sampled_targets(teacher_logprobs.clone(), num_samples, [seed])
            offsets = [0] + list(torch.tensor(sparse["num_distinct"][0]).cumsum(0).tolist())
            ids, counts = (
                torch.from_numpy(sparse["sample_ids"]).long(),
                torch.from_numpy(sparse["sample_counts"]).double(),
            )
            estimate = torch.stack(
                [
                    -(counts[a:b] / num_samples * student_logprobs[j, ids[a:b]].double()).sum()
                    for j, (a, b) in enumerate(zip(offsets[:-1], offsets[1:]))
                ]
            )
            assert torch.all(
                torch.tensor([counts[a:b].sum() for a, b in zip(offsets[:-1], offsets[1:])]) == num_samples
            )
            errors.append((estimate - exact.double()).abs().mean().item())
        return sum(errors) / len(errors)

    error_10, error_100, error_250 = (mean_abs_error(n, range(8)) for n in (10, 100, 250))
    # Monte Carlo error shrinks like 1/sqrt(N): sqrt(10/100) = 0.32 and sqrt(100/250) = 0.63 (measured 0.33, 0.64).
    assert error_100 < error_10 * 0.45
    assert error_250 < error_100 * 0.8
    assert error_250 < 0.02 * exact.mean().item()  # 250 draws: within 2% of H(p, q) on average (measured 0.7%)
