"""Training stage (pipeline/train.py, batches.py, student.py): distill and baseline read the same rows in
the same order, metrics.jsonl, an exact resume after kill -9, determinism, student initialisation,
option checks, up-to-date reruns and the run-folder lock. Students are tiny (1 block, width 16) and
runs are 12 steps of 4 x 32 tokens, so each CLI run costs little more than its imports."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, STUDENT_FLAGS, invoke_cli, make_tiny_teacher, run_cli
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from pipeline.batches import CacheRows, StepBatches, TokenRows, collate_rows
from pipeline.cache_format import CacheReader
from pipeline.config import StudentConfig, TrainConfig, from_flags
from pipeline.errors import PipelineError
from pipeline.models import count_parameters
from pipeline.rows import read_meta
from pipeline.student import build_student, teacher_embedding_projection, teacher_layer_indices
from pipeline.train import lr_at

SEQ_LEN, BATCH, STEPS = 32, 4, 12
METRIC_KEYS = {"step", "tokens_seen", "ce", "kd", "total", "lr", "tokens_per_s"}


def train_options(data: Path, teacher: Path, cache: Path, **overrides) -> list:
    """The CLI options of the reference run; later flags override earlier ones (click keeps the last)."""
    options = {
        "data-dir": data,
        "cache-dir": cache,
        "teacher": teacher,
        "seq-len": SEQ_LEN,
        "batch-size": BATCH,
        "max-steps": STEPS,
        "warmup-steps": 2,
        "lr": 0.02,
        "eval-every": 6,
        "eval-rows": 8,
        "save-every": 3,
        "log-every": 1,
        "num-workers": 0,
        "mixed-precision": "no",
        "seed": 0,
    }
    options.update({key.replace("_", "-"): value for key, value in overrides.items()})
    return [item for key, value in options.items() for item in (f"--{key}", value)] + STUDENT_FLAGS


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: max abs diff {(a[name] - b[name]).abs().max().item()}"


invoke = invoke_cli  # the in-process CLI (conftest)


def in_process_error(result) -> str:
    """The one line a refused in-process command prints (exit code 2)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(lines) == 1, (result.exit_code, result.output[-2000:], result.exception)
    return lines[0]


def error_line(result) -> str:
    """The one `error:` line a refused command prints (stderr may also hold progress bars)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr[-2000:])
    return lines[0]


@pytest.fixture(scope="module")
def options(tiny_data, tiny_teacher, tiny_topk_cache):
    """The reference run's options on the shared topk cache (--k 16, every row), with overrides."""
    return lambda **overrides: train_options(tiny_data, tiny_teacher, tiny_topk_cache, **overrides)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, options) -> Path:
    """12 uninterrupted distill steps in float32 (the run the others are checked against)."""
    out = tmp_path_factory.mktemp("reference") / "distill"
    run_cli("distill", *options(), "--out-dir", out, check=True)
    return out


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory, options) -> Path:
    out = tmp_path_factory.mktemp("baseline") / "baseline"
    invoke("baseline", *options(max_steps=6), "--out-dir", out, check=True)
    return out


# ----------------------------------------------------------------------------- rows and their order


def test_token_rows_are_the_cache_rows(tiny_data, tiny_topk_cache):
    meta = read_meta(tiny_data)
    raw = np.fromfile(tiny_data / "train.bin", dtype=meta["dtype"]).astype(np.int64)
    token_rows, cache_rows = (
        TokenRows(str(tiny_data), "train", SEQ_LEN),
        CacheRows(CacheReader(tiny_topk_cache, "train")),
    )
    assert len(token_rows) == len(cache_rows) == (len(raw) - 1) // SEQ_LEN > 100
    for i in range(len(token_rows)):
        expected = raw[i * SEQ_LEN : i * SEQ_LEN + SEQ_LEN + 1]
        assert np.array_equal(token_rows[i]["tokens"], expected)
        assert np.array_equal(cache_rows[i]["tokens"], expected)
    assert (
        len(TokenRows(str(tiny_data), "train", SEQ_LEN, max_rows=10))
        == len(CacheRows(CacheReader(tiny_topk_cache, "train"), 10))
        == 10
    )

    # The loaders the two run kinds build yield the same token batches, step after step.
    def loader(rows):
        return DataLoader(
            rows,
            batch_sampler=StepBatches(len(rows), BATCH, 2, seed=5, start_step=0, max_steps=8),
            collate_fn=collate_rows,
        )

    baseline_batches, distill_batches = list(loader(token_rows)), list(loader(cache_rows))
    assert len(baseline_batches) == len(distill_batches) == 16
    for plain, cached in zip(baseline_batches, distill_batches):
        assert set(plain) == {"tokens"} and {"topk_ids", "topk_logprobs", "tail_logprob"} <= set(cached)
        assert plain["tokens"].shape == (BATCH, SEQ_LEN + 1)
        assert torch.equal(plain["tokens"], cached["tokens"])


