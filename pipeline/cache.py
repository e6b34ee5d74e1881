"""Stage 1: run the teacher once over the tokenized corpus and cache its sparse next-token
distribution in HDF5 shards (format in `cache_format/`).

For every packed sequence row (seq_len + 1 tokens; the teacher reads the first seq_len) and every
position j, the cache holds the teacher's distribution over token j+1 given tokens 0..j, at the
cache temperature, computed over the full vocabulary before anything is cut:
  - mode "topk": the K most likely ids, their log-probs, and the exact log of the tail mass;
  - mode "sampled": N draws with replacement (Anshumann et al. 2025), stored as distinct ids + counts,
    plus the teacher entropy (so the count-weighted cross-entropy becomes a KL estimate).
Ids are those of the tokenizer (below its length, data/meta.json's vocab_size) whatever the width of the
teacher's head: see TeacherRunner for the padding columns of a padded embedding.

Work is split into parts of `rows_per_part` rows. Each finished part is written atomically, so a
killed run resumes where it stopped. Parts are assigned to jobs in contiguous blocks (one shard per
job and split, fewer when a split has fewer parts than jobs), and the same parts give the same
batches and bytes whatever the number of jobs. A job is a plain run, each process of a distributed
launch, or one `--num-shards N --shard-index I` run; each records its finished shards in
`<shard>.entry.json`, and `merge_shards` checks them all and writes manifest.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline import cache_format, sparse_targets
from pipeline.buffers import WorkBuffers
from pipeline.config import CacheConfig, check, to_flags
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_write_json, folder_lock, read_json, sha256_file
from pipeline.machine import fast_bf16
from pipeline.models import head_gives_logits, load_causal_lm, logit_width
from pipeline.rows import SPLITS, load_tokens, num_rows, read_meta, row_tokens
from pipeline.runs import save_config, up_to_date
from pipeline.teacher import teacher_identity


def compute_dtype(dtype: str, device: torch.device) -> str:
    """The dtype the teacher's weights and forward run in: --dtype, with "auto" = bfloat16 where the device multiplies
    it natively (a GPU with bf16, a CPU with AVX512-BF16 or AMX: machine.fast_bf16), float32 elsewhere."""
    if dtype == "auto":
        return "bfloat16" if fast_bf16(device) else "float32"
    return dtype


def load_teacher(config: CacheConfig, device: torch.device):
    """The teacher of `config`, on `device`, with its weights in the compute dtype."""
    return load_causal_lm(config.teacher, dtype=getattr(torch, compute_dtype(config.dtype, device))).to(device)


def common_attrs(
    config: CacheConfig, meta: dict, identity: dict, vocab_size: int, dtype: str, teacher_vocab_size: int | None = None
) -> dict:
    """The attributes every shard of this cache carries: what it takes to refuse a wrong pairing, and
    every setting that changes the stored numbers (a rerun with another one rebuilds).

    vocab_size is the bound of the stored ids: the tokenizer's length. A teacher whose head is wider (a padded
    embedding) adds teacher_vocab_size (its logit width) and padding_mass: "tail" (topk: the padding columns' mass is
    in the tail) or "excluded" (sampled: drawn from the tokenizer's columns, renormalised). A teacher without
    padding writes neither, so its shards keep the bytes they had before these attributes existed."""
    padding = {}
    if teacher_vocab_size is not None and int(teacher_vocab_size) != int(vocab_size):
        padding = {
            "teacher_vocab_size": int(teacher_vocab_size),
            "padding_mass": "tail" if config.mode == "topk" else "excluded",
        }
    return {
        "format_version": cache_format.FORMAT_VERSION,
        "mode": config.mode,
        "compute_dtype": dtype,
        "teacher_name": identity["teacher_name"],
        "teacher_hash": identity["teacher_hash"],
        "tokenizer_hash": identity["tokenizer_hash"],
        "vocab_size": int(vocab_size),
        "seq_len": int(config.seq_len),
        "temperature": float(config.temperature),
        "k": int(config.k) if config.mode == "topk" else 0,
        "num_samples": int(config.num_samples) if config.mode == "sampled" else 0,
        "seed": int(config.seed),
        "corpus_name": meta["corpus_name"],
        "train_tokens_sha256": meta["train_sha256"],
        "val_tokens_sha256": meta["val_sha256"],
        "max_rows": int(config.max_rows or 0),
        **padding,
    }


def shard_attrs(attrs: dict, split: str, *, shard_index: int, num_shards: int, row_start: int, rows: int) -> dict:
    """The attributes of one shard, as assemble_shard writes them into the file: the cache's common_attrs, the split
    with its tokens' hash, and the shard's place among the split's shards."""
    return {
        **attrs,
        "split": split,
        "tokens_sha256": attrs[f"{split}_tokens_sha256"],
        "shard_index": shard_index,
        "num_shards": num_shards,
        "row_start": row_start,
        "rows": rows,
    }


# ---------------------------------------------------------------- teacher -> sparse targets

# Positions per output-head matmul (one reused [chunk, V] buffer) and per extraction pass over a piece of it: on a
# CPU, big matmuls into a kept buffer beat small ones and fresh allocations, and pieces of a few rows keep the
# extraction's passes inside the core's cache (docs/history.md, "2026-11-26, 01:32 to 03:48 UTC: what
# moved the figures").
HEAD_CHUNK = {"cpu": 1024, "cuda": 8192}
EXTRACT_CHUNK = {"cpu": 16, "cuda": 8192}
# TeacherRunner's kept buffers: float32 logits, sampling scratch, a copy for a second mode, the head's output at the
# teacher's precision when that is not float32
LOGITS, SCRATCH, MODE_COPY, HEAD_OUT = 0, 1, 2, 3


def row_uniforms(row_seeds: list[int], seq_len: int, num_samples: int) -> torch.Tensor:
    """[B * seq_len, N] float64 uniforms, each row's from its own generator seeded by its global row
    index, drawn on the CPU: the draws do not depend on batching, the number of processes or the device."""
    return torch.cat(
        [
            torch.rand(seq_len, num_samples, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            for seed in row_seeds
        ]
    )


def sampled_arrays(draws: torch.Tensor, entropy: torch.Tensor, batch: int, seq_len: int) -> dict[str, np.ndarray]:
    """draws [B * L, N] and entropy [B * L] -> the ragged layout of a sampled part: distinct ids and their
    counts (flat, position by position, ids ascending), num_distinct [B, L] and teacher_entropy [B, L]."""
    draws = draws.cpu().sort(-1).values
    is_start = torch.ones_like(draws, dtype=torch.bool)  # runs of equal ids in each sorted row
    is_start[:, 1:] = draws[:, 1:] != draws[:, :-1]
    flat_start = is_start.flatten().nonzero().squeeze(1)
    flat_draws = draws.flatten()
    counts = torch.diff(flat_start, append=torch.tensor([flat_draws.numel()]))
    return {
        "sample_ids": flat_draws[flat_start].numpy(),
        "sample_counts": counts.numpy().astype(np.uint8),
        "num_distinct": is_start.sum(-1).reshape(batch, seq_len).numpy().astype(np.uint8),
        "teacher_entropy": entropy.cpu().view(batch, seq_len).numpy(),
    }


def topk_arrays(
    values: torch.Tensor, ids: torch.Tensor, tail: torch.Tensor, batch: int, seq_len: int
) -> dict[str, np.ndarray]:
    """topk_with_tail's [B * L, ...] outputs -> the arrays of a topk part, shaped [B, L, K] and [B, L]."""
    k = ids.shape[-1]
    return {
        "topk_ids": ids.cpu().view(batch, seq_len, k).numpy(),
        "topk_logprobs": values.cpu().view(batch, seq_len, k).numpy(),
        "tail_logprob": tail.cpu().view(batch, seq_len).numpy(),
    }


def sampled_targets(logits: torch.Tensor, num_samples: int, row_seeds: list[int]) -> dict[str, np.ndarray]:
    """logits [B, L, V] at the cache temperature (log-probs work too; overwritten) -> num_samples draws per
    position with replacement from the teacher, as sampled_arrays lays them out."""
    batch, seq_len, vocab = logits.shape
    draws, entropy = sparse_targets.sampled_draws(
        logits.reshape(-1, vocab), row_uniforms(row_seeds, seq_len, num_samples)
    )
    return sampled_arrays(draws, entropy, batch, seq_len)


class TeacherRunner:
    """Runs the teacher on [B, L] token batches and turns its logits into the cache's sparse targets.

    The teacher runs with its weights in the compute dtype (compute_dtype: bf16 where the hardware has it), the
    output head included, as a plain forward at that precision does. The head runs chunk by chunk into one reused
    buffer and each chunk is reduced to its sparse targets at once, so the [B * L, V] logits never exist whole (on
    CPU that saves more than the extraction costs); the extraction (log-softmax, tail mass, sampling CDF) is float32
    whatever the teacher's dtype, so the stored numbers are exact for the logits the teacher computed. This needs
    logits == head(last hidden state); `fused_head` is checked once (models.head_gives_logits), and the stage
    falls back to the full logits when they differ.

    Stored ids stay below `vocab_size`, the tokenizer's length, whatever the head's width V (embeddings are often
    padded past the tokenizer: Qwen2.5, or a multiple of 64). The padding columns are never drawn from: the sampled
    mode runs the head on the tokenizer's rows only (their mass is left out and the distribution renormalised over
    the real tokens), and the topk mode picks its K ids among the tokenizer's columns while normalising over all V
    (their mass falls in the tail)."""

    def __init__(
        self,
        model,
        config: CacheConfig,
        device: torch.device,
        lap: Callable[[str], None] | None = None,
        vocab_size: int | None = None,
    ):
        """`model` sits on `device` with its weights in the compute dtype (load_teacher). `lap` (profiling, e.g.
        bench): called with "body" after the teacher body and "head_extract" after the output head and the
        extraction of each batch. `vocab_size`: the tokenizer's length (None: the head's width)."""
        self.dtype = getattr(torch, compute_dtype(config.dtype, device))
        if model.dtype != self.dtype:
            raise ValueError(
                f"the teacher's weights are {model.dtype}, the cache computes in {self.dtype}: load_teacher"
            )
        self.model, self.config, self.device, self.lap = model, config, device, lap
        self.vocab_size = int(vocab_size or logit_width(model))
        self.head_chunk = HEAD_CHUNK.get(device.type, HEAD_CHUNK["cpu"])
        self.extract_chunk = EXTRACT_CHUNK.get(device.type, EXTRACT_CHUNK["cpu"])
        self.fused_head: bool | None = None  # decided on the first batch
        self._buffers = WorkBuffers()

    def _lap(self, phase: str) -> None:
        if self.lap is not None:
            self.lap(phase)

    @torch.inference_mode()
    def full_logits(self, input_ids: np.ndarray) -> torch.Tensor:
        """[B, L] ids -> the model's own [B, L, V] logits, as a plain forward at the runner's precision gives them
        (what the chunked path must match, and what bench times it against)."""
        ids = torch.from_numpy(input_ids).to(self.device, non_blocking=True)
        return self.model(input_ids=ids, use_cache=False).logits

    def _buffer(self, index: int, rows: int, vocab: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._buffers.take(index, (rows, vocab), dtype, self.device)

    def logit_chunks(self, input_ids: np.ndarray, width: int | None = None):
        """[B, L] ids -> yields (first position, [n, width] float32 logits / temperature) over the B * L
        positions in order: the first `width` columns of the head (None: all of them). Each chunk lives in a
        reused buffer: consume it before the next."""
        ids = torch.from_numpy(input_ids).to(self.device, non_blocking=True)
        if self.fused_head is None:
            self.fused_head = head_gives_logits(self.model, ids)
        if self.fused_head:
            head = self.model.get_output_embeddings()
            states = self.model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        else:
            states = self.model(input_ids=ids, use_cache=False).logits
        states = states.reshape(-1, states.shape[-1])
        self._lap("body")
        full = head.out_features if self.fused_head else states.shape[-1]
        vocab = min(width or full, full)
        if self.fused_head:  # the head's first `vocab` rows: views, so a narrower head costs no copy
            weight = head.weight[:vocab]
            bias = None if head.bias is None else head.bias[:vocab]
        for start in range(0, states.shape[0], self.head_chunk):
            piece = states[start : start + self.head_chunk]
            if self.fused_head:  # the head at the teacher's precision, into a kept buffer
                index = LOGITS if self.dtype == torch.float32 else HEAD_OUT
                logits = torch.matmul(piece, weight.T, out=self._buffer(index, len(piece), vocab, self.dtype))
                if bias is not None:
                    logits.add_(bias)
            else:  # the model's own logits
                logits = piece[:, :vocab]
            # float32 logits of full width are ours to overwrite; others are copied piece by piece into a small
            # float32 buffer that the extraction's passes then find in the CPU's cache
            in_place = logits.dtype == torch.float32 and (self.fused_head or vocab == full)
            for offset in range(0, len(logits), self.extract_chunk):
                part = logits[offset : offset + self.extract_chunk]
                if not in_place:
                    part = self._buffer(LOGITS, len(part), vocab).copy_(part)
                if self.config.temperature != 1.0:
                    part.div_(self.config.temperature)
                yield start + offset, part

    @torch.inference_mode()
    def targets_by_mode(
        self, rows: np.ndarray, row_seeds: list[int], modes: tuple[str, ...]
    ) -> dict[str, dict[str, np.ndarray]]:
        """rows [B, L+1] -> {mode: the part arrays for these rows (tokens included)}; one teacher forward serves all
        modes."""
        batch, seq_len = rows.shape[0], rows.shape[1] - 1
        uniforms = row_uniforms(row_seeds, seq_len, self.config.num_samples) if "sampled" in modes else None
        pieces = {mode: [] for mode in modes}
        # topk needs every column of the head (padding mass goes to the tail); sampled the tokenizer's only
        width = None if "topk" in modes else self.vocab_size
        for start, logits in self.logit_chunks(rows[:, :-1], width):
            for i, mode in enumerate(modes):
                columns = self.vocab_size if mode == "sampled" else logits.shape[1]
                if i == len(modes) - 1 and columns == logits.shape[1]:
                    chunk = logits  # the last mode may overwrite the chunk
                else:  # a contiguous copy of the columns this mode reads (one [chunk, V] buffer)
                    chunk = self._buffer(MODE_COPY, len(logits), columns).copy_(logits[:, :columns])
                if mode == "topk":
                    pieces[mode].append(sparse_targets.topk_with_tail(chunk, self.config.k, self.vocab_size))
                else:
                    scratch = self._buffer(SCRATCH, *chunk.shape)
                    pieces[mode].append(
                        sparse_targets.sampled_draws(chunk, uniforms[start : start + len(chunk)], scratch)
                    )
        self._lap("head_extract")
        pack = {"topk": topk_arrays, "sampled": sampled_arrays}
        return {
            mode: {"tokens": rows, **pack[mode](*(torch.cat(column) for column in zip(*parts)), batch, seq_len)}
            for mode, parts in pieces.items()
        }

    def targets(self, rows: np.ndarray, row_seeds: list[int]) -> dict[str, np.ndarray]:
        """rows [B, L+1] -> the part arrays of the configured mode for these rows (tokens included)."""
        return self.targets_by_mode(rows, row_seeds, (self.config.mode,))[self.config.mode]


def concat_parts(pieces: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([p[key] for p in pieces]) for key in pieces[0]}


def row_seed(seed: int, split: str, index: int) -> int:
    """Seed of the sampled draws of row `index` of `split`: a hash of all three, so no two rows of
    any split or seed share their draws (a linear mix like seed*P + index collides across splits)."""
    digest = hashlib.blake2b(f"{seed}:{split}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # < 2**63


def shard_block(num_parts: int, process_index: int, num_processes: int) -> tuple[int, int, int, int] | None:
    """The contiguous block of parts one process computes for a split:
    (shard_index, num_shards, first_part, last_part), with num_shards = min(processes, parts) so
    that every shard holds at least one part; None for a process left without parts."""
    num_shards = min(num_processes, num_parts)
    if process_index >= num_shards:
        return None
    first = num_parts * process_index // num_shards
    last = num_parts * (process_index + 1) // num_shards
    return process_index, num_shards, first, last


# ---------------------------------------------------------------- the stage


def _validate_against_teacher(config: CacheConfig, model_config, meta: dict, identity: dict) -> tuple[int, int]:
    """(the tokenizer's length: the bound of the stored ids, the teacher's logit width), after the checks."""
    problems = []
    teacher_vocab = int(model_config.vocab_size)
    vocab_size = int(meta["vocab_size"])  # len(tokenizer), recorded by the data stage
    max_positions = getattr(model_config, "max_position_embeddings", None)
    if max_positions and config.seq_len > max_positions:
        problems.append(
            f"--seq-len {config.seq_len} is longer than the teacher's context ({max_positions}); pass "
            f"SEQ_LEN={max_positions} or less"
        )
    if config.mode == "topk" and config.k > vocab_size:
        problems.append(
            f"--k {config.k} is larger than the tokenizer's vocabulary ({vocab_size}); pass K={vocab_size} or less"
        )
    if meta["tokenizer_hash"] != identity["tokenizer_hash"]:
        problems.append(
            f"{config.data_dir} was tokenized with another tokenizer than the teacher {config.teacher}'s; rerun make "
            f"data with TEACHER={config.teacher}"
        )
    if vocab_size > teacher_vocab:
        problems.append(
            f"the tokenizer has {vocab_size} tokens but the teacher's output head only {teacher_vocab} rows"
        )
    if problems:
        raise PipelineError("; ".join(problems))
    return vocab_size, teacher_vocab


def build_cache(config: CacheConfig) -> dict:
    """Compute the cache for the train and val splits into `config.out_dir` (resumable; a no-op when complete).

    The work is a number of jobs, each a contiguous block of parts per split (`shard_block`) written as its own
    shard and `<shard>.entry.json`; manifest.json is written by `merge_shards` once every job is done. A plain
    run is one job; under a distributed launch (torchrun / accelerate launch) every process is a job and the
    main process merges; `--num-shards N --shard-index I` runs job I alone (the others may run anywhere, at
    any time, and be retried), and the last job to finish, or `--merge`, writes the manifest."""
    from accelerate import PartialState

    check(config)
    # On a CPU-only machine accelerate sees a torchrun launch only with cpu=True (else every rank
    # would think it is alone and compute the whole cache).
    state = PartialState(cpu=not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and state.num_processes == 1:
        raise PipelineError(
            f"launched as {launched} processes but accelerate sees {state.num_processes}; "
            "run cache-logits under torchrun or accelerate launch, or as one plain process"
        )
    if state.num_processes > 1 and (config.num_shards is not None or config.merge):
        raise PipelineError(
            "--num-shards/--shard-index/--merge run one job as one process: start them without torchrun or "
            "accelerate launch (or drop them: the launched processes then share the work)"
        )
    out_dir = Path(config.out_dir)
    meta = read_meta(config.data_dir)
    identity = teacher_identity(config.teacher)
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(config.teacher)
    vocab_size, teacher_vocab = _validate_against_teacher(config, model_config, meta, identity)
    attrs = common_attrs(config, meta, identity, vocab_size, compute_dtype(config.dtype, state.device), teacher_vocab)

    manifest_path = out_dir / cache_format.MANIFEST_NAME
    # compute_dtype: any, for a --merge on a machine of another kind
    ignored = ("compute_dtype",) if config.merge and config.dtype == "auto" else ()
    manifest = up_to_date(
        out_dir,
        cache_format.MANIFEST_NAME,
        attrs,
        _shard_sizes,
        touch=True,
        ignore=ignored,
        read=lambda path: cache_format.read_manifest(path.parent),
    )
    if manifest is not None:
        state.print(f"cache: {out_dir} is up to date ({manifest['splits']['train']['rows']} train rows)")
        return manifest
    if manifest_path.exists() and not config.merge:
        state.print(f"cache: settings or inputs changed, rebuilding {out_dir}")
    if config.merge:
        with folder_lock(out_dir, "a cache-logits merge"):
            return merge_shards(config, attrs, config.num_shards)

    if config.shard_index is None:  # one process, or every process of a launch, each a job
        job, num_jobs = state.process_index, state.num_processes
        lock = folder_lock(out_dir, "a cache-logits run") if state.is_main_process else contextlib.nullcontext()
    else:
        job, num_jobs = config.shard_index, config.num_shards
        lock = folder_lock(out_dir, f"cache-logits job {job} of {num_jobs}", f".lock-{job:05d}-of-{num_jobs:05d}")
    with lock:
        state.wait_for_everyone()
        if state.is_main_process:
            manifest_path.unlink(missing_ok=True)  # the folder no longer holds a finished cache of these settings
        state.wait_for_everyone()
        runner = None  # the teacher is loaded only when a split of this job is not done yet
        names, started = [], time.perf_counter()
        for split in SPLITS:
            if runner is None and not _job_split_done(config, attrs, split, job, num_jobs):
                runner = TeacherRunner(load_teacher(config, state.device), config, state.device, vocab_size=vocab_size)
            entry = _build_shard(runner, config, attrs, split, job, num_jobs, state.is_local_main_process)
            names += [entry["file"]] if entry else []
        rows = sum(job_shard(config, split, job, num_jobs).get("rows", 0) for split in SPLITS)
        elapsed = time.perf_counter() - started  # includes rows resumed from parts of an earlier run
        print(
            f"cache: job {job} of {num_jobs} wrote {', '.join(names) or 'nothing (no part falls to it)'}: "
            f"{rows * config.seq_len} tokens, {rows * config.seq_len / elapsed:.0f} tokens/s"
        )
        state.wait_for_everyone()
        if config.shard_index is None:
            if state.is_main_process:
                merge_shards(config, attrs, num_jobs)
            state.wait_for_everyone()
            return cache_format.read_manifest(out_dir)
    waiting = _unfinished_jobs(config, attrs, num_jobs)
    if waiting:
        print(
            f"cache: {num_jobs - len(waiting)} of {num_jobs} jobs done, waiting for job(s) "
            f"{', '.join(map(str, waiting))}; the last job to finish (or cache-logits --merge) writes the manifest"
        )
        return {}
    with contextlib.ExitStack() as merge_lock:
        try:
            merge_lock.enter_context(folder_lock(out_dir, "a cache-logits merge"))
        except PipelineError as exc:  # another job finished at the same time and merges
            print(f"cache: not merging: {exc}")
            return {}
        return merge_shards(config, attrs, num_jobs)


def _shard_sizes(manifest: dict) -> dict[str, int]:
    """{file: bytes} of every shard the manifest lists (the up-to-date check compares sizes; verify_cache hashes)."""
    return {e["file"]: e["bytes"] for e in manifest["shards"]}


# ---------------------------------------------------------------- jobs, entries, merge


def entry_name(shard_file: str) -> str:
    """The file where a job records a finished shard: train-00001-of-00003.h5 -> train-00001-of-00003.entry.json."""
    return shard_file[: -len(".h5")] + ".entry.json"


def entry_path(out_dir: Path, shard_file: str) -> Path:
    return out_dir / entry_name(shard_file)


def split_rows(config: CacheConfig, split: str) -> int:
    tokens = load_tokens(config.data_dir, split)
    rows = num_rows(len(tokens), config.seq_len, config.max_rows)
    if rows == 0:
        raise PipelineError(
            f"the {split} split has {len(tokens)} tokens, fewer than one sequence of {config.seq_len + 1}; lower "
            "SEQ_LEN or use a bigger corpus"
        )
    return rows


def job_shard(config: CacheConfig, split: str, job: int, num_jobs: int, rows_per_part: int | None = None) -> dict:
    """The shard job `job` of `num_jobs` writes for a split: {file, shard_index, num_shards, row_start, rows,
    first_part, last_part}, or {} when the split has fewer parts than jobs and none falls to this one."""
    rows_per_part = rows_per_part or config.rows_per_part
    rows = split_rows(config, split)
    block = shard_block(-(-rows // rows_per_part), job, num_jobs)
    if block is None:
        return {}
    shard_index, num_shards, first_part, last_part = block
    row_start = first_part * rows_per_part
    return {
        "file": cache_format.shard_name(split, shard_index, num_shards),
        "shard_index": shard_index,
        "num_shards": num_shards,
        "row_start": row_start,
        "rows": min(rows, last_part * rows_per_part) - row_start,
        "first_part": first_part,
        "last_part": last_part,
    }


def _read_entry(path: Path) -> dict | None:
    try:
        entry = read_json(path)
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) else None


def _job_split_done(config: CacheConfig, attrs: dict, split: str, job: int, num_jobs: int) -> bool:
    """This job's shard of the split is on disk, with an entry of these settings and the file's size."""
    shard = job_shard(config, split, job, num_jobs)
    if not shard:
        return True
    entry = up_to_date(
        config.out_dir,
        entry_name(shard["file"]),
        {"attrs": attrs, "rows_per_part": config.rows_per_part},
        lambda entry: {shard["file"]: entry.get("bytes", -1)},  # an entry without the shard's size is not finished
        read=_read_entry,
    )
    return entry is not None


def _unfinished_jobs(config: CacheConfig, attrs: dict, num_jobs: int) -> list[int]:
    """The jobs with a shard not (yet) recorded with an entry of these settings."""
    return [j for j in range(num_jobs) if not all(_job_split_done(config, attrs, s, j, num_jobs) for s in SPLITS)]


def merge_shards(config: CacheConfig, attrs: dict, num_jobs: int | None) -> dict:
    """Check that every shard of every split is present and matches its entry (size, sha256, rows) and the
    shared attributes (teacher, tokenizer, tokens, temperature, mode, seed, ...), then write manifest.json and
    remove the entries, parts and files of other runs. One PipelineError names every missing or mismatched shard.
    num_jobs: None takes it from the entries. compute_dtype (with "auto", bf16 or fp32 by the machine) is taken from
    the entries, which must agree on it, so that the merge may run on a machine of another kind."""
    out_dir = Path(config.out_dir)
    entries = [e for e in map(_read_entry, sorted(out_dir.glob("*.entry.json"))) if e]
    recorded = {e.get("num_jobs") for e in entries} - {None}
    if num_jobs is None:
        if len(recorded) != 1:
            raise PipelineError(
                f"{out_dir} holds no shard entries to merge; run the jobs first (cache-logits --num-shards N "
                "--shard-index I for every I)"
                if not recorded
                else f"{out_dir} holds entries of runs with {sorted(recorded)} jobs; pass --num-shards N"
            )
        num_jobs = recorded.pop()
    dtypes = {e["attrs"].get("compute_dtype") for e in entries if isinstance(e.get("attrs"), dict)}
    if config.dtype == "auto" and len(dtypes) == 1:
        attrs = {**attrs, "compute_dtype": next(iter(dtypes))}
    rows_per_part = {e.get("rows_per_part") for e in entries} - {None}
    rows_per_part = rows_per_part.pop() if len(rows_per_part) == 1 else config.rows_per_part

    problems, finished = [], []
    for split in SPLITS:
        for job in range(num_jobs):
            shard = job_shard(config, split, job, num_jobs, rows_per_part)
            if not shard:
                continue
            problem = _check_job_shard(out_dir, shard, split, job, num_jobs, attrs, rows_per_part)
            if problem:
                problems.append(problem)
            else:
                finished.append(read_json(entry_path(out_dir, shard["file"])))
    if problems:
        raise PipelineError("; ".join(problems))
    # the settings of the cache (a rerun with --config finds it up to date), without the job options
    settings = dataclasses.replace(config, num_shards=None, shard_index=None, merge=False)
    save_config(out_dir, "cache-logits", to_flags(settings))
    cache_format.write_manifest(out_dir, attrs, finished)
    # the manifest now records the shards: entries, parts, files of other runs and stale job locks go
    listed = {e["file"] for e in finished}
    leftovers = [*out_dir.glob("*.h5"), *out_dir.glob("*.entry.json"), *out_dir.glob(".*.tmp")]
    for stale in [p for p in leftovers if p.name not in listed] + list(out_dir.glob(".lock-*-of-*")):
        stale.unlink(missing_ok=True)
    shutil.rmtree(out_dir / ".parts", ignore_errors=True)
    manifest = cache_format.read_manifest(out_dir)
    splits = manifest["splits"]
    print(
        f"cache: wrote {out_dir}: {splits['train']['rows']} train / {splits['val']['rows']} val rows, "
        f"{splits['train']['tokens'] + splits['val']['tokens']} tokens, {splits['train']['bytes_per_token']:.1f} "
        f"bytes/token ({config.mode}), from {num_jobs} job(s)"
    )
    return manifest


def _check_job_shard(
    out_dir: Path, shard: dict, split: str, job: int, num_jobs: int, attrs: dict, rows_per_part: int
) -> str | None:
    """What is wrong with the shard job `job` should have written (None: it is there and matches)."""
    name, rerun = shard["file"], f"rerun job {job} (cache-logits --num-shards {num_jobs} --shard-index {job})"
    entry = _read_entry(entry_path(out_dir, name))
    if entry is None:
        return f"{name} is missing (job {job} of {num_jobs} has not finished): {rerun}"
    have = entry.get("attrs") if isinstance(entry.get("attrs"), dict) else {}
    differ = [f"{k} {have.get(k)!r}, expected {v!r}" for k, v in attrs.items() if have.get(k) != v]
    if differ:
        return f"{name} was computed with other settings ({'; '.join(differ)}): {rerun} with the same options"
    layout = {k: shard[k] for k in ("shard_index", "num_shards", "row_start", "rows")}
    if {k: entry.get(k) for k in layout} != layout or entry.get("rows_per_part") != rows_per_part:
        return f"{name}'s entry does not match the layout of {num_jobs} jobs: {rerun}"
    path = out_dir / name
    if not path.is_file():
        return f"{path} is missing (its entry is there): copy it into {out_dir} or {rerun}"
    if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
        return f"{path} does not match its entry (size or sha256): copy it again or {rerun}"
    stored = cache_format.read_shard_attrs(path)
    if any(stored.get(k) != v for k, v in shard_attrs(attrs, split, **layout).items()):
        return f"{path} holds attributes that differ from its entry: {rerun}"
    return None


def _build_shard(
    runner: TeacherRunner | None,
    config: CacheConfig,
    attrs: dict,
    split: str,
    job: int,
    num_jobs: int,
    show_progress: bool = True,
) -> dict | None:
    """Compute job `job`'s parts of `split` (skipping parts already on disk), assemble its shard and record it
    in `<shard>.entry.json`. Returns the entry, or None when no part of the split falls to this job. A shard
    already recorded with these settings is kept as it is."""
    out_dir = Path(config.out_dir)
    shard = job_shard(config, split, job, num_jobs)
    if not shard:
        return None
    name = shard["file"]
    if _job_split_done(config, attrs, split, job, num_jobs):
        return read_json(entry_path(out_dir, name))
    entry_path(out_dir, name).unlink(missing_ok=True)  # an entry of other settings: this shard is redone
    for stale in out_dir.glob(f".{name}.*.tmp"):  # a temp shard of a killed run
        stale.unlink()
    tokens = load_tokens(config.data_dir, split)
    rows = split_rows(config, split)
    parts_dir = out_dir / ".parts" / name
    attrs_path = parts_dir / "attrs.json"
    if parts_dir.exists() and (not attrs_path.exists() or read_json(attrs_path) != attrs):
        shutil.rmtree(parts_dir)  # parts of a killed run are reused only if computed with the same settings
    parts_dir.mkdir(parents=True, exist_ok=True)
    if not attrs_path.exists():
        atomic_write_json(attrs_path, attrs)
    part_paths = [parts_dir / f"part-{p:06d}.npz" for p in range(shard["first_part"], shard["last_part"])]

    progress = tqdm(
        total=shard["rows"] * config.seq_len,
        desc=f"cache {split} [{job}]",
        unit="tok",
        unit_scale=True,
        disable=not show_progress,
    )
    with ThreadPoolExecutor(max_workers=1) as writer:  # disk writes overlap the next teacher forward
        pending = []
        for part, path in zip(range(shard["first_part"], shard["last_part"]), part_paths):
            start, end = part * config.rows_per_part, min(rows, (part + 1) * config.rows_per_part)
            if path.exists():
                progress.update((end - start) * config.seq_len)
                continue
            pieces = []
            for batch_start in range(start, end, config.batch_size):
                indices = range(batch_start, min(end, batch_start + config.batch_size))
                batch_rows = np.stack([row_tokens(tokens, i, config.seq_len) for i in indices])
                pieces.append(runner.targets(batch_rows, [row_seed(config.seed, split, i) for i in indices]))
                progress.update(len(indices) * config.seq_len)
            pending.append(writer.submit(cache_format.write_part, path, concat_parts(pieces)))
        for future in pending:
            future.result()  # surfaces a disk-full error here, before the shard is assembled
    progress.close()

    layout = {k: shard[k] for k in ("shard_index", "num_shards", "row_start", "rows")}
    entry = cache_format.assemble_shard(out_dir / name, shard_attrs(attrs, split, **layout), part_paths)
    entry.update(layout, split=split, attrs=attrs, job=job, num_jobs=num_jobs, rows_per_part=config.rows_per_part)
    atomic_write_json(entry_path(out_dir, name), entry)  # written last: the shard is finished
    shutil.rmtree(parts_dir, ignore_errors=True)
    return entry
