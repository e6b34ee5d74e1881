"""Beyond one machine: stage 1 as independent shard jobs (`--num-shards N --shard-index I`, then the last job or
`--merge` writes the manifest) and both stages under a two-node torchrun (two node ranks started side by side on
this machine with a localhost rendezvous, one process each), checked against the single-process and the
two-process single-node runs. A tiny teacher and 48 rows per split keep every launch to seconds."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO, STUDENT_FLAGS, invoke_cli, one_torch_thread, run_cli
from safetensors.torch import load_file

from pipeline.cache_format import CacheReader, read_manifest
from pipeline.fsutil import sha256_file

SEQ_LEN, K, ROWS, ROWS_PER_PART, BATCH = 32, 8, 48, 2, 2  # 24 parts per split


def cache_args(data, teacher, out, *extra) -> list:
    return [
        "cache-logits", "--data-dir", data, "--teacher", teacher, "--out-dir", out, "--seq-len", SEQ_LEN,
        "--mode", "topk", "--k", K, "--max-rows", ROWS, "--rows-per-part", ROWS_PER_PART, "--batch-size", BATCH,
        *extra,
    ]  # fmt: skip


def distill_args(data, teacher, cache, out, *extra) -> list:
    return [
        "distill", "--data-dir", data, "--cache-dir", cache, "--teacher", teacher, "--out-dir", out,
        "--seq-len", SEQ_LEN, "--max-rows", ROWS, "--batch-size", 2, "--max-steps", 6, "--warmup-steps", 2,
        "--lr", 0.02, "--eval-every", 3, "--eval-rows", 4, "--save-every", 3, "--num-workers", 0,
        "--mixed-precision", "no", *STUDENT_FLAGS, *extra,
    ]  # fmt: skip


def cli_env() -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_one_node(*args) -> None:
    """`torchrun --standalone --nproc_per_node 2 -m pipeline ARGS`."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*launch, "-m", "pipeline", *map(str, args)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def torchrun_two_nodes(*args) -> list[str]:
    """Node ranks 0 and 1 of `torchrun --nnodes 2 --nproc-per-node 1` started side by side, meeting at a localhost
    rendezvous (what two machines do with --master-addr set to node 0's address). Returns their outputs."""
    port = free_port()
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--nproc-per-node",
                "1",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                "-m",
                "pipeline",
                *map(str, args),
            ],
            cwd=REPO,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    for rank, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"node rank {rank}:\n{output[-4000:]}"
    return outputs


def shard_hashes(cache_dir: Path) -> dict[str, str]:
    return {e["file"]: sha256_file(cache_dir / e["file"]) for e in read_manifest(cache_dir)["shards"]}


