"""The model card of a student folder: README.md in the Hugging Face Hub's format (YAML metadata between `---`
lines, then Markdown) saying what the student learned from, how it was trained, how good it is and how to load it.

Rendered from the folder's run_config.json alone (train.save_final writes the card with the model), and again by
`compare` with its report, which adds the held-out perplexity and the exact KL to the teacher for both students.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.fsutil import atomic_write_bytes
from pipeline.runs import read_run_config
from pipeline.tables import markdown_table, number

CARD_FILE = "README.md"
DISTILLED_TAGS = ["distillation", "knowledge-distillation", "distill-pipeline"]
# The baseline learned from labels only: it is not tagged as distilled, so a Hub search for distilled models
# does not list it.
BASELINE_TAGS = ["distill-pipeline", "distillation-baseline"]
LICENSE_LINE = "# license: set one before publishing (the terms of the teacher and of the corpus apply to this model)\n"


def _targets(kind: str, train: dict, cache: dict | None, temperature: float) -> str:
    if kind != "distill" or cache is None:
        return "hard labels only (cross-entropy); no teacher targets"
    if cache["mode"] == "sampled":
        return f"sampled cache: {cache['num_samples']} draws per position from the teacher at T = {temperature:g}"
    tail = "renormalised over the stored ids" if train.get("topk_renormalize") else "plus the tail mass as one bucket"
    return f"top-k cache: the teacher's {cache['k']} most likely ids per position at T = {temperature:g}, {tail}"


def _student(student: dict) -> str:
    if student.get("student"):
        return f"started from {student['student']}"
    shape = f"{student['n_layer']} layers"
    if student.get("student_init") == "teacher-layers":
        return f"{shape} copied from the teacher (every n-th block, its embeddings and final norm)"
    embeddings = (
        ", token embeddings initialised from the teacher's (projected on their principal directions)"
        if student.get("student_init") == "teacher-embeddings"
        else ""
    )
    if student.get("student_config"):
        return f"new model from {student['student_config']}{embeddings}"
    return (
        f"new Llama decoder: {shape}, width {student['n_embd']}, {student['n_head']} heads ({student['n_kv_head']} "
        f"key/value), MLP {student['mlp_size']}, tied embeddings{embeddings}"
    )


def _tokenizer(resolved: dict) -> str:
    """The student's tokenizer: the teacher's, or its own (cross-tokenizer distillation)."""
    if not resolved["inputs"].get("student_tokenizer_hash"):
        return "the teacher's"
    return (
        "its own (this folder's), not the teacher's: trained on the same text, its positions aligned with the "
        "teacher's by byte offsets and the teacher's distributions carried to its vocabulary (cross-tokenizer)"
    )


def _comparison_lines(comparison: dict, label: str) -> list[str]:
    """Rows of compare's report for the teacher and both students, this one marked."""
    models, ev = comparison["models"], comparison["eval"]
    labels = [name for name in ("teacher", "distilled", "baseline") if name in models]
    header = [f"{name} (this model)" if name == label else name for name in labels]
    rows = [
        ("val perplexity", "val_ppl", "{:.2f}"),
        ("val bits per byte (does not depend on the tokenizer)", "val_bits_per_byte", "{:.4f}"),
        ("KL(teacher ‖ model), exact over the vocabulary, nats/token", "kl_exact", "{:.4f}"),
        ("top-1 agreement with the teacher", "top1_agreement", "{:.1%}"),
    ]
    if ev.get("student_rows"):  # students of another tokenizer: KL and agreement at the aligned positions
        rows.append(("positions aligned with the teacher's (KL and agreement are over them)", "coverage", "{:.1%}"))
    out = [
        f"Measured by `compare` on {ev['rows']} held-out rows x {ev['seq_len']} tokens of the corpus's val split "
        f"({ev['positions']:,} positions; KL at T = {ev['kl_temperature']:g}), on {comparison.get('device', 'n/a')}:",
        "",
    ]
    return out + markdown_table(
        ["", *header], [[title, *(number(models[name].get(key), fmt) for name in labels)] for title, key, fmt in rows]
    )


