"""Teachers and students of other families than the default Llama, and vocabularies bounded by the tokenizer
rather than by the embedding size (pipeline/cache.py, sparse_targets.py, student.py, evaluate.py).

Each family is a tiny randomly initialised model on the conftest BPE tokenizer (384 tokens), run through the real
CLI: data -> cache-logits (topk and sampled) -> distill (from each) -> baseline -> compare -> generate.

    gpt2     GPT2LMHeadModel: learned positions, Conv1D projections, final layer norm, tied head
    llama3   Llama-3 style: 128,256 rows (the tokenizer extended with unreachable tokens to 128,256, so ids need
             uint32), grouped-query attention, llama3 rope scaling
    qwen2    Qwen2 style: embedding padded past the tokenizer (400 rows around 384 tokens), q/k/v biases, untied head
    gemma2   Gemma-2 style: final logit soft-capping (the cache must hold the capped distribution) and attention
             soft-capping, sliding-window layers, tied head

The cached targets are checked against the teacher's own logits computed here, independently of the cache code."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import STUDENT_FLAGS, invoke_cli, willows_text
from transformers import AutoConfig

from pipeline.cache_format import CacheReader
from pipeline.config import StudentConfig
from pipeline.models import input_embeddings, load_causal_lm, logit_width
from pipeline.rows import read_meta
from pipeline.student import build_student, decoder_blocks, student_rows, teacher_embedding_projection
from pipeline.teacher import tokenizer_hash

SEQ_LEN, ROWS, K, NUM_SAMPLES = 32, 8, 8, 20
LLAMA3_VOCAB = 128256


def sharpen(model, factor: float = 20.0):
    """Scale the output head so that a random model's distributions are peaked (and soft-capping bites)."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)
    return model


def family_model(family: str, tokenizer):
    """A tiny random teacher of `family` whose ids are the tokenizer's."""
    from transformers import Gemma2Config, GPT2Config, LlamaConfig, Qwen2Config

    from pipeline.models import new_causal_lm

    eos = tokenizer.eos_token_id
    common = {"bos_token_id": eos, "eos_token_id": eos}
    if family == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256, **common)
    elif family == "llama3":
        config = LlamaConfig(
            vocab_size=LLAMA3_VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            tie_word_embeddings=True,
            **common,
        )
    elif family == "qwen2":
        config = Qwen2Config(
            vocab_size=400,  # padded past the 384-token tokenizer
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            **common,
        )
    else:
        config = Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=256,
            sliding_window=16,
            final_logit_softcapping=5.0,
            attn_logit_softcapping=50.0,
            **common,
        )
    torch.manual_seed(0)
    return sharpen(new_causal_lm(config, family))


def llama3_tokenizer(tokenizer, folder: Path):
    """The tiny tokenizer with unreachable BPE entries appended up to Llama-3's 128,256 ids (the merges never produce
    them), so that ids need uint32 while tokenizing stays the tiny tokenizer's."""
    from transformers import PreTrainedTokenizerFast

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    for index in range(len(tokenizer), LLAMA3_VOCAB):
        vocab[f"<unused{index}>"] = index
    (folder / "llama3-tokenizer.json").write_text(json.dumps(backend), encoding="utf-8")
    return PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "llama3-tokenizer.json"),
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in ("gpt2", "llama3", "qwen2", "gemma2"):
        tokenizer = llama3_tokenizer(tiny_tokenizer, root) if family == "llama3" else tiny_tokenizer
        assert len(tokenizer) == (LLAMA3_VOCAB if family == "llama3" else 384)
        folder = root / f"{family}-teacher"
        family_model(family, tokenizer).save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        out[family] = folder
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("families-corpus") / "willows.txt"
    path.write_text(willows_text()[20_000:36_000], encoding="utf-8")
    return path


def cli(*args):
    return invoke_cli(*args, check=True)