def test_step_batches_order_is_a_function_of_seed_and_step():
    full = list(StepBatches(50, 4, 2, seed=3, start_step=0, max_steps=20))
    assert len(full) == 40 and all(len(batch) == 4 for batch in full)
    assert full == list(StepBatches(50, 4, 2, seed=3, start_step=0, max_steps=20))
    flat = np.concatenate(full)
    for epoch in range(len(flat) // 50):  # each epoch is a permutation of every row
        assert sorted(flat[epoch * 50 : (epoch + 1) * 50].tolist()) == list(range(50))
    assert list(StepBatches(50, 4, 2, seed=4, start_step=0, max_steps=20)) != full
    # Resuming at step s continues the uninterrupted sequence exactly (2 micro-batches per step).
    for start in (1, 7, 12, 19):
        assert list(StepBatches(50, 4, 2, seed=3, start_step=start, max_steps=20)) == full[2 * start :]
    # The next seed does not replay this seed's next epoch.
    seed0_epoch1 = list(StepBatches(50, 50, 1, seed=0, start_step=0, max_steps=2))[1]
    seed1_epoch0 = list(StepBatches(50, 50, 1, seed=1, start_step=0, max_steps=1))[0]
    assert seed0_epoch1 != seed1_epoch0


def test_step_batches_ranks_partition_each_global_batch():
    world, batch, accum, steps = 3, 2, 2, 9
    single = list(StepBatches(40, batch * world, accum, seed=1, start_step=0, max_steps=steps))
    shares = [
        list(StepBatches(40, batch, accum, seed=1, start_step=0, max_steps=steps, rank=r, world_size=world))
        for r in range(world)
    ]
    assert all(len(s) == len(single) == steps * accum for s in shares)
    for micro, global_batch in enumerate(single):
        parts = [shares[r][micro] for r in range(world)]
        assert all(len(p) == batch for p in parts)
        assert sorted(sum(parts, [])) == sorted(global_batch)  # disjoint shares that cover the global batch
    resumed = list(StepBatches(40, batch, accum, seed=1, start_step=4, max_steps=steps, rank=2, world_size=world))
    assert resumed == shares[2][4 * accum :]


# ----------------------------------------------------------------------------- metrics and outputs


def test_metrics_record_every_step_and_the_distill_loss_falls(reference_run):
    records = metrics(reference_run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    schedule = from_flags(TrainConfig, lr=0.02, warmup_steps=2, max_steps=STEPS)
    alpha = json.loads((reference_run / "run_config.json").read_text())["resolved"]["train"]["alpha"]
    assert alpha == from_flags(TrainConfig).loss.alpha  # the default, as recorded
    for r in records:
        has_eval = r["step"] % 6 == 0
        assert set(r) == METRIC_KEYS | ({"val_ce", "val_ppl"} if has_eval else set())
        assert r["tokens_seen"] == r["step"] * BATCH * SEQ_LEN
        # the rate the step used
        assert r["lr"] == pytest.approx(0.02 * lr_at(r["step"] - 1, schedule.optim, STEPS), rel=1e-9)
        assert r["tokens_per_s"] > 0 and all(math.isfinite(r[k]) for k in ("ce", "kd", "total"))
        assert r["total"] == pytest.approx(alpha * r["ce"] + (1 - alpha) * r["kd"], rel=1e-5)  # T 1
        if has_eval:
            assert r["val_ppl"] == pytest.approx(math.exp(r["val_ce"]), rel=1e-9)
    first, last = records[:3], records[-3:]
    assert np.mean([r["total"] for r in last]) < np.mean([r["total"] for r in first]) - 0.3
    assert np.mean([r["kd"] for r in last]) < np.mean([r["kd"] for r in first]) - 0.3
    assert records[11]["val_ce"] < records[5]["val_ce"]


def test_final_folder_is_a_loadable_model_whose_val_loss_matches_the_metrics(reference_run, tiny_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in reference_run.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "run_config.json",
        "metrics.jsonl",
        "state",
    } <= names and ".lock" not in names
    assert sorted(p.name for p in (reference_run / "state").iterdir()) == ["step_000009", "step_000012"]
    model = AutoModelForCausalLM.from_pretrained(reference_run).eval()
    run_config = json.loads((reference_run / "run_config.json").read_text())
    assert count_parameters(model) == run_config["parameters"]
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 16
    tokenizer = AutoTokenizer.from_pretrained(reference_run)
    assert (
        tokenizer("The Mole").input_ids
        == AutoTokenizer.from_pretrained(read_meta(tiny_data)["tokenizer_name"])("The Mole").input_ids
    )
    # The last evaluation (8 val rows, float32) is the model's own Hugging Face loss on those rows.
    val = TokenRows(str(tiny_data), "val", SEQ_LEN)
    rows = torch.stack([torch.from_numpy(val[i]["tokens"]) for i in range(8)])
    with torch.no_grad():
        loss = model(input_ids=rows, labels=rows).loss.item()
    assert metrics(reference_run)[-1]["val_ce"] == pytest.approx(loss, rel=1e-5)
    assert run_config["final"] == metrics(reference_run)[-1]


def test_rerun_is_up_to_date_and_a_changed_option_after_a_finished_run_retrains(reference_run, options, tmp_path):
    before = (reference_run / "model.safetensors").read_bytes(), (reference_run / "metrics.jsonl").read_text()
    again = invoke("distill", *options(), "--out-dir", reference_run, "--resume", "--num-workers", 1, check=True)
    assert "up to date" in again.stdout
    assert ((reference_run / "model.safetensors").read_bytes(), (reference_run / "metrics.jsonl").read_text()) == before
    # What `make` does after STEPS= changes: --resume over a FINISHED run of other options trains anew.
    copy = tmp_path / "copy"
    shutil.copytree(reference_run, copy)
    changed = invoke("distill", *options(lr=0.01), "--out-dir", copy, "--resume", check=True)
    assert "training anew" in changed.stdout
    assert [r["step"] for r in metrics(copy)] == list(range(1, STEPS + 1))
    assert weights(copy).keys() == weights(reference_run).keys()
    assert not torch.equal(weights(copy)["model.norm.weight"], weights(reference_run)["model.norm.weight"])


@pytest.mark.slow
def test_changed_option_with_resume_over_an_interrupted_run_is_refused(interrupted_run):
    """An interrupted run's progress is never dropped silently: --resume with other options names its state."""
    assert interrupted_run["changed_resume"].returncode == 2
    assert str(interrupted_run["out"] / "state") in error_line(interrupted_run["changed_resume"])


@pytest.mark.slow
def test_changed_option_retrains_and_the_same_seed_twice_gives_identical_weights(reference_run, options, tmp_path):
    retrained = tmp_path / "retrained"
    shutil.copytree(reference_run, retrained)
    result = run_cli("distill", *options(mixed_precision="bf16"), "--out-dir", retrained, check=True)
    assert "up to date" not in result.stdout
    assert json.loads((retrained / "run_config.json").read_text())["resolved"]["train"]["mixed_precision"] == "bf16"
    assert [r["step"] for r in metrics(retrained)] == list(range(1, STEPS + 1))  # old records gone, none repeated
    assert any(not torch.equal(weights(retrained)[n], t) for n, t in weights(reference_run).items())
    fresh = tmp_path / "fresh"
    run_cli("distill", *options(mixed_precision="bf16"), "--out-dir", fresh, check=True)
    assert_same_weights(weights(fresh), weights(retrained))  # bf16 autocast on CPU is bit-deterministic too
    assert [r["ce"] for r in metrics(fresh)] == [r["ce"] for r in metrics(retrained)]


# ----------------------------------------------------------------------------- kill -9, resume and the lock


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, options) -> dict:
    """Start the reference run's command, freeze it (SIGSTOP) once its first state is saved, try a second
    training on the same folder, kill -9 the first, then rerun with --resume."""
    out = tmp_path_factory.mktemp("interrupted") / "distill"
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    log = out.parent / "first.log"
    with open(log, "w") as log_file:
        first = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "distill", *map(str, options()), "--out-dir", str(out)],
            cwd=REPO,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        while not list(out.glob("state/step_*/trainer_state.json")):
            assert first.poll() is None, f"the run ended before saving a state:\n{log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "no state saved within 180 s"
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)
        facts = {
            "pid": first.pid,
            "finished_at_kill": (out / "model.safetensors").exists(),
            "states_at_kill": sorted(p.name for p in (out / "state").glob("step_*")),
        }
        facts["second"] = run_cli("distill", *options(), "--out-dir", out)
    finally:
        first.kill()  # SIGKILL also ends a stopped process
        first.wait()
    facts["lock_left_by_kill"] = (out / ".lock").exists()
    facts["changed_resume"] = run_cli("distill", *options(lr=0.01), "--out-dir", out, "--resume")
    facts["resumed"] = run_cli("distill", *options(), "--out-dir", out, "--resume")
    facts["out"] = out
    return facts


