"""Deployable students: GGUF files for llama.cpp (f16, q8_0) and int8 weights for CPU inference.

`python -m pipeline export --model checkpoints/NAME-distill` writes into `<model>/export/`:

    model-f16.gguf    every matrix float16, norms float32
    model-q8_0.gguf   every matrix Q8_0 (blocks of 32 int8 + one f16 scale; f16 where a row is not a multiple of 32)
    int8/             config.json, tokenizer, model.int8.safetensors: each nn.Linear (and GPT-2 Conv1D, as the
                      Linear it equals) as int8 [out, in] + float32 scale [out] (symmetric per output channel,
                      w ~= int8 * scale); a tied embedding is not stored twice (it is the lm_head's int8 rows times
                      their scales). No pickle: load_int8() rebuilds the model and runs those layers with torch's
                      dynamic int8 kernels (x86/fbgemm). Any causal LM family.
    export_report.json  size on disk, val perplexity, mean |delta log-prob| to the float model, CPU tokens/s.

GGUF (Llama and GPT-2 architectures; other families are refused, naming int8) follows llama.cpp's
convert_hf_to_gguf: tensor names from the gguf package's map of the architecture (token_embd, position_embd,
blk.N.attn_q / attn_qkv ..., output_norm, output: absent when tied), the architecture's hyperparameters, GPT-2's
Conv1D weights transposed to [out, in], and Llama's q_proj / k_proj rows permuted from Hugging Face's rotate-half
order to llama.cpp's interleaved-pair order (permute_qk). The tokenizer is written as llama.cpp's "gpt2" byte-level
BPE (tokens, token types, merges, special ids).

The int8 runtime is torch.ao dynamic quantization (quantize_dynamic + per-channel qint8 weights). PyTorch has
deprecated torch.ao in favour of torchao; the file format here (plain int8 + scales) does not depend on it.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from pipeline.batches import TokenRows
from pipeline.config import ExportConfig, SampleConfig, check
from pipeline.errors import PipelineError
from pipeline.evaluate import evaluate
from pipeline.fsutil import atomic_path, atomic_write_json
from pipeline.generate import continue_prompts, val_prompts
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.rows import read_meta
from pipeline.runs import read_run_config, up_to_date
from pipeline.student_data import check_student_data, student_data_dir
from pipeline.teacher import tokenizer_hash, weights_hash

GGUF_FILES = {"f16": "model-f16.gguf", "q8_0": "model-q8_0.gguf"}
INT8_DIR = "int8"
INT8_WEIGHTS = "model.int8.safetensors"
INT8_FORMAT = "pipeline-int8-v1"
REPORT_FILE = "export_report.json"
EXPORT_DIR = "export"


# ---------------------------------------------------------------- input checks


def read_causal_lm_config(model_dir: str | Path):
    """The transformers config of a causal LM folder, or a PipelineError saying why the folder is not one."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise PipelineError(
            f"{model_dir} is not a model folder (no config.json); pass a trained run folder such as "
            "checkpoints/default-distill"
        )
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as exc:
        raise PipelineError(
            f"{model_dir}/config.json is not a transformers config ({type(exc).__name__}); pass a Hugging Face model "
            "folder"
        ) from exc
    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise PipelineError(
            f"{model_dir} is not a causal language model ({', '.join(architectures) or config.model_type}); "
            f"export takes a causal LM folder such as checkpoints/default-distill"
        )
    if not any(model_dir.glob("*.safetensors")):
        raise PipelineError(
            f"{model_dir} has a config.json but no *.safetensors weights; finish or rerun its training first"
        )
    return config


# transformers model_type -> the GGUF architecture written for it (llama.cpp's names). Other families are refused with
# the formats that do work: int8 quantizes the nn.Linear / Conv1D layers of any causal LM.
GGUF_ARCHITECTURES = {"llama": "llama", "gpt2": "gpt2"}