def train_flags(data: Path, teacher: Path, **extra) -> list:
    flags = {
        "data-dir": data,
        "teacher": teacher,
        "seq-len": SEQ_LEN,
        "max-rows": ROWS,
        "batch-size": 4,
        "max-steps": 3,
        "warmup-steps": 1,
        "eval-every": 3,
        "eval-rows": 2,
        "save-every": 3,
        "num-workers": 0,
        "mixed-precision": "no",
        **extra,
    }
    return [item for key, value in flags.items() if value is not None for item in (f"--{key}", value)]


def run_family(teacher: Path, corpus: Path, out: Path, mode_of_distill: str) -> dict[str, Path]:
    """Every stage of the pipeline on one teacher (both caches; distill and compare from `mode_of_distill`'s)."""
    paths = {name: out / name for name in ("data", "topk", "sampled", "distill", "baseline", "report")}
    cli("data", "--corpus", corpus, "--tokenizer", teacher, "--out-dir", paths["data"], "--val-fraction", 0.2)
    for mode in ("topk", "sampled"):
        cli(
            "cache-logits",
            *("--data-dir", paths["data"], "--teacher", teacher, "--out-dir", paths[mode], "--seq-len", SEQ_LEN),
            *("--mode", mode, "--k", K, "--num-samples", NUM_SAMPLES, "--max-rows", ROWS, "--batch-size", 4),
            *("--dtype", "float32"),  # the stored numbers are checked against the float32 teacher's own logits
        )
    flags = train_flags(paths["data"], teacher)
    cli("distill", *flags, *STUDENT_FLAGS, "--cache-dir", paths[mode_of_distill], "--out-dir", paths["distill"])
    cli("baseline", *flags, *STUDENT_FLAGS, "--out-dir", paths["baseline"])
    cli(
        "compare",
        *("--data-dir", paths["data"], "--cache-dir", paths[mode_of_distill], "--teacher", teacher),
        *("--distilled", paths["distill"], "--baseline", paths["baseline"], "--out-dir", paths["report"]),
        *("--eval-rows", 2, "--max-new-tokens", 4, "--num-prompts", 1),
    )
    return paths


def teacher_logits(teacher, tokens: np.ndarray) -> torch.Tensor:
    """The teacher's own logits [L, V] for a cache row (its first L tokens), float64."""
    with torch.no_grad():
        return teacher(torch.from_numpy(tokens[None, :-1])).logits[0].double()


def check_cached_targets(paths: dict, teacher_dir: Path, vocab: int) -> None:
    """The topk rows are the top K of the tokenizer's ids, normalised over every column of the head (padding mass in
    the tail); the sampled rows hold ids of the tokenizer only and the entropy of the distribution renormalised over
    them."""
    teacher = load_causal_lm(teacher_dir)
    width = logit_width(teacher)
    topk, sampled = CacheReader(paths["topk"], "train"), CacheReader(paths["sampled"], "train")
    for reader in (topk, sampled):
        assert reader.vocab_size == vocab
        padded = {"teacher_vocab_size": width, "padding_mass": "tail" if reader.mode == "topk" else "excluded"}
        assert {k: reader.attrs.get(k) for k in padded} == (padded if width != vocab else dict.fromkeys(padded))
    for index in (0, ROWS - 1):
        row = topk.row(index)
        logits = teacher_logits(teacher, row["tokens"])
        full = torch.log_softmax(logits, -1)  # over every column of the head
        values, ids = full[:, :vocab].topk(K, -1)
        np.testing.assert_array_equal(row["topk_ids"], ids.numpy())
        np.testing.assert_allclose(row["topk_logprobs"], values.numpy(), rtol=1e-3, atol=1e-3)  # float16
        np.testing.assert_allclose(row["tail_logprob"], torch.log1p(-values.exp().sum(-1)).numpy(), atol=1e-4)
        srow = sampled.row(index)
        assert 0 < srow["sample_ids"].max() < vocab
        own = torch.log_softmax(logits[:, :vocab], -1)  # renormalised over the tokenizer's ids
        np.testing.assert_allclose(srow["teacher_entropy"], -(own.exp() * own).sum(-1).numpy(), atol=2e-2)
        np.testing.assert_array_equal(srow["sample_counts"].sum(-1), NUM_SAMPLES)


