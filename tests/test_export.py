"""Exports (pipeline/export.py): GGUF f16 / q8_0 read back with gguf and loaded by transformers, int8 safetensors
reloaded without pickle, the figures compare shows, and the refusals.

The model is a tiny Llama on the conftest BPE tokenizer with grouped-query attention (4 heads, 2 kv heads) so
that q_proj and k_proj are permuted with different head counts, an MLP width of 80 (not a multiple of Q8_0's
32-wide blocks: ffn_down falls back to f16), and weights at std 0.1 so that its log-probs are far from
uniform and a wrong permutation shows (checked: ~0.26 nats mean |delta| without it, against 4e-4 with it).

Tolerances on mean |delta log-prob| against the float32 model on held-out rows:
    f16 GGUF < 1e-2 (measured ~4e-4), q8_0 GGUF < 5e-2 (~1e-2), int8 < 1e-1 (~4e-2; activations are quantized too).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, willows_text

from pipeline import export as ex
from pipeline.batches import TokenRows
from pipeline.config import ExportConfig
from pipeline.errors import PipelineError
from pipeline.export import export_model

SEQ_LEN, EVAL_ROWS = 32, 8
TOLERANCE = {"gguf-f16": 1e-2, "gguf-q8_0": 5e-2, "int8": 1e-1}


@pytest.fixture(scope="module")
def student(tmp_path_factory, tiny_tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        initializer_range=0.1,
        rms_norm_eps=1e-5,
        bos_token_id=tiny_tokenizer.eos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
    )
    folder = tmp_path_factory.mktemp("student") / "tiny-distill"
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(student, tiny_data) -> dict:
    """The export report of all three formats into the default place, student/export."""
    return export_model(
        ExportConfig(
            model=str(student), data_dir=str(tiny_data), seq_len=SEQ_LEN, eval_rows=EVAL_ROWS, max_new_tokens=8
        )
    )


@pytest.fixture(scope="module")
def reference(student, tiny_data) -> torch.Tensor:
    """log p(next token) of the float32 student on the first EVAL_ROWS val rows [EVAL_ROWS, SEQ_LEN]."""
    from pipeline.models import load_causal_lm

    return ex.next_token_logprobs(load_causal_lm(student), TokenRows(str(tiny_data), "val", SEQ_LEN), EVAL_ROWS, 4)


def fields(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_gguf_reads_back_with_llama_metadata_tokenizer_and_tensor_types(exported, student, tiny_tokenizer, qtype):
    from gguf import GGMLQuantizationType as Q

    meta, tensors = fields(student / "export" / f"model-{qtype}.gguf")
    expected = {
        "general.architecture": "llama",
        "llama.context_length": 128,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": 80,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "llama.rope.freq_base": 10000.0,
        "llama.vocab_size": 384,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "general.file_type": {"f16": 1, "q8_0": 7}[qtype],
        "tokenizer.ggml.eos_token_id": tiny_tokenizer.eos_token_id,
        "tokenizer.ggml.bos_token_id": tiny_tokenizer.bos_token_id,
        "tokenizer.ggml.add_bos_token": False,
    }
    assert {k: meta[k] for k in expected} == expected
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    vocab = tiny_tokenizer.get_vocab()
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert len(meta["tokenizer.ggml.merges"]) == len(vocab) - 257 and all(
        m.count(" ") == 1 for m in meta["tokenizer.ggml.merges"]
    )
    assert meta["tokenizer.ggml.token_type"][tiny_tokenizer.eos_token_id] == 3 and set(
        meta["tokenizer.ggml.token_type"]
    ) == {1, 3}

    assert "output.weight" not in tensors and len(tensors) == 2 + 2 * 9  # tied head: token_embd is the output
    matrix = Q.F16 if qtype == "f16" else Q.Q8_0
    assert tensors["blk.0.attn_q.weight"].tensor_type == matrix and tensors["token_embd.weight"].tensor_type == matrix
    assert tensors["blk.1.ffn_down.weight"].tensor_type == Q.F16  # rows of 80: no whole Q8_0 blocks
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32 and tensors["output_norm.weight"].tensor_type == Q.F32
    assert [int(n) for n in tensors["blk.0.attn_k.weight"].shape] == [64, 32]  # ggml order: [in, out]


def test_gguf_q_and_k_rows_are_in_llama_cpp_rope_order(exported, student):
    """llama.cpp rotates dimension pairs (2j, 2j+1) of each head; HF rotates (j, j + head_dim/2). So GGUF row
    h*d + 2j must be HF row h*d + j and row h*d + 2j + 1 must be HF row h*d + j + d/2, for q (4 heads) and k (2)."""
    from safetensors.torch import load_file

    hf = load_file(student / "model.safetensors")
    _, tensors = fields(student / "export" / "model-f16.gguf")
    d = 16
    for name, heads in (("q_proj", 4), ("k_proj", 2)):
        source = hf[f"model.layers.1.self_attn.{name}.weight"].numpy()
        written = np.asarray(tensors[f"blk.1.attn_{name[0]}.weight"].data, dtype=np.float32).reshape(heads * d, 64)
        for h in range(heads):
            for j in range(d // 2):
                np.testing.assert_allclose(written[h * d + 2 * j], source[h * d + j], atol=1e-3)
                np.testing.assert_allclose(written[h * d + 2 * j + 1], source[h * d + j + d // 2], atol=1e-3)


@pytest.mark.parametrize("label", ["gguf-f16", "gguf-q8_0"])
def test_gguf_loads_in_transformers_with_matching_log_likelihood(exported, student, tiny_data, reference, label):
    model = ex.load_gguf(student / "export" / ex.GGUF_FILES[label[5:]])
    logprobs = ex.next_token_logprobs(model, TokenRows(str(tiny_data), "val", SEQ_LEN), EVAL_ROWS, 4)
    delta = (logprobs - reference).abs().mean().item()
    assert delta < TOLERANCE[label]
    assert exported["variants"][label]["mean_abs_logprob_delta"] == pytest.approx(delta, rel=1e-6)
    assert exported["variants"][label]["val_ppl"] == pytest.approx(math.exp(-logprobs.mean().item()), rel=1e-9)


def test_a_missing_permutation_would_fail_the_log_likelihood_check(
    student, tiny_data, reference, tmp_path, monkeypatch
):
    from pipeline.models import load_causal_lm, load_tokenizer

    monkeypatch.setattr(ex, "permute_qk", lambda weight, n_head: weight)
    path = ex.write_gguf(load_causal_lm(student), load_tokenizer(student), tmp_path / "unpermuted.gguf", "f16", "x")
    logprobs = ex.next_token_logprobs(ex.load_gguf(path), TokenRows(str(tiny_data), "val", SEQ_LEN), EVAL_ROWS, 4)
    assert (logprobs - reference).abs().mean().item() > 10 * TOLERANCE["gguf-f16"]


def test_gguf_tokenizer_round_trips_through_transformers(exported, student, tiny_tokenizer):
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(student / "export", gguf_file="model-f16.gguf")
    text = willows_text()[95_000:97_000] + "\n\n 1234 naïve café <|endoftext|> Toad!"
    assert loaded(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    assert loaded.eos_token == tiny_tokenizer.eos_token


def test_tiny_teacher_exports_to_f16_within_tolerance(tiny_teacher, tiny_data, tmp_path):
    """The conftest teacher (2 heads = 2 kv heads, embeddings x20: large logits) through the same path."""
    from pipeline.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(tiny_teacher)
    path = ex.write_gguf(model, load_tokenizer(tiny_teacher), tmp_path / "teacher-f16.gguf", "f16", "tiny")
    rows = TokenRows(str(tiny_data), "val", SEQ_LEN)
    delta = (
        (ex.next_token_logprobs(ex.load_gguf(path), rows, 4, 4) - ex.next_token_logprobs(model, rows, 4, 4))
        .abs()
        .mean()
        .item()
    )
    assert delta < TOLERANCE["gguf-f16"]


def test_int8_is_safetensors_int8_and_reloads_close_to_float(exported, student, reference, tiny_data):
    import torch.ao.nn.quantized.dynamic as nnqd
    from safetensors import safe_open

    folder = student / "export" / "int8"
    assert sorted(p.suffix for p in folder.iterdir() if p.suffix not in (".json", ".jinja")) == [
        ".safetensors"
    ]  # no pickle
    with safe_open(str(folder / ex.INT8_WEIGHTS), framework="pt") as f:
        dtypes = {key: f.get_tensor(key).dtype for key in f.keys()}  # noqa: SIM118 (not a dict)
    assert dtypes["model.layers.0.mlp.down_proj.weight"] == torch.int8 and dtypes["lm_head.weight"] == torch.int8
    assert dtypes["model.layers.0.mlp.down_proj.weight_scale"] == torch.float32
    assert "model.embed_tokens.weight" not in dtypes  # tied: rebuilt from lm_head's int8 rows

    model = ex.load_int8(folder)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nnqd.Linear) and isinstance(model.lm_head, nnqd.Linear)
    logprobs = ex.next_token_logprobs(model, TokenRows(str(tiny_data), "val", SEQ_LEN), EVAL_ROWS, 4)
    assert (logprobs - reference).abs().mean().item() < TOLERANCE["int8"]
    float_ppl, int8_ppl = exported["variants"]["float32"]["val_ppl"], exported["variants"]["int8"]["val_ppl"]
    assert int8_ppl == pytest.approx(math.exp(-logprobs.mean().item()), rel=1e-6)
    assert abs(int8_ppl / float_ppl - 1) < 0.05


def test_report_has_size_speed_and_perplexity_per_variant(exported, student):
    variants = exported["variants"]
    assert list(variants) == ["float32", "gguf-f16", "gguf-q8_0", "int8"]
    assert variants["float32"]["size_bytes"] == (student / "model.safetensors").stat().st_size
    assert variants["gguf-f16"]["size_bytes"] == (student / "export" / "model-f16.gguf").stat().st_size
    assert variants["int8"]["size_bytes"] < 0.4 * variants["float32"]["size_bytes"]
    assert variants["gguf-q8_0"]["size_bytes"] < variants["gguf-f16"]["size_bytes"] < variants["float32"]["size_bytes"]
    assert (
        variants["float32"]["tokens_per_s"] > 0
        and variants["int8"]["tokens_per_s"] > 0
        and variants["gguf-f16"]["tokens_per_s"] is None
    )
    assert json.loads((student / "export" / "export_report.json").read_text())["variants"] == json.loads(
        json.dumps(variants)
    )


def test_compare_reads_the_export_report_of_the_same_weights_only(exported, student, tmp_path):
    from pipeline.compare import render_exports
    from pipeline.export import read_export_report

    figures = read_export_report(student)
    assert set(figures["variants"]) == {"float32", "gguf-f16", "gguf-q8_0", "int8"}
    assert figures["eval"]["rows"] == EVAL_ROWS and figures["variants"]["int8"]["size_bytes"] > 0
    markdown = "\n".join(render_exports(figures))
    assert "## Exported distilled student (CPU)" in markdown and "| gguf-q8_0 |" in markdown
    retrained = tmp_path / "retrained"
    shutil.copytree(student, retrained)
    weights = bytearray((retrained / "model.safetensors").read_bytes())
    weights[-1] ^= 1  # other weights than the export measured
    (retrained / "model.safetensors").write_bytes(bytes(weights))
    assert read_export_report(retrained) is None


def test_refusals(exported, student, tiny_data, tmp_path):
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    with pytest.raises(PipelineError, match="already exists; pass --overwrite"):
        export_model(ExportConfig(model=str(student), formats="f16", measure=False))
    before = (student / "export" / "model-f16.gguf").stat().st_mtime_ns
    export_model(ExportConfig(model=str(student), formats="f16", measure=False, overwrite=True))
    assert (student / "export" / "model-f16.gguf").stat().st_mtime_ns > before

    with pytest.raises(PipelineError, match="not a model folder"):
        export_model(ExportConfig(model=str(tiny_data)))
    BertModel(
        BertConfig(vocab_size=384, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(PipelineError, match="not a causal language model"):
        export_model(ExportConfig(model=str(tmp_path / "bert")))
    GPT2LMHeadModel(
        GPT2Config(vocab_size=384, n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    ).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(PipelineError, match="n_positions=64; export it with --formats int8"):
        export_model(ExportConfig(model=str(tmp_path / "gpt2"), formats="q8_0"))  # transformers reads back 1024 only
    with pytest.raises(PipelineError, match="--formats must list"):
        export_model(ExportConfig(model=str(student), formats="q4_k"))


def test_cli_refuses_a_family_gguf_cannot_express_naming_it_and_int8(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=384,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    ).save_pretrained(tmp_path / "qwen2")
    result = run_cli("export", "--model", tmp_path / "qwen2")
    assert result.returncode == 2
    line = result.stderr.strip()
    assert line.count("\n") == 0 and not (tmp_path / "qwen2" / "export").exists()
    assert "qwen2" in line and "llama and gpt2" in line and "--formats int8" in line


# ----------------------------------------------------------------------------- GPT-2


@pytest.fixture(scope="module")
def gpt2_student(tmp_path_factory, tiny_tokenizer) -> Path:
    """A distilgpt2-shaped student in miniature: learned positions (1024, as distilgpt2), Conv1D projections, final
    layer norm, tied head; weights at std 0.1 so that a transposition mistake shows in the log-probs."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tiny_tokenizer),
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=1024,
        initializer_range=0.1,
        bos_token_id=tiny_tokenizer.eos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
    )
    folder = tmp_path_factory.mktemp("gpt2-student") / "gpt2-distill"
    GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_exported(gpt2_student, tiny_data) -> dict:
    return export_model(
        ExportConfig(
            model=str(gpt2_student), data_dir=str(tiny_data), seq_len=SEQ_LEN, eval_rows=EVAL_ROWS, max_new_tokens=8
        )
    )


