"""Teacher stage: a model folder / .gguf -> the Hugging Face teacher folder every later stage loads.

Only the tiny teacher is used here; the embedded SmolLM2 download is exercised by `make compare SMOKE=1`.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file

from pipeline.config import TeacherConfig
from pipeline.errors import PipelineError
from pipeline.fsutil import read_json
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.teacher import (
    INFO_FILE,
    prepare_teacher,
    teacher_identity,
    tokenizer_hash,
    weights_hash,
)


def assert_error_line(result, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_teacher_from_a_folder_writes_a_hf_folder_and_rerun_is_a_noop(tmp_path, tiny_teacher):
    out = tmp_path / "teacher"
    run_cli("teacher", "--source", tiny_teacher, "--out-dir", out, check=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", INFO_FILE):
        assert (out / name).is_file(), name
    assert not out.with_name("teacher.tmp").exists()

    info = read_json(out / INFO_FILE)
    source_tokenizer = load_tokenizer(tiny_teacher)
    assert info["source"] == str(tiny_teacher) and info["name"] == str(tiny_teacher)
    assert info["weights_sha256"] == weights_hash(out)
    assert info["tokenizer_hash"] == tokenizer_hash(load_tokenizer(out)) == tokenizer_hash(source_tokenizer)
    assert info["vocab_size"] == len(source_tokenizer) == 384 and info["max_position_embeddings"] == 256
    model = load_causal_lm(out)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert teacher_identity(out) == {
        "teacher_name": info["name"],
        "teacher_hash": info["weights_sha256"],
        "tokenizer_hash": info["tokenizer_hash"],
    }
    # same weights as the source, and same outputs
    source = load_causal_lm(tiny_teacher)
    ids = torch.tensor([source_tokenizer("The Rat and the Mole went boating.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits, rtol=0, atol=0)
    saved = load_file(out / "model.safetensors")
    for name, tensor in load_file(tiny_teacher / "model.safetensors").items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0)

    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run_cli("teacher", "--source", tiny_teacher, "--out-dir", out, check=True)
    assert "up to date" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_changed_source_folder_is_rebuilt_not_reused(tmp_path, tiny_teacher):
    source = tmp_path / "source"
    shutil.copytree(tiny_teacher, source)
    out = tmp_path / "teacher"
    prepare_teacher(TeacherConfig(source=str(source), out_dir=str(out)))
    first = read_json(out / INFO_FILE)
    assert first["source_sha256"] == weights_hash(source)

    weights = load_file(source / "model.safetensors")
    weights = {name: tensor * 1.5 for name, tensor in weights.items()}
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    prepare_teacher(TeacherConfig(source=str(source), out_dir=str(out)))
    second = read_json(out / INFO_FILE)
    assert second["source_sha256"] == weights_hash(source) != first["source_sha256"]
    assert second["weights_sha256"] != first["weights_sha256"]
    saved = load_file(out / "model.safetensors")
    for name, tensor in weights.items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0)
    prepare_teacher(TeacherConfig(source=str(source), out_dir=str(out)))  # unchanged again: a no-op
    assert read_json(out / INFO_FILE) == second


@pytest.mark.parametrize("missing, message", [("config.json", "no config.json"), ("model.safetensors", "no weights")])
def test_incomplete_source_folder_raises_one_line_error(tmp_path, tiny_teacher, missing, message):
    source = tmp_path / "incomplete"
    shutil.copytree(tiny_teacher, source)
    (source / missing).unlink()
    out = tmp_path / "teacher"
    with pytest.raises(PipelineError, match=message) as info:
        prepare_teacher(TeacherConfig(source=str(source), out_dir=str(out)))
    assert "\n" not in str(info.value) and str(source) in str(info.value)
    assert not out.exists() and not out.with_name("teacher.tmp").exists()


def test_missing_source_folder_raises_one_line_error(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        prepare_teacher(TeacherConfig(source=str(tmp_path / "nowhere"), out_dir=str(tmp_path / "teacher")))


def test_file_named_gguf_that_is_not_a_model_exits_2(tmp_path):
    fake = tmp_path / "x.gguf"
    fake.write_bytes(b"this is a text file, not a GGUF model\n" * 10)
    out = tmp_path / "teacher"
    result = run_cli("teacher", "--source", fake, "--out-dir", out)
    assert_error_line(result, "x.gguf", "not a GGUF language model")
    assert not out.exists() and not out.with_name("teacher.tmp").exists()
    with pytest.raises(PipelineError, match="missing.gguf does not exist"):
        prepare_teacher(TeacherConfig(source=str(tmp_path / "missing.gguf"), out_dir=str(out)))


def test_out_dir_that_is_not_a_teacher_folder_is_refused(tmp_path, tiny_teacher):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("user data\n")
    with pytest.raises(PipelineError, match="not a teacher folder"):
        prepare_teacher(TeacherConfig(source=str(tiny_teacher), out_dir=str(out)))
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "user data\n"
