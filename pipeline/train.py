"""Stage 2: train a student from the teacher-logit cache (distill) or with cross-entropy only (baseline).

Both read the same rows in the same order for the same steps; only the loss differs:
    distill:  alpha * CE(labels) + (1 - alpha) * T^2 * D(teacher_T || student_T)   (losses.py)
    baseline: CE(labels)

Layout of a run folder (`--out-dir`): the final student as a Hugging Face folder (config.json,
model.safetensors, tokenizer), `run_config.json` (resolved options + input hashes), `metrics.jsonl`,
and `state/step_NNNNNN/` resume points (Accelerate state, written to a temp folder then renamed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline.batches import CacheRows, StepBatches, TokenRows, collate_rows, loss_targets
from pipeline.cache_format import CacheReader, check_compatible, manifest_attrs, read_manifest, verify_cache
from pipeline.config import StudentConfig, TrainConfig, raise_problems
from pipeline.data import read_meta
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_write_json, folder_lock, read_json, writing
from pipeline.losses import distillation_loss, hard_ce
from pipeline.student import build_student, count_parameters
from pipeline.teacher import load_tokenizer, teacher_identity

STATE_DIR = "state"
KEEP_STATES = 2


def resolve_mixed_precision(choice: str) -> str:
    """auto: bf16 where the hardware has it (CUDA bf16, or a CPU with AVX512-BF16/AMX), fp16 on older GPUs, else no."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "no"


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to --lr, then cosine decay to lr * min_lr_ratio at max_steps (a multiplier of --lr)."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms, biases)."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def evaluate_ce(model, rows: TokenRows, batch_size: int, device, max_rows: int = 0, autocast=None) -> float:
    """Mean next-token cross-entropy (nats) of `model` over the first `max_rows` rows (0: all)."""
    model.eval()
    count = len(rows) if max_rows == 0 else min(max_rows, len(rows))
    total, tokens = 0.0, 0
    for start in range(0, count, batch_size):
        batch = collate_rows([rows[i] for i in range(start, min(count, start + batch_size))])["tokens"].to(device)
        with autocast() if autocast else torch.autocast(device.type, enabled=False):
            logits = model(input_ids=batch[:, :-1]).logits
        labels = batch[:, 1:].reshape(-1)
        mask = torch.ones_like(labels, dtype=torch.bool)
        total += hard_ce(logits.reshape(-1, logits.shape[-1]), labels, mask).item() * labels.numel()
        tokens += labels.numel()
    model.train()
    return total / max(tokens, 1)


def input_identity(config: TrainConfig, distill: bool) -> dict:
    """The hashes of what the run reads: changing any of them makes an old run folder stale."""
    meta = read_meta(config.data_dir)
    identity = {
        "train_sha256": meta["train_sha256"],
        "val_sha256": meta["val_sha256"],
        "tokenizer_hash": meta["tokenizer_hash"],
        "corpus_name": meta["corpus_name"],
    }
    if distill:
        manifest = read_json(Path(config.cache_dir) / "manifest.json")
        identity["cache_shards"] = sorted(s["sha256"] for s in manifest["shards"])
    return identity


