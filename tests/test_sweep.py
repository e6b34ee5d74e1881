"""The sweep (pipeline/sweep.py): grid parsing and refusals, a tiny sweep whose students equal plain distill /
baseline runs of the same options, whose figures are recomputed independently, and which resumes after a kill."""

from __future__ import annotations

import json
import math
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, STUDENT_FLAGS, invoke_cli, one_torch_thread, run_cli
from safetensors.torch import load_file
from test_faults import cli_env, command

from pipeline.config import SweepConfig, from_flags
from pipeline.errors import PipelineError
from pipeline.sweep import grid_points, point_name, training_seconds

SEQ_LEN, STEPS = 32, 6  # the shared cache (conftest tiny_topk_cache): every row, so no --max-rows
COMMON = [
    "--seq-len", SEQ_LEN, "--batch-size", 4, "--max-steps", STEPS, "--warmup-steps", 1,
    "--lr", 0.02, "--eval-every", 3, "--eval-rows", 4, "--save-every", 2, "--num-workers", 0,
    "--mixed-precision", "no", *STUDENT_FLAGS,
]  # fmt: skip


def grid(text="", file=None):
    return grid_points(from_flags(SweepConfig, grid=text, grid_file=file))


def test_grid_is_every_combination_with_typed_values():
    points = grid("alpha=0.3,0.7 lr=1e-3,2e-3 kd_loss=forward-kl n-layer=2")
    assert points == [
        {"alpha": a, "lr": lr, "kd_loss": "forward-kl", "n_layer": 2} for a in (0.3, 0.7) for lr in (1e-3, 2e-3)
    ]
    assert isinstance(points[0]["n_layer"], int) and isinstance(points[0]["alpha"], float)
    assert grid("topk_renormalize=true,false") == [{"topk_renormalize": True}, {"topk_renormalize": False}]
    assert point_name(3, points[1]) == "03-alpha-0.3_lr-0.002_kd_loss-forward-kl_n_layer-2"


def test_grid_file_as_axes_or_as_points(tmp_path):
    (tmp_path / "axes.yaml").write_text("alpha: [0.2, 0.8]\nmax_steps: 50\n")
    assert grid(file=tmp_path / "axes.yaml") == [{"alpha": 0.2, "max_steps": 50}, {"alpha": 0.8, "max_steps": 50}]
    (tmp_path / "points.json").write_text(json.dumps([{"alpha": 0.1}, {"lr": 0.004, "student_init": "random"}]))
    assert grid("alpha=0.9", tmp_path / "points.json") == [
        {"alpha": 0.1},
        {"lr": 0.004, "student_init": "random"},
        {"alpha": 0.9},
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("alpah=0.3", "did you mean alpha"),
        ("temperature=2", "make cache-logits TEMPERATURE="),
        ("seq_len=64", "cannot change seq_len"),
        ("lr=fast", "lr=fast: not a float"),
        ("alpha", "option=value1,value2"),
        ("topk_renormalize=maybe", "not a boolean"),
    ],
)
def test_grid_refusals_name_the_fix(text, message):
    with pytest.raises(PipelineError, match=message):
        grid(text)


def test_an_empty_grid_is_refused_in_one_line(tiny_data, tiny_teacher, tmp_path):
    result = invoke_cli("sweep", "--data-dir", tiny_data, "--teacher", tiny_teacher, "--out-dir", tmp_path / "s")
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(lines) == 1 and "--grid" in lines[0]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_data, tiny_teacher, tiny_topk_cache) -> dict:
    """A sweep of two students and the baseline on the shared topk cache, evaluated on all its val rows."""
    root = tmp_path_factory.mktemp("sweep")
    paths = ["--data-dir", tiny_data, "--teacher", tiny_teacher, "--cache-dir", tiny_topk_cache]
    with one_torch_thread():  # as the CLI subprocesses run (OMP_NUM_THREADS=1), so weights compare across them
        invoke_cli("sweep", *paths, *COMMON, "--out-dir", root / "sweep", "--grid", "alpha=0.2,0.8", check=True)
    report = json.loads((root / "sweep" / "sweep.json").read_text())
    return {"root": root, "cache": tiny_topk_cache, "paths": paths, "report": report}


