"""Loading any causal language model (teacher, student, fine-tuned teacher, export) and its tokenizer from a
Hugging Face folder, or a hub id when online, with one-line errors that say what to pass instead."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import PipelineError


def check_model_folder(path: str | Path) -> None:
    """Refuse a folder without config.json or weights, and a local path that does not exist (a hub id passes)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise PipelineError(
                f"{path} is not a model folder (no config.json); run `make teacher` or pass a Hugging Face model folder"
            )
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise PipelineError(
                f"{path} has a config.json but no weights (*.safetensors); the folder is incomplete: rebuild it "
                "(make teacher, or rerun the training that wrote it)"
            )
    elif not path.exists() and (str(path).startswith((".", "/")) or str(path).count("/") != 1):
        raise PipelineError(f"model folder {path} does not exist; run `make teacher` first or pass a model folder")


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    check_model_folder(path)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise PipelineError(
            f"could not load a tokenizer from {path} ({type(exc).__name__}); run `make teacher` or pass a model folder "
            "with tokenizer files"
        ) from exc


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32):
    """A causal LM from a folder (or a hub id when online), in eval mode."""
    from transformers import AutoModelForCausalLM

    check_model_folder(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except Exception as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise PipelineError(
            f"could not load a causal language model from {path} ({type(exc).__name__}: {first_line})"
        ) from exc
    return model.eval()


def model_vocab_size(path: str | Path) -> int:
    """The width of a model's logits (its config's vocab_size), read from its config alone."""
    from transformers import AutoConfig

    try:
        return int(AutoConfig.from_pretrained(str(path)).vocab_size)
    except Exception as exc:
        raise PipelineError(
            f"could not read the model config in {path} ({type(exc).__name__}); run make teacher"
        ) from exc


def count_parameters(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def generation_config_for(model, tokenizer):
    """The model's generation config with the tokenizer's special tokens, so that generate() stops at EOS and pads
    with a known id (EOS when the tokenizer has no pad token) instead of warning; other settings are kept."""
    import copy

    config = copy.deepcopy(model.generation_config)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return config