def check_gguf_supported(config, model_dir: str | Path) -> None:
    """One line naming what the GGUF writer supports: a plain Llama (no biases, SiLU, default RoPE) or a GPT-2
    that transformers' GGUF reader rebuilds (gelu_new, 4 x n_embd MLP, 1024 positions)."""
    if config.model_type not in GGUF_ARCHITECTURES:
        raise PipelineError(
            f"the GGUF writer supports the {' and '.join(GGUF_ARCHITECTURES)} architectures; {model_dir} is "
            f"{config.model_type} ({', '.join(getattr(config, 'architectures', None) or [])}); export it with "
            "--formats int8 (int8 works for every family)"
        )
    if config.model_type == "gpt2":
        checks = (
            (f"activation_function={config.activation_function}", config.activation_function != "gelu_new"),
            (f"n_inner={config.n_inner}", config.n_inner not in (None, 4 * config.n_embd)),
            (f"n_positions={config.n_positions}", config.n_positions != 1024),
            ("scale_attn_by_inverse_layer_idx", getattr(config, "scale_attn_by_inverse_layer_idx", False)),
        )
        wants = (
            "gpt2 as llama.cpp runs it and transformers reads it back (gelu_new, n_inner 4 x n_embd, 1024 positions)"
        )
    else:
        rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        checks = (
            ("attention_bias", getattr(config, "attention_bias", False)),
            ("mlp_bias", getattr(config, "mlp_bias", False)),
            (f"hidden_act={config.hidden_act}", config.hidden_act != "silu"),
            (f"rope_type={rope.get('rope_type')}", rope.get("rope_type", "default") != "default"),
        )
        wants = "plain llama (no biases, silu, default rope)"
    unsupported = [name for name, bad in checks if bad]
    if unsupported:
        raise PipelineError(
            f"the GGUF writer supports {wants}; {model_dir} has {', '.join(unsupported)}; export it with --formats int8"
        )


# ---------------------------------------------------------------- GGUF


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of q_proj / k_proj [n_head * head_dim, in] from HF's rotate-half RoPE order to llama.cpp's pairs.

    Within each head, HF rotates dimension i with i + head_dim/2; llama.cpp (GPT-J style) rotates 2j with
    2j+1. Row (h, half, j) moves to (h, j, half): reshape [n_head, 2, head_dim/2, in], swap axes 1 and 2."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(model) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every weight of a Llama or GPT-2 model, named by the gguf package's own
    tensor map of the architecture (the map transformers' GGUF reader inverts); lm_head dropped when tied.

    Stored as llama.cpp expects: [out, in] matrices, so GPT-2's Conv1D weights ([in, out]) are transposed; Llama's
    q_proj / k_proj rows permuted to llama.cpp's RoPE pairs (permute_qk)."""
    import gguf
    from transformers.pytorch_utils import Conv1D

    config = model.config
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == GGUF_ARCHITECTURES[config.model_type])
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = []
    for key, value in model.state_dict().items():
        module_name, suffix = key.rsplit(".", 1)
        if tied and model.get_submodule(module_name) is model.get_output_embeddings():
            continue
        name = names.get_name(module_name)
        if name is None:
            raise PipelineError(
                f"the GGUF writer does not know the {config.model_type} tensor {key}; export with --formats int8"
            )
        array = value.detach().float().cpu().numpy()
        if isinstance(model.get_submodule(module_name), Conv1D) and suffix == "weight":
            array = array.T
        elif module_name.endswith("self_attn.q_proj") and suffix == "weight":
            array = permute_qk(array, config.num_attention_heads)
        elif module_name.endswith("self_attn.k_proj") and suffix == "weight":
            array = permute_qk(array, config.num_key_value_heads)
        out.append((f"{name}.{suffix}", np.ascontiguousarray(array)))
    return out


