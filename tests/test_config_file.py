"""--config FILE: YAML and JSON files of flag values (plain, or in sections named by command), the command line
winning over the file, one `error:` line naming the closest valid key for a misspelled one, the config.yaml a
data folder saves, `make ... CONFIG=FILE` (the file's values stand, its hash makes stages stale), and the example
files of the two reference use cases."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import click
import pytest
import yaml
from conftest import REPO, invoke_cli

from pipeline.cli import main, resolve_configs
from pipeline.config import (
    CacheConfig,
    CompareConfig,
    DataConfig,
    FinetuneConfig,
    SampleConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    check,
    from_flags,
    to_flags,
)

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
CLASSES = {
    "teacher": [TeacherConfig],
    "data": [DataConfig],
    "cache-logits": [CacheConfig],
    "finetune-teacher": [FinetuneConfig],
    "distill": [TrainConfig, StudentConfig],
    "baseline": [TrainConfig, StudentConfig],
    "compare": [CompareConfig, SampleConfig],
}


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(lines) == 1, (result.exit_code, result.output[-2000:])
    return lines[0]


def expected(command: str, **flags) -> list:
    """The configs of `command` built straight from flag values (the reference the file must resolve to)."""
    classes = CLASSES[command]
    return [from_flags(c, **{k: v for k, v in flags.items() if k in to_flags(c())}) for c in classes]


# ----------------------------------------------------------------------------- reading files


def test_a_sectioned_yaml_file_gives_each_command_its_section_and_flags_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "distill:\n"
        "  max-steps: 7\n"  # dashes as in the flag
        "  lr: 2e-3\n"  # YAML 1.1 reads this as a string: the flag's type converts it
        "  n_layer: 2\n"
        "  resume: yes\n"
        "  temperature: null\n"  # null: the command's default
        "  mixed_precision: fp16\n"
        "baseline:\n"
        "  max_steps: 9\n"
        "  out_dir: somewhere/else\n"
        "compare:\n"
        "  prompt: Once upon a time\n"
    )
    train, student = resolve_configs("distill", ["--config", str(path)])
    assert [train, student] == expected(
        "distill", max_steps=7, lr=0.002, n_layer=2, resume=True, temperature=None, mixed_precision="fp16"
    )
    # A flag given on the command line wins over the file, whatever its position.
    train, _ = resolve_configs("distill", ["--lr", "0.5", "--config", str(path), "--max-steps", "3"])
    assert (train.optim.lr, train.steps.max_steps, train.optim.mixed_precision) == (0.5, 3, "fp16")
    assert resolve_configs("baseline", ["--config", str(path)]) == expected(
        "baseline", max_steps=9, out_dir="somewhere/else"
    )
    # A command without a section in the file keeps its defaults.
    assert resolve_configs("data", ["--config", str(path)]) == [DataConfig()]
    # A repeatable flag (compare --prompt) takes a string or a list.
    parent = click.Context(main, info_name="pipeline")
    context = main.commands["compare"].make_context("compare", ["--config", str(path)], parent=parent)
    assert context.params["prompts"] == ("Once upon a time",)


def test_a_plain_json_file_holds_the_options_of_one_command(tmp_path):
    path = tmp_path / "cache.json"
    path.write_text(json.dumps({"mode": "topk", "k": 16, "temperature": 2, "max_rows": 24, "seed": 3}))
    assert resolve_configs("cache-logits", ["--config", str(path)]) == [
        CacheConfig(mode="topk", k=16, temperature=2.0, max_rows=24, seed=3)
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("distill:\n  alpah: 0.3\n", "distill has no option 'alpah'; did you mean 'alpha'?"),
        ("max_step: 3\n", "distill has no option 'max_step'; did you mean 'max_steps'?"),
        ("distil:\n  alpha: 0.3\n", "'distil' is not a command; did you mean 'distill'?"),
        ("distill:\n  alpha: 0.3\nseed: 1\n", "mixes sections (distill) with plain options (seed)"),
        ("max_steps: many\n", "max_steps: 'many' is not a valid integer"),
        ("- 1\n- 2\n", "must hold a mapping of option: value, got a list"),
        ("distill: [unclosed\n", "is not valid YAML"),
    ],
    ids=["misspelled", "misspelled-plain", "misspelled-command", "mixed", "bad-value", "not-a-mapping", "bad-yaml"],
)
def test_a_bad_config_file_is_one_error_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = invoke_cli("distill", "--config", path, "--out-dir", tmp_path / "run")
    line = error_line(result)
    assert line.startswith(f"error: config file {path}") and message in line, line
    assert not (tmp_path / "run").exists()


def test_a_missing_config_file_is_one_error_line(tmp_path):
    line = error_line(invoke_cli("data", "--config", tmp_path / "none.yaml"))
    assert line == f"error: config file {tmp_path / 'none.yaml'} does not exist; pass a YAML or JSON file with --config"


def test_every_command_takes_config():
    for name, command in main.commands.items():
        assert "--config" in [opt for param in command.params for opt in getattr(param, "opts", ())], name


# ----------------------------------------------------------------------------- saved configs


def test_the_data_folder_saves_a_config_that_reproduces_it(tiny_data, tiny_teacher, tiny_corpus):
    saved = yaml.safe_load((tiny_data / "config.yaml").read_text())
    assert list(saved) == ["data"]
    assert resolve_configs("data", ["--config", str(tiny_data / "config.yaml")]) == [
        DataConfig(corpus=str(tiny_corpus), tokenizer=str(tiny_teacher), out_dir=str(tiny_data), val_fraction=0.1)
    ]
    meta_before = (tiny_data / "meta.json").read_bytes()
    again = invoke_cli("data", "--config", tiny_data / "config.yaml", check=True)
    assert "up to date" in again.stdout and (tiny_data / "meta.json").read_bytes() == meta_before


# ----------------------------------------------------------------------------- the example files


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_files_load_and_validate(path):
    sections = yaml.safe_load(path.read_text())
    assert set(sections) <= set(CLASSES) and {"data", "cache-logits", "distill", "baseline", "compare"} <= set(sections)
    for command, values in sections.items():
        configs = resolve_configs(command, ["--config", str(path)])
        check(*configs)  # every option in range
        flags = {k: v for config in configs for k, v in to_flags(config).items()}
        for key, value in values.items():  # what the file says is what the command runs with
            assert flags[key] == (float(value) if isinstance(flags[key], float) else value), (command, key)
    # The stages chain: each reads the folders the one before writes.
    assert sections["cache-logits"]["data_dir"] == sections["data"]["out_dir"] == sections["distill"]["data_dir"]
    assert sections["distill"]["cache_dir"] == sections["cache-logits"]["out_dir"] == sections["compare"]["cache_dir"]
    assert sections["compare"]["distilled"] == sections["distill"]["out_dir"]
    assert sections["compare"]["baseline"] == sections["baseline"]["out_dir"]
    teacher = sections["cache-logits"]["teacher"]
    assert sections["distill"]["teacher"] == sections["compare"]["teacher"] == teacher


def test_the_reference_use_cases():
    willows = yaml.safe_load((REPO / "examples" / "willows.yaml").read_text())
    assert willows["data"]["corpus"] == "willows"
    # the fine-tuned teacher fills the cache
    assert willows["cache-logits"]["teacher"] == willows["finetune-teacher"]["out_dir"]
    assert willows["finetune-teacher"]["data_dir"] == willows["data"]["out_dir"]
    text8 = yaml.safe_load((REPO / "examples" / "text8.yaml").read_text())
    train, student = resolve_configs("distill", ["--config", str(REPO / "examples" / "text8.yaml")])
    [cache] = resolve_configs("cache-logits", ["--config", str(REPO / "examples" / "text8.yaml")])
    assert text8["teacher"]["source"] == "meta-llama/Llama-3.2-1B" and text8["data"]["corpus"] == "text8"
    assert (cache.temperature, train.loss.temperature, train.loss.alpha) == (5.0, 5.0, 0.3)
    assert (
        train.optim.mixed_precision == "fp16"
        and student.student is None
        and student.student_init == "teacher-embeddings"
    )


# ----------------------------------------------------------------------------- make CONFIG=FILE


def make_dry_run(folder: Path, *variables: str) -> str:
    result = subprocess.run(
        ["make", "-n", "distill", *variables], cwd=folder, capture_output=True, text=True, env=os.environ
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_passes_the_config_file_and_only_the_variables_given(tmp_path):
    """The Makefile in a scratch folder, its targets faked: what `make -n` would run."""
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    for name in ("setup.cfg", "pyproject.toml", "constraints.txt", ".venv/.installed"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    fake_python = tmp_path / ".venv" / "bin" / "python"  # every stage "succeeds" without doing anything
    fake_python.parent.mkdir(parents=True)
    fake_python.write_text("#!/bin/sh\nexit 0\n")
    fake_python.chmod(0o755)
    config = tmp_path / "run.yaml"
    config.write_text("distill:\n  alpha: 0.3\n")

    plain = make_dry_run(tmp_path)
    distill_line = next(line for line in plain.splitlines() if " distill " in line)
    assert "--alpha 0.1" in distill_line and "--seq-len 512" in distill_line and "--config" not in distill_line
    assert "--seed" not in distill_line
    seeded = next(line for line in make_dry_run(tmp_path, "SEED=2").splitlines() if " distill " in line)
    assert "--seed 2" in seeded and "--out-dir checkpoints/default-seed2-distill" in seeded  # its own run folder
    assert "--cache-dir cache/default " in seeded  # the same cache
    with_file = make_dry_run(tmp_path, f"CONFIG={config}", "STEPS=20")
    distill_line = next(line for line in with_file.splitlines() if " distill " in line)
    assert f"--config {config}" in distill_line and "--max-steps 20" in distill_line  # given to make: passed
    assert "--alpha" not in distill_line and "--seq-len" not in distill_line  # the Makefile's defaults: not passed
    assert "--data-dir data/default" in distill_line and "--out-dir checkpoints/default-distill" in distill_line
    for stage in ("teacher", "data", "cache-logits"):
        assert any(f"pipeline {stage} " in line and f"--config {config}" in line for line in with_file.splitlines())

    # A dry run and `make help` write nothing: no stage folder, no recorded options.
    subprocess.run(["make", "help"], cwd=tmp_path, capture_output=True, check=True)
    assert not any((tmp_path / folder).exists() for folder in ("data", "cache", "checkpoints"))

    # A run records each stage's options; with every stage's output faked, newer than those records, there is
    # nothing to do. Editing the file makes the stages stale.
    subprocess.run(["make", "distill", f"CONFIG={config}", "STEPS=20"], cwd=tmp_path, capture_output=True, check=True)
    assert (tmp_path / "checkpoints" / "default-distill" / ".options").read_text().startswith("--data-dir data/default")
    time.sleep(1.1)
    for output in (
        "checkpoints/teacher/config.json",
        "data/default/meta.json",
        "cache/default/manifest.json",
        "checkpoints/default-distill/model.safetensors",
    ):
        (tmp_path / output).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / output).touch()
        time.sleep(0.02)
    assert "pipeline" not in make_dry_run(tmp_path, f"CONFIG={config}", "STEPS=20")
    config.write_text("distill:\n  alpha: 0.4\n")
    assert "pipeline distill" in make_dry_run(tmp_path, f"CONFIG={config}", "STEPS=20")
    missing = subprocess.run(
        ["make", "-n", "distill", "CONFIG=nope.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert missing.returncode != 0 and "CONFIG=nope.yaml does not exist" in missing.stderr
