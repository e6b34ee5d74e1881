"""Stage 3: evaluate the teacher, the distilled and the baseline student on the same held-out rows.

Reports, per model: val perplexity, KL(teacher || model) exactly over the full vocabulary (the teacher
recomputed) and as the val cache's estimate (the estimator training uses), top-1 agreement with the
teacher's argmax, parameters, size on disk and generation speed; text samples side by side; and the
training curves of both runs.
Writes report.json, report.md and curves.png in `--out-dir`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.batches import collate_rows, loss_targets
from pipeline.cache_format import CacheReader, check_compatible
from pipeline.config import CompareConfig, SampleConfig, raise_problems
from pipeline.data import load_tokens, read_meta
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_path, atomic_write_bytes, atomic_write_json, read_json
from pipeline.generate import continue_prompts
from pipeline.losses import hard_ce, sampled_divergence, topk_divergence
from pipeline.machine import device_name
from pipeline.student import count_parameters
from pipeline.teacher import load_teacher, load_tokenizer, teacher_identity

# What two runs must share to be compared; each key is read from run_config.json.
MUST_MATCH = {
    "train data (sha256)": ("inputs", "train_sha256"),
    "val data (sha256)": ("inputs", "val_sha256"),
    "tokenizer": ("inputs", "tokenizer_hash"),
    "sequence length": ("train", "seq_len"),
    "rows used (--max-rows)": ("train", "max_rows"),
}


def read_run(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "run_config.json"
    if not path.exists() or not (Path(run_dir) / "model.safetensors").exists():
        raise PipelineError(
            f"{run_dir} holds no finished training run (run_config.json / model.safetensors missing); run make distill "
            "/ make baseline"
        )
    return read_json(path)


def check_same_setup(distilled: dict, baseline: dict) -> None:
    """Refuse runs that used different data, sequence length or tokenizer, naming each difference."""
    differences = []
    for label, (section, key) in MUST_MATCH.items():
        a, b = distilled["resolved"][section].get(key), baseline["resolved"][section].get(key)
        if a != b:
            differences.append(f"{label}: distilled {a!r} vs baseline {b!r}")
    if differences:
        raise PipelineError(
            "the two runs cannot be compared: " + "; ".join(differences) + "; retrain one with the other's settings"
        )


def size_on_disk(model_dir: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def _cache_kl(
    flat: torch.Tensor, targets: dict, mask: torch.Tensor, num_samples: int, temperature: float
) -> torch.Tensor:
    """KL(teacher || model) as the val cache estimates it: the estimator training uses."""
    if "topk_ids" in targets:
        return topk_divergence(
            flat, targets["topk_ids"], targets["topk_logprobs"], targets["tail_logprob"], mask, temperature
        )
    return sampled_divergence(
        flat,
        targets["sample_ids"],
        targets["sample_counts"],
        num_samples,
        targets["teacher_entropy"],
        mask,
        temperature,
    )


@torch.no_grad()
def evaluate_models(
    teacher, students: dict, val_cache: CacheReader, count: int, batch_size: int, temperature: float, desc: str = "eval"
) -> dict[str, dict]:
    """{"teacher": figures, **{key: figures}} over the first `count` val rows, each model running once per batch.
    Per model: val perplexity, KL(teacher_T || model_T) exact over the full vocabulary ("kl_exact") and as the
    cache estimates it ("kl_to_teacher"), and top-1 agreement with the teacher's argmax. All models on one device."""
    models = {"teacher": teacher, **students}
    for model in models.values():
        model.eval()
    device = next(teacher.parameters()).device
    num_samples = int(val_cache.attrs.get("num_samples", 0))
    sums = {label: {"ce": 0.0, "kl_cache": 0.0, "kl_exact": 0.0, "agree": 0} for label in models}
    positions = 0
    for start in tqdm(range(0, count, batch_size), desc=desc, unit="batch", leave=False):
        batch = collate_rows([val_cache.row(i) for i in range(start, min(count, start + batch_size))])
        tokens = batch["tokens"].to(device)
        labels = tokens[:, 1:].reshape(-1)
        mask = torch.ones_like(labels, dtype=torch.bool)
        targets = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in loss_targets(batch, num_samples).items()}
        n = labels.numel()
        teacher_logp = teacher_p = teacher_argmax = None
        for label, model in models.items():  # the teacher first: its distribution is every student's reference
            flat = model(input_ids=tokens[:, :-1]).logits.float().reshape(n, -1)
            log_q = torch.log_softmax(flat / temperature, dim=-1)
            argmax = flat.argmax(-1)
            if teacher_logp is None:
                teacher_logp, teacher_p, teacher_argmax = log_q, log_q.exp(), argmax
            figures = sums[label]
            figures["ce"] += hard_ce(flat, labels, mask).item() * n
            figures["kl_cache"] += _cache_kl(flat, targets, mask, num_samples, temperature).item() * n
            figures["kl_exact"] += float((teacher_p * (teacher_logp - log_q)).sum())
            figures["agree"] += int((argmax == teacher_argmax).sum())
        positions += n
    results = {}
    for label, figures in sums.items():
        ce = figures["ce"] / positions
        results[label] = {
            "val_ce": ce,
            "val_ppl": math.exp(min(ce, 50.0)),
            "kl_exact": figures["kl_exact"] / positions,
            "kl_to_teacher": figures["kl_cache"] / positions,
            "top1_agreement": figures["agree"] / positions,
            "positions": positions,
        }
    return results