def check_report(paths: dict, teacher_dir: Path, vocab: int) -> None:
    """compare's KL and agreement, recomputed here: p the teacher over the tokenizer's ids (renormalised), q each
    model's softmax over all its columns, on the val rows compare evaluated."""
    report = json.loads((paths["report"] / "report.json").read_text())["models"]
    reader = CacheReader(paths["topk"], "val")
    rows = torch.stack([torch.from_numpy(reader.tokens(i)) for i in range(2)])
    folders = {"teacher": teacher_dir, "distilled": paths["distill"], "baseline": paths["baseline"]}
    with torch.no_grad():
        logits = {label: load_causal_lm(path)(rows[:, :-1]).logits.double() for label, path in folders.items()}
    teacher_logp = torch.log_softmax(logits["teacher"][..., :vocab], -1)
    for label, model_logits in logits.items():
        logq = torch.log_softmax(model_logits, -1)[..., :vocab]
        kl = (teacher_logp.exp() * (teacher_logp - logq)).sum(-1).mean().item()
        assert report[label]["kl_exact"] == pytest.approx(kl, rel=1e-4, abs=1e-6), label
        agree = (model_logits.argmax(-1) == teacher_logp.argmax(-1)).double().mean().item()
        assert report[label]["top1_agreement"] == pytest.approx(agree, abs=1e-9), label
        assert math.isfinite(report[label]["val_ppl"]) and math.isfinite(report[label]["kl_to_teacher"])
    assert report["distilled"]["kl_exact"] > 0 and report["baseline"]["kl_exact"] > 0
    # the students as the teacher's draft: a padded teacher's head is wider than theirs, which transformers reads as
    # another tokenizer (universal assisted decoding, given the one tokenizer); greedy output the teacher's own
    draft = json.loads((paths["report"] / "report.json").read_text())["draft"]
    teacher_rows = AutoConfig.from_pretrained(teacher_dir).get_text_config().vocab_size
    for label in ("distilled", "baseline"):
        assert draft["drafts"][label]["universal"] == (teacher_rows != vocab), label
        assert draft["drafts"][label]["accepted"] + draft["drafts"][label]["teacher_forwards"] == draft["new_tokens"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "mode"), [("gpt2", "topk"), ("llama3", "sampled"), ("qwen2", "topk"), ("gemma2", "sampled")]
)
def test_family_runs_every_stage(family, mode, teachers, corpus, tmp_path):
    paths = run_family(teachers[family], corpus, tmp_path, mode)
    vocab = read_meta(paths["data"])["vocab_size"]
    assert vocab == (LLAMA3_VOCAB if family == "llama3" else 384)
    check_cached_targets(paths, teachers[family], vocab)
    id_dtype = "uint32" if family == "llama3" else "uint16"  # by the tokenizer, whatever the embedding
    assert CacheReader(paths["topk"], "train").attrs["id_dtype"] == id_dtype
    if family == "llama3":  # the random teacher's top ids reach past uint16
        assert CacheReader(paths["topk"], "train").row(0)["topk_ids"].max() >= 2**16
    if family == "gemma2":  # the capped distribution, not head(last hidden state): those differ by far
        teacher, row = load_causal_lm(teachers[family]), CacheReader(paths["topk"], "train").row(0)
        with torch.no_grad():
            hidden = teacher.base_model(torch.from_numpy(row["tokens"][None, :-1])).last_hidden_state
            uncapped = torch.log_softmax(teacher.get_output_embeddings()(hidden)[0].double(), -1)
        assert np.abs(uncapped.topk(K, -1).values.numpy() - row["topk_logprobs"]).max() > 1.0

    for run in ("distill", "baseline"):
        student = load_causal_lm(paths[run])
        assert logit_width(student) == vocab  # the default student: the tokenizer's rows (multiples of 64 here)
        final = json.loads((paths[run] / "run_config.json").read_text())["final"]
        assert math.isfinite(final["val_ppl"])
    check_report(paths, teachers[family], vocab)

    result = invoke_cli(
        "generate", paths["distill"], "--prompt", "The Mole", "--max-new-tokens", 6, "--seed", 1, check=True
    )
    assert "The Mole" in result.output and "tokens/s" in result.output


