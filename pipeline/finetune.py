"""Fine-tune the teacher on the train split before it fills the cache (`make finetune-teacher`).

Full fine-tuning with cross-entropy on the train rows only (val is used for evaluation, never for
updates), through the same Accelerate loop, resume points and metrics as the students: train.train()
with the teacher loaded as the "student" (StudentConfig(student=teacher)) and distill=False.

Full fine-tuning rather than LoRA: the teachers this pipeline uses are small (135M parameters: weights +
AdamW state about 2 GB in float32), so every weight can move, no `peft` dependency is needed, and the
result is a plain Llama folder with nothing to merge.

The run folder is a normal Hugging Face folder (config.json, model.safetensors, tokenizer) plus
teacher_info.json, so `TEACHER=<out_dir>` works in every later stage and the cache records the
fine-tuned teacher's weights hash (teacher.teacher_identity). run_config.json["finetune"] holds the
val perplexity before and after, both measured here in float32 on the same `eval_rows` val rows.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import DEFAULT_TEACHER_DIR, StudentConfig, TrainConfig, opt, raise_problems
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_write_json, read_json

# torch, transformers and the training modules are imported inside the functions: the CLI imports this module for its flags.

RUN_KIND = "finetune-teacher"


@dataclass
class FinetuneConfig:
    """Fine-tune the teacher with cross-entropy on the train split. Defaults fit minutes on 2 CPU cores (135M teacher)."""

    data_dir: str = opt(
        "data/default", "tokenized corpus folder (make data); the teacher trains on its train split only"
    )
    teacher: str = opt(DEFAULT_TEACHER_DIR, "the teacher folder to start from (make teacher)")
    out_dir: str = opt(
        "checkpoints/default-teacher-ft", "the fine-tuned teacher (a Hugging Face folder; TEACHER= can point at it)"
    )
    seq_len: int = opt(256, "tokens per sequence")
    max_rows: int | None = opt(None, "use only the first N train rows")
    batch_size: int = opt(2, "sequences per micro-batch per process")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    max_steps: int = opt(40, "optimizer steps")
    lr: float = opt(5e-5, "peak learning rate (AdamW)")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of --lr (cosine decay)")
    warmup_steps: int = opt(4, "linear warmup steps")
    weight_decay: float = opt(0.0, "AdamW weight decay (not on norms and biases)")
    grad_clip: float = opt(1.0, "gradient norm clip (0: off)")
    mixed_precision: str = opt("auto", "auto (bf16 if supported, else fp16 on GPU, else no) | bf16 | fp16 | no")
    seed: int = opt(0, "seed of the data order")
    eval_every: int = opt(20, "steps between validation evaluations")
    eval_rows: int = opt(16, "val rows of each evaluation and of the before/after perplexity (0: all)")
    save_every: int = opt(20, "steps between saved training states (resume points)")
    log_every: int = opt(5, "steps between log lines")
    resume: bool = opt(False, "continue from the latest saved state in --out-dir")
    num_workers: int = opt(1, "DataLoader worker processes")
    keep_states: bool = opt(False, "keep state/ (optimizer + weights resume points) after a finished run")

    def train_config(self) -> TrainConfig:
        """The student TrainConfig this fine-tune runs as: cross-entropy only (alpha = 1, no cache)."""
        shared = {
            name: getattr(self, name)
            for name in (
                "data_dir",
                "teacher",
                "out_dir",
                "seq_len",
                "max_rows",
                "batch_size",
                "grad_accum",
                "max_steps",
                "lr",
                "min_lr_ratio",
                "warmup_steps",
                "weight_decay",
                "grad_clip",
                "mixed_precision",
                "seed",
                "eval_every",
                "eval_rows",
                "save_every",
                "log_every",
                "resume",
                "num_workers",
            )
        }
        return TrainConfig(**shared, alpha=1.0, cache_dir="")

    def validate(self) -> list[str]:
        problems = self.train_config().validate()
        if Path(self.out_dir).resolve() == Path(self.teacher).resolve():
            problems.append(
                f"--out-dir must differ from --teacher ({self.teacher}): the source teacher is kept as it is"
            )
        return problems


def _val_ppl(model_dir: str | Path, rows, config: FinetuneConfig, device) -> float:
    """exp(mean next-token CE) of the model in `model_dir` over the first eval_rows val rows (TokenRows), float32."""
    from pipeline.teacher import load_teacher
    from pipeline.train import evaluate_ce

    model = load_teacher(model_dir).to(device)
    ce = evaluate_ce(model, rows, config.batch_size, device, config.eval_rows)
    del model
    return math.exp(min(ce, 50.0))


def finetune_teacher(config: FinetuneConfig) -> Path:
    """Fine-tune `config.teacher` on the train split into `config.out_dir`; returns the folder.

    A no-op (figures reprinted) when the folder already holds this fine-tune of this teacher on these data."""
    import torch

    from pipeline.batches import TokenRows
    from pipeline.data import read_meta
    from pipeline.teacher import load_tokenizer, teacher_identity, tokenizer_hash, weights_hash
    from pipeline.train import STATE_DIR, train

    raise_problems(config.validate())
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
    )

    from accelerate import PartialState

    if not PartialState().is_main_process:  # under accelerate launch / torchrun: rank 0 measures and writes
        return out_dir
    run_config_path = out_dir / "run_config.json"
    run_config = read_json(run_config_path)
    new_hash = weights_hash(out_dir)
    figures = run_config.get("finetune", {})
    if figures.get("weights_sha256") != new_hash:  # a new run (not the up-to-date early return): measure before / after
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        val_rows = TokenRows(config.data_dir, "val", config.seq_len)
        before, after = _val_ppl(config.teacher, val_rows, config, device), _val_ppl(out_dir, val_rows, config, device)
        figures = {
            "val_ppl_before": before,
            "val_ppl_after": after,
            "eval_rows": config.eval_rows or len(val_rows),
            "seq_len": config.seq_len,
            "source_teacher": source,
            "weights_sha256": new_hash,
        }
        write_teacher_info(out_dir, source, meta, config)
        run_config["finetune"] = figures  # written last: its weights hash marks the folder complete
        atomic_write_json(run_config_path, run_config)
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

    from pipeline.teacher import INFO_FILE, load_tokenizer, tokenizer_hash, weights_hash

    model_config = AutoConfig.from_pretrained(out_dir)
    run_config = read_json(out_dir / "run_config.json")
    info = {
        "name": f"{source['teacher_name']} fine-tuned on {meta['corpus_name']} ({config.max_steps} steps)",
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