def val_prompts(data_dir: str, tokenizer, count: int, prompt_tokens: int) -> list[str]:
    """`count` openings evenly spaced through the val split, each starting after an EOS when one is near."""
    tokens = load_tokens(data_dir, "val")
    prompts = []
    for i in range(count):
        start = int(len(tokens) * i / max(count, 1))
        prompts.append(
            tokenizer.decode(
                np.asarray(tokens[start : start + prompt_tokens], dtype=np.int64), skip_special_tokens=True
            ).strip()
        )
    return [p for p in prompts if p]


def plot_curves(runs: dict[str, Path], out_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, run_dir in runs.items():
        records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "val_ppl" in r]
        ax.plot([r["tokens_seen"] for r in records], [r["val_ppl"] for r in records], marker="o", label=label)
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("val perplexity")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("Held-out perplexity during training")
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def read_jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def compare(config: CompareConfig, sample: SampleConfig, user_prompts: tuple[str, ...] = ()) -> dict:
    """Evaluate and write the report; returns the report dict."""
    raise_problems(config.validate() + sample.validate())
    out_dir = Path(config.out_dir)
    distilled_run, baseline_run = read_run(config.distilled), read_run(config.baseline)
    check_same_setup(distilled_run, baseline_run)
    meta = read_meta(config.data_dir)
    seq_len = distilled_run["resolved"]["train"]["seq_len"]
    if distilled_run["resolved"]["inputs"]["val_sha256"] != meta["val_sha256"]:
        raise PipelineError(f"the runs were trained on other data than {config.data_dir}; pass the matching --data-dir")
    val_cache = CacheReader(config.cache_dir, "val")
    check_compatible(
        val_cache.attrs,
        {"seq_len": seq_len, "tokens_sha256": meta["val_sha256"], "tokenizer_hash": meta["tokenizer_hash"]},
    )
    if (
        teacher_identity(config.teacher)["teacher_hash"] != val_cache.attrs["teacher_hash"]
    ):  # KL and agreement must refer to one teacher
        raise PipelineError(
            f"the cache {config.cache_dir} was built by another teacher than {config.teacher}; "
            f"pass the cache's teacher with --teacher or rebuild the cache (make cache-logits TEACHER={config.teacher})"
        )
    temperature = float(val_cache.attrs["temperature"])
    count = len(val_cache) if config.eval_rows == 0 else min(config.eval_rows, len(val_cache))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(config.teacher)
    prompts = val_prompts(config.data_dir, tokenizer, config.num_prompts, config.prompt_tokens) + list(user_prompts)
    models = {"teacher": config.teacher, "distilled": config.distilled, "baseline": config.baseline}
    loaded = {label: load_teacher(model_dir).to(device) for label, model_dir in models.items()}
    teacher = loaded.pop("teacher")
    results = evaluate_models(teacher, loaded, val_cache, count, config.batch_size, temperature)
    samples = {}
    for label, model in {"teacher": teacher, **loaded}.items():
        texts, speed = continue_prompts(model, tokenizer, prompts, sample, device)
        results[label].update(
            {
                "parameters": count_parameters(model),
                "size_bytes": size_on_disk(models[label]),
                "generate_tokens_per_s": speed,
                "path": str(models[label]),
            }
        )
        samples[label] = texts
    del teacher, loaded

    plot_curves({"distilled": Path(config.distilled), "baseline": Path(config.baseline)}, out_dir / "curves.png")
    cache_manifest = read_json(Path(config.cache_dir) / "manifest.json")
    report = {
        "models": results,
        "device": device_name(device),
        "eval": {
            "rows": count,
            "seq_len": seq_len,
            "positions": results["teacher"]["positions"],
            "kl_temperature": temperature,
            "cache_mode": val_cache.mode,
        },
        "samples": {"prompts": prompts, **samples, "settings": dataclasses.asdict(sample)},
        "runs": {"distilled": distilled_run, "baseline": baseline_run},
        "hashes": {
            "train_sha256": meta["train_sha256"],
            "val_sha256": meta["val_sha256"],
            "tokenizer_hash": meta["tokenizer_hash"],
            "cache_shards": sorted(s["sha256"] for s in cache_manifest["shards"]),
        },
    }
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_bytes(out_dir / "report.md", render_markdown(report).encode())
    print(render_table(report))
    print(f"compare: wrote {out_dir / 'report.json'}, {out_dir / 'report.md'}, {out_dir / 'curves.png'}")
    from pipeline.export import EXPORT_DIR, add_export_rows, export_files

    if export_files(
        Path(config.distilled) / EXPORT_DIR
    ):  # `make export` ran: rows for its GGUF / int8 files (report["exports"])
        add_export_rows(report, config)
    return report


