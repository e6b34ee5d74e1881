"""Faults every stage must survive (issue 6), injected into the real CLI on a tiny config.

- SIGKILL during data, cache-logits, distill and baseline at several points: before any output, mid-write
  (a temp file complete but not renamed), after the N-th part / saved state (N drawn by a seeded RNG), in the
  middle of a shard assembly or of a state save. The same command then completes with outputs equal to an
  uninterrupted run: identical token files, byte-identical shards, identical student weights (--resume).
- A full disk (RLIMIT_FSIZE: CPython ignores SIGXFSZ, so a write past the limit fails with EFBIG) while a shard
  or a checkpoint is written: exit code 1, one `error:` line naming the file, the earlier parts / states
  intact, and the rerun without the limit completes with the same outputs.
- A second process on a data or cache folder while the first holds it (frozen with SIGSTOP): refused, naming
  the owner's pid; the killed owner's stale lock is taken over by the rerun.
- A shard truncated or bit-flipped after completion: named before training starts; a truncated one also
  without checksums (CacheReader, compare).
- Bad input, table-driven: one `error:` line, a non-zero exit, no traceback, nothing half-written; inputs
  that must work (other scripts, one huge line, a vocabulary beyond uint16) work.
- Checkpoint safety (safetensors, weights_only loads, no custom pickles) and cache determinism across runs.

Killed runs are subprocesses started through HOOK, a wrapper that runs the real CLI after wrapping one
pipeline function so that its N-th call kills (or freezes) the process. The reference training runs, the
refused second commands and the bad inputs run in-process (CliRunner: the same click commands without a new
interpreter), which keeps the file near a minute on two idle cores; killed runs are compared with them bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import REPO, STUDENT_FLAGS, make_tiny_teacher, make_tokenizer, one_torch_thread, willows_text
from safetensors.torch import load_file

from pipeline.cache_format import CacheReader, read_manifest
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.fsutil import disk_full_errno, sha256_file

SEQ_LEN, K, ROWS, ROWS_PER_PART, CACHE_BATCH = 32, 8, 24, 2, 2  # 12 parts per split, one teacher forward each
STEPS, SAVE_EVERY = 6, 2  # states at steps 2, 4, 6
KILL_SEED = 6


def kill_point(name: str, low: int, high: int) -> int:
    """A seeded random kill point in [low, high]: the same on every run, whichever tests are selected."""
    return random.Random(f"{KILL_SEED}:{name}").randint(low, high)


# Runs the real CLI after wrapping PIPELINE_FAULT's target so that its `call`-th call kills or freezes the
# process (`when`: before or after the call); with call 0 it only counts the calls and prints the count.
HOOK = r"""
import atexit, importlib, json, os, signal, sys
fault = json.loads(os.environ["PIPELINE_FAULT"])
module_name, _, attribute = fault["target"].partition(":")
owner = importlib.import_module(module_name)
*parents, name = attribute.split(".")
for parent in parents:
    owner = getattr(owner, parent)
original, calls = getattr(owner, name), [0]

def act():
    os.kill(os.getpid(), signal.SIGKILL if fault["action"] == "kill" else signal.SIGSTOP)

def hooked(*args, **kwargs):
    calls[0] += 1
    hit = calls[0] == fault["call"]
    if hit and fault["when"] == "before":
        act()
    result = original(*args, **kwargs)
    if hit and fault["when"] == "after":
        act()
    return result

setattr(owner, name, hooked)
atexit.register(lambda: print(f"fault-hook calls: {calls[0]}", file=sys.stderr))
from pipeline.cli import main
main(prog_name="pipeline")
"""


# ----------------------------------------------------------------------------- helpers


def command(*args, fault: dict | None = None) -> list[str]:
    prefix = [sys.executable, "-c", HOOK] if fault else [sys.executable, "-m", "pipeline"]
    return prefix + [str(a) for a in args]


def cli_env(fault: dict | None = None) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if fault:
        env["PIPELINE_FAULT"] = json.dumps({"when": "after", "action": "kill", **fault})
    return env


def file_size_limit(nbytes: int):
    """preexec_fn: a disk that holds no file larger than nbytes (writes past it fail with EFBIG)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


