"""pipeline.losses against dense references built directly from full softmaxes."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import (
    LossParts,
    StepLoss,
    dense_kd_loss,
    distillation_loss,
    hard_ce,
    sampled_divergence,
    teacher_targets,
    topk_divergence,
)

V = 50


def _setup(n=8, v=V, k=5, temperature=1.0, seed=0, dtype=torch.float64):
    """Random student/teacher logits and a top-k cache (ids = teacher's top-k at T)."""
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, v, generator=g, dtype=torch.float64) * 2).to(dtype)
    teacher = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    logp_full = torch.log_softmax(teacher / temperature, dim=1)
    topk_logprobs, topk_ids = logp_full.topk(k, dim=1)
    kept = topk_logprobs.exp().sum(1)
    tail = torch.log1p(-kept) if k < v else torch.full((n,), float("-inf"), dtype=torch.float64)
    mask = torch.ones(n, dtype=torch.bool)
    mask[1] = mask[n - 2] = False
    labels = torch.randint(0, v, (n,), generator=g)
    return dict(
        student=student,
        teacher=teacher,
        logp_full=logp_full,
        ids=topk_ids,
        logprobs=topk_logprobs.to(dtype),
        tail=tail.to(dtype),
        mask=mask,
        labels=labels,
    )


def _buckets(full_probs, ids):
    """[n,V] probabilities -> [n,K+1]: the K ids, then everything else."""
    kept = full_probs.gather(1, ids)
    return torch.cat([kept, (full_probs.sum(1) - kept.sum(1))[:, None]], dim=1)


def _kl(p, q):
    """KL(p||q) per row, 0 log 0 = 0."""
    return F.kl_div(q.log(), p, reduction="none").sum(1)


def _dense_ref(s, kind, temperature, renormalize=False, beta=0.5):
    """Per-row reference divergence [n] on the bucketed (or renormalised) dense distributions."""
    p_full = s["logp_full"].exp()
    q_full = torch.softmax(s["student"].double() / temperature, dim=1)
    if renormalize:
        p = p_full.gather(1, s["ids"])
        q = q_full.gather(1, s["ids"])
        p, q = p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True)
    else:
        p, q = _buckets(p_full, s["ids"]), _buckets(q_full, s["ids"])
    return _divergence(p, q, kind, beta)


def _divergence(p, q, kind, beta=0.5):
    """Per-row divergence [n] between bucket probabilities p, q [n,B]."""
    if kind == "forward-kl":
        return _kl(p, q)
    if kind == "reverse-kl":
        return _kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


def _masked_mean(rows, mask):
    return rows[mask].mean()


def _topk(s, temperature, **kw):
    return topk_divergence(s["student"], s["ids"], s["logprobs"], s["tail"], s["mask"], temperature, **kw)


# ------------------------------------------------------------------------------ hard CE