# ----------------------------------------------------------------------------- students


@pytest.mark.parametrize("family", ["gpt2", "llama3", "qwen2", "gemma2"])
def test_teacher_layers_student_of_every_family(family, teachers):
    """--student-init teacher-layers: with every block kept the student computes the teacher's logits on the
    tokenizer's columns (embeddings, positions, final norm, head and blocks all copied; a padded embedding cut to
    the tokenizer); with one block it holds teacher block 0."""
    teacher = load_causal_lm(teachers[family])
    vocab = LLAMA3_VOCAB if family == "llama3" else 384
    whole = build_student(StudentConfig(student_init="teacher-layers", n_layer=2), str(teachers[family]), vocab, 0)
    assert type(whole) is type(teacher) and logit_width(whole) == vocab
    tokens = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = teacher(tokens).logits[..., :vocab]
        torch.testing.assert_close(whole.eval()(tokens).logits, expected, rtol=1e-5, atol=1e-5)
    one = build_student(StudentConfig(student_init="teacher-layers", n_layer=1), str(teachers[family]), vocab, 0)
    blocks = decoder_blocks(one)
    assert blocks == decoder_blocks(teacher) and len(one.get_submodule(blocks)) == 1
    kept, first = one.get_submodule(blocks)[0].state_dict(), teacher.get_submodule(blocks)[0].state_dict()
    assert kept.keys() == first.keys() and all(torch.equal(kept[k], first[k]) for k in kept)
    with torch.no_grad():
        assert not torch.allclose(one.eval()(tokens).logits, expected, atol=1e-3)


@pytest.mark.parametrize("family", ["gpt2", "llama3", "qwen2", "gemma2"])
def test_teacher_embeddings_are_read_alone_from_every_familys_files(family, teachers, tmp_path, monkeypatch):
    """The default student init reads only the teacher's embedding tensor from its safetensors (here with loading
    the whole model made impossible); the student's rows past the tokenizer's keep their random init."""
    expected = load_causal_lm(teachers[family]).get_input_embeddings().weight.detach()

    def no_whole_model(*args, **kwargs):
        raise AssertionError("the whole teacher was loaded")

    with monkeypatch.context() as patched:
        patched.setattr("pipeline.models.load_causal_lm", no_whole_model)
        assert torch.equal(input_embeddings(teachers[family]), expected)
        vocab = LLAMA3_VOCAB if family == "llama3" else 385  # 385: the student has 448 rows, the tokenizer 385
        small = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_kv_head": 2, "mlp_size": 32}
        student = build_student(StudentConfig(**small), str(teachers[family]), vocab, 0)
    plain = build_student(StudentConfig(student_init="random", **small), str(teachers[family]), vocab, 0)
    rows = min(expected.shape[0], vocab)
    projected = teacher_embedding_projection(expected[:rows], 16, student.config.initializer_range)
    embeddings = student.get_input_embeddings().weight.detach()
    assert torch.equal(embeddings[:rows], projected)
    assert torch.equal(embeddings[rows:], plain.get_input_embeddings().weight[rows:])
    if family == "gpt2":  # files as the hub's gpt2 has them, without the base model's prefix; then *.bin weights
        from safetensors.torch import save_file

        bare = tmp_path / "bare"
        shutil.copytree(teachers[family], bare)
        weights = load_causal_lm(teachers[family]).transformer.state_dict()
        save_file({k: v.contiguous() for k, v in weights.items()}, bare / "model.safetensors")
        assert torch.equal(input_embeddings(bare), expected)
        (bare / "model.safetensors").unlink()
        torch.save(load_causal_lm(teachers[family]).state_dict(), bare / "pytorch_model.bin")
        assert torch.equal(input_embeddings(bare), expected)