def run(*args, fault: dict | None = None, fsize: int | None = None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, optionally with a fault hook and a file size limit."""
    return subprocess.run(
        command(*args, fault=fault),
        cwd=REPO,
        env=cli_env(fault),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=file_size_limit(fsize) if fsize else None,
    )


def killed(result) -> None:
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr[-3000:])


def hook_calls(result) -> int:
    return int(result.stderr.rsplit("fault-hook calls: ", 1)[1].split()[0])


def start_frozen(*args, fault: dict, log: Path) -> subprocess.Popen:
    """Start the CLI with a hook that SIGSTOPs it at the fault point; return once it is frozen there."""
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            command(*args, fault=fault),
            cwd=REPO,
            env=cli_env({**fault, "action": "stop"}),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 120
    while True:
        pid, status = os.waitpid(process.pid, os.WNOHANG | os.WUNTRACED)
        if pid and os.WIFSTOPPED(status):
            return process
        assert not pid, f"the run ended before its fault point:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "the run did not reach its fault point within 120 s"
        time.sleep(0.01)


def sigkill(process: subprocess.Popen) -> None:
    process.kill()  # SIGKILL also ends a stopped process
    process.wait()


def invoke(*args):
    """The CLI in this process (no interpreter start); Accelerate's process-wide state is cleared afterwards."""
    from accelerate.state import AcceleratorState, GradientState

    try:
        return CliRunner().invoke(main, [str(a) for a in args])
    finally:
        AcceleratorState._reset_state()
        GradientState._reset_state()


def invoke_ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    return result


def error_line(stderr: str) -> str:
    """The one `error:` line of a failed command; no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def refused(result) -> str:
    """An in-process command refused with exit code 2 and one error line (not an unhandled exception)."""
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (
        result.exit_code,
        result.output[-2000:],
        result.exception,
    )
    return error_line(result.stderr)


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def shard_hashes(cache_dir: Path) -> dict[str, str]:
    return {entry["file"]: sha256_file(cache_dir / entry["file"]) for entry in read_manifest(cache_dir)["shards"]}


def assert_same_weights(run_a: Path, run_b: Path) -> None:
    a, b = load_file(run_a / "model.safetensors"), load_file(run_b / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: max abs diff {(a[name] - b[name]).abs().max().item()}"


def steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def cache_args(tiny_data, tiny_teacher):
    return lambda out, *extra: [
        "cache-logits",
        "--data-dir",
        tiny_data,
        "--teacher",
        tiny_teacher,
        "--out-dir",
        out,
        "--seq-len",
        SEQ_LEN,
        "--mode",
        "topk",
        "--k",
        K,
        "--max-rows",
        ROWS,
        "--rows-per-part",
        ROWS_PER_PART,
        "--batch-size",
        CACHE_BATCH,
        *extra,
    ]


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory, cache_args) -> Path:
    """An uninterrupted `cache-logits` in a subprocess."""
    out = tmp_path_factory.mktemp("faults-cache") / "reference"
    result = run(*cache_args(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def train_args(tiny_data, tiny_teacher, reference_cache):
    def args(kind: str, out: Path, *extra) -> list:
        return [
            kind,
            "--data-dir",
            tiny_data,
            "--cache-dir",
            reference_cache,
            "--teacher",
            tiny_teacher,
            "--out-dir",
            out,
            "--seq-len",
            SEQ_LEN,
            "--max-rows",
            ROWS,
            "--batch-size",
            4,
            "--max-steps",
            STEPS,
            "--warmup-steps",
            2,
            "--lr",
            0.02,
            "--save-every",
            SAVE_EVERY,
            "--eval-every",
            3,
            "--eval-rows",
            4,
            "--log-every",
            1,
            "--num-workers",
            0,
            "--mixed-precision",
            "no",
            "--seed",
            0,
            *STUDENT_FLAGS,
            *extra,
        ]

    return args


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory, train_args) -> dict[str, Path]:
    """Uninterrupted distill and baseline runs (in-process)."""
    root = tmp_path_factory.mktemp("faults-runs")
    for kind in ("distill", "baseline"):
        invoke_ok(*train_args(kind, root / kind))
    return {kind: root / kind for kind in ("distill", "baseline")}


# ----------------------------------------------------------------------------- data stage


@pytest.mark.slow
def test_data_killed_at_four_points_and_a_second_process_refused(tmp_path, tiny_corpus, tiny_teacher, tiny_data):
    out = tmp_path / "data"
    args = ["data", "--corpus", tiny_corpus, "--tokenizer", tiny_teacher, "--out-dir", out, "--val-fraction", "0.1"]

    # 1. frozen before it writes anything: a second data run on the folder is refused, naming the owner
    first = start_frozen(
        *args, fault={"target": "pipeline.data:load_tokenizer", "call": 1, "when": "before"}, log=tmp_path / "log"
    )
    try:
        line = refused(invoke(*args))
        print(line)
        assert f"in use by a data run running as pid {first.pid}" in line and str(out) in line, line
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        sigkill(first)
    assert (out / ".lock").exists()  # the killed owner's lock: stale, the next run takes it over
    # 2. killed while tokenizing (the first ids arrived): every split file (tokens, text, ends, document parts) open
    # under a temp name, nothing else
    killed(run(*args, fault={"target": "pipeline.data:TokenSplitWriter.add", "call": 1}))
    assert sorted(".".join(p.name.split(".")[1:3]) for p in out.glob(".*.tmp")) == sorted(
        f"{split}.{kind}" for split in ("train", "val") for kind in ("bin", "txt", "ends", "docs")
    )
    assert not [p for p in out.iterdir() if not p.name.startswith(".")]
    # 3. killed with both temp files complete, before either is renamed into place
    killed(run(*args, fault={"target": "pipeline.fsutil:os.replace", "call": 1, "when": "before"}))
    assert not (out / "train.bin").exists() and not (out / "val.bin").exists()
    # 4. killed after both token files are in place: no meta.json (written last, it marks a complete folder)
    killed(run(*args, fault={"target": "pipeline.fsutil:os.replace", "call": 2}))
    assert (out / "train.bin").exists() and (out / "val.bin").exists() and not (out / "meta.json").exists()

    invoke_ok(*args)  # the same command once more: the stale lock is taken over, the temp file removed
    # train.bin, val.bin and meta.json identical, nothing else; config.yaml names each run's own --out-dir
    hashes, reference = file_hashes(out), file_hashes(tiny_data)
    assert hashes.pop("config.yaml") != reference.pop("config.yaml") and hashes == reference


# ----------------------------------------------------------------------------- cache stage


@pytest.fixture(scope="module")
def cache_faults(tmp_path_factory, cache_args) -> dict:
    """One cache folder through: freeze after part N (a second run is refused), SIGKILL; SIGKILL mid-way
    through assembling the train shard; a full disk while writing it; the same command without the limit."""
    out = tmp_path_factory.mktemp("faults-cache") / "faulted"
    parts = lambda: sorted(p.relative_to(out / ".parts") for p in (out / ".parts").glob("*/part-*.npz"))  # noqa: E731
    facts = {"out": out, "kill_part": kill_point("cache", 2, 2 * ROWS // ROWS_PER_PART - 2)}

    first = start_frozen(
        *cache_args(out),
        fault={"target": "pipeline.cache_format:write_part", "call": facts["kill_part"]},
        log=out.parent / "first.log",
    )
    try:
        facts["pid"], facts["second"] = first.pid, invoke(*cache_args(out))
    finally:
        sigkill(first)
    facts["parts_after_kill"] = parts()
    facts["lock_after_kill"] = (out / ".lock").exists()

    killed(
        run(*cache_args(out), fault={"target": "pipeline.cache_format.writer:read_part", "call": 3, "when": "before"})
    )
    facts["temp_shards_after_kill"] = sorted(p.name.split(".h5")[0] for p in out.glob(".*.tmp"))
    facts["files_after_assembly_kill"] = sorted(p.name for p in out.iterdir())

    parts_before = {p: sha256_file(out / ".parts" / p) for p in parts()}
    facts["full"] = run(*cache_args(out), fsize=32 << 10)  # parts (~7.5 KiB) fit, a shard (~37 KiB) does not
    facts["parts_kept"] = all(sha256_file(out / ".parts" / p) == h for p, h in parts_before.items())
    facts["files_after_full"] = sorted(p.name for p in out.iterdir())
    facts["parts_before_rerun"] = len(parts())

    facts["rerun"] = run(*cache_args(out), fault={"target": "pipeline.cache:TeacherRunner.targets", "call": 0})
    return facts


@pytest.mark.slow
def test_cache_second_process_on_the_folder_is_refused(cache_faults):
    line = refused(cache_faults["second"])
    print(line)
    assert (
        f"in use by a cache-logits run running as pid {cache_faults['pid']}" in line
        and str(cache_faults["out"]) in line
    )


@pytest.mark.slow
def test_cache_killed_after_part_n_and_mid_assembly_leaves_only_resumable_files(cache_faults):
    assert len(cache_faults["parts_after_kill"]) == cache_faults["kill_part"]  # frozen right after part N was written
    assert cache_faults["lock_after_kill"]  # the killed owner's lock, stale: the next run takes it over
    assert cache_faults["temp_shards_after_kill"] == [
        ".train-00000-of-00001"
    ]  # killed while the train shard was written
    assert "manifest.json" not in cache_faults["files_after_assembly_kill"]
    assert not [name for name in cache_faults["files_after_assembly_kill"] if name.endswith(".h5")]


@pytest.mark.slow
def test_cache_disk_full_while_writing_a_shard_is_one_line_and_keeps_the_parts(cache_faults):
    full, out = cache_faults["full"], cache_faults["out"]
    print(f"killed after part {cache_faults['kill_part']}; exit {full.returncode}: {error_line(full.stderr)}")
    assert full.returncode == 1, full.stderr[-3000:]
    assert full.stderr.rstrip().splitlines()[-1] == error_line(full.stderr)  # the last thing printed, on its own line
    assert error_line(full.stderr) == (
        f"error: could not write {out / 'train-00000-of-00001.h5'} (File too large); free disk "
        "space and rerun the same command: what was completed is kept and resumed"
    )
    assert cache_faults["parts_kept"] and cache_faults["parts_before_rerun"] >= ROWS // ROWS_PER_PART
    assert cache_faults["files_after_full"] == [".parts"]  # no shard, temp file, manifest or lock left


@pytest.mark.slow
def test_cache_rerun_after_faults_reuses_parts_and_equals_the_uninterrupted_run(cache_faults, reference_cache):
    rerun, out = cache_faults["rerun"], cache_faults["out"]
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # one teacher forward per missing part (batch 2 = one part): finished parts are reused, not recomputed
    assert hook_calls(rerun) == 2 * ROWS // ROWS_PER_PART - cache_faults["parts_before_rerun"]
    assert shard_hashes(out) == shard_hashes(reference_cache)  # byte-identical shards
    assert read_manifest(out) == read_manifest(reference_cache)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml",
        "manifest.json",
        "train-00000-of-00001.h5",
        "val-00000-of-00001.h5",
    ]


def test_cache_same_command_twice_gives_the_same_bytes(tmp_path, cache_args, reference_cache):
    invoke_ok(
        *cache_args(tmp_path / "again")
    )  # a second, separate run (this process; the reference ran in a subprocess)
    assert shard_hashes(tmp_path / "again") == shard_hashes(reference_cache)
    assert (tmp_path / "again" / "manifest.json").read_bytes() == (reference_cache / "manifest.json").read_bytes()


@pytest.mark.parametrize(
    "exc, code",
    [
        (OSError(28, "No space left on device"), 28),  # Python's own writes, numpy.savez
        (
            RuntimeError(
                "Can't decrement id ref count (file write failed: ... errno = 27, error message = 'File too large')"
            ),
            27,
        ),  # h5py
        (Exception("Error while serializing: I/O error: Disk quota exceeded (os error 122)"), 122),  # safetensors
        (
            RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
            None,
        ),  # torch.save: probed instead
        (PipelineError("--k must be positive; [Errno 28] in the message of a user error"), None),
        (OSError(13, "Permission denied"), None),
    ],
    ids=["oserror", "h5py", "safetensors", "torch-save-unprobed", "pipeline-error", "other-oserror"],
)
def test_disk_full_is_recognised_in_each_writers_words(exc, code):
    """The words each writer used when a write ran past RLIMIT_FSIZE here (the subprocess tests run the real ones)."""
    assert disk_full_errno(exc) == code


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def distill_faults(tmp_path_factory, train_args) -> dict:
    """One distill folder through: SIGKILL in the middle of saving state N + 1 (state N complete); a full
    disk at that save (--resume); the same command with --resume, unlimited."""
    out = tmp_path_factory.mktemp("faults-distill") / "distill"
    args = lambda *extra: train_args("distill", out, *extra)  # noqa: E731
    state_n = kill_point("distill", 1, STEPS // SAVE_EVERY - 1)
    facts = {
        "out": out,
        "kept_state": f"step_{state_n * SAVE_EVERY:06d}",
        "next_state": f"step_{(state_n + 1) * SAVE_EVERY:06d}",
    }
    # train's atomic_write_json writes the trainer_state.json of each state (resolved_config.json is runs.py's):
    # killed before call n + 1, state n + 1 has its tensors written to .tmp_step_... but is not complete
    killed(run(*args(), fault={"target": "pipeline.train:atomic_write_json", "call": state_n + 1, "when": "before"}))
    facts["states_after_kill"] = sorted(p.name for p in (out / "state").iterdir())
    facts["tmp_after_kill"] = sorted(p.name for p in (out / "state").glob(".tmp_step_*/*"))
    facts["finished_after_kill"] = (out / "run_config.json").exists() or (out / "model.safetensors").exists()
    kept = out / "state" / facts["kept_state"]
    kept_hashes = file_hashes(kept)

    # optimizer.bin (~80 KiB) does not fit: torch.save fails without saying why; the file size says it
    facts["full"] = run(*args("--resume"), fsize=50 << 10)
    facts["kept_after_full"] = file_hashes(kept) == kept_hashes
    facts["states_after_full"] = sorted(p.name for p in (out / "state").iterdir())
    facts["lock_after_full"] = (out / ".lock").exists()

    facts["resumed"] = run(*args("--resume"))
    return facts


@pytest.mark.slow
def test_distill_killed_mid_save_keeps_the_previous_state_and_nothing_finished(distill_faults):
    states = [f"step_{step:06d}" for step in range(SAVE_EVERY, int(distill_faults["kept_state"][5:]) + 1, SAVE_EVERY)]
    assert distill_faults["states_after_kill"] == sorted(states + [".tmp_" + distill_faults["next_state"]])
    assert distill_faults["tmp_after_kill"] == [
        "model.safetensors",
        "optimizer.bin",
        "random_states_0.pkl",
    ]  # no trainer_state.json
    assert not distill_faults["finished_after_kill"]


@pytest.mark.slow
def test_distill_disk_full_at_a_checkpoint_is_one_line_and_keeps_the_previous_state(distill_faults):
    full, out = distill_faults["full"], distill_faults["out"]
    assert full.returncode == 1, full.stderr[-3000:]
    line = error_line(full.stderr)
    assert full.stderr.rstrip().splitlines()[-1] == line  # the last thing printed, on its own line
    print(f"resumed from {distill_faults['kept_state']}; exit {full.returncode}: {line}")
    assert line == (
        f"error: could not write {out / 'state' / ('.tmp_' + distill_faults['next_state'])} (File too large); "
        "free disk space and rerun the same command: what was completed is kept and resumed"
    )
    assert distill_faults["kept_after_full"] and not distill_faults["lock_after_full"]
    assert distill_faults["states_after_full"] == distill_faults["states_after_kill"]


@pytest.mark.slow
def test_distill_resume_after_kill_and_full_disk_equals_the_uninterrupted_run(distill_faults, reference_runs):
    out, resumed = distill_faults["out"], distill_faults["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'state' / distill_faults['kept_state']}" in resumed.stdout
    assert_same_weights(out, reference_runs["distill"])
    assert steps(out) == list(range(1, STEPS + 1))
    assert not list((out / "state").glob(".tmp_*")) and not (out / ".lock").exists()


@pytest.mark.slow
def test_baseline_killed_after_state_n_resumes_to_identical_weights(tmp_path, train_args, reference_runs):
    out = tmp_path / "baseline"
    state_n = kill_point("baseline", 1, STEPS // SAVE_EVERY - 1)
    killed(run(*train_args("baseline", out), fault={"target": "pipeline.train:_save_state", "call": state_n}))
    assert not (out / "model.safetensors").exists()
    resumed = run(*train_args("baseline", out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'state' / f'step_{state_n * SAVE_EVERY:06d}'}" in resumed.stdout
    assert_same_weights(out, reference_runs["baseline"])
    assert steps(out) == list(range(1, STEPS + 1))


def test_saved_states_are_safetensors_and_tensors_only(reference_runs):
    """Resume loads nothing that needs pickle: the model is safetensors; optimizer.bin loads with
    torch.load(weights_only=True); the RNG states with Accelerate's loader (weights_only=True plus its numpy
    allow-list); no custom_checkpoint_*.pkl (Accelerate loads those with weights_only=False)."""
    from accelerate.utils import load as accelerate_load

    for state in sorted((reference_runs["distill"] / "state").glob("step_*")):
        assert sorted(p.name for p in state.iterdir()) == [
            "model.safetensors",
            "optimizer.bin",
            "random_states_0.pkl",
            "trainer_state.json",
        ]
        assert load_file(state / "model.safetensors")
        assert set(torch.load(state / "optimizer.bin", weights_only=True)) == {"state", "param_groups"}
        rng = accelerate_load(state / "random_states_0.pkl")
        assert {"random_state", "numpy_random_seed", "torch_manual_seed"} <= set(rng)
    for source in sorted((REPO / "pipeline").glob("*.py")):
        text = source.read_text()
        for unsafe in (
            "import pickle",
            "pickle.load",
            "allow_pickle=True",
            "weights_only=False",
            "register_for_checkpointing",
        ):
            assert unsafe not in text, f"{source.name} uses {unsafe}"
        assert text.count("torch.load(") == text.count("weights_only=True"), (
            f"{source.name}: torch.load without weights_only=True"
        )


# ----------------------------------------------------------------------------- corrupted shards


@pytest.fixture
def damaged_cache(tmp_path, reference_cache):
    def damage(how: str, split: str = "train") -> tuple[Path, Path]:
        cache = tmp_path / f"cache-{how}"
        shutil.copytree(reference_cache, cache)
        shard = cache / f"{split}-00000-of-00001.h5"
        data = bytearray(shard.read_bytes())
        if how == "truncated":
            data = data[: len(data) - 100]
        else:
            data[len(data) // 2] ^= 0x01  # one bit inside the data
        shard.write_bytes(bytes(data))
        return cache, shard

    return damage


@pytest.mark.parametrize(
    "how, message",
    [("truncated", "is truncated or corrupted (size"), ("bit-flipped", "is truncated or corrupted (sha256 mismatch)")],
)
def test_damaged_shard_is_named_before_training_starts(damaged_cache, train_args, tmp_path, how, message):
    cache, shard = damaged_cache(how)
    line = refused(invoke(*train_args("distill", tmp_path / "run", "--cache-dir", cache)))
    print(line)
    assert f"{shard} {message}" in line, line
    assert not (tmp_path / "run").exists()


def test_truncated_shard_is_caught_by_size_without_checksums(
    damaged_cache, reference_runs, tiny_data, tiny_teacher, tmp_path
):
    cache, shard = damaged_cache("truncated", "val")
    with pytest.raises(PipelineError, match=f"{shard} is truncated or corrupted"):
        CacheReader(cache, "val")  # verify=False: the size check alone
    line = refused(
        invoke(
            "compare",
            "--data-dir",
            tiny_data,
            "--cache-dir",
            cache,
            "--teacher",
            tiny_teacher,
            "--distilled",
            reference_runs["distill"],
            "--baseline",
            reference_runs["baseline"],
            "--out-dir",
            tmp_path / "report",
        )
    )
    assert f"{shard} is truncated or corrupted" in line
    assert not (tmp_path / "report" / "report.json").exists()


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_tokenizer, tiny_teacher, tiny_corpus):
    """Bad and odd inputs, built once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.config import DataConfig
    from pipeline.data import prepare_data

    root = tmp_path_factory.mktemp("faults-inputs")
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.txt").write_bytes(b" \n\t\t  \r\n\n   \t\n" * 200)
    (root / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    (root / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade.\n".encode("latin-1") * 50)
    (root / "model.gguf").write_bytes(b"this is a text file, not a GGUF model\n" * 10)
    shutil.copytree(tiny_teacher, root / "no-weights")
    (root / "no-weights" / "model.safetensors").unlink()
    make_tiny_teacher(root / "other-teacher", tiny_tokenizer, seed=1)  # same tokenizer, other weights
    make_tiny_teacher(root / "other-tokenizer", make_tokenizer(willows_text()[:40_000], vocab_size=300))
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=300,  # fewer rows than the tokenizer's 384 tokens
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    ).save_pretrained(root / "student-300")
    for name, tokenizer, text in (
        ("data-other-tokenizer", root / "other-tokenizer", tiny_corpus.read_text()),
        ("data-other-corpus", tiny_teacher, willows_text()[75_000:115_000]),
    ):
        corpus = root / f"{name}.txt"
        corpus.write_text(text, encoding="utf-8")
        prepare_data(
            DataConfig(corpus=str(corpus), tokenizer=str(tokenizer), out_dir=str(root / name), val_fraction=0.1)
        )
    return root


# (id, stage, arguments after the stage name, a fragment of the error line); {in}: the inputs folder,
# {out}: a fresh output folder, {data} / {teacher} / {cache}: the tiny data, teacher and reference cache.
BAD_INPUTS = [
    ("empty-corpus", "data", "--corpus {in}/empty.txt --tokenizer {teacher}", "holds no text"),
    ("whitespace-corpus", "data", "--corpus {in}/blank.txt --tokenizer {teacher}", "holds no text"),
    ("binary-corpus", "data", "--corpus {in}/binary.txt --tokenizer {teacher}", "binary file (it contains NUL bytes)"),
    ("latin1-corpus", "data", "--corpus {in}/latin1.txt --tokenizer {teacher}", "is not UTF-8 text"),
    ("missing-corpus", "data", "--corpus {in}/nowhere.txt --tokenizer {teacher}", "does not exist"),
    ("teacher-without-weights", "teacher", "--source {in}/no-weights", "no weights"),
    ("cache-teacher-without-weights", "cache", "--teacher {in}/no-weights", "holds no *.safetensors weights"),
    ("gguf-not-a-model", "teacher", "--source {in}/model.gguf", "is not a GGUF language model"),
    ("seq-len-beyond-context", "cache", "--seq-len 300", "--seq-len 300 is longer than the teacher's context (256)"),
    ("k-beyond-vocabulary", "cache", "--k 1000", "--k 1000 is larger than the tokenizer's vocabulary (384)"),
    ("cache-batch-size-0", "cache", "--batch-size 0", "--batch-size must be positive, got 0"),
    ("cache-batch-size-negative", "cache", "--batch-size -4", "--batch-size must be positive, got -4"),
    ("cache-temperature-0", "cache", "--temperature 0", "--temperature must be positive, got 0.0"),
    ("cache-temperature-negative", "cache", "--temperature -1", "--temperature must be positive, got -1.0"),
    (
        "cache-data-of-another-tokenizer",
        "cache",
        "--data-dir {in}/data-other-tokenizer",
        "tokenized with another tokenizer",
    ),
    ("distill-batch-size-0", "distill", "--batch-size 0", "--batch-size must be positive, got 0"),
    ("baseline-batch-size-negative", "baseline", "--batch-size -2", "--batch-size must be positive, got -2"),
    ("distill-temperature-0", "distill", "--temperature 0", "--temperature must be positive, got 0.0"),
    ("distill-temperature-negative", "distill", "--temperature -1", "--temperature must be positive, got -1.0"),
    ("alpha-above-1", "distill", "--alpha 1.5", "--alpha must be in [0, 1], got 1.5"),
    ("alpha-below-0", "distill", "--alpha -0.1", "--alpha must be in [0, 1], got -0.1"),
    (
        "student-smaller-than-the-tokenizer",
        "distill",
        "--student {in}/student-300",
        "the student's output head has 300 rows, fewer than the tokenizer's 384 tokens",
    ),
    ("cache-of-another-teacher", "distill", "--teacher {in}/other-teacher", "was built by another teacher"),
    (
        "cache-of-another-tokenizer",
        "distill",
        "--data-dir {in}/data-other-tokenizer --teacher {in}/other-tokenizer",
        "tokenizer_hash: cache has",
    ),
    ("cache-of-another-temperature", "distill", "--temperature 2.0", "--temperature 2.0 differs from the cache's 1.0"),
    ("cache-of-another-seq-len", "distill", "--seq-len 16", "seq_len: cache has 32, expected 16"),
    ("cache-of-another-corpus", "distill", "--data-dir {in}/data-other-corpus", "train_tokens_sha256: cache has"),
    ("cache-of-other-rows", "distill", "--max-rows 12", "max_rows: cache has 24, expected 12"),
    ("compare-batch-size-0", "compare", "--batch-size 0", "--batch-size must be positive, got 0"),
]


@pytest.mark.parametrize("stage, extra, fragment", [row[1:] for row in BAD_INPUTS], ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_one_error_line_and_writes_nothing(
    stage, extra, fragment, tmp_path, inputs, tiny_data, tiny_teacher, reference_cache, cache_args, train_args
):
    out = tmp_path / "out"
    extra = extra.format(**{"in": inputs, "out": out, "data": tiny_data, "teacher": tiny_teacher}).split()
    if stage == "cache":
        args = [*cache_args(out), *extra]
    elif stage in ("distill", "baseline"):
        args = train_args(stage, out, *extra)
    elif stage == "compare":
        args = [
            "compare",
            "--data-dir",
            tiny_data,
            "--cache-dir",
            reference_cache,
            "--teacher",
            tiny_teacher,
            "--out-dir",
            out,
            *extra,
        ]
    else:
        args = [stage, "--out-dir", out, *extra]
    line = refused(invoke(*args))  # later flags win: each row overrides one good option
    print(f"{stage}: {line}")
    assert fragment in line, line
    assert not out.exists() or not [p for p in out.rglob("*")], sorted(map(str, out.rglob("*")))  # nothing half-written
    assert not out.with_name("out.tmp").exists()


def test_text_in_other_scripts_and_one_huge_line_are_tokenized(tmp_path, tiny_teacher, tiny_tokenizer):
    text = (
        "Съешь же ещё этих мягких французских булок. 中文测试：你好，世界。 Emoji: 😀🚀 👍🏽 👨‍👩‍👧 🇫🇷\n" * 30
        + "".join(random.Random(0).choice("abcdefghij") for _ in range(300_000))
    )  # then one 300k-character word
    corpus = tmp_path / "scripts.txt"
    corpus.write_text(text, encoding="utf-8")
    invoke_ok(
        "data", "--corpus", corpus, "--tokenizer", tiny_teacher, "--out-dir", tmp_path / "out", "--val-fraction", "0.1"
    )
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    ids = np.concatenate(
        [np.fromfile(tmp_path / "out" / f"{split}.bin", dtype=meta["dtype"]) for split in ("train", "val")]
    )
    assert tiny_tokenizer.decode(ids[:-1].astype(np.int64)) == text.strip() + "\n"  # the document round-trips
    assert ids[-1] == tiny_tokenizer.eos_token_id


def test_vocabulary_beyond_uint16_is_stored_as_uint32_not_wrapped(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", bos_token="<eos>"
    )
    teacher = make_tiny_teacher(tmp_path / "big", tokenizer, hidden=8, layers=1, max_positions=64)
    words = np.random.default_rng(0).integers(65_530, 70_000, 400)
    (tmp_path / "words.txt").write_text(" ".join(f"w{i}" for i in words) + "\n", encoding="utf-8")
    invoke_ok(
        "data",
        "--corpus",
        tmp_path / "words.txt",
        "--tokenizer",
        teacher,
        "--out-dir",
        tmp_path / "out",
        "--val-fraction",
        "0.1",
    )
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_002
    ids = np.concatenate(
        [np.fromfile(tmp_path / "out" / f"{split}.bin", dtype=np.uint32) for split in ("train", "val")]
    )
    np.testing.assert_array_equal(ids, np.append(words + 2, 0))  # ids above 65535 kept, not taken modulo 65536


# ----------------------------------------------------------------------------- the best checkpoint (--keep-best)


def val_ppl_of(model_dir: Path, data_dir: Path, rows: int) -> float:
    """exp(mean CE) of a saved model over the first `rows` val rows, computed here with torch alone."""
    from pipeline.models import load_causal_lm
    from pipeline.rows import load_tokens

    tokens = np.asarray(load_tokens(data_dir, "val"), dtype=np.int64)
    batch = torch.stack([torch.from_numpy(tokens[i * SEQ_LEN : i * SEQ_LEN + SEQ_LEN + 1]) for i in range(rows)])
    model = load_causal_lm(model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=batch[:, :-1]).logits.float()
    return float(
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).exp()
    )


def test_the_best_checkpoint_is_the_best_evaluation_with_its_weights(reference_runs, tiny_data):
    for kind, run_dir in reference_runs.items():
        evaluations = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        evaluations = [record for record in evaluations if "val_ppl" in record]
        assert [record["step"] for record in evaluations] == [3, 6]
        best = min(evaluations, key=lambda record: record["val_ppl"])
        best_json = json.loads((run_dir / "best" / "best.json").read_text())
        assert best_json == best, kind
        assert json.loads((run_dir / "run_config.json").read_text())["best"] == best
        assert (run_dir / "best" / "config.json").exists() and (run_dir / "best" / "tokenizer.json").exists()
        assert val_ppl_of(run_dir / "best", tiny_data, rows=4) == pytest.approx(best["val_ppl"], rel=1e-4), kind
        if best["step"] == STEPS:
            assert_same_weights(run_dir / "best", run_dir)
        assert not list(run_dir.glob("*best.old")) and not list(run_dir.glob(".tmp_best"))


@pytest.mark.slow
def test_baseline_killed_right_after_a_new_best_resumes_to_the_same_best(tmp_path, train_args, reference_runs):
    """Killed after the step-3 best was written, before its metrics record and the step-4 state: the resume from
    step 2 drops that best (it is ahead of the resume point) and the replay writes the same one again."""
    out = tmp_path / "baseline"
    killed(run(*train_args("baseline", out), fault={"target": "pipeline.train:save_best", "call": 1}))
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 3
    assert steps(out) == [1, 2]  # the best is saved before its metrics record
    resumed = run(*train_args("baseline", out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'state' / 'step_000002'}" in resumed.stdout
    reference = reference_runs["baseline"]
    resumed_best, reference_best = (
        json.loads((run_dir / "best" / "best.json").read_text()) for run_dir in (out, reference)
    )
    timing = ("tokens_per_s",)  # the one figure of a record that is a measurement of this run, not of the model
    assert {k: v for k, v in resumed_best.items() if k not in timing} == {
        k: v for k, v in reference_best.items() if k not in timing
    }
    assert_same_weights(out / "best", reference / "best")
    assert_same_weights(out, reference)


def test_no_keep_best_keeps_no_best_and_a_swap_cut_short_is_undone(tmp_path, train_args):
    from pipeline.runs import read_best

    out = tmp_path / "distill"
    invoke_ok(*train_args("distill", out, "--no-keep-best", "--max-steps", 3))
    assert not (out / "best").exists() and "best" not in json.loads((out / "run_config.json").read_text())

    # a kill between moving the former best aside and putting the new one in place leaves only best.old
    (out / "best.old").mkdir()
    (out / "best.old" / "best.json").write_text(json.dumps({"step": 3, "val_ppl": 9.5}))
    assert read_best(out) == {"step": 3, "val_ppl": 9.5}
    assert (out / "best" / "best.json").exists() and not (out / "best.old").exists()
