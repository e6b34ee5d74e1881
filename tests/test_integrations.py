"""What a run folder offers the tools users already run: the metrics in TensorBoard (Accelerate's tracker, read
back from the event files with TensorBoard's own reader), config.yaml that `--config` reruns to the same bytes,
the model card in the Hub's format (parsed with huggingface_hub), and generation_config.json with the tokenizer's
special tokens. Students are tiny (1 block, width 16); runs are 6 steps of 4 x 32 tokens."""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import STUDENT_FLAGS, invoke_cli

from pipeline.cli import resolve_configs
from pipeline.config import StudentConfig, TrainConfig, from_flags, to_flags
from pipeline.train import TRACKER_NAMES

SEQ_LEN, BATCH, STEPS = 32, 4, 6


def options(tiny_data, tiny_teacher, cache, **overrides) -> list:
    values = {
        "data-dir": tiny_data,
        "cache-dir": cache,
        "teacher": tiny_teacher,
        "seq-len": SEQ_LEN,
        "batch-size": BATCH,
        "max-steps": STEPS,
        "max-rows": 32,
        "warmup-steps": 1,
        "lr": 0.02,
        "eval-every": 3,
        "eval-rows": 4,
        "save-every": 3,
        "log-every": 1,
        "num-workers": 0,
        "mixed-precision": "no",
        "alpha": 0.25,
    }
    values.update({key.replace("_", "-"): value for key, value in overrides.items()})
    return [item for key, value in values.items() for item in (f"--{key}", value)] + STUDENT_FLAGS


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def event_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard itself reads the event files (purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def event_hparams(log_dir: Path) -> dict:
    """The hyperparameters of the run, decoded from the hparams plugin's session-start summary."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    [session_dir] = [p.parent for p in log_dir.glob("*/events.out.tfevents.*")]  # add_hparams writes a sub-run
    accumulator = EventAccumulator(str(session_dir))
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")
    data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    values = {}
    for key, value in data.session_start_info.hparams.items():
        values[key] = getattr(value, value.WhichOneof("kind"))
    return values


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_data, tiny_teacher, tiny_sampled_cache) -> Path:
    """A distill run logging to TensorBoard."""
    out = tmp_path_factory.mktemp("tracked") / "distill"
    invoke_cli(
        "distill",
        *options(tiny_data, tiny_teacher, tiny_sampled_cache),
        "--report-to",
        "tensorboard",
        "--out-dir",
        out,
        check=True,
    )
    return out


# ----------------------------------------------------------------------------- trackers


def test_tensorboard_holds_the_metrics_and_the_resolved_options(
    tracked_run, tiny_data, tiny_teacher, tiny_sampled_cache
):
    records = metrics(tracked_run)
    scalars = event_scalars(tracked_run / "logs" / "distill-pipeline")
    assert set(scalars) == set(TRACKER_NAMES.values())
    for key, tag in TRACKER_NAMES.items():
        expected = [(r["step"], r[key]) for r in records if key in r]
        assert [step for step, _ in scalars[tag]] == [step for step, _ in expected], tag
        assert [value for _, value in scalars[tag]] == pytest.approx([v for _, v in expected], rel=1e-6), tag
    assert [step for step, _ in scalars["val/perplexity"]] == [3, 6]

    hparams = event_hparams(tracked_run / "logs" / "distill-pipeline")
    train, student = from_flags(TrainConfig, **{}), from_flags(StudentConfig)
    flags = {**to_flags(train), **to_flags(student)}
    assert set(flags) - {k for k, v in flags.items() if v is None} <= set(hparams)  # TensorBoard drops None values
    assert hparams["run_kind"] == "distill" and hparams["alpha"] == 0.25 and hparams["max_steps"] == STEPS
    assert hparams["report_to"] == "tensorboard" and hparams["data_dir"] == str(tiny_data)
    assert hparams["kd_temperature"] == 1.0


def test_config_yaml_reruns_the_same_run_and_trackers_do_not_change_the_weights(
    tracked_run, tmp_path, tiny_sampled_cache
):
    """config.yaml holds every option; --config reproduces the run (here without the tracker: a flag wins)."""
    saved = yaml.safe_load((tracked_run / "config.yaml").read_text())
    assert list(saved) == ["distill"] and saved["distill"]["out_dir"] == str(tracked_run)
    train, student = resolve_configs("distill", ["--config", str(tracked_run / "config.yaml")])
    assert saved["distill"] == {**to_flags(train), **to_flags(student)}
    assert (train.loss.alpha, train.eval.report_to, student.n_embd) == (0.25, "tensorboard", 16)

    again = invoke_cli("distill", "--config", tracked_run / "config.yaml", check=True)
    assert "up to date" in again.stdout

    copy = tmp_path / "copy"
    invoke_cli("distill", "--config", tracked_run / "config.yaml", "--out-dir", copy, "--report-to", "none", check=True)
    assert (copy / "model.safetensors").read_bytes() == (tracked_run / "model.safetensors").read_bytes()
    assert [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in metrics(copy)] == [
        {k: v for k, v in r.items() if k != "tokens_per_s"} for r in metrics(tracked_run)
    ]
    assert not (copy / "logs").exists()
    assert yaml.safe_load((copy / "config.yaml").read_text())["distill"]["report_to"] == "none"

    # The cache folder's config.yaml reruns cache-logits: up to date.
    assert list(yaml.safe_load((tiny_sampled_cache / "config.yaml").read_text())) == ["cache-logits"]
    cached = invoke_cli("cache-logits", "--config", tiny_sampled_cache / "config.yaml", check=True)
    assert "up to date" in cached.stdout


def test_a_resumed_run_shows_each_step_once_in_tensorboard(tracked_run, tmp_path):
    """Interrupted after logging step 6 but before its final save: the rerun resumes at step 3 and its events
    for steps 4-6 replace the first ones (purge_step), as its metrics.jsonl records do."""
    run = tmp_path / "run"
    shutil.copytree(tracked_run, run)
    (run / "run_config.json").unlink()
    shutil.rmtree(run / "state" / "step_000006")
    resumed = invoke_cli("distill", "--config", tracked_run / "config.yaml", "--out-dir", run, "--resume", check=True)
    assert "resuming from" in resumed.stdout and "step 3" in resumed.stdout
    records, scalars = metrics(run), event_scalars(run / "logs" / "distill-pipeline")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    speeds = [(r["step"], r["tokens_per_s"]) for r in records]
    assert [s for s, _ in scalars["train/tokens_per_second"]] == [s for s, _ in speeds]  # each step once
    # the resumed run's own timing for steps 4-6 (differs from the first run's), its first 3 steps kept
    assert [v for _, v in scalars["train/tokens_per_second"]] == pytest.approx([v for _, v in speeds], rel=1e-6)
    assert speeds[3:] != [(r["step"], r["tokens_per_s"]) for r in metrics(tracked_run)][3:]


def test_a_tracker_that_is_not_installed_is_one_error_line(
    tiny_data, tiny_teacher, tiny_sampled_cache, tmp_path, monkeypatch
):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    result = invoke_cli(
        "distill",
        *options(tiny_data, tiny_teacher, tiny_sampled_cache),
        "--report-to",
        "tensorboard,wandb",
        "--out-dir",
        tmp_path,
    )
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and lines == [
        "error: --report-to tensorboard,wandb: not installed: wandb; install it with pip install -e '.[wandb]' "
        "(or pip install wandb), or pass --report-to none"
    ]
    unknown = invoke_cli(
        "distill", *options(tiny_data, tiny_teacher, tiny_sampled_cache), "--report-to", "comet", "--out-dir", tmp_path
    )
    assert unknown.exit_code == 2 and unknown.stderr.strip().splitlines() == [
        "error: --report-to must be none | all | some of tensorboard, wandb, mlflow, trackio, got 'comet'"
    ]
    assert not (tmp_path / "model.safetensors").exists()


# ----------------------------------------------------------------------------- model card and generation config


def test_the_model_card_is_in_the_hubs_format_and_says_how_the_student_was_trained(
    tracked_run, tiny_teacher, tiny_data
):
    from huggingface_hub import ModelCard

    from pipeline.rows import read_meta

    card = ModelCard.load(tracked_run / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert "distillation" in data["tags"] and "license" not in data  # the license is the user's to set
    assert data["teacher"] == str(tiny_teacher) and data["corpus"] == read_meta(tiny_data)["corpus_name"]
    assert "\n# license:" in (tracked_run / "README.md").read_text().split("---")[1]  # placeholder in the metadata
    text = card.text
    last = metrics(tracked_run)[-1]
    assert f"| tokens seen | {STEPS * BATCH * SEQ_LEN:,} |" in text
    assert "alpha = 0.25, T = 1" in text and "8 draws per position" in text
    assert f"Val perplexity at the end of training: {last['val_ppl']:.2f} (the first 4 val rows x 32 tokens" in text
    assert f'path = "{tracked_run}"' in text and "AutoModelForCausalLM.from_pretrained(path)" in text


def test_generate_stops_at_the_tokenizers_eos_without_warnings(tiny_data, tiny_teacher, tiny_sampled_cache, tmp_path):
    """A student started from a model whose own config names other special tokens (LlamaConfig's defaults,
    bos 1 / eos 2): the saved generation_config.json carries the tokenizer's, so generate() ends at its EOS."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        LogitsProcessor,
        LogitsProcessorList,
    )

    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    start = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    assert (start.eos_token_id, start.pad_token_id) != (tokenizer.eos_token_id, tokenizer.eos_token_id)
    LlamaForCausalLM(start).save_pretrained(tmp_path / "start")
    run = tmp_path / "run"
    invoke_cli(
        "distill",
        *options(tiny_data, tiny_teacher, tiny_sampled_cache, max_steps=2, eval_every=2, save_every=2),
        "--student",
        tmp_path / "start",
        "--out-dir",
        run,
        check=True,
    )
    saved = json.loads((run / "generation_config.json").read_text())
    eos = tokenizer.eos_token_id
    assert (saved["eos_token_id"], saved["bos_token_id"], saved["pad_token_id"]) == (eos, tokenizer.bos_token_id, eos)

    class ForceAt(LogitsProcessor):
        """Make token `token` the only choice at the `at`-th new token."""

        def __init__(self, token: int, at: int, prompt_length: int):
            self.token, self.at, self.prompt_length = token, at, prompt_length

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - self.prompt_length == self.at - 1:
                scores = torch.full_like(scores, -float("inf"))
                scores[:, self.token] = 0.0
            return scores

    model = AutoModelForCausalLM.from_pretrained(run).eval()
    inputs = AutoTokenizer.from_pretrained(run)("The Mole had been working", return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            output = model.generate(
                **inputs,
                max_new_tokens=12,
                do_sample=False,
                logits_processor=LogitsProcessorList([ForceAt(eos, 3, prompt_length)]),
            )
    finally:
        transformers_logger.removeHandler(handler)
    assert [str(w.message) for w in caught] == [] and messages == []
    assert output.shape[1] == prompt_length + 3 and output[0, -1].item() == eos  # stopped at EOS, not after 12
