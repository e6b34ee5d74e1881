"""Loading any causal language model (teacher, student, fine-tuned teacher, export) and its tokenizer from a
Hugging Face folder, or a hub id when online, with one-line errors that say what to pass instead."""

from __future__ import annotations

import contextlib
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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_tokenizer(path: str | Path):
    """The tokenizer of a model folder, of a tokenizer-only folder (train-tokenizer), or of a hub id when online."""
    from transformers import AutoTokenizer

    if not (Path(path).is_dir() and any((Path(path) / name).exists() for name in TOKENIZER_FILES)):
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


def input_embeddings(path: str | Path) -> torch.Tensor:
    """A causal LM's input token embeddings [rows, width] in float32. From a folder of safetensors files the one
    tensor is read alone (its name found on a weightless copy of the model), so that starting a student from a
    large teacher's embeddings does not hold the whole teacher in every process; otherwise (a hub id, *.bin
    weights, a name the files do not use) the whole model is loaded and its embeddings taken."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if files:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)))
        weight = skeleton.get_input_embeddings().weight
        name = next(n for n, p in skeleton.named_parameters() if p is weight)
        for file in files:
            with safe_open(str(file), "pt") as tensors:
                # the name as the model holds it, or without its base-model prefix ("wte.weight" in GPT-2's files)
                stored = tensors.keys()
                keys = [k for k in stored if k == name or ("." in k and name.endswith("." + k))]
                if keys:
                    return tensors.get_tensor(keys[0]).float()
    return load_causal_lm(folder).get_input_embeddings().weight.detach()


def model_vocab_size(path: str | Path) -> int:
    """The width of a model's logits (its config's vocab_size), read from its config alone."""
    from transformers import AutoConfig

    try:
        return int(AutoConfig.from_pretrained(str(path)).vocab_size)
    except Exception as exc:
        raise PipelineError(
            f"could not read the model config in {path} ({type(exc).__name__}); run make teacher"
        ) from exc


def config_from_json(values: dict | str | Path, what: str):
    """A transformers config from a config JSON file (or its parsed content), e.g. {"model_type": "gpt2", "n_layer": 4,
    ...}: (config, the keys the file gives). `what` names the source in errors ("--student-config x.json")."""
    import json

    from transformers import AutoConfig

    if not isinstance(values, dict):
        try:
            values = json.loads(Path(values).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PipelineError(f"{what} is not a readable JSON file ({exc})") from exc
    if not isinstance(values, dict) or "model_type" not in values:
        raise PipelineError(
            f"{what} has no model_type; write a transformers config.json, e.g. "
            '{"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 4, ...}'
        )
    given = dict(values)
    model_type = given.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **given), given
    except Exception as exc:
        raise PipelineError(f"{what}: transformers knows no model_type {model_type!r} ({type(exc).__name__})") from exc


def new_causal_lm(config, what: str):
    """A randomly initialised float32 causal LM of a transformers config, or one error line when the config is not
    a causal language model's."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise PipelineError(
            f"{what} describes a {config.model_type} model, which is not a causal language model (transformers has no "
            "...ForCausalLM for it); write the config of a decoder (llama, gpt2, qwen2, gemma2, ...)"
        )
    try:
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (ValueError, TypeError, RuntimeError) as exc:  # inconsistent sizes, e.g. heads not dividing the width
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise PipelineError(
            f"{what}: transformers cannot build this {config.model_type} model ({type(exc).__name__}: {first_line})"
        ) from exc


def logit_width(model) -> int:
    """Columns of the model's logits: the rows of its output head (its config's vocab_size when it has none)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


# Config fields of families whose logits are not the output head's alone (logit soft-capping, logit scaling): for
# them the head cannot be fused with anything that reads the logits.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@torch.no_grad()
def head_gives_logits(model, input_ids: torch.Tensor) -> bool:
    """Are the model's logits its output head (a Linear) applied to its base model's last hidden state, with nothing
    after it (no logit soft-capping or scaling)? Then the head can run apart from the body: the cache's chunked head,
    the trainer's fused head + loss. Checked on the config and once on the model itself, input_ids [B, L] (its first
    16 positions), in eval mode: the head's output must be the logits exactly (up to an upcast), and its input the
    base model's last hidden state. Ask before Accelerate prepares the model: its autocast wrapper runs the model's
    forward in bf16 but not the base model's, so the two would differ by rounding."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or getattr(model, "base_model", None) is model:
        return False
    config = model.config
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return False
    probe = input_ids[:1, :16]
    seen = {}
    hook = head.register_forward_hook(lambda _module, args, output: seen.update(input=args[0], output=output))
    training = model.training
    try:
        model.eval()
        logits = model(input_ids=probe, use_cache=False).logits
        hidden = model.base_model(input_ids=probe, use_cache=False).last_hidden_state
    finally:
        hook.remove()
        model.train(training)
    if "output" not in seen or not torch.equal(seen["output"].to(logits.dtype), logits):
        return False
    head_input = seen["input"].float()
    return torch.allclose(hidden.float(), head_input, rtol=1e-3, atol=1e-3 * head_input.abs().max().item())


@contextlib.contextmanager
def head_input_as_logits(model):
    """Within the block a forward of `model` skips its output head: the `.logits` it returns are the head's input,
    the final hidden states [B, L, H] (final norm applied). Yields a dict whose "dtype" is, after the forward, the
    dtype the head's logits would have had (the autocast dtype where autocast was on at the head, else the
    input's), so that a fused head + loss computes the same logits. Only for models where head_gives_logits."""
    head = model.get_output_embeddings()
    seen = {}

    def forward(hidden):
        kind = hidden.device.type
        on = torch.is_autocast_enabled(kind)
        seen["dtype"] = torch.get_autocast_dtype(kind) if on else torch.promote_types(hidden.dtype, head.weight.dtype)
        return hidden

    previous = head.__dict__.get("forward")  # a forward already set on the instance (hooks of other libraries)
    head.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's forward
    try:
        yield seen
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


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