def test_new_students_get_the_tokenizer_rows_rounded_up_to_64(teachers):
    """A tokenizer of 385 tokens: a new student gets 448 rows; teacher-layers keeps a padded teacher's rows up to that
    (400 here: it never adds random rows to a copied embedding)."""
    assert [student_rows(v) for v in (384, 385, 50257, 128256, 151665)] == [384, 448, 50304, 128256, 151680]
    small = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_kv_head": 2, "mlp_size": 32}
    assert logit_width(build_student(StudentConfig(**small), str(teachers["gpt2"]), 385, 0)) == 448
    layers = StudentConfig(student_init="teacher-layers", n_layer=1)
    assert logit_width(build_student(layers, str(teachers["qwen2"]), 385, 0)) == 400
    assert logit_width(build_student(layers, str(teachers["qwen2"]), 384, 0)) == 384


def write_json(path: Path, values: dict) -> Path:
    path.write_text(json.dumps(values), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def llama_runs(tiny_data, tiny_topk_cache, tiny_teacher) -> dict[str, Path]:
    """The shared data and topk cache of the conftest Llama teacher, for the student tests (read-only). The cache
    holds every row: runs on it pass no --max-rows (train_flags drops an option given as None)."""
    return {"data": tiny_data, "cache": tiny_topk_cache, "teacher": tiny_teacher}


def distill(runs: dict, out: Path, *student_flags):
    flags = train_flags(runs["data"], runs["teacher"], **{"cache-dir": runs["cache"], "out-dir": out, "max-rows": None})
    return invoke_cli("distill", *flags, *student_flags)


def one_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(lines) == 1, (result.exit_code, result.output[-2000:], result.exception)
    return lines[0]


def test_student_config_file_builds_a_gpt2_student_of_a_llama_teacher(llama_runs, tmp_path):
    """--student-config: any transformers config; a GPT-2 student (learned positions, Conv1D) distils from a Llama
    teacher that shares its tokenizer. Missing keys take the tokenizer's rows and the teacher's special ids."""
    config = write_json(
        tmp_path / "gpt2.json", {"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 64}
    )
    result = distill(llama_runs, tmp_path / "gpt2-student", "--student-config", config)
    assert result.exit_code == 0, result.output[-2000:]
    student = load_causal_lm(tmp_path / "gpt2-student")
    assert type(student).__name__ == "GPT2LMHeadModel" and logit_width(student) == 384
    assert student.config.eos_token_id == load_causal_lm(llama_runs["teacher"]).config.eos_token_id
    records = [json.loads(line) for line in (tmp_path / "gpt2-student" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kd"] > 0 and math.isfinite(records[-1]["val_ppl"])

    not_causal = write_json(tmp_path / "t5.json", {"model_type": "t5", "d_model": 16, "num_layers": 1})
    assert "not a causal language model" in one_error(
        distill(llama_runs, tmp_path / "t5", "--student-config", not_causal)
    )
    no_type = write_json(tmp_path / "bare.json", {"hidden_size": 16})
    odd = write_json(tmp_path / "odd.json", {"model_type": "gpt2", "n_embd": 16, "n_head": 12})  # 16 / 12 heads
    assert "cannot build this gpt2 model" in one_error(distill(llama_runs, tmp_path / "odd", "--student-config", odd))
    assert "no model_type" in one_error(distill(llama_runs, tmp_path / "bare", "--student-config", no_type))
    short = write_json(
        tmp_path / "short.json", {"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 16}
    )
    line = one_error(distill(llama_runs, tmp_path / "short", "--student-config", short))
    assert f"--seq-len {SEQ_LEN} is longer than the student's context (16 positions)" in line
    both = one_error(
        distill(llama_runs, tmp_path / "both", "--student-config", config, "--student-init", "teacher-layers")
    )
    assert "--student-config" in both


def save_llama(folder: Path, rows: int, tokenizer=None) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=rows,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def test_pretrained_students_padded_or_of_another_tokenizer_train_and_too_small_are_refused(
    llama_runs, tmp_path, tiny_tokenizer
):
    """--student PATH: the head may be padded past the tokenizer (448 rows for 384 tokens), not short of it; a student
    with a tokenizer of its own trains across tokenizers."""
    padded = save_llama(tmp_path / "padded", 448, tiny_tokenizer)
    result = distill(llama_runs, tmp_path / "padded-run", "--student", padded)
    assert result.exit_code == 0, result.output[-2000:]
    assert logit_width(load_causal_lm(tmp_path / "padded-run")) == 448

    small = save_llama(tmp_path / "small", 300)
    line = one_error(distill(llama_runs, tmp_path / "small-run", "--student", small))
    assert "300 rows" in line and "384 tokens" in line
    assert not (tmp_path / "small-run" / "model.safetensors").exists()

    from conftest import make_tokenizer

    other_tokenizer = make_tokenizer(willows_text()[:30_000], vocab_size=512)
    foreign = save_llama(tmp_path / "foreign", 512, other_tokenizer)  # its own tokenizer: a cross-tokenizer run
    data = tmp_path / "data"  # its rows go into the data folder: a copy, the shared one stays as it is
    shutil.copytree(llama_runs["data"], data)
    result = distill({**llama_runs, "data": data}, tmp_path / "foreign-run", "--student", foreign)
    assert result.exit_code == 0, result.output[-2000:]
    assert "its own tokenizer (512 tokens" in result.output
    run_config = json.loads((tmp_path / "foreign-run" / "run_config.json").read_text())
    assert run_config["resolved"]["inputs"]["student_tokenizer_hash"] == tokenizer_hash(other_tokenizer)


def test_a_cache_bounded_by_the_embedding_is_refused_with_the_rebuild_command(llama_runs, tmp_path):
    """Caches written before ids were bounded by the tokenizer recorded the teacher's embedding rows as vocab_size;
    one from a padded teacher is refused naming the rebuild (an unpadded one has the same bytes and still reads)."""
    import shutil

    old = tmp_path / "old-cache"
    shutil.copytree(llama_runs["cache"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["vocab_size"] = 448
    (old / "manifest.json").write_text(json.dumps(manifest))
    flags = train_flags(
        llama_runs["data"], llama_runs["teacher"], **{"cache-dir": old, "out-dir": tmp_path / "run", "max-rows": None}
    )
    line = one_error(invoke_cli("distill", *flags, *STUDENT_FLAGS))
    assert "448" in line and "384 tokens" in line and "make cache-logits" in line


# ----------------------------------------------------------------------------- the loss on a padded student


@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_padding_columns_of_the_student_stay_in_its_softmax(mode):
    """The loss does not mask a student's padding columns (ids >= the tokenizer's length): the teacher's distribution,
    zero there, is compared with the student's softmax over all its columns, so the divergence is the dense
    KL(p || q) over the student's width and its gradient pushes the padding logits down (the student learns to put
    no mass on ids no text holds, which generate() would otherwise sample). Checked against autograd on that KL."""
    from pipeline.losses import distillation_loss

    vocab, padded, n, temperature = 40, 48, 6, 2.0
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3
    student = (torch.randn(n, padded, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    p = torch.softmax(teacher / temperature, -1)  # [n, vocab]: no mass past the tokenizer
    if mode == "topk":  # every tokenizer id stored: the teacher's tail is empty
        logp, ids = torch.log_softmax(teacher / temperature, -1).sort(-1, descending=True)
        targets = {"topk_ids": ids, "topk_logprobs": logp, "tail_logprob": torch.full((n,), float("-inf"))}
    else:  # expected counts: the estimate is then the exact cross-entropy minus the entropy
        num_samples = 1000
        ids = torch.arange(vocab).expand(n, vocab)
        targets = {
            "sample_ids": ids,
            "sample_counts": p * num_samples,
            "teacher_entropy": -(p * p.log()).sum(-1),
            "num_samples": num_samples,
        }
    labels = torch.randint(0, vocab, (n,), generator=g)
    kd = distillation_loss(student, labels, targets=targets, alpha=0.0, temperature=temperature).kd
    (grad,) = torch.autograd.grad(kd, student)

    reference_student = student.detach().clone().requires_grad_(True)
    log_q = torch.log_softmax(reference_student / temperature, -1)  # over all 48 columns
    dense = (p * (p.log() - log_q[:, :vocab])).sum(-1).mean()
    (reference_grad,) = torch.autograd.grad(dense, reference_student)
    torch.testing.assert_close(kd, dense, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-7, atol=1e-10)
    assert (grad[:, vocab:] > 0).all()  # descent lowers every padding logit
