"""Stage 3: evaluate the teacher, the distilled and the baseline student on the same held-out rows.

Reports, per model: val perplexity and bits per byte, KL(teacher || model) exactly over the full vocabulary (the
teacher recomputed) and as the val cache's estimate (the estimator training uses), top-1 agreement with the
teacher's argmax, parameters, size on disk and generation speed; the same figures for each run's best checkpoint
(--keep-best: best vs best beside final vs final); each student as the teacher's draft model (assisted generation:
acceptance rate, speed-up); text samples side by side; and the training curves of both runs.
Writes report.json, report.md and curves.png in `--out-dir`, and rewrites both students' model cards (README.md)
with the figures.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from pipeline.batches import CacheRows
from pipeline.cache_format import CacheReader, check_compatible
from pipeline.config import CompareConfig, SampleConfig, check
from pipeline.drafting import draft_figures
from pipeline.errors import PipelineError
from pipeline.evaluate import evaluate, evaluate_across_tokenizers
from pipeline.export import read_export_report
from pipeline.fsutil import atomic_write_bytes, atomic_write_json, read_json
from pipeline.generate import continue_prompts, prompt_ids, val_prompts
from pipeline.machine import device_name
from pipeline.modelcard import write_model_card
from pipeline.models import count_parameters, load_causal_lm, load_tokenizer
from pipeline.plots import plot_val_ppl
from pipeline.rows import label_text_bytes, read_meta
from pipeline.runs import STUDENT_RUNS, best_dir, finished_run, read_best, read_metrics
from pipeline.student_data import built_student_rows
from pipeline.tables import cell_text, markdown_table, number
from pipeline.teacher import teacher_identity

# What two runs must share to be compared; each key is read from run_config.json.
MUST_MATCH = {
    "train data (sha256)": ("inputs", "train_sha256"),
    "val data (sha256)": ("inputs", "val_sha256"),
    "tokenizer": ("inputs", "tokenizer_hash"),
    "student tokenizer": ("inputs", "student_tokenizer_hash"),
    "sequence length": ("train", "seq_len"),
    "rows used (--max-rows)": ("train", "max_rows"),
}


def read_run(run_dir: str | Path) -> dict:
    run_config = finished_run(run_dir)
    if run_config is None:
        raise PipelineError(
            f"{run_dir} holds no finished training run (run_config.json / model.safetensors missing); run make distill "
            "/ make baseline"
        )
    return run_config


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


def compare(config: CompareConfig, sample: SampleConfig, user_prompts: tuple[str, ...] = ()) -> dict:
    """Evaluate and write the report; returns the report dict."""
    check(config, sample)
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
        {
            "seq_len": seq_len,
            "tokens_sha256": meta["val_sha256"],
            "tokenizer_hash": meta["tokenizer_hash"],
            "vocab_size": int(meta["vocab_size"]),  # ids bounded by the tokenizer (older caches of padded teachers)
        },
    )
    if teacher_identity(config.teacher)["teacher_hash"] != val_cache.attrs["teacher_hash"]:  # KL needs one teacher
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
    bests = {label: read_best(models[label]) for label in ("distilled", "baseline")}
    if all(bests.values()):  # best vs best needs both runs' best checkpoints (--keep-best, the default)
        models.update({f"{label} (best)": best_dir(models[label]) for label in bests})
    loaded = {label: load_causal_lm(model_dir).to(device) for label, model_dir in models.items()}
    cross_tokenizer = distilled_run["resolved"]["inputs"].get("student_tokenizer_hash") is not None
    evaluated = {label: model for label, model in loaded.items() if not cross_tokenizer or label == "teacher"}
    results = evaluate(
        evaluated,
        CacheRows(val_cache),
        count=count,
        batch_size=config.batch_size,
        reference="teacher",
        temperature=temperature,
        num_samples=int(val_cache.attrs.get("num_samples", 0)),
        desc="eval",
        vocab_size=int(meta["vocab_size"]),
        text_bytes=label_text_bytes(config.data_dir, "val", seq_len, count, tokenizer),
    )
    student_tokenizer = tokenizer
    if cross_tokenizer:
        student_tokenizer = load_tokenizer(config.distilled)
        student = built_student_rows(config.data_dir, tokenizer, student_tokenizer, int(val_cache.attrs["vocab_size"]))
        student_eval = evaluate_across_tokenizers(
            loaded["teacher"],
            {label: model for label, model in loaded.items() if label != "teacher"},
            student.data_dir,
            config.data_dir,
            val_cache,
            student.maps,
            count=count,
            batch_size=config.batch_size,
            temperature=temperature,
        )
        student_eval["student_tokenizer"] = f"{len(student_tokenizer)} tokens"
        results.update(student_eval.pop("models"))
    best = {
        label: {**results.pop(f"{label} (best)"), "step": bests[label]["step"]}
        for label in bests
        if all(bests.values())
    }
    for label in best:
        del loaded[f"{label} (best)"]
    draft = None
    if config.draft and not cross_tokenizer:  # acceptance counts one tokenizer's tokens on both sides
        draft = draft_figures(
            loaded["teacher"],
            {label: loaded[label] for label in ("distilled", "baseline")},
            [prompt_ids(tokenizer, prompt).to(device) for prompt in prompts],
            sample.max_new_tokens,
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            tokenizer,
        )
    samples = {}
    for label, model in loaded.items():
        texts, speed = continue_prompts(
            model, tokenizer if label == "teacher" else student_tokenizer, prompts, sample, device
        )
        results[label].update(
            {
                "parameters": count_parameters(model),
                "size_bytes": size_on_disk(models[label]),
                "generate_tokens_per_s": speed,
                "path": str(models[label]),
            }
        )
        samples[label] = texts
    del loaded

    plot_val_ppl(
        {label: read_metrics(models[label]) for label in ("distilled", "baseline")},
        out_dir / "curves.png",
        title="Held-out perplexity during training",
    )
    cache_manifest = read_json(Path(config.cache_dir) / "manifest.json")
    report = {
        "models": results,
        "best": best,
        "draft": draft,
        "device": device_name(device),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "data": {key: meta[key] for key in ("corpus_name", "train_tokens", "val_tokens")},
        "eval": {
            "rows": count,
            "seq_len": seq_len,
            "positions": results["teacher"]["positions"],
            "kl_temperature": temperature,
            "cache_mode": val_cache.mode,
            **(student_eval if cross_tokenizer else {}),
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
    exports = read_export_report(config.distilled)  # `make export` ran: rows for its GGUF / int8 files
    if exports is not None:
        report["exports"] = exports
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_bytes(out_dir / "report.md", render_markdown(report).encode())
    for label, run in report["runs"].items():
        if run["resolved"]["kind"] in STUDENT_RUNS:
            write_model_card(models[label], run, comparison=report, label=label)
    print(render_table(report))
    print(f"compare: wrote {out_dir / 'report.json'}, {out_dir / 'report.md'}, {out_dir / 'curves.png'}")
    return report


ROWS = [
    ("val perplexity", "val_ppl", "{:.2f}"),
    ("val bits per byte", "val_bits_per_byte", "{:.4f}"),
    ("KL(teacher || model), nats/token", "kl_exact", "{:.4f}"),
    ("KL estimated from the val cache", "kl_to_teacher", "{:.4f}"),
    ("top-1 agreement with teacher", "top1_agreement", "{:.1%}"),
    ("parameters", "parameters", "{:,}"),
    ("size on disk (MB)", "size_bytes", "{:.1f}"),
    ("generation tokens/s", "generate_tokens_per_s", "{:.1f}"),
]


# Students with another tokenizer than the teacher's: KL and agreement are over the aligned positions, this share.
CROSS_ROWS = [("coverage (positions aligned with the teacher's)", "coverage", "{:.1%}")]

LABELS = ("teacher", "distilled", "baseline")  # the report's columns in this order (report.json's keys are sorted)
BEST_LABELS = ("distilled", "baseline")

BEST_ROWS = [
    ("val perplexity", "val_ppl", "{:.2f}"),
    ("val bits per byte", "val_bits_per_byte", "{:.4f}"),
    ("KL(teacher || model), nats/token", "kl_exact", "{:.4f}"),
    ("top-1 agreement with teacher", "top1_agreement", "{:.1%}"),
    ("step", "step", "{:,}"),
]

DRAFT_ROWS = [
    ("acceptance rate (accepted / proposed)", "acceptance_rate", "{:.1%}"),
    ("draft tokens proposed", "proposed", "{:,}"),
    ("draft tokens accepted", "accepted", "{:,}"),
    ("teacher forwards", "teacher_forwards", "{:,}"),
    ("teacher tokens/s with this draft", "tokens_per_s", "{:.1f}"),
    ("speed-up over the teacher alone", "speedup", "{:.2f}x"),
]


def _cell(fmt: str, key: str, value) -> str:
    return number(value / 1e6 if key == "size_bytes" and value is not None else value, fmt)


def _columns(report: dict) -> dict[str, dict]:
    """{column title: figures} of each table: final models; best checkpoints (teacher beside them); drafts."""
    final = {label: report["models"][label] for label in LABELS}
    best, drafts = report.get("best") or {}, (report.get("draft") or {}).get("drafts", {})
    best_columns = {"teacher": final["teacher"]} if best else {}
    best_columns.update(
        {f"{label} (step {best[label]['step']})": best[label] for label in BEST_LABELS if label in best}
    )
    return {
        "final": final,
        "best": best_columns,
        "draft": {label: drafts[label] for label in BEST_LABELS if label in drafts},
    }


def ratio_lines(report: dict) -> list[str]:
    """Distilled over baseline, final vs final and (with both best checkpoints) best vs best."""
    pairs = [("final vs final", report["models"])]
    if report.get("best"):
        pairs.append(("best vs best", report["best"]))
    lines = []
    for name, figures in pairs:
        d, b = figures["distilled"], figures["baseline"]
        ppl = d["val_ppl"] / b["val_ppl"]
        bpb = (
            f", bits per byte {d['val_bits_per_byte']:.4f} vs {b['val_bits_per_byte']:.4f}"
            if "val_bits_per_byte" in d
            else ""
        )
        lines.append(f"distilled / baseline val perplexity, {name}: {ppl:.3f}x{bpb}")
    return lines


def _text_table(columns: dict[str, dict], rows: list) -> list[str]:
    lines = [f"{'':40}" + "".join(f"{label:>22}" for label in columns)]
    for title, key, fmt in rows:
        lines.append(f"{title:40}" + "".join(f"{_cell(fmt, key, f.get(key)):>22}" for f in columns.values()))
    return lines


def final_rows(report: dict) -> list:
    """The rows of the final models' table: ROWS, and CROSS_ROWS for students with another tokenizer."""
    return ROWS + (CROSS_ROWS if report["eval"].get("student_rows") else [])


