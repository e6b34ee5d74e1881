"""Stage 2: train a student from the teacher-logit cache (distill) or with cross-entropy only (baseline).

Both read the same rows in the same order for the same steps; only the loss differs:
    distill:  alpha * CE(labels) + (1 - alpha) * T^2 * D(teacher_T || student_T)   (pipeline/losses/)
    baseline: CE(labels)

`train()` reads top to bottom: check the inputs, set up (Accelerator, rows, student, optimizer), decide whether
to resume, run the loop (`run_loop`: one `training_step` per micro-batch; metrics, evaluation and resume points
on schedule), save the final student. `training_step` is the one step every caller runs: distill, baseline,
finetune-teacher and bench.

Layout of a run folder (`--out-dir`): the final student as a Hugging Face folder (config.json,
model.safetensors, tokenizer, generation_config.json with the tokenizer's special tokens, and for students a
README.md model card), `run_config.json` (resolved options + input hashes), `config.yaml` (every option, in the
form `--config` reads back), `metrics.jsonl`, `logs/` (TensorBoard, with --report-to tensorboard) and
`state/step_NNNNNN/` resume points (Accelerate state, written to a temp folder then renamed). The run records
(run_config.json, resolved_config.json, config.yaml, metrics.jsonl) are written and read through runs.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline.batches import AlignedCacheRows, CacheRows, StepBatches, TokenRows, collate_rows
from pipeline.cache_format import CacheReader, check_compatible, manifest_attrs, read_manifest, verify_cache
from pipeline.config import (
    Evaluation,
    Optimization,
    StudentConfig,
    TrainConfig,
    cache_mode_problems,
    check,
    to_flags,
)
from pipeline.errors import PipelineError
from pipeline.evaluate import evaluate
from pipeline.fsutil import atomic_write_json, folder_lock, read_json, writing
from pipeline.losses import LossParts, StepLoss
from pipeline.machine import fast_bf16
from pipeline.modelcard import write_model_card
from pipeline.models import (
    count_parameters,
    generation_config_for,
    head_gives_logits,
    head_input_as_logits,
)
from pipeline.rows import read_meta
from pipeline.runs import (
    STUDENT_RUNS,
    append_metrics,
    clear_best,
    clear_metrics,
    clear_run_config,
    finished_run,
    has_run_config,
    read_best,
    read_metrics,
    replace_best,
    same_resolved,
    save_config,
    save_resolved,
    truncate_metrics,
    write_run_config,
)
from pipeline.student import build_student
from pipeline.student_data import StudentRows, cross_tokenizer_note, student_rows_for
from pipeline.teacher import teacher_identity

STATE_DIR = "state"
TRACKER_DIR = "logs"  # --report-to tensorboard writes its event files under logs/<tracker project>/
KEEP_STATES = 2
# options that do not change what a run computes
# (--fused-head computes the same loss and gradients, to float rounding, with less memory)
VOLATILE_OPTIONS = ("resume", "num_workers", "out_dir", "report_to", "tracker_project", "fused_head")
# metrics.jsonl keys -> the names experiment trackers show them under
TRACKER_NAMES = {
    "ce": "train/hard_loss_ce",
    "kd": "train/soft_loss_kd",
    "total": "train/total_loss",
    "lr": "train/learning_rate",
    "tokens_per_s": "train/tokens_per_second",
    "tokens_seen": "train/tokens_seen",
    "val_ce": "val/cross_entropy",
    "val_ppl": "val/perplexity",
}
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


# ---------------------------------------------------------------- the training step


def resolve_mixed_precision(choice: str) -> str:
    """auto: bf16 where the hardware multiplies it natively (machine.fast_bf16), fp16 on older GPUs, else no."""
    if choice != "auto":
        return choice
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if fast_bf16(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else "no"


def lr_at(step: int, optim: Optimization, max_steps: int) -> float:
    """Linear warmup to --lr, then cosine decay to lr * min_lr_ratio at max_steps (a multiplier of --lr)."""
    if step < optim.warmup_steps:
        return (step + 1) / (optim.warmup_steps + 1)
    progress = (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps)
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, optim: Optimization) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms, biases)."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(0.9, 0.95), eps=1e-8)


def training_step(
    accelerator,
    model,
    optimizer,
    batch: dict[str, torch.Tensor],
    loss_fn: Callable[[torch.Tensor, dict], LossParts],
    optim: Optimization,
    step: int,
    max_steps: int,
    lap: Callable[[str], None] | None = None,
) -> LossParts:
    """One micro-batch of optimizer step `step`: the step's learning rate, forward, loss, backward, and on the last
    micro-batch of the step (Accelerate's gradient accumulation) clipping and the AdamW update.

    batch: tokens [B, L+1] and the rows' cached teacher targets, if any; loss_fn(logits [B, L, V], batch) gives the
    loss (losses.StepLoss). With loss_fn.fused_head the model's forward skips its output head and the loss gets the
    final hidden states [B, L, H] and the head instead (StepLoss.on_hidden): no [B * L, V] logits, and the head's
    time counts in "loss". The rate is a function of the step alone, so a resume needs no scheduler state.
    `lap` (profiling, e.g. bench) is called after each phase: "forward", "loss", "backward", "optimizer"."""
    lap = lap or (lambda phase: None)
    lr = optim.lr * lr_at(step, optim, max_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    batch = {key: value.to(accelerator.device, non_blocking=True) for key, value in batch.items()}
    with accelerator.accumulate(model):
        if getattr(loss_fn, "fused_head", False):
            # The body still runs through the prepared (DDP) model, so its gradient sync and no_sync work as always;
            # the head's weight is a parameter of it, its gradient (from the loss's backward) all-reduced once.
            student = accelerator.unwrap_model(model)
            with head_input_as_logits(student) as head_call:
                hidden = model(input_ids=batch["tokens"][:, :-1]).logits  # (B, L, H): the head's input
            lap("forward")
            loss = loss_fn.on_hidden(hidden, student.get_output_embeddings(), head_call["dtype"], batch)
        else:
            logits = model(input_ids=batch["tokens"][:, :-1]).logits  # (B, L, V) in the mixed-precision dtype
            lap("forward")
            loss = loss_fn(logits, batch)
        lap("loss")
        accelerator.backward(loss.total)
        lap("backward")
        if accelerator.sync_gradients and optim.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lap("optimizer")
    return loss


def save_tied_weights_once(_models, weights: list[dict], _output_dir) -> None:
    """save_state pre-hook: a tied embedding is one tensor under two names; keep its first name only (Accelerate
    would drop the alias itself, warning at every save; loading re-ties it either way)."""
    for state in weights:
        seen = set()
        for name in list(state):
            storage = (state[name].untyped_storage().data_ptr(), state[name].device)
            if storage in seen:
                del state[name]
            seen.add(storage)


# ---------------------------------------------------------------- inputs


def input_identity(config: TrainConfig, distill: bool, student: StudentRows) -> dict:
    """The hashes of what the run reads: changing any of them makes an old run folder stale."""
    meta = read_meta(config.data_dir)
    identity = {
        "train_sha256": meta["train_sha256"],
        "val_sha256": meta["val_sha256"],
        "tokenizer_hash": meta["tokenizer_hash"],
        "corpus_name": meta["corpus_name"],
    }
    if student.cross_tokenizer:
        identity["student_tokenizer_hash"] = student.meta["tokenizer_hash"]
        identity["student_train_sha256"] = student.meta["train_sha256"]
        identity["student_val_sha256"] = student.meta["val_sha256"]
    if distill:
        manifest = read_json(Path(config.cache_dir) / "manifest.json")
        identity["cache_shards"] = sorted(s["sha256"] for s in manifest["shards"])
    return identity


def check_cache(config: TrainConfig, meta: dict, vocab_size: int) -> dict:
    """The cache's common attributes (from its manifest), after checking that it fits the run's data,
    options and teacher; the shards themselves are verified later, by the main process only."""
    attrs = manifest_attrs(read_manifest(config.cache_dir))
    cache_temperature = float(attrs["temperature"])
    temperature = config.loss.temperature
    if temperature is not None and abs(temperature - cache_temperature) > 1e-6:
        raise PipelineError(
            f"--temperature {temperature} differs from the cache's {cache_temperature}; "
            f"rebuild the cache at that temperature (make cache-logits TEMPERATURE={temperature}) or drop "
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
    problems = cache_mode_problems(attrs["mode"], config.loss.kd_loss, config.loss.topk_renormalize)
    if problems:
        raise PipelineError("; ".join(problems))
    if int(attrs["vocab_size"]) != vocab_size:  # a cache from before ids were bounded by the tokenizer
        raise PipelineError(
            f"the cache {config.cache_dir} bounds its ids by {attrs['vocab_size']} (the teacher's embedding rows, as "
            f"caches did before ids were bounded by the tokenizer), the tokenizer has {vocab_size} tokens; rebuild it: "
            f"make cache-logits (python -m pipeline cache-logits --out-dir {config.cache_dir} ...)"
        )
    if attrs.get("teacher_hash") != teacher_identity(config.teacher)["teacher_hash"]:
        raise PipelineError(
            f"the cache {config.cache_dir} was built by another teacher ({attrs.get('teacher_name')}) than --teacher "
            f"{config.teacher}; pass that teacher with --teacher or rebuild the cache "
            f"(make cache-logits TEACHER={config.teacher})"
        )
    return attrs


def step_loss(config: TrainConfig, cache_attrs: dict | None) -> StepLoss:
    """The loss of each step: with the cache's temperature and draws (distill), or CE alone (baseline)."""
    return StepLoss(
        alpha=config.loss.alpha,
        temperature=float(cache_attrs["temperature"]) if cache_attrs else 1.0,
        kd_loss=config.loss.kd_loss,
        jsd_beta=config.loss.jsd_beta,
        topk_renormalize=config.loss.topk_renormalize,
        chunk_size=config.loss.loss_chunk,
        num_samples=int(cache_attrs.get("num_samples", 0)) if cache_attrs else 0,
    )


def head_fusable(model, vocab_size: int) -> bool:
    """Are the student's logits its output head's alone (models.head_gives_logits: a Linear head, no logit
    soft-capping or scaling), so that the head can run inside the loss?"""
    device = next(model.parameters()).device
    return head_gives_logits(model, (torch.arange(16, device=device) % vocab_size)[None])


def use_fused_head(choice: str, model, vocab_size: int) -> bool:
    """--fused-head: off never; on wherever the head is fusable, else one error line; auto wherever it is fusable
    (the fused step measured faster than the unfused one as well as smaller: docs/losses.md, "The output head
    fused with the loss"; the figures in docs/history.md)."""
    if choice == "off":
        return False  # without probing the model
    applies = head_fusable(model, vocab_size)
    if choice == "on" and not applies:
        raise PipelineError(
            f"--fused-head on: the {model.config.model_type} student's logits are not its output head's alone "
            "(logit soft-capping or scaling, or no Linear head); use --fused-head auto or off"
        )
    return applies


def run_provenance(config: TrainConfig, meta: dict, cache_attrs: dict | None) -> dict:
    """What the model card says a run learned from: the teacher, the corpus and (distill) the cache's targets."""
    cache = None
    if cache_attrs is not None:
        cache = {key: cache_attrs.get(key) for key in ("mode", "k", "num_samples", "temperature")}
    teacher_name = cache_attrs["teacher_name"] if cache_attrs else teacher_identity(config.teacher)["teacher_name"]
    return {"teacher_name": str(teacher_name), "corpus_name": meta["corpus_name"], "cache": cache}


# ---------------------------------------------------------------- the run folder: resume points (records: runs.py)


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


@dataclasses.dataclass
class RunStart:
    """Where a run starts: its step, the tokens seen so far, and the record of its best model so far (best.json)."""

    step: int = 0
    tokens_seen: int = 0
    best: dict | None = None


def start_or_resume(accelerator, out_dir: Path, resolved: dict, resume: bool, run_kind: str) -> RunStart:
    """Load the latest resume point of this run (--resume) and say where it stands, or clear the folder for a fresh
    start (step 0, no best). A resume point of other settings is refused while its run is unfinished (its
    progress is never overwritten silently) and discarded once that run has finished (what `make` expects after a
    changed option). The run records (metrics.jsonl, resolved_config.json, run_config.json) are runs.py's."""
    latest = _latest_state(out_dir) if resume else None
    if latest is not None and not same_resolved(out_dir, resolved):
        if not has_run_config(out_dir):
            raise PipelineError(
                f"the saved state in {out_dir} was made with other settings or inputs; delete {out_dir / STATE_DIR} "
                "to start over or pass the same options"
            )
        accelerator.print(f"{run_kind}: options or inputs changed since the finished run in {out_dir}; training anew")
        latest = None
    start_step, tokens_seen = 0, 0
    if latest is not None:
        accelerator.load_state(str(latest))
        trainer_state = read_json(latest / "trainer_state.json")
        start_step, tokens_seen = trainer_state["step"], trainer_state["tokens_seen"]
        accelerator.print(f"{run_kind}: resuming from {latest} (step {start_step})")
    elif accelerator.is_main_process:
        shutil.rmtree(out_dir / STATE_DIR, ignore_errors=True)
        clear_metrics(out_dir)
        clear_best(out_dir)
        shutil.rmtree(out_dir / TRACKER_DIR, ignore_errors=True)  # the trackers' local logs go with the metrics
        out_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(out_dir, resolved)
    if accelerator.is_main_process:
        clear_run_config(out_dir)  # an unfinished folder must never look finished (up to date)
        truncate_metrics(out_dir, start_step)
        best = read_best(out_dir)
        if best is not None and best["step"] > start_step:  # saved after the resume point: the replay finds it again
            clear_best(out_dir)
    accelerator.wait_for_everyone()
    return RunStart(start_step, tokens_seen, read_best(out_dir))


# ---------------------------------------------------------------- experiment trackers (Accelerate's)


def trackers_to_start(evaluation: Evaluation) -> list[str]:
    """The Accelerate trackers of --report-to, each checked to be installed (Accelerate would skip a missing one
    without a word); `all` is every installed one."""
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_trackio_available, is_wandb_available

    installed = {
        "tensorboard": is_tensorboard_available(),
        "wandb": is_wandb_available(),
        "mlflow": is_mlflow_available(),
        "trackio": is_trackio_available(),
    }
    names = evaluation.tracker_names()
    if evaluation.report_to.strip().lower() == "all":
        names = [name for name in names if installed[name]]
        if not names:
            raise PipelineError(
                "--report-to all found no tracker package installed; install one, e.g. pip install -e '.[tensorboard]'"
            )
        return names
    missing = [name for name in names if not installed[name]]
    if missing:
        packages = " ".join(TRACKER_PACKAGES[name] for name in missing)
        raise PipelineError(
            f"--report-to {evaluation.report_to}: not installed: {packages}; install it with "
            f"pip install -e '.[{','.join(missing)}]' (or pip install {packages}), or pass --report-to none"
        )
    return names


def start_trackers(accelerator, config: TrainConfig, hyperparameters: dict, start_step: int) -> None:
    """Start the run in each tracker (main process only; nothing without --report-to), with the run's resolved options
    as its hyperparameters. The run is named after its folder; a resumed run hides the TensorBoard events the
    interrupted one logged past its resume point (purge_step), as metrics.jsonl drops those records."""
    run_name = Path(config.out_dir).name
    accelerator.init_trackers(
        config.eval.tracker_project,
        config=hyperparameters,
        init_kwargs={
            "tensorboard": {"purge_step": start_step + 1} if start_step else {},
            "wandb": {"name": run_name},
            "mlflow": {"run_name": run_name},
            "trackio": {"name": run_name},
        },
    )


def tracker_scalars(record: dict) -> dict:
    """A metrics.jsonl record under the trackers' names (the step goes as the step)."""
    return {TRACKER_NAMES[key]: value for key, value in record.items() if key in TRACKER_NAMES}


# ---------------------------------------------------------------- the loop


class _Window:
    """Sums of the logged figures since the last log line."""

    def __init__(self):
        self.ce = self.kd = self.total = 0.0
        self.micro_batches = self.tokens = 0
        self.started = time.perf_counter()

    def add(self, loss: LossParts, tokens: int) -> None:
        self.ce += loss.ce.item()
        self.kd += loss.kd.item()
        self.total += loss.total.item()
        self.micro_batches += 1
        self.tokens += tokens

    def record(self, step: int, tokens_seen: int, lr: float) -> dict:
        n, elapsed = self.micro_batches, time.perf_counter() - self.started
        return {
            "step": step,
            "tokens_seen": tokens_seen,
            "ce": self.ce / n,
            "kd": self.kd / n,
            "total": self.total / n,
            "lr": lr,
            "tokens_per_s": self.tokens / max(elapsed, 1e-9),
        }


def validation_figures(accelerator, model, val_rows: TokenRows, config: TrainConfig) -> dict:
    """Val cross-entropy and perplexity of the student on the first --eval-rows val rows, in the training precision."""
    figures = evaluate(
        {"student": accelerator.unwrap_model(model)},
        val_rows,
        count=config.eval.eval_rows,
        batch_size=config.steps.batch_size,
        autocast=accelerator.autocast,
    )["student"]
    return {"val_ce": figures["val_ce"], "val_ppl": figures["val_ppl"]}


def run_loop(
    accelerator,
    model,
    optimizer,
    loader,
    loss_fn,
    val_rows,
    config: TrainConfig,
    out_dir: Path,
    start: RunStart,
    run_kind: str,
    tokenizer,
) -> None:
    """Train from start.step to --max-steps: one training_step per micro-batch; every --log-every steps a
    metrics.jsonl record (the evaluation added every --eval-every steps and at the end), with --keep-best the
    model of each new best val perplexity in best/, every --save-every steps and at the
    end a resume point."""
    steps, every = config.steps, config.eval
    model.train()
    step, tokens_seen, best, window = start.step, start.tokens_seen, start.best, _Window()
    progress = tqdm(
        total=steps.max_steps,
        initial=start.step,
        desc=run_kind,
        unit="step",
        disable=not accelerator.is_local_main_process,
    )
    for batch in loader:
        loss = training_step(accelerator, model, optimizer, batch, loss_fn, config.optim, step, steps.max_steps)
        tokens = batch["tokens"][:, 1:].numel() * accelerator.num_processes
        window.add(loss, tokens)
        tokens_seen += tokens
        if not accelerator.sync_gradients:
            continue
        step += 1
        progress.update(1)

        is_last = step == steps.max_steps
        evaluate_now = step % every.eval_every == 0 or is_last
        if step % every.log_every == 0 or evaluate_now:
            record = window.record(step, tokens_seen, optimizer.param_groups[0]["lr"])
            if evaluate_now:
                record.update(validation_figures(accelerator, model, val_rows, config))
                if config.checkpoint.keep_best and (best is None or record["val_ppl"] < best["val_ppl"]):
                    best = record  # saved before its metrics record: a best never runs ahead of the resume points
                    save_best(accelerator, model, tokenizer, out_dir, best)
            if accelerator.is_main_process:
                append_metrics(out_dir, record)
            accelerator.log(tracker_scalars(record), step=step)  # the same figures to --report-to (main process)
            progress.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k in ("total", "ce", "kd", "val_ppl")})
            window = _Window()
        if step % config.checkpoint.save_every == 0 or is_last:
            _save_state(accelerator, out_dir, step, tokens_seen)
    progress.close()