# Llama-3's pre-tokenizer split (its tokenizer.json), which llama.cpp calls "llama-bpe"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def gguf_pre_tokenizer(backend: dict) -> str:
    """llama.cpp's tokenizer.ggml.pre for the HF pre-tokenizer: plain byte-level (GPT-2 regex), SmolLM's digits +
    byte-level, or Llama-3's split + byte-level ("llama-bpe")."""
    pre = backend.get("pre_tokenizer") or {}

    def gpt2_split(part: dict) -> bool:
        return (
            part.get("type") == "ByteLevel" and part.get("use_regex", True) and not part.get("add_prefix_space", False)
        )

    if gpt2_split(pre):
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (
        len(parts) == 2
        and parts[0].get("type") == "Digits"
        and parts[0].get("individual_digits")
        and gpt2_split(parts[1])
    ):
        return "smollm"
    if (
        len(parts) == 2
        and parts[0].get("type") == "Split"
        and (parts[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT
        and parts[0].get("behavior") == "Isolated"
        and not parts[0].get("invert", False)
        and parts[1].get("type") == "ByteLevel"
        and not parts[1].get("use_regex", True)
        and not parts[1].get("add_prefix_space", False)
    ):
        return "llama-bpe"
    raise PipelineError(
        "the GGUF writer supports byte-level BPE tokenizers with the GPT-2 split (optionally single digits first, no "
        "prefix space) or Llama-3's split; "
        f"this tokenizer's pre-tokenizer is {json.dumps(pre)[:120]}; export with --formats int8"
    )


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """What llama.cpp's "gpt2" tokenizer reads: tokens by id (byte-level spelling), types, merges, special ids."""
    from gguf import TokenType

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model", {})
    if model.get("type") != "BPE":
        raise PipelineError(
            f"the GGUF writer supports byte-level BPE tokenizers; this one is {model.get('type')}; export with "
            "--formats int8"
        )
    id_to_token = {index: token for token, index in tokenizer.get_vocab().items()}
    added = {index: token for index, token in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in id_to_token:  # the model's vocabulary is padded past the tokenizer's
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(id_to_token[index])
            types.append(
                TokenType.NORMAL
                if index not in added
                else TokenType.CONTROL
                if added[index].special
                else TokenType.USER_DEFINED
            )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    with_specials = tokenizer("a")["input_ids"]
    specials = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    return {
        "pre": gguf_pre_tokenizer(backend),
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "specials": {k: v for k, v in specials.items() if v is not None},
        "add_bos": len(with_specials) > len(plain) and with_specials[0] == tokenizer.bos_token_id,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }


def _add_hyperparameters(writer, config) -> None:
    """The architecture's keys, as llama.cpp's convert_hf_to_gguf writes them for Llama and GPT-2."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    if config.model_type == "gpt2":
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_layer_norm_eps(float(config.layer_norm_epsilon))
        return
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = dict(getattr(config, "rope_parameters", None) or {})
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count_kv(config.num_key_value_heads)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))


def write_gguf(model, tokenizer, path: Path, qtype: str, name: str) -> Path:
    """Write a Llama or GPT-2 model + tokenizer as one GGUF file; qtype "f16" or "q8_0" (1-D tensors stay float32)."""
    import gguf

    config = model.config
    meta = tokenizer_metadata(tokenizer, config.vocab_size)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, GGUF_ARCHITECTURES[config.model_type])
        writer.add_name(name)
        writer.add_vocab_size(config.vocab_size)
        _add_hyperparameters(writer, config)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(meta["pre"])
        writer.add_token_list(meta["tokens"])
        writer.add_token_types(meta["types"])
        writer.add_token_merges(meta["merges"])
        for key, token_id in meta["specials"].items():
            getattr(writer, f"add_{key}_token_id")(int(token_id))
        writer.add_add_bos_token(bool(meta["add_bos"]))
        writer.add_add_space_prefix(False)
        if meta["chat_template"]:
            writer.add_chat_template(meta["chat_template"])
        for tensor_name, array in gguf_tensors(model):
            if array.ndim == 1:
                writer.add_tensor(tensor_name, array.astype(np.float32))
            elif qtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
                writer.add_tensor(
                    tensor_name,
                    gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                    raw_dtype=gguf.GGMLQuantizationType.Q8_0,
                )
            else:
                writer.add_tensor(tensor_name, array.astype(np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def load_gguf(path: str | Path):
    """A GGUF file back as a float32 transformers model (dequantized by transformers' GGUF loader), eval mode."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


# ---------------------------------------------------------------- int8


def _quantized_dynamic():
    with warnings.catch_warnings():  # torch.ao is deprecated upstream (torchao replaces it); it still ships and works
        warnings.simplefilter("ignore")
        import torch.ao.nn.quantized.dynamic as nnqd
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    return nnqd, per_channel_dynamic_qconfig, quantize_dynamic


def as_linears(model):
    """Every transformers Conv1D (GPT-2's projections: y = x W + b, W [in, out]) replaced in place by the nn.Linear it
    equals (weight W^T), so that one int8 path covers every family; returns the model."""
    from transformers.pytorch_utils import Conv1D

    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            linear = torch.nn.Linear(module.weight.shape[0], module.weight.shape[1])
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                linear.bias.copy_(module.bias)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return model


def int8_state(model) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """quantize_dynamic (per-channel symmetric qint8) of every nn.Linear -> tensors for safetensors + metadata.

    Each Linear `name` gives name.weight (int8 [out, in]), name.weight_scale (float32 [out]) and its bias; the rest
    stays float32. With tied embeddings the embedding is left out and rebuilt from lm_head's int8 rows."""
    import copy

    nnqd, qconfig, quantize_dynamic = _quantized_dynamic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = quantize_dynamic(
            as_linears(copy.deepcopy(model).float().eval()), {torch.nn.Linear: qconfig}, dtype=torch.qint8
        )
    tensors, linear_names = {}, []
    for name, module in quantized.named_modules():
        if isinstance(module, nnqd.Linear):
            weight, bias = module.weight(), module.bias()
            if bool((weight.q_per_channel_zero_points() != 0).any()):
                raise PipelineError(
                    "int8 export expects symmetric weights (zero points 0); this torch build quantized otherwise"
                )
            tensors[f"{name}.weight"] = weight.int_repr().contiguous()
            tensors[f"{name}.weight_scale"] = weight.q_per_channel_scales().float().contiguous()
            if bias is not None:
                tensors[f"{name}.bias"] = bias.detach().float().contiguous()
            linear_names.append(name)
    if not linear_names:
        raise PipelineError(f"int8 export quantizes nn.Linear / Conv1D layers and {type(model).__name__} has none")
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and "lm_head" in linear_names
    embedding_key = next(n for n, m in model.named_modules() if m is model.get_input_embeddings()) + ".weight"
    for key, value in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in linear_names or (tied and key == embedding_key):
            continue
        tensors[key] = value.detach().float().contiguous()
    metadata = {
        "format": INT8_FORMAT,
        "linears": json.dumps(linear_names),
        "embedding_from": "lm_head" if tied else "",
        "embedding_key": embedding_key,
    }
    return tensors, metadata


def save_int8(model, tokenizer, out_dir: Path) -> Path:
    """The int8 folder: config.json + tokenizer + model.int8.safetensors (written to a temp folder, then renamed)."""
    from safetensors.torch import save_file

    tensors, metadata = int8_state(model)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_file(tensors, str(tmp / INT8_WEIGHTS), metadata=metadata)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def load_int8(folder: str | Path):
    """Rebuild a model saved by save_int8: float32 model from config.json, every stored Linear replaced by a
    dynamic int8 Linear (torch.ao.nn.quantized.dynamic.Linear) holding the saved int8 weights. CPU only."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    path = folder / INT8_WEIGHTS
    if not path.is_file():
        raise PipelineError(
            f"{folder} holds no {INT8_WEIGHTS}; export it with: python -m pipeline export --formats int8"
        )
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
    if metadata.get("format") != INT8_FORMAT:
        raise PipelineError(
            f"{path} is not an int8 export of this tool (format {metadata.get('format')!r}); rerun the export"
        )
    nnqd, _, _ = _quantized_dynamic()
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32).eval()
    linears = json.loads(metadata["linears"])
    int8 = {
        name: (tensors.pop(f"{name}.weight"), tensors.pop(f"{name}.weight_scale"), tensors.pop(f"{name}.bias", None))
        for name in linears
    }
    if metadata.get("embedding_from"):
        weight, scale, _ = int8[metadata["embedding_from"]]
        tensors[metadata["embedding_key"]] = weight.float() * scale[:, None]
    missing, unexpected = model.load_state_dict(tensors, strict=False)  # the float part, before the Linears are swapped
    if unexpected or [k for k in missing if k.rsplit(".", 1)[0] not in linears]:
        raise PipelineError(
            f"{path} does not match its config.json (missing {missing[:3]}, unexpected {unexpected[:3]}); rerun the "
            "export"
        )
    for name, (weight, scale, bias) in int8.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qweight = torch.quantize_per_channel(
                weight.float() * scale[:, None],
                scale.double(),
                torch.zeros_like(scale, dtype=torch.long),
                0,
                torch.qint8,
            )
            linear = nnqd.Linear(weight.shape[1], weight.shape[0], bias_=bias is not None, dtype=torch.qint8)
            linear.set_weight_bias(qweight, bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return model


# ---------------------------------------------------------------- measurement


def next_token_logprobs(model, rows, count: int, batch_size: int) -> torch.Tensor:
    """log p(token t+1 | tokens <= t) under `model` for the first `count` rows: [count, seq_len] float64 (CPU)."""
    return evaluate({"model": model}, rows, count=count, batch_size=batch_size, keep_label_logprobs=True)["model"][
        "label_logprobs"
    ]


def files_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def export_files(export_dir: Path) -> dict[str, Path]:
    """The exported variants present in an export folder, by label."""
    found = {f"gguf-{q}": export_dir / name for q, name in GGUF_FILES.items() if (export_dir / name).is_file()}
    if (export_dir / INT8_DIR / INT8_WEIGHTS).is_file():
        found["int8"] = export_dir / INT8_DIR
    return found


def exported_variants(
    model_dir: str | Path,
    data_dir: str | Path,
    seq_len: int,
    eval_rows: int = 0,
    batch_size: int = 4,
    prompts: list[str] | None = None,
    max_new_tokens: int = 32,
    export_dir: str | Path | None = None,
) -> dict:
    """Size on disk, val perplexity, mean |delta log-prob| against the float model and CPU greedy tokens/s of the float
    model in `model_dir` and of every export in `export_dir` (default model_dir/export), on the same val rows and
    prompts.

    All on CPU (the int8 kernels are CPU kernels). GGUF files are scored after transformers dequantizes them, so their
    perplexity shows the quantization error; their speed is llama.cpp's business and is not measured (None)."""
    model_dir = Path(model_dir)
    export_dir = Path(export_dir) if export_dir else model_dir / EXPORT_DIR
    rows = TokenRows(str(data_dir), "val", seq_len)
    if len(rows) == 0:
        raise PipelineError(
            f"the val split of {data_dir} is shorter than one row of {seq_len + 1} tokens; pass a smaller --seq-len"
        )
    count = len(rows) if eval_rows == 0 else min(eval_rows, len(rows))
    tokenizer = load_tokenizer(model_dir)
    prompts = prompts if prompts is not None else val_prompts(str(data_dir), tokenizer, 3, 16)
    sample = SampleConfig(max_new_tokens=max_new_tokens, sample_temperature=0.0)
    loaders = {"float32": lambda: load_causal_lm(model_dir)}
    for label, path in export_files(export_dir).items():
        loaders[label] = (lambda p=path: load_int8(p)) if label == "int8" else (lambda p=path: load_gguf(p))
    sizes = {"float32": sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))}
    sizes.update(
        {
            label: files_size(path / INT8_WEIGHTS if label == "int8" else path)
            for label, path in export_files(export_dir).items()
        }
    )

    variants, reference = {}, None
    for label, load in loaders.items():
        model = load()
        figures = evaluate({label: model}, rows, count=count, batch_size=batch_size, keep_label_logprobs=True)[label]
        logprobs = figures["label_logprobs"]
        reference = logprobs if reference is None else reference
        speed = None
        if not label.startswith("gguf") and prompts:
            _, speed = continue_prompts(model, tokenizer, prompts, sample, torch.device("cpu"))
        variants[label] = {
            "size_bytes": sizes[label],
            "val_ppl": figures["val_ppl"],
            "mean_abs_logprob_delta": (logprobs - reference).abs().mean().item(),
            "tokens_per_s": speed,
            "path": str(export_dir / GGUF_FILES[label[5:]])
            if label.startswith("gguf")
            else str(export_dir / INT8_DIR)
            if label == "int8"
            else str(model_dir),
        }
        del model
    return {
        "variants": variants,
        "eval": {
            "rows": count,
            "seq_len": seq_len,
            "positions": count * seq_len,
            "device": "cpu",
            "threads": torch.get_num_threads(),
            "generation": f"greedy, {max_new_tokens} tokens x {len(prompts)} prompts",
        },
    }


def render_variants(figures: dict) -> str:
    """A fixed-width table of exported_variants()."""
    lines = [f"{'variant':10}{'size MB':>10}{'val ppl':>11}{'mean |dlogp|':>14}{'CPU tokens/s':>14}"]
    for label, v in figures["variants"].items():
        speed = f"{v['tokens_per_s']:.1f}" if v["tokens_per_s"] is not None else "llama.cpp"
        lines.append(
            f"{label:10}{v['size_bytes'] / 1e6:>10.2f}{v['val_ppl']:>11.3f}"
            f"{v['mean_abs_logprob_delta']:>14.2e}{speed:>14}"
        )
    return "\n".join(lines)


def read_export_report(model_dir: str | Path) -> dict | None:
    """The figures `export` measured for the model in `model_dir` ({"variants", "eval"} of its export_report.json),
    or None when it has not been exported or was retrained since (the report names other weights)."""
    path = Path(model_dir) / EXPORT_DIR / REPORT_FILE
    if not path.is_file():
        return None
    report = up_to_date(path.parent, REPORT_FILE, {"model_sha256": weights_hash(model_dir)})
    if report is None or "variants" not in report:
        print(f"compare: {path} describes other weights than {model_dir}'s (retrained since?); rerun make export")
        return None
    return {"variants": report["variants"], "eval": report["eval"]}


# ---------------------------------------------------------------- the command


def export_model(config: ExportConfig) -> dict:
    """Write the requested formats of `config.model` and (with --measure) export_report.json; returns the report."""
    check(config)
    model_dir = Path(config.model)
    model_config = read_causal_lm_config(model_dir)
    formats = config.format_list()
    if any(f in GGUF_FILES for f in formats):
        check_gguf_supported(model_config, model_dir)
    out_dir = Path(config.out_dir) if config.out_dir else model_dir / EXPORT_DIR
    targets = [out_dir / GGUF_FILES[f] for f in formats if f in GGUF_FILES] + (
        [out_dir / INT8_DIR] if "int8" in formats else []
    )
    targets += [out_dir / REPORT_FILE] if config.measure else []
    existing = [str(t) for t in targets if t.exists()]
    if existing and not config.overwrite:
        raise PipelineError(f"{existing[0]} already exists; pass --overwrite to replace it or choose another --out-dir")

    model, tokenizer = load_causal_lm(model_dir), load_tokenizer(model_dir)
    written = {}
    for fmt in formats:
        start = time.perf_counter()
        if fmt in GGUF_FILES:
            written[fmt] = write_gguf(model, tokenizer, out_dir / GGUF_FILES[fmt], fmt, model_dir.name)
        else:
            written[fmt] = save_int8(model, tokenizer, out_dir / INT8_DIR)
        print(
            f"export: wrote {written[fmt]} ({files_size(written[fmt]) / 1e6:.2f} MB, "
            f"{time.perf_counter() - start:.1f}s)"
        )
    del model

    report = {
        "model": str(model_dir),
        "model_sha256": weights_hash(model_dir),
        "files": {fmt: str(path) for fmt, path in written.items()},
    }
    if config.measure:
        run_config = read_run_config(model_dir) or {}
        train_options = run_config.get("resolved", {}).get("train", {})
        data_dir = config.data_dir or train_options.get("data_dir")
        if not data_dir or not (Path(data_dir) / "meta.json").exists():
            raise PipelineError(
                f"no tokenized data to measure on ({data_dir or 'none recorded in the run'}); pass --data-dir or "
                "--no-measure"
            )
        tokenizer = load_tokenizer(model_dir)
        if tokenizer_hash(tokenizer) != read_meta(data_dir)["tokenizer_hash"]:  # a student of another tokenizer
            data_dir = student_data_dir(data_dir, tokenizer)  # its own rows over the same text
            check_student_data(data_dir, config.data_dir or train_options.get("data_dir"))
        seq_len = config.seq_len or train_options.get("seq_len") or min(256, int(model_config.max_position_embeddings))
        report.update(
            exported_variants(
                model_dir,
                data_dir,
                seq_len,
                config.eval_rows,
                config.batch_size,
                max_new_tokens=config.max_new_tokens,
                export_dir=out_dir,
            )
        )
        report["data_dir"] = str(data_dir)
        atomic_write_json(out_dir / REPORT_FILE, report)
        print(render_variants(report))
    return report
