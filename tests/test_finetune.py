"""Teacher fine-tuning (pipeline/finetune.py): trains on train rows only, lowers val perplexity, and leaves a
teacher folder whose identity (weights hash) the cache records. Tiny teacher from conftest, seq_len 32."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from pipeline import batches
from pipeline.config import FinetuneConfig, from_flags
from pipeline.errors import PipelineError
from pipeline.finetune import finetune_teacher
from pipeline.fsutil import read_json
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.teacher import teacher_identity, tokenizer_hash, weights_hash

SEQ_LEN, BATCH, STEPS, EVAL_ROWS = 32, 4, 12, 16


def tiny_config(tiny_data, teacher, out_dir, **overrides) -> FinetuneConfig:
    options = dict(
        data_dir=str(tiny_data),
        teacher=str(teacher),
        out_dir=str(out_dir),
        seq_len=SEQ_LEN,
        batch_size=BATCH,
        max_steps=STEPS,
        lr=1e-2,
        warmup_steps=2,
        eval_every=6,
        save_every=6,
        log_every=3,
        eval_rows=EVAL_ROWS,
        mixed_precision="no",
        num_workers=0,
    )
    return from_flags(FinetuneConfig, **{**options, **overrides})


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_teacher, tiny_data):
    """(config, {split: rows read}) of one fine-tune of the tiny teacher; TokenRows reads are counted by split."""
    reads = {"train": 0, "val": 0}
    original = batches.TokenRows.__getitem__

    def counting_getitem(self, index):
        reads[self.split] += 1
        return original(self, index)

    config = tiny_config(tiny_data, tiny_teacher, tmp_path_factory.mktemp("ft") / "teacher-ft")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batches.TokenRows, "__getitem__", counting_getitem)
        finetune_teacher(config)
    return config, reads


def val_ppl_by_hand(model_dir, tiny_data, rows: int) -> float:
    """exp(mean CE) over the first `rows` val rows of SEQ_LEN + 1 tokens, computed here without the pipeline's
    helpers."""
    from pipeline.rows import load_tokens

    tokens = torch.from_numpy(load_tokens(tiny_data, "val")[: rows * SEQ_LEN + 1].astype("int64"))
    ids = torch.stack([tokens[i * SEQ_LEN : i * SEQ_LEN + SEQ_LEN + 1] for i in range(rows)])
    with torch.no_grad():
        logits = load_causal_lm(model_dir)(input_ids=ids[:, :-1]).logits
    return math.exp(
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    )


def test_finetune_lowers_val_perplexity_and_reports_before_and_after(finetuned, tiny_teacher, tiny_data):
    config, _ = finetuned
    figures = read_json(f"{config.out_dir}/run_config.json")["finetune"]
    assert figures["eval_rows"] == EVAL_ROWS and figures["seq_len"] == SEQ_LEN
    assert figures["val_ppl_before"] == pytest.approx(val_ppl_by_hand(tiny_teacher, tiny_data, EVAL_ROWS), rel=1e-4)
    assert figures["val_ppl_after"] == pytest.approx(val_ppl_by_hand(config.out_dir, tiny_data, EVAL_ROWS), rel=1e-4)
    assert figures["val_ppl_after"] < 0.8 * figures["val_ppl_before"]
    records = [json.loads(line) for line in open(f"{config.out_dir}/metrics.jsonl")]
    assert [r["step"] for r in records if "val_ppl" in r] == [6, 12]
    assert read_json(f"{config.out_dir}/run_config.json")["resolved"]["kind"] == "finetune-teacher"


def test_trains_on_train_rows_only(finetuned):
    """Every optimizer step reads batch_size train rows; val rows are read only by evaluations
    (2 in the loop at steps 6 and 12, plus the before and after measurements), eval_rows each."""
    _, reads = finetuned
    assert reads["train"] == STEPS * BATCH
    assert reads["val"] == 4 * EVAL_ROWS


def test_output_is_a_teacher_folder_with_its_own_identity(finetuned, tiny_teacher):
    config, _ = finetuned
    info = read_json(f"{config.out_dir}/teacher_info.json")
    source = teacher_identity(tiny_teacher)
    assert info["weights_sha256"] == weights_hash(config.out_dir) != source["teacher_hash"]
    assert teacher_identity(config.out_dir)["teacher_hash"] == info["weights_sha256"]
    assert info["finetuned_from"] == source
    assert info["tokenizer_hash"] == tokenizer_hash(load_tokenizer(config.out_dir)) == source["tokenizer_hash"]
    before, after = load_causal_lm(tiny_teacher).state_dict(), load_causal_lm(config.out_dir).state_dict()
    assert before.keys() == after.keys()
    assert not torch.equal(
        before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"]
    )
    assert (Path(config.out_dir) / "model.safetensors").exists() and not (
        Path(config.out_dir) / "state"
    ).exists()  # no --keep-states


def test_rerun_is_a_no_op(finetuned, capsys):
    config, _ = finetuned
    before = weights_hash(config.out_dir)
    finetune_teacher(config)
    out = capsys.readouterr().out
    assert "is up to date" in out and "before ->" in out
    assert weights_hash(config.out_dir) == before


def test_cache_records_the_finetuned_teacher(finetuned, tiny_data, tmp_path):
    from pipeline.cache import build_cache
    from pipeline.config import CacheConfig

    config, _ = finetuned
    cache_dir = tmp_path / "cache"
    build_cache(
        CacheConfig(
            data_dir=str(tiny_data),
            teacher=config.out_dir,
            out_dir=str(cache_dir),
            mode="topk",
            k=8,
            seq_len=SEQ_LEN,
            batch_size=4,
            max_rows=4,
            dtype="float32",
        )
    )
    manifest = read_json(cache_dir / "manifest.json")
    assert manifest["teacher_hash"] == weights_hash(config.out_dir)
    assert manifest["teacher_name"].endswith(
        f"fine-tuned on {read_json(tiny_data / 'meta.json')['corpus_name']} ({STEPS} steps)"
    )


def test_refuses_data_of_another_tokenizer_and_overwriting_the_source(tiny_teacher, tiny_data, tmp_path):
    other = tmp_path / "data"
    shutil.copytree(tiny_data, other)
    meta = read_json(other / "meta.json")
    (other / "meta.json").write_text(json.dumps({**meta, "tokenizer_hash": "0" * 64}))
    with pytest.raises(PipelineError, match="another tokenizer"):
        finetune_teacher(tiny_config(other, tiny_teacher, tmp_path / "ft"))
    with pytest.raises(PipelineError, match="--out-dir must differ from --teacher"):
        finetune_teacher(tiny_config(tiny_data, tiny_teacher, tiny_teacher))


def test_cli_reports_a_bad_option_in_one_line(tiny_teacher, tiny_data, tmp_path):
    result = run_cli(
        "finetune-teacher",
        "--data-dir",
        tiny_data,
        "--teacher",
        tiny_teacher,
        "--out-dir",
        tmp_path / "ft",
        "--max-steps",
        "0",
        "--lr",
        "-1",
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip().count("\n") == 0
        and "--max-steps must be positive" in result.stderr
        and "--lr must be positive" in result.stderr
    )
