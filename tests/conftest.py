"""Shared fixtures: a tiny randomly initialised Llama teacher with a small BPE tokenizer trained on
The Wind in the Willows, written to a temp folder, the corpus slice tokenized with it, one cache of each mode
built from them, the tiny student's flags, and helpers to run the real CLI.

The session fixtures (tiny_teacher, tiny_data, tiny_topk_cache, tiny_sampled_cache) are built once and shared by
every file: a test that changes one works on a copy (shutil.copytree into tmp_path). Each checks at the end of
the session that no test changed its files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The tiny student of every training test (1 block, width 16): what `distill` / `baseline` get after the run's own
# options. A test of another student shape passes its own flags.
STUDENT_FLAGS = ["--n-layer", 1, "--n-embd", 16, "--n-head", 2, "--n-kv-head", 2, "--mlp-size", 32]
WILLOWS = (
    Path(__file__).resolve().parent / "data" / "wind_in_the_willows_excerpt.txt"
)  # public domain; see data/README.md


def willows_text() -> str:
    """The opening of The Wind in the Willows (about 120k characters) kept in the repository for the tests."""
    return WILLOWS.read_text(encoding="utf-8")


@contextlib.contextmanager
def one_torch_thread():
    """In-process runs use one thread like the CLI subprocesses (OMP_NUM_THREADS=1), so their bytes compare."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_tokenizer(text: str, vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on `text`, with an EOS token, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def make_tiny_teacher(
    folder: Path, tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2, max_positions: int = 256
) -> Path:
    """A randomly initialised LlamaForCausalLM sized to the tokenizer, saved with it as a HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a sharper-than-random teacher: scale the output so its distributions are not flat
        model.model.embed_tokens.weight.mul_(20.0)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer(willows_text())


def written_files(paths) -> dict[str, tuple[int, str]]:
    """{name: (inode, sha256)} of files: a stage that writes a file again (temp file + rename) gives it a new inode;
    one that finds it up to date leaves both (it may set its time, for make)."""
    from pipeline.fsutil import sha256_file

    return {Path(p).name: (Path(p).stat().st_ino, sha256_file(p)) for p in paths}


def folder_digest(folder: Path) -> dict[str, str]:
    """{path relative to `folder`: sha256} of every file under it."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def assert_unchanged(folder: Path, digest: dict[str, str]) -> None:
    """A shared session folder must end the session as it was built: a test that changes one works on a copy."""
    now = folder_digest(folder)
    changed = sorted(name for name in digest.keys() | now.keys() if digest.get(name) != now.get(name))
    assert not changed, f"a test changed the shared fixture {folder}: {changed} (copy it into tmp_path first)"


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_tokenizer) -> Path:
    """Folder of a tiny random Llama teacher (vocab ~384, 2 layers, width 32) with its tokenizer."""
    folder = make_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny-teacher", tiny_tokenizer)
    digest = folder_digest(folder)
    yield folder
    assert_unchanged(folder, digest)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A ~40k-character slice of The Wind in the Willows as a .txt file."""
    path = tmp_path_factory.mktemp("corpus") / "willows-slice.txt"
    path.write_text(willows_text()[20_000:60_000], encoding="utf-8")
    return path


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600, check: bool = False):
    """Run `python -m pipeline ARGS` in a subprocess (the real CLI). Returns the CompletedProcess."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **(env or {})}
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"pipeline {' '.join(map(str, args))} exited "
            f"{result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_teacher, tiny_corpus) -> Path:
    """The tiny corpus tokenized with the tiny teacher's tokenizer, 10% val (data stage output folder)."""
    out = tmp_path_factory.mktemp("data") / "tiny"
    invoke_cli("data", "--corpus", tiny_corpus, "--tokenizer", tiny_teacher, "--out-dir", out, "--val-fraction", 0.1,
               check=True)  # fmt: skip
    digest = folder_digest(out)
    yield out
    assert_unchanged(out, digest)


@pytest.fixture(scope="session")
def tiny_topk_cache(tmp_path_factory, tiny_data, tiny_teacher) -> Path:
    """`cache-logits --mode topk --k 16 --seq-len 32` over every row of tiny_data (the default dtype and batch).
    Read-only: a test that changes a cache copies it first."""
    out = tmp_path_factory.mktemp("cache") / "topk"
    with one_torch_thread():
        invoke_cli("cache-logits", "--data-dir", tiny_data, "--teacher", tiny_teacher, "--out-dir", out,
                   "--seq-len", 32, "--mode", "topk", "--k", 16, check=True)  # fmt: skip
    digest = folder_digest(out)
    yield out
    assert_unchanged(out, digest)


@pytest.fixture(scope="session")
def tiny_sampled_cache(tmp_path_factory, tiny_data, tiny_teacher) -> Path:
    """`cache-logits --mode sampled --num-samples 8 --seq-len 32 --max-rows 32` of tiny_data. Read-only, as
    tiny_topk_cache."""
    out = tmp_path_factory.mktemp("cache") / "sampled"
    with one_torch_thread():
        invoke_cli("cache-logits", "--data-dir", tiny_data, "--teacher", tiny_teacher, "--out-dir", out,
                   "--seq-len", 32, "--mode", "sampled", "--num-samples", 8, "--max-rows", 32, check=True)  # fmt: skip
    digest = folder_digest(out)
    yield out
    assert_unchanged(out, digest)


def invoke_cli(*args, check: bool = False):
    """The CLI in this process: no interpreter start and no imports, so a tiny run costs a fraction of a
    subprocess (run_cli). Accelerate's process-wide training state is cleared afterwards, so the next
    Accelerator starts fresh. Runs whose point is another process (resume, lock) use run_cli."""
    from accelerate.state import AcceleratorState, GradientState
    from click.testing import CliRunner

    from pipeline.cli import main

    try:
        result = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        AcceleratorState._reset_state()
        GradientState._reset_state()
    if check and result.exit_code != 0:
        raise AssertionError(
            f"pipeline {' '.join(map(str, args))} exited {result.exit_code}:\n{result.output[-3000:]}"
        ) from result.exception
    return result