def test_gpt2_gguf_has_gpt2_metadata_and_llama_cpp_tensors(gpt2_exported, gpt2_student):
    meta, tensors = fields(gpt2_student / "export" / "model-f16.gguf")
    expected = {
        "general.architecture": "gpt2",
        "gpt2.context_length": 1024,
        "gpt2.embedding_length": 64,
        "gpt2.block_count": 2,
        "gpt2.feed_forward_length": 256,
        "gpt2.attention.head_count": 4,
        "tokenizer.ggml.model": "gpt2",
    }
    assert {k: meta[k] for k in expected} == expected
    per_block = {"attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"}
    names = {f"blk.{b}.{t}.{w}" for b in range(2) for t in per_block for w in ("weight", "bias")}
    names |= {"token_embd.weight", "position_embd.weight", "output_norm.weight", "output_norm.bias"}
    assert set(tensors) == names  # tied head: no output.weight
    assert [int(n) for n in tensors["blk.0.attn_qkv.weight"].shape] == [64, 192]  # ggml order [in, out]: W^T of Conv1D


@pytest.mark.parametrize("label", ["gguf-f16", "gguf-q8_0", "int8"])
def test_gpt2_exports_reload_with_matching_log_likelihood(gpt2_exported, gpt2_student, tiny_data, label):
    """GGUF read back by transformers' GGUF reader (which transposes GPT-2's matrices back), int8 with Conv1D
    quantized as the Linear it equals: log-probs of the val rows close to the float model's."""
    from pipeline.models import load_causal_lm

    rows = TokenRows(str(tiny_data), "val", SEQ_LEN)
    reference = ex.next_token_logprobs(load_causal_lm(gpt2_student), rows, EVAL_ROWS, 4)
    path = gpt2_student / "export" / ("int8" if label == "int8" else f"model-{label[5:]}.gguf")
    model = ex.load_int8(path) if label == "int8" else ex.load_gguf(path)
    assert type(model).__name__ == "GPT2LMHeadModel"
    delta = (ex.next_token_logprobs(model, rows, EVAL_ROWS, 4) - reference).abs().mean().item()
    assert delta < TOLERANCE[label], delta
    assert gpt2_exported["variants"][label]["mean_abs_logprob_delta"] == pytest.approx(delta, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_int8_works_for_families_gguf_cannot_express(family, tiny_tokenizer, tmp_path):
    """int8 (every nn.Linear) of a Qwen2 (biases, untied head) and a Gemma-2 (soft-capping, tied head): saved without
    pickle, reloaded, log-probs close to the float model's."""
    from transformers import Gemma2Config, Qwen2Config

    from pipeline.models import new_causal_lm

    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    if family == "qwen2":
        config = Qwen2Config(vocab_size=448, num_key_value_heads=2, tie_word_embeddings=False, **shape)
    else:
        config = Gemma2Config(vocab_size=384, num_key_value_heads=2, head_dim=16, final_logit_softcapping=5.0, **shape)
    config.initializer_range = 0.1
    torch.manual_seed(0)
    model = new_causal_lm(config, family).eval()
    ex.save_int8(model, tiny_tokenizer, tmp_path / "int8")
    reloaded = ex.load_int8(tmp_path / "int8")
    tokens = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(tokens).logits.log_softmax(-1), reloaded(tokens).logits.log_softmax(-1)
    assert type(reloaded) is type(model)
    assert (got - want).abs().mean().item() < TOLERANCE["int8"]


def test_a_llama3_style_tokenizer_exports_as_llama_bpe_and_round_trips(student, tiny_tokenizer, tmp_path):
    """A student on a byte-level BPE trained with Llama-3's pre-tokenizer (its split regex, then byte-level without
    a regex): the GGUF says llama.cpp's "llama-bpe", and transformers' GGUF reader tokenizes like the original, which
    differs from the GPT-2 split on this text (so a wrong pre-tokenizer name would show)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    def llama3_split():
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(ex.LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer, backend.decoder = llama3_split(), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=len(tiny_tokenizer),
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([willows_text()], trainer=trainer)
    specials = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    folder = tmp_path / "llama3-student"
    shutil.copytree(student, folder, ignore=shutil.ignore_patterns("export", "tokenizer*"))
    tokenizer.save_pretrained(folder)
    export_model(ExportConfig(model=str(folder), formats="f16", measure=False))
    meta, _ = fields(folder / "export" / "model-f16.gguf")
    assert meta["tokenizer.ggml.pre"] == "llama-bpe"
    loaded = AutoTokenizer.from_pretrained(folder / "export", gguf_file="model-f16.gguf")
    text = willows_text()[95_000:97_000] + "\n\n 1234567 IT'S naive.\r\n\r\n Toad's 42 <|endoftext|>"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    gpt2_split = Tokenizer.from_str(backend.to_str())
    gpt2_split.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert gpt2_split.encode(text).ids != tokenizer(text)["input_ids"]
