"""Run records: what a stage leaves beside its output so that the next run, and the next stage, know what is there.

    config.yaml           every option of the command that made the folder, in the form `--config` reads back
                          (data, cache-logits, distill / baseline / finetune-teacher)
    metrics.jsonl         a training run's logged steps, one JSON record a line: appended as the run goes, cut back
                          to the resumed step on a resume, read by compare and sweep for their curves
    resolved_config.json  the resolved options and input hashes of the training run in the folder (written when it
                          starts): a resume point of other settings is never continued
    run_config.json       written last by a finished training run: resolved options, parameters, final figures,
                          the best checkpoint's step and figures, provenance (finetune-teacher adds its before /
                          after figures)
    best/                 with --keep-best (distill / baseline, on by default): the model of the best val
                          perplexity so far, a Hugging Face folder, and best/best.json = its metrics.jsonl record

and the one "up to date" decision every stage takes before it works (`up_to_date`): the record the stage writes
last (data: meta.json, cache: manifest.json and each job's shard entry, distill / baseline / finetune-teacher:
run_config.json, teacher: teacher_info.json, export: export_report.json) says it was made from these inputs and
options, and the output files it names are there with their sizes. What a stage prints about the decision
("is up to date", "rebuilding") stays with the stage.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from pipeline.config import config_file_text
from pipeline.fsutil import atomic_write_bytes, atomic_write_json, read_json, writing

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
RESOLVED_FILE = "resolved_config.json"
RUN_CONFIG_FILE = "run_config.json"
MODEL_FILE = "model.safetensors"  # with run_config.json, what marks a finished training run
BEST_DIR = "best"  # the run's best model so far: a Hugging Face folder with best.json
BEST_FILE = "best.json"
STUDENT_RUNS = ("distill", "baseline")  # the run kinds (run_config.json's resolved.kind) that train a student


# ---------------------------------------------------------------- the "up to date" decision


def matches(record: Mapping, made_from: Mapping, ignore: Iterable[str] = ()) -> bool:
    """Does `record` hold every key of `made_from` with the same value (keys in `ignore` aside)? A key the record
    lacks matches only None."""
    ignore = set(ignore)
    return all(record.get(key) == value for key, value in made_from.items() if key not in ignore)


def outputs_present(folder: str | Path, sizes: Mapping[str, int | None]) -> bool:
    """Is every file of `sizes` ({name in folder: bytes, or None for any size}) there with its size? A cheap check:
    sizes, no hashing."""
    for name, size in sizes.items():
        path = Path(folder) / name
        if not path.is_file() or (size is not None and path.stat().st_size != size):
            return False
    return True


def up_to_date(
    folder: str | Path,
    record_name: str,
    made_from: Mapping,
    outputs: Mapping[str, int | None] | Callable[[dict], Mapping[str, int | None]] | None = None,
    *,
    ignore: Iterable[str] = (),
    read: Callable[[Path], dict | None] = read_json,
    touch: bool = False,
) -> dict | None:
    """The record `folder/record_name` when the folder's output is there for these inputs and options, else None.

    Up to date means: the record exists (the stage writes it last, so a killed run leaves none), it holds every key
    of `made_from` with the same value (`matches`; `ignore` names keys left out), and every output file it names is
    present with its size (`outputs`: {name: bytes or None}, or a function of the record giving them; None: no
    files). `read` reads the record (default: JSON; a reader may raise, or return None for an unreadable one).
    touch: the stage itself asks (its rerun found its output current): the record's and the output files' times are
    set to now, so that `make`, which compares file times, sees them as newer than the inputs it reran for."""
    path = Path(folder) / record_name
    if not path.exists():
        return None
    record = read(path)
    if record is None or not matches(record, made_from, ignore):
        return None
    sizes = outputs(record) if callable(outputs) else outputs or {}
    if not outputs_present(folder, sizes):
        return None
    if touch:
        for name in (record_name, *sizes):
            os.utime(Path(folder) / name)
    return record


# ---------------------------------------------------------------- config.yaml


def save_config(folder: str | Path, command: str, flags: dict) -> None:
    """config.yaml: the command and its flag values, as `--config` reads them back."""
    atomic_write_bytes(Path(folder) / CONFIG_FILE, config_file_text(command, flags).encode())


# ---------------------------------------------------------------- metrics.jsonl


def append_metrics(run_dir: str | Path, record: dict) -> None:
    """Append one record to the run's metrics.jsonl."""
    path = Path(run_dir) / METRICS_FILE
    with writing(path), open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of the run's metrics.jsonl (none when absent); a line cut short by a kill mid-write is skipped."""
    path = Path(run_dir) / METRICS_FILE
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(run_dir: str | Path, last_step: int) -> None:
    """Drop records past the resumed step so a resumed run's metrics read like an uninterrupted one's."""
    path = Path(run_dir) / METRICS_FILE
    if path.exists():
        kept = [record for record in read_metrics(run_dir) if record.get("step", last_step + 1) <= last_step]
        path.write_text("".join(json.dumps(record) + "\n" for record in kept))