def error_line(result) -> str:
    """The one `error:` line of a command refused in-process (exit code 2)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(lines) == 1, (result.exit_code, result.output[-3000:], result.exception)
    return lines[0]


@pytest.fixture(autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def single_cache(tmp_path_factory, tiny_data, tiny_teacher) -> Path:
    out = tmp_path_factory.mktemp("single") / "cache"
    run_cli(*cache_args(tiny_data, tiny_teacher, out), check=True)
    return out


@pytest.fixture(scope="module")
def two_process_cache(tmp_path_factory, tiny_data, tiny_teacher) -> Path:
    out = tmp_path_factory.mktemp("two-process") / "cache"
    torchrun_one_node(*cache_args(tiny_data, tiny_teacher, out))
    return out


# ---------------------------------------------------------------- stage 1 as independent jobs


@pytest.mark.slow
def test_three_jobs_one_killed_and_rerun_give_the_single_process_cache(tmp_path, tiny_data, tiny_teacher, single_cache):
    """Jobs 0, 1 (SIGKILL after its third part), 2 and 1 again, one after another in one folder: the rerun resumes
    from its parts, is the last to finish and merges; every row and every dataset's bytes equal the single-process
    cache's."""
    out = tmp_path / "jobs"
    job = lambda index: cache_args(tiny_data, tiny_teacher, out, "--num-shards", 3, "--shard-index", index)  # noqa: E731

    first = invoke_cli(*job(0), check=True)
    assert "1 of 3 jobs done, waiting for job(s) 1, 2" in first.output and not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("*-00000-of-00003*")) == [
        "train-00000-of-00003.entry.json", "train-00000-of-00003.h5",
        "val-00000-of-00003.entry.json", "val-00000-of-00003.h5",
    ]  # fmt: skip

    parts = out / ".parts" / "train-00001-of-00003.h5"
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *map(str, job(1))], cwd=REPO, env=cli_env(), stdout=log, stderr=log
        )
    deadline = time.monotonic() + 120
    while len(list(parts.glob("part-*.npz"))) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_parts = len(list(parts.glob("part-*.npz")))
    assert 3 <= done_parts < 8 and not list(out.glob("*-00001-of-00003.entry.json"))

    third = invoke_cli(*job(2), check=True)
    assert "2 of 3 jobs done, waiting for job(s) 1;" in third.output and not (out / "manifest.json").exists()

    rerun = run_cli(*job(1), check=True)  # the killed job again, in a fresh process: it merges
    assert "cache: wrote" in rerun.stdout and "from 3 job(s)" in rerun.stdout, rerun.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.yaml", "manifest.json", *shard_hashes(out)]
    )  # nothing else

    for split in ("train", "val"):
        jobs, single = CacheReader(out, split, verify=True), CacheReader(single_cache, split)
        assert len(jobs) == len(single) == ROWS
        for i in range(ROWS):
            a, b = jobs.row(i), single.row(i)
            for name in b:
                np.testing.assert_array_equal(a[name], b[name], err_msg=f"{split} row {i} {name}")
        files = sorted(e["file"] for e in read_manifest(out)["shards"] if e["split"] == split)
        assert files == [f"{split}-0000{i}-of-00003.h5" for i in range(3)]
        (single_file,) = [e["file"] for e in read_manifest(single_cache)["shards"] if e["split"] == split]
        with h5py.File(single_cache / single_file) as whole:
            for name in ("tokens", "topk_ids", "topk_logprobs", "tail_logprob"):
                pieces = []
                for file in files:
                    with h5py.File(out / file) as piece:
                        pieces.append(piece[name][:].tobytes())
                assert b"".join(pieces) == whole[name][:].tobytes(), f"{split} {name}"

    again = invoke_cli(*cache_args(tiny_data, tiny_teacher, out, "--num-shards", 3, "--merge"), check=True)
    assert "up to date" in again.output
    # config.yaml holds the cache's settings without the job options: rerunning it finds the cache done
    settings = (out / "config.yaml").read_text()
    assert "num_shards: null" in settings and "shard_index: null" in settings and "merge: false" in settings
    assert "up to date" in invoke_cli("cache-logits", "--config", out / "config.yaml", check=True).output


@pytest.mark.slow
def test_jobs_on_machines_without_a_shared_folder_merge_once_copied(
    tmp_path, tiny_data, tiny_teacher, two_process_cache
):
    """Two jobs, each writing to its own folder (two machines), copied into one folder and merged there: the shards
    are byte-identical to those of a two-process torchrun run."""
    for index in (0, 1):
        invoke_cli(*cache_args(tiny_data, tiny_teacher, tmp_path / f"machine{index}", "--num-shards", 2,
                               "--shard-index", index), check=True)  # fmt: skip
    merged = tmp_path / "merged"
    merged.mkdir()
    for index in (0, 1):
        for path in (tmp_path / f"machine{index}").glob("*-0000*"):
            shutil.copy(path, merged)
    result = invoke_cli(*cache_args(tiny_data, tiny_teacher, merged, "--merge"), check=True)  # --num-shards: 2 read
    assert "from 2 job(s)" in result.output
    assert shard_hashes(merged) == shard_hashes(two_process_cache)
    assert read_manifest(merged) == read_manifest(two_process_cache)