@pytest.mark.slow
def test_second_training_on_the_same_folder_refuses_while_the_first_runs(interrupted_run):
    line = error_line(interrupted_run["second"])
    assert "in use" in line and str(interrupted_run["pid"]) in line


@pytest.mark.slow
def test_resume_after_kill_matches_the_uninterrupted_run(interrupted_run, reference_run):
    out = interrupted_run["out"]
    assert not interrupted_run["finished_at_kill"] and interrupted_run["states_at_kill"]
    assert interrupted_run["lock_left_by_kill"]  # the stale lock of the killed process is taken over
    resumed = interrupted_run["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {out / 'state' / interrupted_run['states_at_kill'][-1]}" in resumed.stdout
    assert not (out / ".lock").exists()
    assert_same_weights(weights(out), weights(reference_run))
    records, expected = metrics(out), metrics(reference_run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # no step twice, none missing
    for got, want in zip(records, expected):
        assert {k: v for k, v in got.items() if k != "tokens_per_s"} == {
            k: v for k, v in want.items() if k != "tokens_per_s"
        }


# ----------------------------------------------------------------------------- baseline vs distill


def test_baseline_has_no_kd_term_and_starts_from_the_same_model_and_batch(baseline_run, reference_run):
    records = metrics(baseline_run)
    assert [r["step"] for r in records] == list(range(1, 7))
    for r in records:
        assert r["kd"] == 0.0 and r["total"] == r["ce"]
        assert ("val_ce" in r) == (r["step"] == 6)
    # Step 1's loss is measured before any update: same initialisation, same first batch.
    assert records[0]["ce"] == pytest.approx(metrics(reference_run)[0]["ce"], rel=1e-6)
    assert json.loads((baseline_run / "run_config.json").read_text())["resolved"]["kind"] == "baseline"


def test_distill_with_alpha_one_trains_exactly_like_the_baseline(baseline_run, options, tmp_path):
    """alpha = 1 zeroes the KD weight: same rows in the same order must then give the baseline's steps."""
    run = tmp_path / "alpha1"
    invoke("distill", *options(max_steps=6, alpha=1.0), "--out-dir", run, check=True)
    distilled, baseline = metrics(run), metrics(baseline_run)
    assert [r["ce"] for r in distilled] == pytest.approx([r["ce"] for r in baseline], rel=1e-6, abs=1e-7)
    assert all(r["kd"] > 0 for r in distilled)  # the KD term was computed, just not weighted
    for name, tensor in weights(baseline_run).items():
        assert torch.allclose(weights(run)[name], tensor, rtol=0, atol=1e-6), name


# ----------------------------------------------------------------------------- students


def test_teacher_layers_student_copies_embeddings_norm_and_every_nth_block(tmp_path, tiny_tokenizer):
    teacher_dir = make_tiny_teacher(tmp_path / "teacher4", tiny_tokenizer, seed=1, layers=4)
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = build_student(
        StudentConfig(student_init="teacher-layers", n_layer=2), str(teacher_dir), len(tiny_tokenizer), seed=0
    )
    assert teacher_layer_indices(4, 2) == [0, 2] and teacher_layer_indices(4, 3) == [0, 1, 2]
    assert student.config.num_hidden_layers == 2 and student.config.hidden_size == teacher.config.hidden_size
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(s["model.norm.weight"], t["model.norm.weight"])
    assert torch.equal(student.get_output_embeddings().weight, t["model.embed_tokens.weight"])
    for new, old in enumerate([0, 2]):
        block = {k[len(f"model.layers.{new}.") :]: v for k, v in s.items() if k.startswith(f"model.layers.{new}.")}
        assert block and all(torch.equal(v, t[f"model.layers.{old}.{k}"]) for k, v in block.items())
    with pytest.raises(PipelineError, match="more than the teacher"):
        build_student(
            StudentConfig(student_init="teacher-layers", n_layer=5), str(teacher_dir), len(tiny_tokenizer), seed=0
        )


def test_teacher_embedding_projection_keeps_the_leading_directions():
    torch.manual_seed(0)
    # rank-3 embeddings in 8 dimensions plus an offset every row shares: a width-3 projection loses only the offset
    basis = torch.linalg.qr(torch.randn(8, 8))[0][:, :3]
    embeddings = (torch.randn(200, 3) * torch.tensor([5.0, 3.0, 1.0])) @ basis.T + torch.randn(8)
    embeddings = embeddings.double()  # exactly rank 3 about the offset, to float64 rounding
    out = teacher_embedding_projection(embeddings, 3, std=0.02)
    assert out.shape == (200, 3) and out.dtype == torch.float32
    assert out.std().item() == pytest.approx(0.02, rel=1e-5)
    exact = "donot_use_mm_for_euclid_dist"
    d_in, d_out = (torch.cdist(x, x, compute_mode=exact) for x in (embeddings, out.double()))
    ratio = d_out[d_in > 0] / d_in[d_in > 0]  # every distance between two tokens scaled by one factor
    assert torch.allclose(ratio, ratio.mean().expand_as(ratio), rtol=1e-4)
    # leading direction first, each column's spread in proportion to the centred matrix's singular values
    singular = torch.linalg.svdvals(embeddings - embeddings.mean(0))
    for width in (3, 2):
        norms = teacher_embedding_projection(embeddings, width, std=1.0).double().norm(dim=0)
        assert torch.allclose(norms / norms[0], singular[:width] / singular[0], rtol=1e-4)
    with pytest.raises(PipelineError, match=r"width 9 \(--n-embd\) is more than the teacher's \(8\)"):
        teacher_embedding_projection(embeddings, 9, std=0.02)


def test_teacher_embeddings_student_is_the_random_one_with_the_teachers_token_embeddings(tmp_path, tiny_tokenizer):
    teacher_dir = make_tiny_teacher(tmp_path / "teacher", tiny_tokenizer, seed=1)  # width 32
    from transformers import AutoModelForCausalLM

    teacher_embeddings = AutoModelForCausalLM.from_pretrained(teacher_dir).get_input_embeddings().weight.detach()
    shape = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_kv_head": 2, "mlp_size": 32}
    vocab = len(tiny_tokenizer)
    student = build_student(StudentConfig(student_init="teacher-embeddings", **shape), str(teacher_dir), vocab, 0)
    plain = build_student(StudentConfig(student_init="random", **shape), str(teacher_dir), vocab, 0)
    embeddings = student.get_input_embeddings().weight
    expected = teacher_embedding_projection(teacher_embeddings, 16, student.config.initializer_range)
    assert torch.equal(embeddings[:vocab], expected)
    assert torch.equal(student.get_output_embeddings().weight, embeddings)  # tied
    plain_state = plain.state_dict()
    for name, value in student.state_dict().items():  # everything else (and padding rows) as the random student's
        rows = slice(vocab, None) if name in ("model.embed_tokens.weight", "lm_head.weight") else slice(None)
        assert torch.equal(value[rows], plain_state[name][rows]), name
    assert count_parameters(student) == count_parameters(plain)
    with pytest.raises(PipelineError, match="use --n-embd 32 or less, or --student-init random"):
        build_student(StudentConfig(**{**shape, "n_embd": 64}), str(teacher_dir), vocab, 0)  # the default init
    # a --student-config student (here GPT-2) starts from the teacher's embeddings the same way, by default
    config_file = tmp_path / "gpt2.json"
    config_file.write_text(json.dumps({"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2}))
    custom = build_student(StudentConfig(student_config=str(config_file)), str(teacher_dir), vocab, 0)
    assert torch.equal(custom.get_input_embeddings().weight[:vocab], expected)


def test_temperature_other_than_the_caches_names_the_rebuild(options, tmp_path):
    result = invoke("distill", *options(), "--temperature", 2.0, "--out-dir", tmp_path / "run")
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()  # refused before any setup: nothing else printed
    assert line.startswith("error: --temperature 2.0 differs from the cache's 1.0") and "cache-logits" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "variant",
    [
        ["--kd-loss", "reverse-kl", "--student-init", "teacher-layers", "--n-layer", 1],
        ["--kd-loss", "jsd", "--topk-renormalize"],
    ],
    ids=["reverse-kl-teacher-layers", "jsd-renormalized"],
)
def test_kd_variants_train(options, tmp_path, variant):
    run = tmp_path / "run"
    invoke("distill", *options(max_steps=2, eval_every=2, save_every=2), *variant, "--out-dir", run, check=True)
    records = metrics(run)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r[k]) and r["kd"] > 0 for r in records for k in ("ce", "kd", "total"))
    assert math.isfinite(records[-1]["val_ce"])
    resolved = json.loads((run / "run_config.json").read_text())["resolved"]
    assert resolved["train"]["kd_loss"] == variant[1]
    if "teacher-layers" in variant:  # the teacher's width, one of its blocks
        config = json.loads((run / "config.json").read_text())
        assert (config["num_hidden_layers"], config["hidden_size"]) == (1, 32)
    else:
        assert resolved["train"]["topk_renormalize"] is True


def test_sampled_cache_trains(tiny_sampled_cache, options, tmp_path):
    cache = tiny_sampled_cache  # --num-samples 8, 32 rows
    run = tmp_path / "run"
    invoke(
        "distill",
        *options(max_steps=3, eval_every=3, save_every=3, max_rows=32, cache_dir=cache),
        "--out-dir",
        run,
        check=True,
    )
    records = metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["kd"]) and r["kd"] != 0 for r in records)
    assert "val_ce" in records[-1]
    refused = invoke(
        "distill", *options(max_rows=32, cache_dir=cache), "--kd-loss", "jsd", "--out-dir", tmp_path / "jsd"
    )
    assert refused.exit_code == 2 and "needs a topk cache" in refused.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--alpha", "1.5"], "--alpha must be in [0, 1], got 1.5"),
        (["--alpha", "-0.1"], "--alpha must be in [0, 1], got -0.1"),
        (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    ],
)
def test_out_of_range_options_exit_2_with_one_line(options, tmp_path, flags, message):
    result = invoke("distill", *options(), *flags, "--out-dir", tmp_path / "run")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_with_the_global_batch(options, tmp_path):
    """`torchrun --nproc_per_node 2` on CPU: each rank takes its interleaved half of every global batch
    (disjoint rows), gradients are averaged, and the run is saved once. Two ranks of batch 2 must then
    train like one process of batch 4 over the same rows (equal up to float reduction order)."""
    one = tmp_path / "one"
    invoke("distill", *options(), "--out-dir", one, "--batch-size", 4, check=True)
    two = tmp_path / "two"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pipeline"]
    args = ["distill", *[str(a) for a in options()], "--out-dir", str(two), "--batch-size", "2"]
    result = subprocess.run(launch + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    records_one, records_two = metrics(one), metrics(two)
    assert [r["step"] for r in records_two] == [r["step"] for r in records_one]  # written once, by rank 0
    assert records_two[-1]["tokens_seen"] == STEPS * 4 * SEQ_LEN  # 2 ranks x 2 rows per step
    assert sorted(p.name for p in (two / "state").iterdir()) == sorted(p.name for p in (one / "state").iterdir())
    # Same rows per step, gradients averaged over the ranks: the models agree (the logged train losses are
    # rank 0's half of each batch, so they are not compared; val CE is the whole model on the same val rows).
    for got, want in zip(records_two, records_one):
        if "val_ce" in want:
            assert got["val_ce"] == pytest.approx(want["val_ce"], rel=1e-3)
    a, b = weights(one), weights(two)
    worst = max(((b[n] - a[n]).abs().max() / a[n].abs().max()).item() for n in a)
    assert worst < 5e-2, worst  # a different split of the rows would differ by O(1) relative
