"""The fused output head + loss (losses.fused_distillation_loss) against the unfused path: distillation_loss on
logits = hidden @ W.T (+ b), values and gradients with respect to the hidden states and the head."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, invoke_cli
from test_losses import _draw, _targets, _tiny_tail_setup, _with_garbage, reference_loss
from test_train import metrics, train_options, weights

from pipeline.losses import distillation_loss, fused_distillation_loss

N, H, V = 13, 6, 37  # odd sizes: a chunk of 4 does not divide N, V is not a multiple of 64

CASES = [  # (cache mode, kd_loss, topk_renormalize)
    (None, "forward-kl", False),
    ("topk", "forward-kl", False),
    ("topk", "reverse-kl", False),
    ("topk", "jsd", False),
    ("topk", "forward-kl", True),
    ("sampled", "forward-kl", False),
]


def _problem(temperature, dtype=torch.float64, bias=False, seed=0, k=5, num_samples=12):
    """hidden [N,H], head weight [V,H] (bias [V]), labels, a mask with two rows out, and both caches' targets."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    head_bias = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    mask = torch.ones(N, dtype=torch.bool)
    mask[2] = mask[N - 1] = False
    logp_full = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 3 / temperature, dim=1)
    topk_logprobs, topk_ids = logp_full.topk(k, dim=1)
    sample_ids, counts = _draw(logp_full, num_samples, g)
    targets = {
        "topk": dict(
            topk_ids=topk_ids, topk_logprobs=topk_logprobs, tail_logprob=torch.log1p(-topk_logprobs.exp().sum(1))
        ),
        "sampled": dict(
            sample_ids=sample_ids,
            sample_counts=counts,
            num_samples=num_samples,
            teacher_entropy=-(logp_full.exp() * logp_full).sum(1),
        ),
        None: None,
    }
    return hidden, weight, head_bias, labels, mask, targets


def _both(mode, kind, renormalize, temperature, dtype=torch.float64, bias=False, chunk=4, autocast=False):
    """(loss, d hidden, d weight, d bias) of the fused path and of the unfused one (head, then distillation_loss)."""
    hidden, weight, head_bias, labels, mask, targets = _problem(temperature, dtype, bias)
    options = dict(alpha=0.3, temperature=temperature, kd_loss=kind, topk_renormalize=renormalize, chunk_size=chunk)
    results = []
    for fused in (True, False):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        b = None if head_bias is None else head_bias.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fused:
                out = fused_distillation_loss(
                    h,
                    w,
                    labels,
                    mask,
                    targets[mode],
                    head_bias=b,
                    logits_dtype=torch.bfloat16 if autocast else None,
                    **options,
                )
            else:
                logits = torch.nn.functional.linear(h, w, b)
        if not fused:  # as accelerate hands the logits on: float32 after autocast
            out = distillation_loss(logits.float() if autocast else logits, labels, mask, targets[mode], **options)
        grads = torch.autograd.grad(out.total, [h, w] + ([b] if b is not None else []))
        results.append((out, grads))
    return results