def test_hard_ce_matches_cross_entropy_on_masked_positions():
    s = _setup(dtype=torch.float32)
    labels = s["labels"].clone()
    labels[~s["mask"]] = -100  # garbage where masked out must not matter
    got = hard_ce(s["student"], labels, s["mask"])
    want = F.cross_entropy(s["student"][s["mask"]], labels[s["mask"]])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------ top-k


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("kind", ["forward-kl", "reverse-kl", "jsd"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_matches_dense_bucketed_reference(temperature, kind, renormalize):
    s = _setup(temperature=temperature)
    got = _topk(s, temperature, kind=kind, renormalize=renormalize, jsd_beta=0.3)
    want = _masked_mean(_dense_ref(s, kind, temperature, renormalize, beta=0.3), s["mask"])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert got.item() > 0


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_topk_float32_matches_reference(temperature):
    s32 = _setup(temperature=temperature, dtype=torch.float32)
    s64 = dict(s32, student=s32["student"].double())
    got = _topk(s32, temperature)
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got.double(), _masked_mean(_dense_ref(s64, "forward-kl", temperature), s32["mask"]), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("tail_value", [float("-inf"), -1e4, -30.0])
@pytest.mark.parametrize("kind", ["forward-kl", "reverse-kl", "jsd"])
def test_topk_with_full_vocab_equals_full_dense_divergence(tail_value, kind):
    # K = V: the tail bucket is empty, whatever tail mass the cache reports.
    s = _setup(k=V, temperature=2.0)
    s["tail"] = torch.full_like(s["tail"], tail_value)
    student = s["student"].clone().requires_grad_(True)
    got = topk_divergence(student, s["ids"], s["logprobs"], s["tail"], s["mask"], 2.0, kind=kind)
    p = s["logp_full"].exp()
    q = torch.softmax(s["student"] / 2.0, dim=1)
    if kind == "forward-kl":
        rows = _kl(p, q)
    elif kind == "reverse-kl":
        rows = _kl(q, p)
    else:
        m = 0.5 * (p + q)
        rows = 0.5 * _kl(p, m) + 0.5 * _kl(q, m)
    torch.testing.assert_close(got, _masked_mean(rows, s["mask"]), rtol=1e-9, atol=1e-12)
    got.backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_teacher_tail_is_finite(dtype):
    # The teacher says (almost) nothing lies outside the ids; the student disagrees strongly.
    s = _setup(k=5, dtype=dtype)
    student = s["student"].clone().requires_grad_(True)
    for tail_value in (-1e4, float("-inf"), -85.0):
        for kind in ("forward-kl", "reverse-kl", "jsd"):
            tail = torch.full_like(s["tail"], tail_value)
            out = topk_divergence(student, s["ids"], s["logprobs"], tail, s["mask"], 1.0, kind=kind)
            (grad,) = torch.autograd.grad(out, student)
            assert torch.isfinite(out) and torch.isfinite(grad).all(), (tail_value, kind)


def test_student_tail_is_accurate_when_ids_hold_nearly_all_mass():
    # Student puts ~1 - 1e-12 on the stored ids: log(1 - sum q_k) in float32 would be log(0).
    n, v = 4, 20
    student = torch.full((n, v), -30.0)
    student[:, :3] = 0.0
    ids = torch.arange(3).expand(n, 3)
    # Teacher: uniform over the 3 ids with 10% tail mass.
    logprobs = torch.full((n, 3), math.log(0.3))
    tail = torch.full((n,), math.log(0.1))
    mask = torch.ones(n, dtype=torch.bool)
    got = topk_divergence(student, ids, logprobs, tail, mask, 1.0)
    q_tail = (v - 3) * math.exp(-30.0) / (3 + (v - 3) * math.exp(-30.0))
    q_k = (1 - q_tail) / 3
    want = 3 * 0.3 * math.log(0.3 / q_k) + 0.1 * math.log(0.1 / q_tail)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_identical_teacher_and_student_give_zero():
    s = _setup(temperature=1.5)
    s["student"] = s["teacher"].clone()
    for kind in ("forward-kl", "reverse-kl", "jsd"):
        for renormalize in (False, True):
            assert abs(_topk(s, 1.5, kind=kind, renormalize=renormalize).item()) < 1e-12


# ------------------------------------------------------------------------------ sampled


def _dense_kl(s, temperature):
    p = s["logp_full"].exp()
    q = torch.softmax(s["student"].double() / temperature, dim=1)
    return _kl(p, q)


def _entropy(s):
    return -(s["logp_full"].exp() * s["logp_full"]).sum(1)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_sampled_with_expected_counts_equals_dense_kl(temperature):
    s = _setup(temperature=temperature)
    n, num_samples = s["student"].shape[0], 50
    ids = torch.arange(V).expand(n, V)
    counts = s["logp_full"].exp() * num_samples  # count / N = p exactly
    got = sampled_divergence(s["student"], ids, counts, num_samples, _entropy(s), s["mask"], temperature)
    torch.testing.assert_close(got, _masked_mean(_dense_kl(s, temperature), s["mask"]), rtol=1e-9, atol=1e-12)


def _draw(logp_full, num_samples, generator):
    """num_samples draws with replacement per row -> (distinct ids, counts), padded with count 0."""
    draws = torch.multinomial(logp_full.exp(), num_samples, replacement=True, generator=generator)
    full_counts = torch.zeros_like(logp_full).scatter_add_(1, draws, torch.ones_like(draws, dtype=logp_full.dtype))
    width = int((full_counts > 0).sum(1).max())
    counts, ids = full_counts.sort(dim=1, descending=True)
    return ids[:, :width], counts[:, :width]  # zero-count tail entries are the padding


def test_sampled_estimate_is_unbiased_monte_carlo():
    temperature, num_samples, reps = 2.0, 50, 300
    s = _setup(n=4, temperature=temperature, seed=3)
    s["mask"] = torch.ones(4, dtype=torch.bool)
    g = torch.Generator().manual_seed(1234)
    entropy = _entropy(s)
    estimates = []
    for _ in range(reps):
        ids, counts = _draw(s["logp_full"], num_samples, g)
        assert (counts.sum(1) == num_samples).all()
        estimates.append(
            sampled_divergence(s["student"], ids, counts, num_samples, entropy, s["mask"], temperature).item()
        )
    est = torch.tensor(estimates, dtype=torch.float64)
    want = _dense_kl(s, temperature).mean().item()
    stderr = est.std().item() / math.sqrt(reps)
    assert stderr > 0
    assert abs(est.mean().item() - want) < 4 * stderr, (est.mean().item(), want, stderr)


def test_sampled_rejects_other_kinds():
    s = _setup()
    ids, counts = s["ids"], torch.ones(s["ids"].shape, dtype=torch.float64)
    for kind in ("reverse-kl", "jsd"):
        with pytest.raises(ValueError, match="forward-kl"):
            sampled_divergence(s["student"], ids, counts, 5, _entropy(s), s["mask"], 1.0, kind=kind)
        with pytest.raises(ValueError, match="forward-kl"):
            distillation_loss(
                s["student"],
                s["labels"],
                s["mask"],
                dict(sample_ids=ids, sample_counts=counts, num_samples=5, teacher_entropy=_entropy(s)),
                alpha=0.5,
                temperature=1.0,
                kd_loss=kind,
            )


# ------------------------------------------------------------------------------ gradcheck


def _small(k=3, n=5, v=7, temperature=1.7, seed=5):
    s = _setup(n=n, v=v, k=k, temperature=temperature, seed=seed)
    s["student"] = s["student"].detach().requires_grad_(True)
    return s


@pytest.mark.parametrize("kind", ["forward-kl", "reverse-kl", "jsd"])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("k", [3, 7])
def test_gradcheck_topk(kind, renormalize, k):
    s = _small(k=k)
    f = lambda x: topk_divergence(
        x, s["ids"], s["logprobs"], s["tail"], s["mask"], 1.7, kind=kind, jsd_beta=0.3, renormalize=renormalize
    )
    assert torch.autograd.gradcheck(f, (s["student"],))


def test_gradcheck_sampled():
    s = _small()
    g = torch.Generator().manual_seed(0)
    ids, counts = _draw(s["logp_full"], 10, g)
    f = lambda x: sampled_divergence(x, ids, counts, 10, _entropy(s), s["mask"], 1.7)
    assert torch.autograd.gradcheck(f, (s["student"],))


def _targets(s, mode, num_samples=10, seed=0):
    if mode == "topk":
        return dict(topk_ids=s["ids"], topk_logprobs=s["logprobs"], tail_logprob=s["tail"])
    if mode == "sampled":
        ids, counts = _draw(s["logp_full"], num_samples, torch.Generator().manual_seed(seed))
        return dict(sample_ids=ids, sample_counts=counts, num_samples=num_samples, teacher_entropy=_entropy(s))
    return None


@pytest.mark.parametrize(
    "mode,kind,renormalize,k,temperature",
    [
        ("topk", "forward-kl", False, 3, 1.7),
        ("topk", "reverse-kl", False, 3, 1.7),
        ("topk", "jsd", False, 3, 1.7),
        ("topk", "forward-kl", True, 3, 1.7),
        ("topk", "jsd", True, 3, 1.0),
        ("topk", "reverse-kl", False, 7, 1.7),
        ("topk", "jsd", False, 7, 1.0),
        ("topk", "forward-kl", False, 3, 1.0),
        ("sampled", "forward-kl", False, 3, 1.7),
        ("sampled", "forward-kl", False, 3, 1.0),
        (None, "forward-kl", False, 3, 1.0),
    ],
)
def test_gradcheck_distillation_loss_chunked(mode, kind, renormalize, k, temperature):
    # The backward is assembled by hand (losses.distillation.ChunkedLoss): check it against finite differences, with
    # a chunk that is all padding (rows 2-3) and so skipped.
    s = _small(k=k, n=7, temperature=temperature)
    mask = torch.tensor([True, False, False, False, True, True, True])
    targets = _targets(s, mode)
    f = lambda x: distillation_loss(
        x,
        s["labels"],
        mask,
        targets,
        alpha=0.3,
        temperature=temperature,
        kd_loss=kind,
        topk_renormalize=renormalize,
        chunk_size=2,
    )
    assert torch.autograd.gradcheck(lambda x: f(x).total, (s["student"],))


# ------------------------------------------------------------------------------ distillation_loss


@pytest.mark.parametrize("mode", ["topk", "sampled", None])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_loss_combines_its_parts(mode, temperature):
    s = _setup(temperature=temperature)
    targets = _targets(s, mode)
    out = distillation_loss(
        s["student"],
        s["labels"],
        s["mask"],
        targets,
        alpha=0.3,
        temperature=temperature,
        kd_loss="forward-kl",
        chunk_size=3,
    )
    assert isinstance(out, LossParts)
    ce = hard_ce(s["student"], s["labels"], s["mask"])
    torch.testing.assert_close(out.ce, ce)
    if mode is None:
        assert out.kd.item() == 0.0
        torch.testing.assert_close(out.total, ce)
        return
    if mode == "topk":
        kd = _topk(s, temperature)
    else:
        kd = sampled_divergence(
            s["student"],
            targets["sample_ids"],
            targets["sample_counts"],
            targets["num_samples"],
            targets["teacher_entropy"],
            s["mask"],
            temperature,
        )
    torch.testing.assert_close(out.kd, kd)
    torch.testing.assert_close(out.total, 0.3 * ce + 0.7 * temperature**2 * kd)


@pytest.mark.parametrize(
    "mode,kind,renormalize",
    [
        ("topk", "forward-kl", False),
        ("topk", "reverse-kl", False),
        ("topk", "jsd", True),
        ("sampled", "forward-kl", False),
        (None, "forward-kl", False),
    ],
)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_chunked_equals_unchunked(mode, kind, renormalize, temperature):
    s = _setup(n=10, temperature=temperature, dtype=torch.float32)
    targets = _targets(s, mode)
    results = []
    for chunk_size in (3, 10_000):
        x = s["student"].clone().requires_grad_(True)
        out = distillation_loss(
            x,
            s["labels"],
            s["mask"],
            targets,
            alpha=0.4,
            temperature=temperature,
            kd_loss=kind,
            topk_renormalize=renormalize,
            chunk_size=chunk_size,
        )
        out.total.backward()
        results.append((out, x.grad))
    (a, ga), (b, gb) = results
    for u, w in zip(a, b):
        torch.testing.assert_close(u, w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_bf16_logits_give_float32_loss_close_to_float32(mode):
    s = _setup(n=12, temperature=2.0, dtype=torch.float32)
    targets = _targets(s, mode)
    x32 = s["student"].clone().requires_grad_(True)
    x16 = s["student"].to(torch.bfloat16).requires_grad_(True)
    kw = dict(alpha=0.5, temperature=2.0, chunk_size=5)
    out32 = distillation_loss(x32, s["labels"], s["mask"], targets, **kw)
    out16 = distillation_loss(x16, s["labels"], s["mask"], targets, **kw)
    assert all(t.dtype == torch.float32 for t in out16)
    for u, w in zip(out16, out32):
        torch.testing.assert_close(u, w, rtol=2e-2, atol=2e-2)
    out16.total.backward()
    out32.total.backward()
    assert x16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x16.grad.float(), x32.grad, rtol=5e-2, atol=5e-3)


def _with_garbage_in_masked_rows(s, targets):
    """Values a padded position may hold in a real batch: none may leak into value or gradient."""
    labels = s["labels"].clone()
    labels[~s["mask"]] = -100
    return labels, _with_garbage(targets, ~s["mask"])


def _with_garbage(targets, bad):
    """A copy of targets with garbage (id -1 / out of range, NaN, inf) in the rows `bad` [N] bool."""
    if targets is None:
        return None
    targets = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in targets.items()}
    if "topk_ids" in targets:
        targets["topk_ids"][bad] = -1
        targets["topk_logprobs"][bad] = float("nan")
        targets["tail_logprob"][bad] = float("inf")
    else:
        targets["sample_ids"][bad] = 10**9
        targets["sample_counts"][bad] = float("nan")
        targets["teacher_entropy"][bad] = float("nan")
    return targets


@pytest.mark.parametrize(
    "mode,kind",
    [("topk", "forward-kl"), ("topk", "reverse-kl"), ("topk", "jsd"), ("sampled", "forward-kl"), (None, "forward-kl")],
)
def test_masked_positions_get_no_gradient_even_with_garbage(mode, kind):
    s = _setup(temperature=2.0, dtype=torch.float32)
    clean = _targets(s, mode)
    labels, targets = _with_garbage_in_masked_rows(s, clean)
    x = s["student"].clone().requires_grad_(True)
    out = distillation_loss(x, labels, s["mask"], targets, alpha=0.5, temperature=2.0, kd_loss=kind, chunk_size=3)
    ref = distillation_loss(s["student"], s["labels"], s["mask"], clean, alpha=0.5, temperature=2.0, kd_loss=kind)
    torch.testing.assert_close(out.total, ref.total)
    out.total.backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[~s["mask"]] == 0).all()
    assert (x.grad[s["mask"]].abs().sum(1) > 0).all()