def check_cache(config: TrainConfig, meta: dict, vocab_size: int) -> dict:
    """The cache's common attributes (from its manifest), after checking that it fits the run's data,
    options and teacher; the shards themselves are verified later, by the main process only."""
    attrs = manifest_attrs(read_manifest(config.cache_dir))
    cache_temperature = float(attrs["temperature"])
    if config.temperature is not None and abs(config.temperature - cache_temperature) > 1e-6:
        raise PipelineError(
            f"--temperature {config.temperature} differs from the cache's {cache_temperature}; "
            f"rebuild the cache at that temperature (make cache-logits TEMPERATURE={config.temperature}) or drop "
            "--temperature"
        )
    check_compatible(
        attrs,
        {
            "seq_len": config.seq_len,
            "tokenizer_hash": meta["tokenizer_hash"],
            "train_tokens_sha256": meta["train_sha256"],
            "max_rows": int(config.max_rows or 0),
        },
    )
    if config.kd_loss != "forward-kl" and attrs["mode"] == "sampled":
        raise PipelineError(
            f"--kd-loss {config.kd_loss} needs a topk cache; the sampled cache only estimates forward KL"
        )
    if int(attrs["vocab_size"]) != vocab_size:
        raise PipelineError(
            f"the cache's vocabulary ({attrs['vocab_size']}) differs from the teacher {config.teacher}'s "
            f"({vocab_size}); rebuild it: make cache-logits"
        )
    if attrs.get("teacher_hash") != teacher_identity(config.teacher)["teacher_hash"]:
        raise PipelineError(
            f"the cache {config.cache_dir} was built by another teacher ({attrs.get('teacher_name')}) than --teacher "
            f"{config.teacher}; "
            f"pass that teacher with --teacher or rebuild the cache (make cache-logits TEACHER={config.teacher})"
        )
    return attrs


def _latest_state(out_dir: Path) -> Path | None:
    states = sorted((out_dir / STATE_DIR).glob("step_[0-9]*"))
    states = [s for s in states if (s / "trainer_state.json").exists()]
    return states[-1] if states else None


def _save_state(accelerator, out_dir: Path, step: int, tokens_seen: int) -> None:
    """accelerator.save_state into a temp folder, renamed when complete (a kill mid-save loses nothing)."""
    final = out_dir / STATE_DIR / f"step_{step:06d}"
    tmp = out_dir / STATE_DIR / f".tmp_step_{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with writing(tmp):  # a full disk: one error line naming the folder; the older states stay intact
        accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / "trainer_state.json", {"step": step, "tokens_seen": tokens_seen})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted((out_dir / STATE_DIR).glob("step_[0-9]*"))[:-KEEP_STATES]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _append_metrics(path: Path, record: dict) -> None:
    with writing(path), open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl; a line cut short by a kill mid-write is skipped."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records past the resumed step so a resumed run's metrics read like an uninterrupted one's."""
    if path.exists():
        kept = [record for record in _read_metrics(path) if record.get("step", last_step + 1) <= last_step]
        path.write_text("".join(json.dumps(record) + "\n" for record in kept))