def save_model(accelerator, model, tokenizer, folder: Path) -> None:
    """The unwrapped model and its tokenizer as a Hugging Face folder (generate() stops at the tokenizer's EOS)."""
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.generation_config = generation_config_for(unwrapped, tokenizer)
    with writing(folder):
        unwrapped.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)


def save_best(accelerator, model, tokenizer, out_dir: Path, record: dict) -> None:
    """The model as the run's best so far (best/, with `record` as best.json); main process, the others wait."""
    if accelerator.is_main_process:
        replace_best(out_dir, lambda folder: save_model(accelerator, model, tokenizer, folder), record)
    accelerator.wait_for_everyone()


def save_final(
    accelerator,
    model,
    tokenizer,
    out_dir: Path,
    resolved: dict,
    run_kind: str,
    saved_config: tuple[str, dict],
    provenance: dict,
) -> None:
    """The final student as a Hugging Face folder (generate() stops at the tokenizer's EOS), config.yaml (the
    command's options, `saved_config` = (command, flag values)), and for students a model card;
    run_config.json, written last, marks the folder finished."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(accelerator, model, tokenizer, out_dir)
        save_config(out_dir, *saved_config)
        last = read_metrics(out_dir)
        final = last[-1] if last else {}
        run_config = {
            "resolved": resolved,
            "parameters": count_parameters(accelerator.unwrap_model(model)),
            "final": final,
            "provenance": provenance,
        }
        best = read_best(out_dir)
        if best is not None:
            run_config["best"] = best
        if run_kind in STUDENT_RUNS:
            write_model_card(out_dir, run_config)
        write_run_config(out_dir, run_config)
        accelerator.print(f"{run_kind}: wrote {out_dir} (val ppl {final.get('val_ppl', float('nan')):.2f})")
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------- the stage


def train(
    config: TrainConfig,
    student_config: StudentConfig,
    distill: bool,
    *,
    run_kind: str | None = None,
    extra_inputs: dict | None = None,
    saved_config: tuple[str, dict] | None = None,
) -> Path:
    """Train a student; returns the run folder. `distill=False` is the baseline (cache ignored).

    `run_kind` (default "distill" / "baseline") names the run in logs and run_config.json; `extra_inputs`
    adds hashes to the run's identity, so a change in them makes the folder stale (finetune.py: the source
    teacher); `saved_config` (command, flag values) is what config.yaml holds (default: this command's options)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    check(config, student_config)
    out_dir = Path(config.out_dir)
    run_kind = run_kind or ("distill" if distill else "baseline")
    saved_config = saved_config or (run_kind, {**to_flags(config), **to_flags(student_config)})
    trackers = trackers_to_start(config.eval)  # a missing tracker package is refused before any work

    # ---- inputs checked against each other and the options (manifest only: cheap, before any setup)
    meta = read_meta(config.data_dir)
    cache_attrs = check_cache(config, meta, int(meta["vocab_size"])) if distill else None
    loss_fn = step_loss(config, cache_attrs)

    # ---- accelerator and rows: cache rows (distill) or token rows (baseline), the same rows either way
    # cpu=True on a CPU-only machine: only then does Accelerate join the ranks of a torchrun launch.
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(config.optim.mixed_precision),
        gradient_accumulation_steps=config.steps.grad_accum,
        cpu=not torch.cuda.is_available(),
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / TRACKER_DIR)),
    )
    student = student_rows_for(config, student_config, meta, accelerator)
    vocab_size = int(student.meta["vocab_size"])  # its tokenizer's length: every id of its rows is below it
    if distill and student.cross_tokenizer and (config.loss.kd_loss != "forward-kl" or config.loss.topk_renormalize):
        raise PipelineError(
            "a cross-tokenizer student distils with --kd-loss forward-kl and the tail bucket (targets carried to its "
            "vocabulary merge teacher tokens, and the padding this leaves would bias reverse-kl, jsd and "
            "--topk-renormalize); drop those options"
        )
    if distill:
        if accelerator.is_main_process:
            verify_cache(config.cache_dir, "train")  # checksums: a truncated or bit-flipped shard stops here
        accelerator.wait_for_everyone()
        reader = CacheReader(config.cache_dir, "train")
        if student.cross_tokenizer:
            train_rows = AlignedCacheRows(student.data_dir, config.data_dir, reader, student.maps, config.max_rows)
        else:
            train_rows = CacheRows(reader, config.max_rows)
    else:
        train_rows = TokenRows(student.data_dir, "train", config.seq_len, config.max_rows)
    val_rows = TokenRows(student.data_dir, "val", config.seq_len)
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise PipelineError(
            f"not enough tokens for one sequence of {config.seq_len + 1} in train and val; lower --seq-len"
        )

    # ---- a finished run of the same options and inputs is up to date
    options = {k: v for k, v in to_flags(config).items() if k not in VOLATILE_OPTIONS}
    student_options = to_flags(student_config)
    if not student.cross_tokenizer:  # options only a cross-tokenizer run reads: runs of earlier versions stay valid
        options.pop("vocab_map")
        student_options.pop("student_tokenizer")
    resolved = {
        "kind": run_kind,
        "train": options,
        "student": student_options,
        "temperature": loss_fn.temperature,
        "inputs": {**input_identity(config, distill, student), **(extra_inputs or {})},
    }
    if finished_run(out_dir, resolved, touch=accelerator.is_main_process) is not None:
        accelerator.print(f"{run_kind}: {out_dir} is up to date")
        return out_dir

    with folder_lock(out_dir, f"a {run_kind} run") if accelerator.is_main_process else contextlib.nullcontext():
        # ---- seed, model, optimizer; then resume or start fresh
        set_seed(config.steps.seed)
        tokenizer = student.tokenizer
        model = build_student(
            student_config,
            config.teacher,
            vocab_size,
            config.steps.seed,
            config.seq_len,
            tokenizer if student.cross_tokenizer else None,
            student.maps.teacher_rows if student.cross_tokenizer else None,
        )
        loss_fn = dataclasses.replace(loss_fn, fused_head=use_fused_head(config.loss.fused_head, model, vocab_size))
        optimizer = make_optimizer(model, config.optim)
        model, optimizer = accelerator.prepare(model, optimizer)
        accelerator.register_save_state_pre_hook(save_tied_weights_once)
        start = start_or_resume(accelerator, out_dir, resolved, config.checkpoint.resume, run_kind)

        sampler = StepBatches(
            len(train_rows),
            config.steps.batch_size,
            config.steps.grad_accum,
            config.steps.seed,
            start.step,
            config.steps.max_steps,
            accelerator.process_index,
            accelerator.num_processes,
        )
        loader = DataLoader(
            train_rows,
            batch_sampler=sampler,
            collate_fn=collate_rows,
            num_workers=config.steps.num_workers,
            pin_memory=accelerator.device.type == "cuda",
            persistent_workers=False,
        )
        accelerator.print(
            f"{run_kind}: {count_parameters(accelerator.unwrap_model(model)) / 1e6:.1f}M-parameter student "
            f"({'from ' + student_config.student if student_config.student else student_config.student_init}), "
            f"{len(train_rows)} train rows x {config.seq_len} tokens, {config.steps.max_steps} steps, "
            f"mixed precision {accelerator.mixed_precision}, device {accelerator.device}, "
            f"output head {'fused with the loss' if loss_fn.fused_head else 'unfused'}"
            + cross_tokenizer_note(student, student_config)
        )

        start_trackers(
            accelerator,
            config,
            {"run_kind": run_kind, **saved_config[1], "kd_temperature": loss_fn.temperature},
            start.step,
        )
        try:
            run_loop(
                accelerator,
                model,
                optimizer,
                loader,
                loss_fn,
                val_rows,
                config,
                out_dir,
                start,
                run_kind,
                tokenizer,
            )
            provenance = run_provenance(config, meta, cache_attrs)
            save_final(accelerator, model, tokenizer, out_dir, resolved, run_kind, saved_config, provenance)
        finally:
            accelerator.end_training()  # closes the trackers' runs, even after an error
    return out_dir