def cross_tokenizer_note(report: dict) -> str:
    """What the figures of students with another tokenizer mean ('' for students of the teacher's tokenizer)."""
    ev = report["eval"]
    if not ev.get("student_rows"):
        return ""
    return (
        f"The students read their own tokenizer ({ev['student_tokenizer']}): they are scored on their own "
        f"{ev['student_rows']} val rows over the same text, so their perplexity counts their tokens (compare bits per "
        "byte across tokenizers), and KL and agreement are over the positions where their tokenization and the "
        "teacher's end at the same byte (coverage), with the teacher's distribution carried to their vocabulary. "
        "No draft-model figures: acceptance counts one tokenizer's tokens."
    )


def render_table(report: dict) -> str:
    columns = _columns(report)
    lines = _text_table(columns["final"], final_rows(report))
    if report.get("best"):
        lines += ["", "best checkpoints:", *_text_table(columns["best"], BEST_ROWS)]
    if columns["draft"]:
        lines += [
            "",
            f"as the teacher's draft model (teacher alone: {report['draft']['teacher_tokens_per_s']:.1f} tokens/s):",
            *_text_table(columns["draft"], DRAFT_ROWS),
        ]
    return "\n".join(lines + [""] + ratio_lines(report))


def _markdown_rows(columns: dict[str, dict], rows: list) -> list[str]:
    return markdown_table(
        ["", *columns],
        [[cell_text(title), *(_cell(fmt, key, f.get(key)) for f in columns.values())] for title, key, fmt in rows],
    )