def clear_metrics(run_dir: str | Path) -> None:
    """Delete the run's metrics.jsonl (a fresh start)."""
    (Path(run_dir) / METRICS_FILE).unlink(missing_ok=True)


# ---------------------------------------------------------------- resolved_config.json, run_config.json


def save_resolved(run_dir: str | Path, resolved: dict) -> None:
    """resolved_config.json: the resolved options and inputs of the run now starting in the folder."""
    atomic_write_json(Path(run_dir) / RESOLVED_FILE, resolved)


def same_resolved(run_dir: str | Path, resolved: dict) -> bool:
    """Was the run in the folder started with these resolved options and inputs?"""
    path = Path(run_dir) / RESOLVED_FILE
    return path.exists() and read_json(path) == resolved


def has_run_config(run_dir: str | Path) -> bool:
    """Does the folder hold run_config.json (a training run there has finished)?"""
    return (Path(run_dir) / RUN_CONFIG_FILE).exists()


def read_run_config(run_dir: str | Path) -> dict | None:
    """The folder's run_config.json, or None when there is none."""
    path = Path(run_dir) / RUN_CONFIG_FILE
    return read_json(path) if path.exists() else None


def write_run_config(run_dir: str | Path, run_config: dict) -> None:
    """Write run_config.json, atomically: the last file of a finished training run."""
    atomic_write_json(Path(run_dir) / RUN_CONFIG_FILE, run_config)


def clear_run_config(run_dir: str | Path) -> None:
    """Delete run_config.json while a run works in the folder: an unfinished folder must never look finished."""
    (Path(run_dir) / RUN_CONFIG_FILE).unlink(missing_ok=True)


def finished_run(run_dir: str | Path, resolved: dict | None = None, touch: bool = False) -> dict | None:
    """The run_config.json of a finished training run in the folder (with the model's weights beside it), of these
    resolved options and inputs when `resolved` is given; else None. touch: as up_to_date's (the training stage)."""
    made_from = {"resolved": resolved} if resolved is not None else {}
    return up_to_date(run_dir, RUN_CONFIG_FILE, made_from, {MODEL_FILE: None}, touch=touch)


# ---------------------------------------------------------------- best/


def best_dir(run_dir: str | Path) -> Path:
    """Where the run keeps the model of its best val perplexity: <run_dir>/best."""
    return Path(run_dir) / BEST_DIR


def read_best(run_dir: str | Path) -> dict | None:
    """best/best.json (the metrics.jsonl record of the best evaluation: step, tokens_seen, val_ce, val_ppl, ...),
    or None when the run keeps no best model. A swap cut short by a kill (best.old left, best gone) is undone here."""
    folder, old = best_dir(run_dir), best_dir(run_dir).with_name(BEST_DIR + ".old")
    if not folder.exists() and (old / BEST_FILE).exists():
        old.rename(folder)
    path = folder / BEST_FILE
    return read_json(path) if path.exists() else None


def replace_best(run_dir: str | Path, write_model: Callable[[Path], None], record: dict) -> None:
    """Make `record`'s model the run's best: `write_model(folder)` fills a temp folder, best.json goes in last, and
    the folder takes best/'s place (the former best is moved aside first and removed last: a kill at any point
    leaves one whole best model)."""
    folder = best_dir(run_dir)
    tmp, old = folder.with_name(".tmp_" + BEST_DIR), folder.with_name(BEST_DIR + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_model(tmp)
    atomic_write_json(tmp / BEST_FILE, record)
    read_best(run_dir)  # a swap cut short earlier is undone before this one
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def clear_best(run_dir: str | Path) -> None:
    """Remove the run's best model (a fresh start)."""
    for name in (BEST_DIR, BEST_DIR + ".old", ".tmp_" + BEST_DIR):
        shutil.rmtree(Path(run_dir) / name, ignore_errors=True)
