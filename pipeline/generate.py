"""Sampling from any checkpoint folder, and the timed generation `compare` and `export` report."""

from __future__ import annotations

import time

import numpy as np
import torch

from pipeline.config import SampleConfig, check
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.rows import load_tokens


def _generation_kwargs(config: SampleConfig, tokenizer) -> dict:
    kwargs = {
        "max_new_tokens": config.max_new_tokens,
        "min_new_tokens": config.max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    }
    if config.sample_temperature > 0:
        kwargs.update(
            do_sample=True, temperature=config.sample_temperature, top_k=config.top_k or None, top_p=config.top_p
        )
    else:
        kwargs.update(do_sample=False)
    return kwargs


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """[1, n] ids of the prompt; an empty prompt starts from the BOS (or EOS) token: an unconditional sample."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] == 0:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([[start]], dtype=torch.long)
    return ids


def val_prompts(data_dir: str, tokenizer, count: int, prompt_tokens: int) -> list[str]:
    """`count` openings of `prompt_tokens` tokens evenly spaced through the val split (empty ones dropped)."""
    tokens = load_tokens(data_dir, "val")
    prompts = []
    for i in range(count):
        start = int(len(tokens) * i / max(count, 1))
        opening = np.asarray(tokens[start : start + prompt_tokens], dtype=np.int64)
        prompts.append(tokenizer.decode(opening, skip_special_tokens=True).strip())
    return [p for p in prompts if p]


@torch.inference_mode()
def continue_prompts(
    model, tokenizer, prompts: list[str], config: SampleConfig, device=None
) -> tuple[list[str], float]:
    """Continue each prompt (one at a time, seeded per prompt). Returns (continuations, generated tokens/s);
    the first prompt is run once before timing as a warm-up."""
    device = device or next(model.parameters()).device
    kwargs = _generation_kwargs(config, tokenizer)
    encoded = [prompt_ids(tokenizer, p).to(device) for p in prompts]
    if encoded:
        model.generate(encoded[0], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
    texts, generated, elapsed = [], 0, 0.0
    for index, ids in enumerate(encoded):
        torch.manual_seed(config.seed + index)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        elapsed += time.perf_counter() - start
        new_tokens = out[0, ids.shape[1] :]
        generated += len(new_tokens)
        texts.append(tokenizer.decode(new_tokens, skip_special_tokens=True))
    return texts, generated / max(elapsed, 1e-9)


def generate(model_dir: str, prompts: list[str], config: SampleConfig) -> list[str]:
    """Print and return continuations of `prompts` by the model in `model_dir`."""
    check(config)
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir).to("cuda" if torch.cuda.is_available() else "cpu")
    texts, speed = continue_prompts(model, tokenizer, prompts, config)
    for prompt, text in zip(prompts, texts):
        print(f"--- {prompt!r}\n{prompt}{text}\n")
    print(f"({speed:.1f} tokens/s on {next(model.parameters()).device})")
    return texts