ROWS = [
    ("val perplexity", "val_ppl", "{:.2f}"),
    ("KL(teacher || model), nats/token", "kl_exact", "{:.4f}"),
    ("KL estimated from the val cache", "kl_to_teacher", "{:.4f}"),
    ("top-1 agreement with teacher", "top1_agreement", "{:.1%}"),
    ("parameters", "parameters", "{:,}"),
    ("size on disk (MB)", "size_bytes", "{:.1f}"),
    ("generation tokens/s", "generate_tokens_per_s", "{:.1f}"),
]


def _cell(fmt: str, key: str, value) -> str:
    return fmt.format(value / 1e6 if key == "size_bytes" else value)


def render_table(report: dict) -> str:
    labels = list(report["models"])
    lines = [f"{'':34}" + "".join(f"{label:>14}" for label in labels)]
    for title, key, fmt in ROWS:
        lines.append(
            f"{title:34}" + "".join(f"{_cell(fmt, key, report['models'][label][key]):>14}" for label in labels)
        )
    return "\n".join(lines)


def _md_cell(text: str) -> str:
    """Text safe inside a Markdown table cell or a one-line quote: pipes escaped, newlines as spaces."""
    return str(text).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def render_markdown(report: dict) -> str:
    labels = list(report["models"])
    out = [
        "# Distillation report",
        "",
        f"Held-out rows: {report['eval']['rows']} x {report['eval']['seq_len']} tokens ({report['eval']['positions']} "
        "positions); "
        f"KL at T={report['eval']['kl_temperature']}: exact over the full vocabulary, and as estimated from the "
        f"{report['eval']['cache_mode']} val cache; device: {report['device']}.",
        "",
        "| | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for title, key, fmt in ROWS:
        out.append(
            f"| {_md_cell(title)} | "
            + " | ".join(_cell(fmt, key, report["models"][label][key]) for label in labels)
            + " |"
        )
    out += [
        "",
        "![validation perplexity against training tokens](curves.png)",
        "",
        "## Samples",
        "",
        f"Settings: {report['samples']['settings']}",
        "",
    ]
    for index, prompt in enumerate(report["samples"]["prompts"]):
        out += [f"### Prompt {index + 1}", "", f"> {_md_cell(prompt)}", ""]
        for label in labels:
            out += [f"**{label}**: {_md_cell(report['samples'][label][index])}", ""]
    return "\n".join(out) + "\n"