@pytest.mark.parametrize(
    "mode,kind", [("topk", "forward-kl"), ("topk", "jsd"), ("sampled", "forward-kl"), (None, "forward-kl")]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_masked_gives_zeros(mode, kind, dtype):
    s = _setup(temperature=2.0, dtype=torch.float32)
    s["mask"] = torch.zeros_like(s["mask"])
    labels, targets = _with_garbage_in_masked_rows(s, _targets(s, mode))
    x = s["student"].to(dtype).requires_grad_(True)
    out = distillation_loss(x, labels, s["mask"], targets, alpha=0.5, temperature=2.0, kd_loss=kind, chunk_size=3)
    assert [t.item() for t in out] == [0.0, 0.0, 0.0]
    out.total.backward()
    assert x.grad is not None and (x.grad == 0).all()
    for fn_out in (
        hard_ce(x, labels, s["mask"]),
        topk_divergence(x, s["ids"], s["logprobs"], s["tail"], s["mask"], 2.0, kind=kind),
    ):
        assert fn_out.item() == 0.0


def test_no_grad_evaluation_works():
    s = _setup(dtype=torch.float32)
    with torch.no_grad():
        out = distillation_loss(
            s["student"], s["labels"], s["mask"], _targets(s, "topk"), alpha=0.5, temperature=1.0, chunk_size=3
        )
    ref = distillation_loss(s["student"], s["labels"], s["mask"], _targets(s, "topk"), alpha=0.5, temperature=1.0)
    torch.testing.assert_close(out.total, ref.total)


# ------------------------------------------------------------------------------ options


@pytest.mark.parametrize(
    "kwargs,option",
    [
        (dict(alpha=-0.1), "alpha"),
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(kd_loss="kl"), "kd_loss"),
        (dict(kd_loss="jsd", jsd_beta=0.0), "jsd_beta"),
        (dict(kd_loss="jsd", jsd_beta=1.0), "jsd_beta"),
    ],
)
def test_invalid_options_raise(kwargs, option):
    s = _setup(dtype=torch.float32)
    args = dict(alpha=0.5, temperature=1.0) | kwargs
    with pytest.raises(ValueError, match=option):
        distillation_loss(s["student"], s["labels"], s["mask"], _targets(s, "topk"), **args)
    if "alpha" not in kwargs:
        with pytest.raises(ValueError, match=option):
            topk_divergence(
                s["student"],
                s["ids"],
                s["logprobs"],
                s["tail"],
                s["mask"],
                args["temperature"],
                kind=args.get("kd_loss", "forward-kl"),
                jsd_beta=args.get("jsd_beta", 0.5),
            )