def test_sweep_runs_are_plain_distill_and_baseline_runs(swept):
    root, report = swept["root"], swept["report"]
    names = {row["name"] for row in report["ranked"]}
    assert names == {"baseline", "01-alpha-0.2", "02-alpha-0.8"}
    # The same options given to distill / baseline directly give the same weights: the sweep runs the real step.
    with one_torch_thread():
        invoke_cli(
            "distill", *swept["paths"], *COMMON, "--alpha", 0.8, "--out-dir", root / "direct-distill", check=True
        )
        invoke_cli("baseline", *swept["paths"], *COMMON, "--out-dir", root / "direct-baseline", check=True)
    for direct, swept_run in (("direct-distill", "02-alpha-0.8"), ("direct-baseline", "baseline")):
        a = load_file(root / direct / "model.safetensors")
        b = load_file(root / "sweep" / "runs" / swept_run / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ranked_figures_match_an_independent_computation(swept, tiny_data):
    from transformers import AutoModelForCausalLM

    from pipeline.cache_format import CacheReader

    report = swept["report"]
    ppls = [row["val_ppl"] for row in report["ranked"]]
    assert ppls == sorted(ppls)
    baseline = next(row for row in report["ranked"] if row["name"] == "baseline")
    reader = CacheReader(swept["cache"], "val")
    tokens = torch.stack([torch.from_numpy(reader.row(i)["tokens"]) for i in range(len(reader))])
    for row in report["ranked"]:
        model = AutoModelForCausalLM.from_pretrained(row["path"]).eval()
        with torch.no_grad():  # the model's own Hugging Face loss, mean over every val position
            loss = model(input_ids=tokens, labels=tokens).loss.item()
        assert row["val_ppl"] == pytest.approx(math.exp(loss), rel=1e-4)
        assert row["ratio_to_baseline"] == pytest.approx(row["val_ppl"] / baseline["val_ppl"])
        assert 0 <= row["top1_agreement"] <= 1 and row["kl_exact"] > 0 and row["train_seconds"] > 0
    markdown = (swept["root"] / "sweep" / "sweep.md").read_text()
    assert "| 1 |" in markdown and "the temperature is the cache's" in markdown
    assert "| baseline | CE only, student_init=teacher-embeddings |" in markdown  # the default student
    assert (swept["root"] / "sweep" / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_training_seconds_sum_the_metrics_windows(tmp_path):
    records = [
        {"step": 1, "tokens_seen": 100, "tokens_per_s": 50.0},
        {"step": 2, "tokens_seen": 300, "tokens_per_s": 100.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert training_seconds(tmp_path) == pytest.approx(100 / 50 + 200 / 100)


@pytest.mark.slow
def test_a_killed_sweep_continues_where_it_stopped(swept, tmp_path):
    """Kill the sweep while it trains its second student; the rerun keeps the finished first run as it is and ends
    with the same students as an uninterrupted sweep."""
    out = tmp_path / "sweep"
    args = [*swept["paths"], *COMMON, "--out-dir", out, "--grid", "alpha=0.2,0.8", "--no-baseline"]
    # killed right after the second student's first saved state: its 3rd save of 6 steps every 2 is the first's last
    fault = {"target": "pipeline.train:_save_state", "call": STEPS // 2 + 1}
    result = subprocess.run(
        command("sweep", *args, fault=fault), cwd=REPO, env=cli_env(fault), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    first = out / "runs" / "01-alpha-0.2" / "model.safetensors"
    assert first.exists() and not (out / "runs" / "02-alpha-0.8" / "model.safetensors").exists()
    metrics = first.parent / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    run_cli("sweep", *args, check=True)
    assert metrics.stat().st_mtime_ns == before  # finished: up to date, not retrained (its metrics never rewritten)
    report = json.loads((out / "sweep.json").read_text())
    for row in report["ranked"]:
        reference = swept["root"] / "sweep" / "runs" / row["name"] / "model.safetensors"
        a, b = load_file(Path(row["path"]) / "model.safetensors"), load_file(reference)
        assert all(torch.equal(a[k], b[k]) for k in a), row["name"]