def render_markdown(report: dict) -> str:
    labels = LABELS
    columns = _columns(report)
    out = [
        "# Distillation report",
        "",
        f"Held-out rows: {report['eval']['rows']} x {report['eval']['seq_len']} tokens ({report['eval']['positions']} "
        "positions); "
        f"KL at T={report['eval']['kl_temperature']}: exact over the full vocabulary, and as estimated from the "
        f"{report['eval']['cache_mode']} val cache; device: {report['device']}.",
        "",
    ]
    if cross_tokenizer_note(report):
        out += [cross_tokenizer_note(report), ""]
    out += _markdown_rows(columns["final"], final_rows(report))
    out += ["", *ratio_lines(report)]
    if report.get("best"):
        out += [
            "",
            "## Best checkpoints",
            "",
            "Each run's model at its best val perplexity during training (`--keep-best`, evaluated every "
            "`--eval-every` steps on the first `--eval-rows` val rows), scored here on the same rows as above.",
            "",
            *_markdown_rows(columns["best"], BEST_ROWS),
        ]
    if columns["draft"]:
        draft = report["draft"]
        out += [
            "",
            "## The students as the teacher's draft model",
            "",
            "Assisted generation (transformers, greedy): the teacher continues the "
            f"{len(report['samples']['prompts'])} prompts below by {draft['new_tokens']:,} tokens in all, alone at "
            f"{draft['teacher_tokens_per_s']:.1f} tokens/s and with each final student proposing tokens it checks. "
            "The output is the teacher's own either way; a speed-up below 1 means drafting cost more than it "
            "saved on this device.",
            "",
            *_markdown_rows(columns["draft"], DRAFT_ROWS),
        ]
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
        out += [f"### Prompt {index + 1}", "", f"> {cell_text(prompt)}", ""]
        for label in labels:
            out += [f"**{label}**: {cell_text(report['samples'][label][index])}", ""]
    if "exports" in report:
        out += render_exports(report["exports"])
    return "\n".join(out) + "\n"


def render_exports(exports: dict) -> list[str]:
    """Markdown lines of the distilled student's exports, as `export` measured them (its export_report.json)."""
    ev = exports["eval"]
    out = [
        "",
        "## Exported distilled student (CPU)",
        "",
        f"As measured by `export`: {ev['rows']} val rows x {ev['seq_len']} tokens; {ev['generation']}; "
        "GGUF scored after dequantization (speed: run it in llama.cpp).",
        "",
    ]
    rows = [
        [
            label,
            f"{v['size_bytes'] / 1e6:.2f}",
            f"{v['val_ppl']:.3f}",
            f"{v['mean_abs_logprob_delta']:.2e}",
            f"{v['tokens_per_s']:.1f}" if v["tokens_per_s"] is not None else "n/a",
        ]
        for label, v in exports["variants"].items()
    ]
    header = ["variant", "size (MB)", "val perplexity", "mean abs delta log-prob", "CPU tokens/s"]
    return out + markdown_table(header, rows)