@pytest.mark.parametrize("mode", ["topk", "sampled", None])
def test_no_float32_vocab_sized_activation_is_kept_for_backward(mode):
    # Recompute in the backward: between forward and backward autograd may keep the inputs (the
    # bf16 logits, the small teacher tensors) but none of the float32 [chunk,V] intermediates.
    s = _setup(n=12, temperature=2.0, dtype=torch.float32)
    x = s["student"].to(torch.bfloat16).requires_grad_(True)
    kept = []

    def pack(t):
        if t.is_floating_point() and t.dtype != torch.bfloat16 and t.shape[-1] == V:
            kept.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = distillation_loss(x, s["labels"], s["mask"], _targets(s, mode), alpha=0.5, temperature=2.0, chunk_size=4)
    assert kept == []
    out.total.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("part", ["ce", "kd"])
def test_gradient_of_each_part_alone(part):
    # The parts share one recomputing backward; each must still get its own gradient.
    s = _setup(temperature=2.0, dtype=torch.float32)
    x = s["student"].clone().requires_grad_(True)
    out = distillation_loss(
        x, s["labels"], s["mask"], _targets(s, "topk"), alpha=0.5, temperature=2.0, kd_loss="jsd", chunk_size=3
    )
    (got,) = torch.autograd.grad(getattr(out, part), x)
    y = s["student"].clone().requires_grad_(True)
    ref = (
        hard_ce(y, s["labels"], s["mask"])
        if part == "ce"
        else topk_divergence(y, s["ids"], s["logprobs"], s["tail"], s["mask"], 2.0, kind="jsd")
    )
    (want,) = torch.autograd.grad(ref, y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_cache_dtypes_and_batch_shape(mode):
    # The cache stores int32 ids, float16 log-probs / entropies and uint8 counts; the trainer may
    # pass [B,L,...] tensors. Same loss as float64 / int64 [N,...] inputs up to float16 rounding.
    s = _setup(n=12, temperature=2.0, dtype=torch.float32)
    targets = _targets(s, mode)
    small = {
        k: v.to(torch.int32)
        if k.endswith("_ids")
        else v.to(torch.uint8)
        if k == "sample_counts"
        else v.half()
        if torch.is_tensor(v)
        else v
        for k, v in targets.items()
    }
    shaped = {k: v.reshape(3, 4, *v.shape[1:]) if torch.is_tensor(v) else v for k, v in small.items()}
    want = distillation_loss(s["student"], s["labels"], s["mask"], targets, alpha=0.5, temperature=2.0)
    got = distillation_loss(
        s["student"].reshape(3, 4, V),
        s["labels"].reshape(3, 4),
        s["mask"].reshape(3, 4),
        shaped,
        alpha=0.5,
        temperature=2.0,
    )
    for u, w in zip(got, want):
        torch.testing.assert_close(u, w, rtol=2e-3, atol=2e-3)


def test_empty_batch():
    x = torch.zeros(0, V, requires_grad=True)
    targets = dict(
        topk_ids=torch.zeros(0, 3, dtype=torch.long), topk_logprobs=torch.zeros(0, 3), tail_logprob=torch.zeros(0)
    )
    out = distillation_loss(
        x, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool), targets, alpha=0.5, temperature=2.0
    )
    assert [t.item() for t in out] == [0.0, 0.0, 0.0]
    out.total.backward()
    assert x.grad.shape == (0, V)


