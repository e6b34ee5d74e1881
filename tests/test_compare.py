"""Compare and generate stages: the report's figures recomputed independently in the test (perplexity from
the models' own Hugging Face loss, top-1 agreement from argmaxes, a dense KL against a cache with K equal to
the vocabulary), the files written, refusals of runs that cannot be compared, and seeded generation."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import STUDENT_FLAGS, invoke_cli, make_tiny_teacher, run_cli

from pipeline.batches import TokenRows
from pipeline.models import load_tokenizer

SEQ_LEN, ROWS, TEMPERATURE = 32, 24, 2.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


invoke = invoke_cli  # the in-process CLI (conftest)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data, tiny_teacher) -> dict:
    """A K = vocabulary cache at T = 2 over 24 rows per split, a distilled and a baseline student, and their report."""
    root = tmp_path_factory.mktemp("compare")
    vocab = json.loads((tiny_teacher / "config.json").read_text())["vocab_size"]
    run_cli(
        "cache-logits",
        "--data-dir",
        tiny_data,
        "--teacher",
        tiny_teacher,
        "--out-dir",
        root / "cache",
        "--seq-len",
        SEQ_LEN,
        "--mode",
        "topk",
        "--k",
        vocab,
        "--temperature",
        TEMPERATURE,
        "--max-rows",
        ROWS,
        "--dtype",
        "float32",
        check=True,
    )  # float32 on GPUs too
    train = [
        "--data-dir",
        tiny_data,
        "--cache-dir",
        root / "cache",
        "--teacher",
        tiny_teacher,
        "--seq-len",
        SEQ_LEN,
        "--max-rows",
        ROWS,
        "--batch-size",
        4,
        "--max-steps",
        6,
        "--warmup-steps",
        1,
        "--lr",
        0.02,
        "--eval-every",
        3,
        "--eval-rows",
        8,
        "--save-every",
        6,
        "--num-workers",
        0,
        "--mixed-precision",
        "no",
        *STUDENT_FLAGS,
    ]
    invoke("distill", *train, "--out-dir", root / "distill", check=True)
    invoke("baseline", *train, "--out-dir", root / "baseline", check=True)
    compare_options = [
        "--data-dir",
        tiny_data,
        "--cache-dir",
        root / "cache",
        "--teacher",
        tiny_teacher,
        "--distilled",
        root / "distill",
        "--baseline",
        root / "baseline",
        "--batch-size",
        5,
        "--max-new-tokens",
        6,
        "--num-prompts",
        2,
    ]
    result = run_cli("compare", *compare_options, "--out-dir", root / "report", check=True)
    return {
        "root": root,
        "vocab": vocab,
        "stdout": result.stdout,
        "options": compare_options,
        "report": json.loads((root / "report" / "report.json").read_text()),
    }


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_report_figures_match_an_independent_computation(runs, tiny_data, tiny_teacher):
    report, root = runs["report"], runs["root"]
    assert set(report["models"]) == {"teacher", "distilled", "baseline"}
    val = TokenRows(str(tiny_data), "val", SEQ_LEN)
    count = min(len(val), ROWS)  # the cache holds the first 24 val rows; eval_rows 0 means all of them
    rows = torch.stack([torch.from_numpy(val[i]["tokens"]) for i in range(count)])
    meta = json.loads((tiny_data / "meta.json").read_text())
    assert report["data"] == {key: meta[key] for key in ("corpus_name", "train_tokens", "val_tokens")}
    assert report["eval"] == {
        "rows": count,
        "seq_len": SEQ_LEN,
        "positions": count * SEQ_LEN,
        "kl_temperature": TEMPERATURE,
        "cache_mode": "topk",
    }
    paths = {"teacher": tiny_teacher, "distilled": root / "distill", "baseline": root / "baseline"}
    with torch.no_grad():
        models = {label: load(path) for label, path in paths.items()}
        logits = {label: model(input_ids=rows[:, :-1]).logits for label, model in models.items()}
        teacher_logp = torch.log_softmax(logits["teacher"] / TEMPERATURE, dim=-1)
        for label, model in models.items():
            figures = report["models"][label]
            hf_loss = model(input_ids=rows, labels=rows).loss.item()  # mean next-token CE over every position
            assert figures["val_ppl"] == pytest.approx(math.exp(hf_loss), rel=1e-5), label
            agreement = (logits[label].argmax(-1) == logits["teacher"].argmax(-1)).double().mean().item()
            assert figures["top1_agreement"] == pytest.approx(agreement, abs=1.5 / (count * SEQ_LEN)), label
            student_logp = torch.log_softmax(logits[label] / TEMPERATURE, dim=-1)
            dense_kl = (
                (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean().item()
            )  # KL(teacher || model) at T
            assert figures["kl_to_teacher"] == pytest.approx(dense_kl, rel=1e-4, abs=1e-4), (
                label
            )  # cache log-probs are float16
            assert figures["kl_exact"] == pytest.approx(dense_kl, rel=1e-5, abs=1e-6), (
                label
            )  # recomputed from the teacher
            unique = {id(p): p for p in model.parameters()}.values()
            assert figures["parameters"] == sum(p.numel() for p in unique)
            assert figures["size_bytes"] == sum(p.stat().st_size for p in Path(paths[label]).glob("*.safetensors"))
            assert figures["generate_tokens_per_s"] > 0 and figures["positions"] == count * SEQ_LEN
    assert report["models"]["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-4)
    assert report["models"]["teacher"]["kl_exact"] == 0.0
    assert report["models"]["distilled"]["kl_to_teacher"] > 0.1  # a real difference, not a degenerate zero
    assert report["models"]["teacher"]["top1_agreement"] == 1.0

    # bits per byte: the CE summed over the positions, over the bytes the labels spell (byte-level BPE: one byte per
    # character of a token's string, none for the special EOS), in bits
    tokenizer = load_tokenizer(tiny_teacher)
    labels = rows[:, 1:].reshape(-1).tolist()
    special = set(tokenizer.all_special_ids)
    label_bytes = sum(len(tokenizer.convert_ids_to_tokens(i)) for i in labels if i not in special)
    for label, figures in report["models"].items():
        expected = figures["val_ce"] * count * SEQ_LEN / label_bytes / math.log(2)
        assert figures["val_bits_per_byte"] == pytest.approx(expected, rel=1e-9), label


def test_best_checkpoints_and_draft_figures(runs, tiny_teacher):
    """Best vs best: each run's best/ scored like the final models; the students as the teacher's draft models."""
    report, root = runs["report"], runs["root"]
    for label, folder in (("distilled", "distill"), ("baseline", "baseline")):
        best = report["best"][label]
        assert best["step"] == json.loads((root / folder / "best" / "best.json").read_text())["step"]
        if best["step"] == report["runs"][label]["resolved"]["train"]["max_steps"]:  # the final model is the best
            assert best["val_ppl"] == pytest.approx(report["models"][label]["val_ppl"], rel=1e-9)
        assert {"val_ppl", "val_bits_per_byte", "kl_exact", "top1_agreement"} <= set(best)
    draft = report["draft"]
    assert draft["new_tokens"] == len(report["samples"]["prompts"]) * 6 and draft["teacher_tokens_per_s"] > 0
    for label in ("distilled", "baseline"):
        figures = draft["drafts"][label]
        assert figures["accepted"] + figures["teacher_forwards"] == draft["new_tokens"]
        assert 0 <= figures["accepted"] <= figures["proposed"] and figures["same_output"] == 1.0
        assert figures["speedup"] == pytest.approx(figures["tokens_per_s"] / draft["teacher_tokens_per_s"])
    lines = [line for line in runs["stdout"].splitlines() if line.startswith("distilled / baseline")]
    assert [line.split(",")[0] for line in lines] == [
        "distilled / baseline val perplexity",
        "distilled / baseline val perplexity",
    ]
    assert "final vs final" in lines[0] and "best vs best" in lines[1]


def test_report_files_and_samples(runs):
    out = runs["root"] / "report"
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "report.json", "report.md"]
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    report = runs["report"]
    prompts = report["samples"]["prompts"]
    assert len(prompts) == 2 and all(prompts)
    for label in ("teacher", "distilled", "baseline"):
        assert len(report["samples"][label]) == len(prompts) and all(report["samples"][label])
    assert report["runs"]["distilled"]["resolved"]["kind"] == "distill"
    assert report["runs"]["baseline"]["resolved"]["kind"] == "baseline"
    markdown = (out / "report.md").read_text()
    tables = [block.splitlines() for block in markdown.split("\n\n") if block.startswith("|")]
    # final models (8 rows), best checkpoints (5), the students as draft models (6)
    assert [len(table) for table in tables] == [2 + 8, 2 + 5, 2 + 6]
    assert [len(re.split(r"(?<!\\)\|", table[0])) for table in tables] == [4 + 2, 4 + 2, 3 + 2]
    for table in tables:  # every row has its header's cells: no stray | inside a cell (KL(teacher || model))
        for line in table:
            assert len(re.split(r"(?<!\\)\|", line)) == len(re.split(r"(?<!\\)\|", table[0])), line
    assert f"{report['models']['distilled']['val_ppl']:.2f}" in markdown and "curves.png" in markdown
    assert "val perplexity" in runs["stdout"] and "report.json" in runs["stdout"]


def test_compare_writes_its_figures_into_both_students_model_cards(runs, tiny_teacher):
    """compare rewrites each student's README.md with its exact KL and perplexity, the teacher's beside them."""
    from huggingface_hub import ModelCard

    models = runs["report"]["models"]
    for label, folder, tags in (("distilled", "distill", {"distillation"}), ("baseline", "baseline", set())):
        card = ModelCard.load(runs["root"] / folder / "README.md")
        assert card.data.library_name == "transformers" and card.data.teacher == str(tiny_teacher)
        assert ("distillation" in card.data.tags) == bool(tags)  # the CE-only baseline is not tagged as distilled
        rows = {line.split("|")[1].strip(): line for line in card.text.splitlines() if line.startswith("| ")}
        header = next(line for line in card.text.splitlines() if line.startswith("| | teacher"))
        assert f"{label} (this model)" in header
        cells = [c.strip() for c in rows["val perplexity"].split("|")[2:-1]]
        assert cells == [f"{models[name]['val_ppl']:.2f}" for name in ("teacher", "distilled", "baseline")]
        exact = [c.strip() for c in next(v for k, v in rows.items() if k.startswith("KL(teacher")).split("|")[2:-1]]
        assert exact == [f"{models[name]['kl_exact']:.4f}" for name in ("teacher", "distilled", "baseline")]


def edited_copy(run: Path, dest: Path, section: str, key: str, value) -> Path:
    """A copy of a finished run whose run_config.json claims another setting (as if trained with it)."""
    shutil.copytree(run, dest)
    config = json.loads((dest / "run_config.json").read_text())
    config["resolved"][section][key] = value
    (dest / "run_config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize(
    "section, key, value, named",
    [
        ("train", "seq_len", 64, "sequence length: distilled 32 vs baseline 64"),
        ("inputs", "train_sha256", "0" * 64, "train data (sha256)"),
    ],
)
def test_runs_that_differ_are_refused_naming_the_difference(runs, tmp_path, section, key, value, named):
    other = edited_copy(runs["root"] / "baseline", tmp_path / "baseline", section, key, value)
    options = [*runs["options"], "--baseline", other, "--out-dir", tmp_path / "report"]
    result = invoke("compare", *options)
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: the two runs cannot be compared") and named in line
    assert not (tmp_path / "report").exists()


def test_missing_run_folder_is_refused(runs, tmp_path):
    missing = tmp_path / "never-trained"
    result = invoke("compare", *runs["options"], "--distilled", missing, "--out-dir", tmp_path / "report")
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert str(missing) in line and "distill" in line


def test_a_cache_of_another_teacher_is_refused(runs, tmp_path, tiny_tokenizer):
    other = make_tiny_teacher(tmp_path / "other-teacher", tiny_tokenizer, seed=7)  # same tokenizer, other weights
    result = invoke("compare", *runs["options"], "--teacher", other, "--out-dir", tmp_path / "report")
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert "another teacher" in line and str(other) in line and "cache-logits" in line


def continuations(output: str) -> str:
    """The printed prompts and continuations, without the speed line."""
    return "\n".join(line for line in output.splitlines() if not re.match(r"^\(\d+(\.\d+)? tokens/s", line))


def test_generate_prints_seeded_continuations(runs):
    student = runs["root"] / "distill"
    args = [
        "generate",
        student,
        "--prompt",
        "The Mole",
        "--prompt",
        "",
        "--max-new-tokens",
        12,
        "--sample-temperature",
        1.0,
    ]
    first = run_cli(*args, "--seed", 3, check=True)
    text = continuations(first.stdout)
    assert "--- 'The Mole'\nThe Mole" in text and "--- ''" in text  # an empty prompt samples from the start token
    again = invoke(*args, "--seed", 3, check=True)  # another process, same seed
    assert continuations(again.stdout) == text
    other = invoke(*args, "--seed", 4, check=True)
    assert continuations(other.stdout) != text
    greedy = [
        continuations(invoke(*args, "--sample-temperature", 0, "--seed", seed, check=True).stdout) for seed in (1, 2)
    ]
    assert greedy[0] == greedy[1]  # greedy decoding ignores the seed