def train(
    config: TrainConfig,
    student_config: StudentConfig,
    distill: bool,
    *,
    run_kind: str | None = None,
    extra_inputs: dict | None = None,
) -> Path:
    """Train a student; returns the run folder. `distill=False` is the baseline (cache ignored).

    `run_kind` (default "distill" / "baseline") names the run in logs and run_config.json; `extra_inputs`
    adds hashes to the run's identity, so a change in them makes the folder stale (finetune.py: the source teacher)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    raise_problems(config.validate() + student_config.validate())
    out_dir = Path(config.out_dir)
    run_kind = run_kind or ("distill" if distill else "baseline")

    # ---- inputs checked against each other and the options (manifest only: cheap, before any setup)
    meta = read_meta(config.data_dir)
    vocab_size = teacher_vocab_size(config.teacher)
    temperature, num_samples = 1.0, 0
    if distill:
        cache_attrs = check_cache(config, meta, vocab_size)
        temperature, num_samples = float(cache_attrs["temperature"]), int(cache_attrs.get("num_samples", 0))

    # ---- accelerator
    # cpu=True on a CPU-only machine: only then does Accelerate join the ranks of a torchrun launch.
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(config.mixed_precision),
        gradient_accumulation_steps=config.grad_accum,
        cpu=not torch.cuda.is_available(),
    )
    device = accelerator.device

    # ---- data: cache rows (distill) or token rows (baseline)
    if distill:
        if accelerator.is_main_process:
            verify_cache(config.cache_dir, "train")  # checksums: a truncated or bit-flipped shard stops here
        accelerator.wait_for_everyone()
        train_rows = CacheRows(CacheReader(config.cache_dir, "train"), config.max_rows)
    else:
        train_rows = TokenRows(config.data_dir, "train", config.seq_len, config.max_rows)
    val_rows = TokenRows(config.data_dir, "val", config.seq_len)
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise PipelineError(
            f"not enough tokens for one sequence of {config.seq_len + 1} in train and val; lower --seq-len"
        )

    resolved = {
        "kind": run_kind,
        "train": dataclasses.asdict(config),
        "student": dataclasses.asdict(student_config),
        "temperature": temperature,
        "inputs": {**input_identity(config, distill), **(extra_inputs or {})},
    }
    for volatile in ("resume", "num_workers", "out_dir"):
        resolved["train"].pop(volatile)
    run_config_path = out_dir / "run_config.json"
    if (
        run_config_path.exists()
        and (out_dir / "model.safetensors").exists()
        and read_json(run_config_path).get("resolved") == resolved
    ):
        accelerator.print(f"{run_kind}: {out_dir} is up to date")
        return out_dir

    with folder_lock(out_dir, f"a {run_kind} run") if accelerator.is_main_process else _nullcontext():
        # ---- seed, model, optimizer, schedule
        set_seed(config.seed)
        tokenizer = load_tokenizer(config.teacher)
        model = build_student(student_config, config.teacher, vocab_size, config.seed)
        optimizer = make_optimizer(model, config)
        # The learning rate is a function of the step alone (set before each update below), so a resume
        # needs no scheduler state: nothing but tensors and safetensors is loaded back.
        model, optimizer = accelerator.prepare(model, optimizer)

        # ---- resume or start fresh
        start_step, tokens_seen = 0, 0
        saved = out_dir / "resolved_config.json"
        latest = _latest_state(out_dir) if config.resume else None
        if latest is not None and (not saved.exists() or read_json(saved) != resolved):
            if (
                not run_config_path.exists()
            ):  # an interrupted run of other settings: never overwrite its progress silently
                raise PipelineError(
                    f"the saved state in {out_dir} was made with other settings or inputs; delete "
                    f"{out_dir / STATE_DIR} to start over or pass the same options"
                )
            # The state belongs to a finished run whose options or inputs have since changed (e.g. STEPS=):
            # nothing is lost by training anew, as `make` expects after a changed option.
            accelerator.print(
                f"{run_kind}: options or inputs changed since the finished run in {out_dir}; training anew"
            )
            latest = None
        if latest is not None:
            accelerator.load_state(str(latest))
            trainer_state = read_json(latest / "trainer_state.json")
            start_step, tokens_seen = trainer_state["step"], trainer_state["tokens_seen"]
            accelerator.print(f"{run_kind}: resuming from {latest} (step {start_step})")
        elif accelerator.is_main_process:
            shutil.rmtree(out_dir / STATE_DIR, ignore_errors=True)
            (out_dir / "metrics.jsonl").unlink(missing_ok=True)
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(saved, resolved)
        if accelerator.is_main_process:
            run_config_path.unlink(
                missing_ok=True
            )  # an unfinished folder must never look finished (up to date, comparable)
            _truncate_metrics(out_dir / "metrics.jsonl", start_step)

        sampler = StepBatches(
            len(train_rows),
            config.batch_size,
            config.grad_accum,
            config.seed,
            start_step,
            config.max_steps,
            accelerator.process_index,
            accelerator.num_processes,
        )
        loader = DataLoader(
            train_rows,
            batch_sampler=sampler,
            collate_fn=collate_rows,
            num_workers=config.num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )
        accelerator.print(
            f"{run_kind}: {count_parameters(accelerator.unwrap_model(model)) / 1e6:.1f}M-parameter student, "
            f"{len(train_rows)} train rows x {config.seq_len} tokens, {config.max_steps} steps, "
            f"mixed precision {accelerator.mixed_precision}, device {device}"
        )

        # ---- the loop
        model.train()
        step = start_step
        window = {"ce": 0.0, "kd": 0.0, "total": 0.0, "micro": 0, "tokens": 0, "time": time.perf_counter()}
        progress = tqdm(
            total=config.max_steps,
            initial=start_step,
            desc=run_kind,
            unit="step",
            disable=not accelerator.is_local_main_process,
        )
        for batch in loader:
            batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
            tokens = batch["tokens"]
            step_lr = config.lr * lr_at(step, config)  # the rate this step's update uses
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            with accelerator.accumulate(model):
                logits = model(input_ids=tokens[:, :-1]).logits  # (B, L, V) in the mixed-precision dtype
                labels = tokens[:, 1:].reshape(-1)
                mask = torch.ones_like(labels, dtype=torch.bool)
                loss = distillation_loss(
                    logits.reshape(-1, logits.shape[-1]),
                    labels,
                    mask,
                    loss_targets(batch, num_samples),
                    alpha=config.alpha,
                    temperature=temperature,
                    kd_loss=config.kd_loss,
                    jsd_beta=config.jsd_beta,
                    topk_renormalize=config.topk_renormalize,
                    chunk_size=config.loss_chunk,
                )
                accelerator.backward(loss.total)
                if accelerator.sync_gradients and config.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window["ce"] += loss.ce.item()
            window["kd"] += loss.kd.item()
            window["total"] += loss.total.item()
            window["micro"] += 1
            window["tokens"] += labels.numel() * accelerator.num_processes
            tokens_seen += labels.numel() * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)

            is_last = step == config.max_steps
            if step % config.log_every == 0 or step % config.eval_every == 0 or is_last:
                elapsed = time.perf_counter() - window["time"]
                record = {
                    "step": step,
                    "tokens_seen": tokens_seen,
                    "ce": window["ce"] / window["micro"],
                    "kd": window["kd"] / window["micro"],
                    "total": window["total"] / window["micro"],
                    "lr": step_lr,
                    "tokens_per_s": window["tokens"] / max(elapsed, 1e-9),
                }
                if step % config.eval_every == 0 or is_last:
                    val_ce = evaluate_ce(
                        accelerator.unwrap_model(model),
                        val_rows,
                        config.batch_size,
                        device,
                        config.eval_rows,
                        accelerator.autocast,
                    )
                    record.update({"val_ce": val_ce, "val_ppl": math.exp(min(val_ce, 50.0))})
                if accelerator.is_main_process:
                    _append_metrics(out_dir / "metrics.jsonl", record)
                progress.set_postfix(
                    {k: f"{v:.3g}" for k, v in record.items() if k in ("total", "ce", "kd", "val_ppl")}
                )
                window = {"ce": 0.0, "kd": 0.0, "total": 0.0, "micro": 0, "tokens": 0, "time": time.perf_counter()}
            if step % config.save_every == 0 or is_last:
                _save_state(accelerator, out_dir, step, tokens_seen)
        progress.close()

        # ---- the final student, as a Hugging Face folder
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            final_model = accelerator.unwrap_model(model)
            with writing(out_dir):  # run_config.json, written last, marks the folder finished
                final_model.save_pretrained(out_dir, safe_serialization=True)
                tokenizer.save_pretrained(out_dir)
            last = _read_metrics(out_dir / "metrics.jsonl")
            atomic_write_json(
                run_config_path,
                {"resolved": resolved, "parameters": count_parameters(final_model), "final": last[-1] if last else {}},
            )
            accelerator.print(f"{run_kind}: wrote {out_dir} (val ppl {last[-1].get('val_ppl', float('nan')):.2f})")
        accelerator.wait_for_everyone()
    return out_dir


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def teacher_vocab_size(teacher: str) -> int:
    """The teacher model's vocabulary (the width of its logits, which the cache and the student share)."""
    from transformers import AutoConfig

    try:
        return int(AutoConfig.from_pretrained(teacher).vocab_size)
    except Exception as exc:
        raise PipelineError(
            f"could not read the teacher config in {teacher} ({type(exc).__name__}); run make teacher"
        ) from exc