def render_model_card(run_config: dict, model_path: str, comparison: dict | None = None, label: str = "") -> str:
    """The card text of the student whose run_config.json is `run_config`; `comparison` is compare's report and
    `label` this student's name in it (distilled / baseline)."""
    import yaml

    resolved, provenance = run_config["resolved"], run_config.get("provenance", {})
    kind, train, student = resolved["kind"], resolved["train"], resolved["student"]
    teacher, corpus = provenance.get("teacher_name", "n/a"), provenance.get("corpus_name", "n/a")
    temperature = float(resolved.get("temperature", 1.0))
    final = run_config.get("final", {})
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": DISTILLED_TAGS if kind == "distill" else BASELINE_TAGS,
        "teacher": teacher,
        "corpus": corpus,
    }
    name = Path(model_path).name
    millions = run_config["parameters"] / 1e6
    if kind == "distill":
        summary = f"A {millions:.1f}M-parameter causal language model distilled from **{teacher}** on {corpus}"
        loss = (
            f"alpha * CE + (1 - alpha) * T^2 * {train['kd_loss']}(teacher_T ‖ student_T), alpha = {train['alpha']:g}, "
            f"T = {temperature:g}"
        )
    else:
        summary = (
            f"A {millions:.1f}M-parameter causal language model trained with cross-entropy only on {corpus}: the "
            f"baseline that a student distilled from **{teacher}** is compared with (same rows, order and steps)"
        )
        loss = "cross-entropy on the next token"
    tokens_per_step = f"{train['batch_size']} x {train['seq_len']} tokens"
    if train["grad_accum"] > 1:
        tokens_per_step += f" x {train['grad_accum']} micro-batches"
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).rstrip("\n"),
        LICENSE_LINE.rstrip("\n"),
        "---",
        "",
        f"# {name}",
        "",
        f"{summary}, with distill-pipeline (offline knowledge distillation: the teacher ran once over the corpus and "
        "its sparse next-token distributions were cached on disk).",
        "",
        "## Training",
        "",
        *markdown_table(
            ["", ""],
            [
                ["teacher", teacher],
                ["corpus", corpus],
                ["targets", _targets(kind, train, provenance.get("cache"), temperature)],
                ["loss", loss],
                ["student", _student(student)],
                ["tokenizer", _tokenizer(resolved)],
                [
                    "steps",
                    f"{train['max_steps']} optimizer steps of {tokens_per_step} per process, seed {train['seed']}",
                ],
                ["tokens seen", f"{final.get('tokens_seen', 0):,}"],
                [
                    "optimizer",
                    f"AdamW, peak lr {train['lr']:g}, {train['warmup_steps']} warmup steps, cosine decay to "
                    f"{train['min_lr_ratio']:g} x, weight decay {train['weight_decay']:g}, gradient clip "
                    f"{train['grad_clip']:g}, mixed precision {train['mixed_precision']}",
                ],
            ],
            align="ll",
        ),
        "",
        "## Evaluation",
        "",
    ]
    if comparison is not None:
        lines += _comparison_lines(comparison, label)
    elif "val_ppl" in final:
        rows = f"the first {train['eval_rows']} val rows" if train["eval_rows"] else "every val row"
        lines += [
            f"Val perplexity at the end of training: {final['val_ppl']:.2f} ({rows} x {train['seq_len']} tokens of "
            "the corpus's held-out split). `python -m pipeline compare` adds the exact KL to the teacher here.",
        ]
    best = run_config.get("best")
    if best is not None:
        lines += [
            "",
            f"The run's best checkpoint (val perplexity {best['val_ppl']:.2f} at step {best['step']:,} of "
            f"{train['max_steps']:,}, on the same val rows) is kept beside this final model in `best/`.",
        ]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'path = "{model_path}"  # this folder, or its Hub id once pushed',
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "model = AutoModelForCausalLM.from_pretrained(path)",
        'inputs = tokenizer("Once upon a time", return_tensors="pt")',
        "output = model.generate(**inputs, max_new_tokens=40, do_sample=True, top_p=0.95)",
        "print(tokenizer.decode(output[0], skip_special_tokens=True))",
        "```",
        "",
        "generation_config.json holds the tokenizer's end-of-text and padding ids: generation stops at the end of "
        "text.",
        "",
        "## Reproducing",
        "",
        f"`python -m pipeline {kind} --config {Path(model_path) / 'config.yaml'}` retrains this model from the same "
        "data and cache (config.yaml in this folder holds every option of the run).",
    ]
    return "\n".join(lines) + "\n"


def write_model_card(run_dir: str | Path, run_config: dict | None = None, comparison: dict | None = None, label=""):
    """Write run_dir/README.md (atomically) from its run_config.json (or `run_config`) and compare's report."""
    run_dir = Path(run_dir)
    run_config = run_config if run_config is not None else read_run_config(run_dir)
    text = render_model_card(run_config, str(run_dir), comparison, label)
    atomic_write_bytes(run_dir / CARD_FILE, text.encode())