def test_merge_names_missing_and_mismatched_shards_and_writes_nothing(tmp_path, tiny_data, tiny_teacher):
    out = tmp_path / "jobs"
    job = lambda index, *extra: cache_args(  # noqa: E731
        tiny_data, tiny_teacher, out, "--num-shards", 3, "--shard-index", index, *extra
    )
    merge = cache_args(tiny_data, tiny_teacher, out, "--num-shards", 3, "--merge")

    line = error_line(invoke_cli(*job(3)))
    assert "--shard-index 3 is out of range for --num-shards 3: pass 0 to 2" in line, line
    assert not out.exists()
    assert "needs --shard-index I (run job I) or --merge" in error_line(
        invoke_cli(*cache_args(tiny_data, tiny_teacher, out, "--num-shards", 3))
    )
    assert "holds no shard entries to merge" in error_line(
        invoke_cli(*cache_args(tiny_data, tiny_teacher, out, "--merge"))
    )

    invoke_cli(*job(0), check=True)
    invoke_cli(*job(2, "--temperature", 2.0), check=True)  # other settings: never merged with the others
    line = error_line(invoke_cli(*merge))
    print(line)
    for split in ("train", "val"):
        assert f"{split}-00001-of-00003.h5 is missing (job 1 of 3 has not finished)" in line
        assert f"{split}-00002-of-00003.h5 was computed with other settings (temperature 2.0, expected 1.0)" in line
    assert "--shard-index 1" in line and "--shard-index 2" in line and "train-00000" not in line
    assert not (out / "manifest.json").exists()

    invoke_cli(*job(2), check=True)  # job 2 again with the right settings, then job 1 (the last: it merges)
    shard = out / "val-00002-of-00003.h5"
    shard.write_bytes(shard.read_bytes()[:-10])  # damaged after its job finished (a bad copy)
    assert "2 of 3 jobs done, waiting for job(s) 2" in invoke_cli(*job(1), check=True).output
    line = error_line(invoke_cli(*merge))
    assert f"{shard} does not match its entry (size or sha256)" in line and "--shard-index 2" in line, line
    assert not (out / "manifest.json").exists()


# ---------------------------------------------------------------- two node ranks


@pytest.mark.slow
def test_two_node_torchrun_cache_is_the_two_process_cache(tmp_path, tiny_data, tiny_teacher, two_process_cache):
    out = tmp_path / "cache"
    torchrun_two_nodes(*cache_args(tiny_data, tiny_teacher, out))
    assert shard_hashes(out) == shard_hashes(two_process_cache)
    assert read_manifest(out) == read_manifest(two_process_cache)
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.yaml", "manifest.json", *shard_hashes(out)])


@pytest.mark.slow
def test_two_node_torchrun_distill_equals_the_two_process_run(tmp_path, tiny_data, tiny_teacher, two_process_cache):
    one_node, two_nodes = tmp_path / "one-node", tmp_path / "two-nodes"
    torchrun_one_node(*distill_args(tiny_data, tiny_teacher, two_process_cache, one_node))
    torchrun_two_nodes(*distill_args(tiny_data, tiny_teacher, two_process_cache, two_nodes))
    a, b = load_file(one_node / "model.safetensors"), load_file(two_nodes / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (one_node / "metrics.jsonl").read_text().count("val_ce") == 2
    strip = lambda path: [line.split('"tokens_per_s"')[0] for line in path.read_text().splitlines()]  # noqa: E731
    assert strip(one_node / "metrics.jsonl") == strip(two_nodes / "metrics.jsonl")
    assert sorted(p.name for p in (two_nodes / "state").iterdir()) == ["step_000003", "step_000006"]
    assert sorted(p.name for p in (two_nodes / "state" / "step_000006").iterdir()) == [
        "model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl", "trainer_state.json",
    ]  # fmt: skip