@pytest.mark.parametrize("mode,kind,renormalize", CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_equals_unfused_float64(mode, kind, renormalize, temperature):
    (fused, fused_grads), (plain, plain_grads) = _both(mode, kind, renormalize, temperature)
    for part in ("total", "ce", "kd"):
        torch.testing.assert_close(getattr(fused, part), getattr(plain, part), rtol=1e-12, atol=1e-12)
    for got, want in zip(fused_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode,kind,renormalize", [CASES[0], CASES[1], CASES[3], CASES[5]])
def test_fused_equals_unfused_with_bias_and_one_chunk(mode, kind, renormalize):
    for chunk in (4, 100):
        (fused, fused_grads), (plain, plain_grads) = _both(mode, kind, renormalize, 1.5, bias=True, chunk=chunk)
        torch.testing.assert_close(fused.total, plain.total, rtol=1e-12, atol=1e-12)
        assert len(fused_grads) == 3
        for got, want in zip(fused_grads, plain_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode,kind,renormalize", CASES)
def test_fused_equals_unfused_under_bf16_autocast(mode, kind, renormalize):
    # float32 hidden and head, logits in bf16 as an autocast Linear gives them: the same bf16 logits either way,
    # so the values agree closely; the gradients differ by bf16 rounding of per-chunk sums.
    (fused, fused_grads), (plain, plain_grads) = _both(mode, kind, renormalize, 2.0, dtype=torch.float32, autocast=True)
    assert fused.total.dtype == torch.float32
    torch.testing.assert_close(fused.total, plain.total, rtol=1e-5, atol=1e-5)
    for got, want in zip(fused_grads, plain_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


def test_tied_head_gradient_reaches_the_embedding_once():
    # A tied head: the embedding matrix is both the input table and the head; its gradient sums both uses.
    g = torch.Generator().manual_seed(1)
    table = torch.randn(V, H, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (N + 1,), generator=g)
    grads = []
    for fused in (True, False):
        w = table.clone().requires_grad_(True)
        hidden = torch.tanh(w[tokens[:-1]])  # a stand-in body
        if fused:
            out = fused_distillation_loss(hidden, w, tokens[1:], alpha=1.0, temperature=1.0, chunk_size=5)
        else:
            out = distillation_loss(hidden @ w.T, tokens[1:], alpha=1.0, temperature=1.0, chunk_size=5)
        grads.append(torch.autograd.grad(out.total, w)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode,kind,renormalize", [CASES[0], CASES[1], CASES[4], CASES[5]])
def test_nothing_of_tokens_by_vocab_is_saved_or_made(mode, kind, renormalize):
    # Saved for backward: only hidden, the head and [N,1] / [N,K] statistics; no tensor of N x V elements.
    hidden, weight, _, labels, mask, targets = _problem(1.0, torch.float32)
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fused_distillation_loss(
            h, w, labels, mask, targets[mode], alpha=0.5, temperature=1.0, topk_renormalize=renormalize, chunk_size=4
        )
    assert saved and all(torch.Size(s).numel() < N * V for s in saved), saved
    assert (N, V) not in saved
    out.total.backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


def test_second_backward_makes_the_chunks_again():
    # The forward's gradients serve the first backward of total (scaled in place); a second backward of the same
    # graph (retain_graph), here of another mix of the parts, makes the chunks' logits again, as a loss whose only
    # backward is of that mix does.
    hidden, weight, head_bias, labels, mask, targets = _problem(2.0, bias=True)
    params = [t.clone().requires_grad_(True) for t in (hidden, weight, head_bias)]

    def loss():
        options = dict(alpha=0.3, temperature=2.0, chunk_size=4)
        return fused_distillation_loss(*params[:2], labels, mask, targets["topk"], head_bias=params[2], **options)

    out = loss()
    first = torch.autograd.grad(out.total, params, retain_graph=True)
    second = torch.autograd.grad(0.2 * out.ce + 1.3 * out.kd, params)
    want_first = torch.autograd.grad(loss().total, params)
    mix = loss()
    want_second = torch.autograd.grad(0.2 * mix.ce + 1.3 * mix.kd, params)
    assert all(torch.equal(a, b) for a, b in zip(first + second, want_first + want_second))


def test_all_masked_gives_zero_loss_and_gradients():
    hidden, weight, _, labels, _, targets = _problem(1.0)
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    out = fused_distillation_loss(
        h, w, labels, torch.zeros(N, dtype=torch.bool), targets["topk"], alpha=0.5, temperature=1.0, chunk_size=4
    )
    out.total.backward()
    assert out.total.item() == 0.0 and not h.grad.any() and not w.grad.any()


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_tiny_student_tails_are_redone_from_the_hidden_states(temperature, monkeypatch):
    # Rows whose student tail is below float32's reach get lse_out summed again (losses.chunked.redo_lse_out); the fused
    # path makes those rows' logits from hidden states. An identity head makes the logits the hidden states.
    from pipeline.losses import chunked

    redone = []
    real = chunked.redo_lse_out
    monkeypatch.setattr(chunked, "redo_lse_out", lambda *a: redone.append(list(a[3])) or real(*a))
    s = _tiny_tail_setup(temperature, 60.0 * temperature, torch.float32)
    targets, grads, values = _targets(s, "topk"), [], []
    for fused in (True, False):
        x = s["student"].clone().requires_grad_(True)
        options = dict(alpha=0.3, temperature=temperature, kd_loss="forward-kl", chunk_size=3)
        if fused:
            eye = torch.eye(x.shape[1])
            out = fused_distillation_loss(x, eye, s["labels"], s["mask"], targets, **options)
        else:
            out = distillation_loss(x, s["labels"], s["mask"], targets, **options)
        values.append(out.total)
        grads.append(torch.autograd.grad(out.total, x)[0])
    # fused: per chunk of 3, rows local to it (0 | 3 4 5); unfused: all rows at once
    assert redone == [[0], [0, 1, 2], [0, 3, 4, 5]]
    torch.testing.assert_close(values[0], values[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the student's head (models.py)


def _tiny(model_type: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    if model_type == "gpt2":
        sizes = dict(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=64)
    elif model_type in ("gemma2", "llama", "qwen2"):
        sizes.update(num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes, **extra)).train()


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2"])
def test_head_input_is_the_final_hidden_state_and_the_head_gives_the_logits(model_type):
    from pipeline.models import head_gives_logits, head_input_as_logits

    model = _tiny(model_type).eval()
    ids = torch.arange(10)[None] % V
    assert head_gives_logits(model, ids)
    assert model.training is False
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        with head_input_as_logits(model) as head_call:
            hidden = model(input_ids=ids).logits
        assert hidden.shape == (1, 10, model.config.hidden_size) and head_call["dtype"] == torch.float32
        torch.testing.assert_close(model.get_output_embeddings()(hidden), logits)
        assert model(input_ids=ids).logits.shape[-1] == V  # the head is back after the block
        with head_input_as_logits(model) as head_call, torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids)
        assert head_call["dtype"] == torch.bfloat16  # what the head's logits would have been


def test_soft_capped_logits_use_the_unfused_head_and_on_is_refused():
    from pipeline.errors import PipelineError
    from pipeline.train import head_fusable, use_fused_head

    gemma = _tiny("gemma2", final_logit_softcapping=30.0)
    assert not head_fusable(gemma, V) and use_fused_head("auto", gemma, V) is False
    assert gemma.training  # the probe leaves the mode as it was
    with pytest.raises(PipelineError, match="--fused-head on: the gemma2 student's logits are not its output head"):
        use_fused_head("on", gemma, V)
    llama = _tiny("llama")
    assert head_fusable(llama, V) and use_fused_head("on", llama, V)
    assert use_fused_head("off", llama, V) is False
    assert use_fused_head("auto", llama, V) is True  # wherever it applies, CPU included


# ----------------------------------------------------------------------------- training runs, fused vs unfused


@pytest.mark.parametrize("kind, precision", [("distill", "no"), ("baseline", "bf16")])
def test_twenty_steps_fused_and_unfused_give_the_same_losses(
    kind, precision, tiny_data, tiny_teacher, tiny_topk_cache, tmp_path
):
    runs = {}
    for fused in ("on", "off"):
        out = tmp_path / fused
        options = train_options(
            tiny_data,
            tiny_teacher,
            tiny_topk_cache,
            max_steps=20,
            eval_every=20,
            save_every=20,
            mixed_precision=precision,
            loss_chunk=48,  # 128 positions a step: chunks of 48, 48 and 32
        )
        result = invoke_cli(kind, *options, "--fused-head", fused, "--out-dir", out, check=True)
        assert ("output head fused with the loss" in result.stdout) == (fused == "on")
        runs[fused] = metrics(out)
    assert [r["step"] for r in runs["on"]] == list(range(1, 21))
    rel = 1e-4 if precision == "no" else 2e-2  # bf16: the head's gradient summed per chunk, rounded differently
    for on, off in zip(runs["on"], runs["off"]):
        for key in ("total", "ce", "kd"):
            assert on[key] == pytest.approx(off[key], rel=rel, abs=1e-6), (on["step"], key)
    assert runs["on"][-1]["val_ce"] == pytest.approx(runs["off"][-1]["val_ce"], rel=rel)
    print(
        "WORST",
        kind,
        max(abs(a[k] - b[k]) / abs(b[k]) for a, b in zip(runs["on"], runs["off"]) for k in ("total", "ce")),
    )


@pytest.mark.slow
def test_torchrun_two_processes_with_grad_accum_fused_and_unfused_agree(
    tiny_data, tiny_teacher, tiny_topk_cache, tmp_path
):
    """Two CPU ranks, two micro-batches a step: the body goes through DDP (no_sync on the first micro-batch), the
    head's weight gets its gradient from the loss's backward and is all-reduced with the rest. Fused and unfused
    runs end with the same weights; an unsynced head gradient would leave rank 0's head off by far more."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pipeline"]
    options = train_options(
        tiny_data, tiny_teacher, tiny_topk_cache, max_steps=4, eval_every=4, save_every=4, batch_size=2
    )
    runs = {}
    for fused in ("on", "off"):
        out = tmp_path / fused
        args = ["distill", *map(str, options), "--grad-accum", "2", "--loss-chunk", "48", "--fused-head", fused]
        result = subprocess.run(
            launch + args + ["--out-dir", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        runs[fused] = weights(out)
    a, b = runs["on"], runs["off"]
    assert a.keys() == b.keys()
    worst = max(((a[n] - b[n]).abs().max() / b[n].abs().max()).item() for n in a)
    assert worst < 1e-4, worst


@pytest.mark.parametrize("part", ["ce", "kd", "scaled_total", "mixed"])
def test_gradients_of_any_combination_of_the_parts(part):
    # The forward keeps the gradients of alpha CE + (1 - alpha) T^2 KD; a multiple of total uses them, any other
    # combination makes the chunks' logits again. Both must match the unfused path.
    hidden, weight, _, labels, mask, targets = _problem(2.0)
    got = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        options = dict(alpha=0.3, temperature=2.0, chunk_size=4)
        if fused:
            out = fused_distillation_loss(h, w, labels, mask, targets["topk"], **options)
        else:
            out = distillation_loss(h @ w.T, labels, mask, targets["topk"], **options)
        loss = {
            "ce": out.ce,
            "kd": out.kd,
            "scaled_total": 0.25 * out.total,
            "mixed": out.total + out.ce,
        }[part]
        got.append(torch.autograd.grad(loss, [h, w]))
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- teacher_mask: targets at some positions


def _teacher_mask(seed=0):
    """A random teacher_mask [N]: row 2 (out of the mask) in, rows 4-7 out (a whole chunk of 4 with CE and no KD)."""
    present = torch.rand(N, generator=torch.Generator().manual_seed(seed)) < 0.5
    present[:3] = True
    present[4:8] = False
    return present


def _fused_with_teacher_mask(hidden, weight, labels, mask, targets, present, **options):
    """(LossParts, d total / d (hidden, weight), d kd / d (hidden, weight)) of fused_distillation_loss: the first
    backward uses the forward's gradients, the second (KD alone) makes the chunks again."""
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    if present is not None:
        targets = dict(targets, teacher_mask=present)
    out = fused_distillation_loss(h, w, labels, mask, targets, chunk_size=4, **options)
    return out, torch.autograd.grad(out.total, [h, w], retain_graph=True), torch.autograd.grad(out.kd, [h, w])


@pytest.mark.parametrize("mode,kind,renormalize", CASES[1:])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("with_mask", [False, True])
def test_fused_teacher_mask_matches_reference_on_the_subset(mode, kind, renormalize, temperature, with_mask):
    # KD over the rows in mask & teacher_mask only, CE over mask, against the float64 reference on hidden @ W.T.
    hidden, weight, _, labels, mask, targets = _problem(temperature)
    mask = mask if with_mask else None
    present = _teacher_mask()
    options = dict(alpha=0.3, temperature=temperature, kd_loss=kind, jsd_beta=0.3, topk_renormalize=renormalize)
    out, got_total, got_kd = _fused_with_teacher_mask(hidden, weight, labels, mask, targets[mode], present, **options)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref = reference_loss(
        h @ w.T,
        labels,
        mask,
        targets[mode],
        present,
        alpha=0.3,
        temperature=temperature,
        kind=kind,
        renormalize=renormalize,
        beta=0.3,
    )
    want_total = torch.autograd.grad(ref.total, [h, w], retain_graph=True)
    want_kd = torch.autograd.grad(ref.kd, [h, w])
    for part in ("total", "ce", "kd"):
        torch.testing.assert_close(getattr(out, part), getattr(ref, part), rtol=1e-9, atol=1e-12)
    for got, want in zip(got_total + got_kd, want_total + want_kd):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    rows = present if mask is None else mask & present
    assert (got_kd[0][~rows] == 0).all()  # no KD gradient reaches the hidden states of rows without a target


@pytest.mark.parametrize("mode,kind,renormalize", CASES[1:])
def test_fused_teacher_mask_all_true_is_bit_identical_to_none(mode, kind, renormalize):
    hidden, weight, _, labels, mask, targets = _problem(2.0, torch.float32)
    options = dict(alpha=0.3, temperature=2.0, kd_loss=kind, topk_renormalize=renormalize)
    results = [
        _fused_with_teacher_mask(hidden, weight, labels, mask, targets[mode], present, **options)
        for present in (None, torch.ones(N, dtype=torch.bool))
    ]
    flat = [tuple(out) + total + kd for out, total, kd in results]
    assert all(torch.equal(a, b) for a, b in zip(*flat))


@pytest.mark.parametrize("mode,kind,renormalize", CASES[1:])
def test_fused_teacher_mask_all_false_gives_ce_alone(mode, kind, renormalize):
    # No position has a teacher target and every target is garbage: KD 0, total the CE, CE's gradients only.
    hidden, weight, _, labels, mask, targets = _problem(2.0)
    absent = torch.zeros(N, dtype=torch.bool)
    garbage = _with_garbage(targets[mode], ~absent)
    options = dict(alpha=0.3, temperature=2.0, kd_loss=kind, topk_renormalize=renormalize)
    out, got_total, got_kd = _fused_with_teacher_mask(hidden, weight, labels, mask, garbage, absent, **options)
    ce_alone, ce_grads, _ = _fused_with_teacher_mask(hidden, weight, labels, mask, None, None, **options)
    assert out.kd.item() == 0.0
    torch.testing.assert_close(out.total, out.ce, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.ce, ce_alone.ce, rtol=1e-12, atol=1e-12)
    assert all(torch.isfinite(g).all() for g in got_total) and all((g == 0).all() for g in got_kd)
    for got, want in zip(got_total, ce_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode,kind,renormalize", CASES[1:])
def test_fused_garbage_outside_teacher_mask_does_not_leak(mode, kind, renormalize):
    hidden, weight, _, labels, mask, targets = _problem(2.0, torch.float32)
    present = _teacher_mask()
    options = dict(alpha=0.3, temperature=2.0, kd_loss=kind, topk_renormalize=renormalize)
    results = []
    for t in (targets[mode], _with_garbage(targets[mode], ~present)):
        out, total, kd = _fused_with_teacher_mask(hidden, weight, labels, mask, t, present, **options)
        results.append(tuple(out) + total + kd)
    assert all(torch.isfinite(t).all() for t in results[1])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("part", ["scaled_total", "ce", "mixed"])
def test_fused_teacher_mask_gradients_of_any_combination_of_the_parts(part):
    # A multiple of total (as under gradient accumulation) scales the forward's gradients; any other combination
    # makes the chunks again: with a teacher_mask, both match the unfused path.
    hidden, weight, _, labels, mask, targets = _problem(2.0)
    targets = dict(targets["topk"], teacher_mask=_teacher_mask())
    got = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        options = dict(alpha=0.3, temperature=2.0, kd_loss="jsd", chunk_size=4)
        if fused:
            out = fused_distillation_loss(h, w, labels, mask, targets, **options)
        else:
            out = distillation_loss(h @ w.T, labels, mask, targets, **options)
        loss = {"scaled_total": 0.25 * out.total, "ce": out.ce, "mixed": out.total + out.kd}[part]
        got.append(torch.autograd.grad(loss, [h, w]))
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_fused_gradcheck_with_teacher_mask(mode):
    hidden, weight, _, labels, mask, targets = _problem(1.7)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    t = dict(targets[mode], teacher_mask=_teacher_mask())
    f = lambda h, w: fused_distillation_loss(h, w, labels, mask, t, alpha=0.3, temperature=1.7, chunk_size=4).total
    # The first backward hands on the gradients the forward computed, a second one (gradcheck's reentrancy check)
    # recomputes them from the kept statistics: equal up to float64 rounding.
    assert torch.autograd.gradcheck(f, (h, w), nondet_tol=1e-12)