# ------------------------------------------------------------------------------ tiny student tails


def _tiny_tail_setup(temperature, gap, dtype):
    """_setup with the student's logits outside the ids `gap` below the row's best id on rows 0, 1
    (masked out), 3 and 5, and 5x gap below on row 4: q_o ~ e^-gap / e^-5gap, past float's range
    around the row maximum. Other rows are ordinary."""
    s = _setup(n=8, k=5, temperature=temperature, seed=7, dtype=torch.float64)
    student = s["student"].clone()
    outside = torch.ones_like(student, dtype=torch.bool).scatter_(1, s["ids"], False)
    top = student.gather(1, s["ids"]).amax(1, keepdim=True)
    for row, g in ((0, gap), (1, gap), (3, gap), (5, gap), (4, 5 * gap)):
        student[row] = torch.where(outside[row], top[row] - g + torch.rand(V, dtype=torch.float64), student[row])
    s["student"] = student.to(dtype)
    # The teacher keeps 20% outside the ids: forward KL then charges 0.2 log(0.2 / q_o), ~ 0.2 gap.
    s["logprobs"] = (torch.log_softmax(s["logprobs"].double(), dim=1) + math.log(0.8)).to(dtype)
    s["tail"] = torch.full_like(s["tail"], math.log(0.2))
    return s


