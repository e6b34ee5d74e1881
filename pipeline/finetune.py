"""Fine-tune the teacher on the train split before it fills the cache (`make finetune-teacher`).

Full fine-tuning with cross-entropy on the train rows only (val is used for evaluation, never for
updates), through the same Accelerate loop, resume points and metrics as the students: train.train()
with the teacher loaded as the "student" (StudentConfig(student=teacher)) and distill=False; the options
are config.FinetuneConfig (the training sections with their own defaults).

Full fine-tuning rather than LoRA: the teachers this pipeline uses are small (135M parameters: weights +
AdamW state about 2 GB in float32), so every weight can move, no `peft` dependency is needed, and the
result is a plain Llama folder with nothing to merge.

The run folder is a normal Hugging Face folder (config.json, model.safetensors, tokenizer) plus
teacher_info.json, so `TEACHER=<out_dir>` works in every later stage and the cache records the
fine-tuned teacher's weights hash (teacher.teacher_identity). run_config.json["finetune"] holds the
val perplexity before and after, both measured here in float32 on the same `eval_rows` val rows.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from pipeline.batches import TokenRows
from pipeline.config import FinetuneConfig, StudentConfig, check, to_flags
from pipeline.errors import PipelineError
from pipeline.evaluate import evaluate
from pipeline.fsutil import atomic_write_json
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.rows import read_meta
from pipeline.runs import matches, read_run_config, write_run_config
from pipeline.teacher import INFO_FILE, teacher_identity, tokenizer_hash, weights_hash
from pipeline.train import STATE_DIR, train

RUN_KIND = "finetune-teacher"


def _val_ppl(model_dir: str | Path, rows: TokenRows, config: FinetuneConfig, device) -> float:
    """Val perplexity of the model in `model_dir` over the first --eval-rows val rows, float32."""
    model = load_causal_lm(model_dir).to(device)
    return evaluate({"model": model}, rows, count=config.eval.eval_rows, batch_size=config.steps.batch_size)["model"][
        "val_ppl"
    ]


def finetune_teacher(config: FinetuneConfig) -> Path:
    """Fine-tune `config.teacher` on the train split into `config.out_dir`; returns the folder.

    A no-op (figures reprinted) when the folder already holds this fine-tune of this teacher on these data."""
    check(config)
    out_dir = Path(config.out_dir)
    meta = read_meta(config.data_dir)
    source = teacher_identity(config.teacher)
    if meta["tokenizer_hash"] != tokenizer_hash(load_tokenizer(config.teacher)):
        raise PipelineError(
            f"{config.data_dir} was tokenized with another tokenizer than the teacher {config.teacher}'s; "
            f"rerun make data with TEACHER={config.teacher}"
        )

    train(
        config.train_config(),
        StudentConfig(student=str(config.teacher)),
        distill=False,
        run_kind=RUN_KIND,
        extra_inputs={"source_teacher_hash": source["teacher_hash"]},
        saved_config=(RUN_KIND, to_flags(config)),
    )

    from accelerate import PartialState

    if not PartialState().is_main_process:  # under accelerate launch / torchrun: rank 0 measures and writes
        return out_dir
    run_config = read_run_config(out_dir)
    new_hash = weights_hash(out_dir)
    figures = run_config.get("finetune", {})
    # figures of other weights: a new run (train found no up-to-date folder), so measure before / after
    if not matches(figures, {"weights_sha256": new_hash}):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        val_rows = TokenRows(config.data_dir, "val", config.seq_len)
        before, after = _val_ppl(config.teacher, val_rows, config, device), _val_ppl(out_dir, val_rows, config, device)
        figures = {
            "val_ppl_before": before,
            "val_ppl_after": after,
            "eval_rows": config.eval.eval_rows or len(val_rows),
            "seq_len": config.seq_len,
            "source_teacher": source,
            "weights_sha256": new_hash,
        }
        write_teacher_info(out_dir, source, meta, config)
        run_config["finetune"] = figures  # written last: its weights hash marks the folder complete
        write_run_config(out_dir, run_config)
        if not config.keep_states:
            shutil.rmtree(out_dir / STATE_DIR, ignore_errors=True)
    print(
        f"{RUN_KIND}: val perplexity {figures['val_ppl_before']:.3f} before -> {figures['val_ppl_after']:.3f} after "
        f"({figures['eval_rows']} val rows x {figures['seq_len']} tokens); use it with TEACHER={out_dir}"
    )
    return out_dir


def write_teacher_info(out_dir: Path, source: dict, meta: dict, config: FinetuneConfig) -> dict:
    """teacher_info.json of the fine-tuned folder: what teacher.teacher_identity (and so the cache) records."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(out_dir)
    run_config = read_run_config(out_dir)
    info = {
        "name": f"{source['teacher_name']} fine-tuned on {meta['corpus_name']} ({config.steps.max_steps} steps)",
        "source": f"finetune:{config.teacher}",
        "finetuned_from": source,
        "weights_sha256": weights_hash(out_dir),
        "tokenizer_hash": tokenizer_hash(load_tokenizer(out_dir)),
        "vocab_size": int(model_config.vocab_size),
        "max_position_embeddings": int(getattr(model_config, "max_position_embeddings", 0) or 0),
        "parameters": int(run_config["parameters"]),
    }
    atomic_write_json(out_dir / INFO_FILE, info)
    return info
