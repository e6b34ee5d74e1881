"""End to end: the real CLI, stage after stage (data -> cache-logits -> distill -> baseline -> compare) on the
tiny teacher and a corpus slice, checking exactly which files each stage leaves behind."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import STUDENT_FLAGS, run_cli

SEQ_LEN, STEPS = 32, 8
RUN_FILES = {
    "README.md",
    "config.yaml",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "run_config.json",
    "resolved_config.json",
    "metrics.jsonl",
    "state",
    "best",
}


def names(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.mark.slow
def test_cli_pipeline_end_to_end(tiny_teacher, tiny_corpus, tmp_path):
    data, cache, report = tmp_path / "data", tmp_path / "cache", tmp_path / "report"
    runs = {"distill": tmp_path / "tiny-distill", "baseline": tmp_path / "tiny-baseline"}

    run_cli(
        "data",
        "--corpus",
        tiny_corpus,
        "--tokenizer",
        tiny_teacher,
        "--out-dir",
        data,
        "--val-fraction",
        0.1,
        "--max-tokens",
        12000,
        check=True,
    )
    assert names(data) == {"config.yaml", "meta.json"} | {
        f"{split}.{kind}" for split in ("train", "val") for kind in ("bin", "txt", "ends", "docs")
    }
    meta = json.loads((data / "meta.json").read_text())
    token_counts = {split: np.fromfile(data / f"{split}.bin", dtype=meta["dtype"]).size for split in ("train", "val")}
    assert token_counts == {"train": meta["train_tokens"], "val": meta["val_tokens"]}
    assert 0 < sum(token_counts.values()) <= 12000

    run_cli(
        "cache-logits",
        "--data-dir",
        data,
        "--teacher",
        tiny_teacher,
        "--out-dir",
        cache,
        "--seq-len",
        SEQ_LEN,
        "--mode",
        "topk",
        "--k",
        8,
        check=True,
    )
    assert names(cache) == {
        "config.yaml",
        "manifest.json",
        "train-00000-of-00001.h5",
        "val-00000-of-00001.h5",
    }  # parts and locks cleaned up
    manifest = json.loads((cache / "manifest.json").read_text())
    assert {split: manifest["splits"][split]["rows"] for split in ("train", "val")} == {
        split: (count - 1) // SEQ_LEN for split, count in token_counts.items()
    }

    train = [
        "--data-dir",
        data,
        "--cache-dir",
        cache,
        "--teacher",
        tiny_teacher,
        "--seq-len",
        SEQ_LEN,
        "--batch-size",
        4,
        "--max-steps",
        STEPS,
        "--warmup-steps",
        2,
        "--lr",
        0.02,
        "--eval-every",
        4,
        "--eval-rows",
        8,
        "--save-every",
        4,
        "--log-every",
        2,
        "--num-workers",
        0,
        *STUDENT_FLAGS,
    ]
    for kind, run in runs.items():
        result = run_cli(kind, *train, "--out-dir", run, check=True)
        assert f"{kind}: wrote {run}" in result.stdout
        assert names(run) == RUN_FILES
        assert names(run / "state") == {"step_000004", "step_000008"}
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [2, 4, 6, 8] and all(
            "val_ppl" in r for r in records if r["step"] % 4 == 0
        )
        run_config = json.loads((run / "run_config.json").read_text())
        assert run_config["resolved"]["kind"] == kind and run_config["final"] == records[-1]

    result = run_cli(
        "compare",
        "--data-dir",
        data,
        "--cache-dir",
        cache,
        "--teacher",
        tiny_teacher,
        "--distilled",
        runs["distill"],
        "--baseline",
        runs["baseline"],
        "--out-dir",
        report,
        "--max-new-tokens",
        6,
        "--num-prompts",
        1,
        check=True,
    )
    assert names(report) == {"report.json", "report.md", "curves.png"}
    content = json.loads((report / "report.json").read_text())
    assert set(content["models"]) == {"teacher", "distilled", "baseline"}
    lines = result.stdout.splitlines()
    header = lines[next(i for i, line in enumerate(lines) if line.startswith("val perplexity")) - 1]
    assert header.split() == ["teacher", "distilled", "baseline"]  # the printed table
    for figures in content["models"].values():
        assert all(
            math.isfinite(figures[key])
            for key in ("val_ppl", "kl_exact", "kl_to_teacher", "top1_agreement", "parameters")
        )
        assert figures["positions"] == content["eval"]["positions"] == manifest["splits"]["val"]["rows"] * SEQ_LEN
    assert (
        content["models"]["distilled"]["parameters"]
        == content["models"]["baseline"]["parameters"]
        < content["models"]["teacher"]["parameters"]
    )
    assert content["hashes"]["train_sha256"] == meta["train_sha256"]