@pytest.mark.parametrize("kind", ["forward-kl", "reverse-kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_tiny_student_tail_float32_matches_float64(kind, temperature, monkeypatch):
    # float32 q_o ~ 1e-26 (and 0 around the row max): the chunked loss sums those rows' tails again
    # around their own maximum; value and gradient match the float64 autograd reference.
    from pipeline.losses import chunked

    redone = []
    real = chunked.redo_lse_out
    monkeypatch.setattr(chunked, "redo_lse_out", lambda *a: redone.append(list(a[3])) or real(*a))
    s = _tiny_tail_setup(temperature, 60.0 * temperature, torch.float32)
    targets = _targets(s, "topk")
    x = s["student"].clone().requires_grad_(True)
    out = distillation_loss(
        x, s["labels"], s["mask"], targets, alpha=0.3, temperature=temperature, kd_loss=kind, chunk_size=3
    )
    (got,) = torch.autograd.grad(out.total, x)
    assert redone == [[0, 3, 4, 5]]  # masked-in tiny tails only
    y = s["student"].double().requires_grad_(True)
    ref_kd = topk_divergence(y, s["ids"], s["logprobs"].double(), s["tail"].double(), s["mask"], temperature, kind=kind)
    ref = 0.3 * hard_ce(y, s["labels"], s["mask"]) + 0.7 * temperature**2 * ref_kd
    (want,) = torch.autograd.grad(ref, y)
    if kind == "forward-kl":
        assert ref_kd.item() > 5  # the tail term dominates: a tail off by a factor would show
    torch.testing.assert_close(out.kd.double(), ref_kd, rtol=1e-5, atol=0)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    assert (got[~s["mask"]] == 0).all()


@pytest.mark.parametrize(
    "temperature, kind",
    # finite differences over every input are the slowest in-process test: one case stays in make test-fast
    [(1.0, "forward-kl")]
    + [
        pytest.param(t, k, marks=pytest.mark.slow)
        for t in (1.0, 1.7)
        for k in ("forward-kl", "reverse-kl", "jsd")
        if (t, k) != (1.0, "forward-kl")
    ],
)
def test_gradcheck_tiny_student_tail(kind, temperature):
    # float64 q_o ~ e^-400: past the 1e-154 threshold, the redone rows' backward against finite differences.
    s = _tiny_tail_setup(temperature, 400.0 * temperature, torch.float64)
    x = s["student"].detach().requires_grad_(True)
    targets = _targets(s, "topk")
    f = lambda x: (
        distillation_loss(
            x, s["labels"], s["mask"], targets, alpha=0.3, temperature=temperature, kd_loss=kind, chunk_size=3
        ).total
    )
    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("mode,renormalize", [("topk", False), ("topk", True), ("sampled", False), (None, False)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_bf16_logits_equal_float32_of_the_same_values(mode, renormalize, temperature):
    # bf16 logits are read as float32 without a float32 copy: same float32 math, so the same loss, and
    # the gradient is the float32 one rounded to bf16.
    s = _setup(n=12, temperature=temperature, dtype=torch.float32)
    x16 = s["student"].to(torch.bfloat16).requires_grad_(True)
    x32 = x16.detach().float().requires_grad_(True)
    kw = dict(alpha=0.4, temperature=temperature, topk_renormalize=renormalize, chunk_size=5)
    out16 = distillation_loss(x16, s["labels"], s["mask"], _targets(s, mode), **kw)
    out32 = distillation_loss(x32, s["labels"], s["mask"], _targets(s, mode), **kw)
    for u, w in zip(out16, out32):
        torch.testing.assert_close(u, w, rtol=1e-6, atol=1e-7)
    out16.total.backward()
    out32.total.backward()
    torch.testing.assert_close(x16.grad, x32.grad.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["forward-kl", "reverse-kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_chunked_kd_gradient_matches_autograd_float32(kind, temperature):
    # The hand-built backward (one softmax pass carrying the tail factor, exact values written at the
    # ids) against autograd through topk_divergence, in float32.
    s = _setup(temperature=temperature, dtype=torch.float32)
    x = s["student"].clone().requires_grad_(True)
    out = distillation_loss(
        x, s["labels"], s["mask"], _targets(s, "topk"), alpha=0.0, temperature=temperature, kd_loss=kind, chunk_size=3
    )
    (got,) = torch.autograd.grad(out.kd, x)
    y = s["student"].clone().requires_grad_(True)
    (want,) = torch.autograd.grad(_topk(dict(s, student=y), temperature, kind=kind), y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------ teacher_mask: targets at some positions

# (cache mode, kd_loss, topk_renormalize): every divergence of either mode
KD_CASES = [
    ("topk", "forward-kl", False),
    ("topk", "reverse-kl", False),
    ("topk", "jsd", False),
    ("topk", "forward-kl", True),
    ("topk", "reverse-kl", True),
    ("topk", "jsd", True),
    ("sampled", "forward-kl", False),
]


def _teacher_mask(n, seed=0):
    """A random teacher_mask [n]: rows 0 and 1 in (row 1 is out of _setup's mask), rows 3-5 out (a whole chunk of 3:
    a chunk with CE and no KD)."""
    present = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5
    present[:2] = True
    present[3:6] = False
    return present


def reference_loss(x, labels, mask, targets, present, *, alpha, temperature, kind, renormalize=False, beta=0.5):
    """LossParts by hand in float64 from full softmaxes of x [N,V], independent of pipeline.losses: CE the mean
    cross-entropy over mask (None: every row); KD the divergence summed over the rows in mask and present only, per
    row of mask (0 if none), and the rows of mask without a target given (1 - alpha) of their CE besides; top-k on
    the K ids plus the tail bucket (or renormalised over the ids), sampled the forward-KL estimate."""
    x = x.double()
    mask = torch.ones(x.shape[0], dtype=torch.bool) if mask is None else mask
    ce = F.cross_entropy(x[mask], labels[mask])
    rows = mask & present
    log_q = torch.log_softmax(x[rows] / temperature, dim=1)  # [n,V] over the rows with a teacher target only
    if "topk_ids" in targets:
        ids = targets["topk_ids"][rows].long()
        p, q = targets["topk_logprobs"][rows].double().exp(), log_q.exp().gather(1, ids)
        if renormalize:
            p, q = p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True)
        else:
            p = torch.cat([p, targets["tail_logprob"][rows].double().exp()[:, None]], dim=1)
            q = torch.cat([q, 1 - q.sum(1, keepdim=True)], dim=1)
        kd_rows = _divergence(p, q, kind, beta)
    else:
        counts = targets["sample_counts"][rows].double()
        cross = -(counts * log_q.gather(1, targets["sample_ids"][rows].long())).sum(1) / targets["num_samples"]
        kd_rows = cross - targets["teacher_entropy"][rows].double()
    kd = kd_rows.sum() / int(mask.sum())  # summed over the rows with a target, per masked-in position as the CE
    rest = mask & ~present  # no teacher target: the soft loss's share goes to their CE
    ce_rest = F.cross_entropy(x[rest], labels[rest], reduction="sum") / int(mask.sum())
    return LossParts(alpha * ce + (1 - alpha) * (temperature**2 * kd + ce_rest), ce, kd)


def _with_teacher_mask(targets, present):
    return dict(targets, teacher_mask=present)


@pytest.mark.parametrize("mode,kind,renormalize", KD_CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("with_mask", [False, True])
def test_teacher_mask_matches_reference_on_the_subset(mode, kind, renormalize, temperature, with_mask):
    # KD over the rows in mask & teacher_mask only, CE over mask: value and gradient (of total, and of KD alone)
    # against the float64 reference, with chunks of 3 (one of them with no teacher target at all).
    s = _setup(n=10, temperature=temperature)
    mask = s["mask"] if with_mask else None
    present = _teacher_mask(10)
    targets = _targets(s, mode)
    options = dict(alpha=0.3, temperature=temperature, kd_loss=kind, jsd_beta=0.3, topk_renormalize=renormalize)
    x = s["student"].clone().requires_grad_(True)
    out = distillation_loss(x, s["labels"], mask, _with_teacher_mask(targets, present), chunk_size=3, **options)
    got = torch.autograd.grad(out.total, x, retain_graph=True) + torch.autograd.grad(out.kd, x)
    y = s["student"].clone().requires_grad_(True)
    ref = reference_loss(
        y,
        s["labels"],
        mask,
        targets,
        present,
        alpha=0.3,
        temperature=temperature,
        kind=kind,
        renormalize=renormalize,
        beta=0.3,
    )
    want = torch.autograd.grad(ref.total, y, retain_graph=True) + torch.autograd.grad(ref.kd, y)
    for part in ("total", "ce", "kd"):
        torch.testing.assert_close(getattr(out, part), getattr(ref, part), rtol=1e-9, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    rows = present if mask is None else mask & present
    assert 0 < rows.sum() < rows.numel() and out.kd.item() != 0
    assert (got[1][~rows] == 0).all()  # no KD gradient outside the rows with a teacher target


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_teacher_mask_with_full_vocabulary_equals_dense_kd_loss_on_the_subset(temperature):
    # K = V: the top-k forward KL is the full one, so KD is dense_kd_loss's on the rows with a teacher target.
    s = _setup(n=10, k=V, temperature=temperature, dtype=torch.float32)
    present = _teacher_mask(10, seed=1)
    rows = s["mask"] & present
    targets = _with_teacher_mask(_targets(s, "topk"), present)
    out = distillation_loss(s["student"], s["labels"], s["mask"], targets, alpha=0.3, temperature=temperature)
    dense = dense_kd_loss(s["student"][rows], s["teacher"][rows], s["labels"][rows], alpha=0.3, temperature=temperature)
    ce = hard_ce(s["student"], s["labels"], s["mask"])
    share = rows.sum() / s["mask"].sum()  # KD summed over the rows with a target, per masked-in row
    torch.testing.assert_close(out.kd, dense.kd * share, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.ce, ce)
    rest = s["mask"] & ~present
    ce_rest = F.cross_entropy(s["student"][rest], s["labels"][rest], reduction="sum") / s["mask"].sum()
    want = 0.3 * ce + 0.7 * (temperature**2 * dense.kd * share + ce_rest)
    torch.testing.assert_close(out.total, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode,kind,renormalize", KD_CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_teacher_mask_all_true_is_bit_identical_to_none(mode, kind, renormalize, temperature):
    s = _setup(n=10, temperature=temperature, dtype=torch.float32)
    targets = _targets(s, mode)
    results = []
    for t in (targets, _with_teacher_mask(targets, torch.ones(10, dtype=torch.bool))):
        x = s["student"].clone().requires_grad_(True)
        out = distillation_loss(
            x,
            s["labels"],
            s["mask"],
            t,
            alpha=0.3,
            temperature=temperature,
            kd_loss=kind,
            topk_renormalize=renormalize,
            chunk_size=3,
        )
        results.append(tuple(out) + torch.autograd.grad(out.total, x))
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("mode,kind,renormalize", KD_CASES)
@pytest.mark.parametrize("with_mask", [False, True])
def test_teacher_mask_all_false_gives_ce_alone(mode, kind, renormalize, with_mask):
    # No position has a teacher target, and every target is garbage: KD is 0, total the CE (alpha of it as the hard
    # loss, the rest as the soft loss's share), gradients finite and the CE's.
    s = _setup(n=10, temperature=2.0, dtype=torch.float32)
    mask = s["mask"] if with_mask else None
    absent = torch.zeros(10, dtype=torch.bool)
    targets = _with_teacher_mask(_with_garbage(_targets(s, mode), ~absent), absent)
    x = s["student"].clone().requires_grad_(True)
    out = distillation_loss(
        x,
        s["labels"],
        mask,
        targets,
        alpha=0.3,
        temperature=2.0,
        kd_loss=kind,
        topk_renormalize=renormalize,
        chunk_size=3,
    )
    assert out.kd.item() == 0.0
    torch.testing.assert_close(out.total, out.ce, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.ce, hard_ce(s["student"], s["labels"], mask))
    (g_total,) = torch.autograd.grad(out.total, x, retain_graph=True)
    (g_kd,) = torch.autograd.grad(out.kd, x)
    y = s["student"].clone().requires_grad_(True)
    (g_ce,) = torch.autograd.grad(hard_ce(y, s["labels"], mask), y)
    assert torch.isfinite(g_total).all() and (g_kd == 0).all()
    torch.testing.assert_close(g_total, g_ce, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("mode,kind,renormalize", KD_CASES)
def test_garbage_outside_teacher_mask_does_not_leak(mode, kind, renormalize):
    # ids -1 (or out of range), NaN log-probs / counts / entropies, an infinite tail at the positions without a
    # teacher target: the same value and gradient, bit for bit, as clean values there.
    s = _setup(n=10, temperature=2.0, dtype=torch.float32)
    present = _teacher_mask(10)
    clean = _with_teacher_mask(_targets(s, mode), present)
    results = []
    for targets in (clean, _with_garbage(clean, ~present)):
        x = s["student"].clone().requires_grad_(True)
        out = distillation_loss(
            x,
            s["labels"],
            s["mask"],
            targets,
            alpha=0.3,
            temperature=2.0,
            kd_loss=kind,
            topk_renormalize=renormalize,
            chunk_size=3,
        )
        results.append(tuple(out) + torch.autograd.grad(out.total, x))
    assert all(torch.isfinite(t).all() for t in results[1])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize(
    "mode,kind,renormalize",
    [
        ("topk", "forward-kl", False),
        ("topk", "jsd", False),
        ("topk", "reverse-kl", True),
        ("sampled", "forward-kl", False),
    ],
)
def test_gradcheck_with_teacher_mask(mode, kind, renormalize):
    # The hand-built backward with rows that have CE and no KD, and a chunk (rows 2-3) with no teacher target.
    s = _small(k=3, n=7)
    mask = torch.tensor([True, False, True, True, True, True, True])
    present = torch.tensor([True, True, False, False, True, False, True])
    targets = _with_teacher_mask(_targets(s, mode), present)
    f = lambda x: (
        distillation_loss(
            x,
            s["labels"],
            mask,
            targets,
            alpha=0.3,
            temperature=1.7,
            kd_loss=kind,
            topk_renormalize=renormalize,
            chunk_size=2,
        ).total
    )
    assert torch.autograd.gradcheck(f, (s["student"],))


@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_step_loss_hands_a_batch_teacher_mask_on(mode):
    # A batch's teacher_mask [B, L] goes to the loss flattened, as the targets do.
    s = _setup(n=12, temperature=2.0, dtype=torch.float32)
    present = _teacher_mask(12)
    targets = _targets(s, mode)
    batch = {"tokens": torch.cat([torch.zeros(3, 1, dtype=torch.long), s["labels"].reshape(3, 4)], dim=1)}
    batch |= {k: v.reshape(3, 4, *v.shape[1:]) for k, v in targets.items() if torch.is_tensor(v)}
    batch["teacher_mask"] = present.reshape(3, 4)
    num_samples = targets.get("num_samples", 0)
    assert torch.equal(teacher_targets(batch, num_samples)["teacher_mask"], present)
    loss = StepLoss(alpha=0.3, temperature=2.0, num_samples=num_samples, chunk_size=5)
    got = loss(s["student"].reshape(3, 4, V), batch)
    want = distillation_loss(
        s["student"], s["labels"], None, _with_teacher_mask(targets, present), alpha=0.3, temperature=2.0, chunk_size=5
    )
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    del batch["teacher_mask"]
    assert "teacher_mask" not in teacher_targets(batch, num_samples)


def test_tiny_student_tails_outside_teacher_mask_are_not_redone(monkeypatch):
    # Rows 0, 3, 4, 5 (in mask) have tails past float32's reach; row 3 and 5 have no teacher target, so only 0 and 4
    # are summed again, and value and gradient still match the float64 reference on the rows with a target.
    from pipeline.losses import chunked

    redone = []
    real = chunked.redo_lse_out
    monkeypatch.setattr(chunked, "redo_lse_out", lambda *a: redone.append(list(a[3])) or real(*a))
    s = _tiny_tail_setup(1.0, 60.0, torch.float32)
    present = torch.tensor([True, True, True, False, True, False, True, True])
    x = s["student"].clone().requires_grad_(True)
    targets = _with_teacher_mask(_targets(s, "topk"), present)
    out = distillation_loss(x, s["labels"], s["mask"], targets, alpha=0.3, temperature=1.0, chunk_size=3)
    (got,) = torch.autograd.grad(out.total, x)
    assert redone == [[0, 4]]
    y = s["student"].double().requires_grad_(True)
    rows = s["mask"] & present
    ref_kd = topk_divergence(y, s["ids"], s["logprobs"].double(), s["tail"].double(), rows, 1.0)
    ref_kd = ref_kd * rows.sum() / s["mask"].sum()  # summed over the rows with a target, per masked-in row
    rest = s["mask"] & ~present  # without a teacher target: the soft loss's share goes to their CE
    ce_rest = F.cross_entropy(y[rest], s["labels"][rest], reduction="sum") / s["mask"].sum()
    ref = 0.3 * hard_ce(y, s["labels"], s["mask"]) + 0.7 * (ref_kd + ce_rest)
    (want,) = torch.autograd.grad(ref, y)
    torch.testing.assert_close(out.kd.double(), ref_kd, rtol=1e-5, atol=0)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
