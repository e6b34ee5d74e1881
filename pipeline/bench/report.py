"""bench.md and the terminal's tables: a bench report (the dict run_bench writes as bench.json) as Markdown.

The page is data: SECTIONS lists each section's heading and blocks, a block being a paragraph template or a Table
(its columns: a header and a cell template each; its rows: one dict of figures per row, drawn from the report). The
templates are str.format templates over a section's figures; a figure the report lacks (a report of an older
bench, e.g. docs/bench-*.json) shows as "-", and `!m` marks a target met ("ok") or missed ("MISS"). Rows follow the
variants' own order (STEP_VARIANTS, QUALITY_VARIANTS, ...), so a report read back from bench.json, whose keys are
sorted, renders as the run printed it.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Callable

from pipeline.bench.fused_head import FUSED_MODES, FUSED_WIDE_VOCAB
from pipeline.bench.probes import busy_machine
from pipeline.bench.quality import QUALITY_VARIANTS
from pipeline.bench.stage2 import LOSS_ALONE_CASES, STEP_VARIANTS
from pipeline.tables import markdown_table

CACHE_MODES = ("topk", "sampled")
STEP_PHASES = ("teacher", "forward", "loss", "backward", "optimizer")


class _Figures(string.Formatter):
    """str.format over report figures: a missing key (or index) and None or a non-finite float show as "-";
    the conversion `!m` turns a bool into ok / MISS. Counts the fields it filled and those it found missing."""

    def __init__(self):
        super().__init__()
        self.fields = self.missing = 0

    def get_field(self, field_name, args, kwargs):
        self.fields += 1
        try:
            return super().get_field(field_name, args, kwargs)
        except (KeyError, IndexError, TypeError):
            return None, field_name

    def convert_field(self, value, conversion):
        if conversion == "m":
            return None if value is None else ("ok" if value else "MISS")
        return super().convert_field(value, conversion)

    def format_field(self, value, format_spec):
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            self.missing += 1
            return "-"
        return format(value, format_spec)


def fill(template: str, figures: dict, missing: str | None = None) -> str:
    """The template with its figures; `missing`, when given, stands for the whole text where the report has none of
    the figures it names."""
    formatter = _Figures()
    text = formatter.vformat(template, (), figures)
    if missing is not None and formatter.fields and formatter.missing == formatter.fields:
        return missing
    return text


@dataclasses.dataclass(frozen=True)
class Column:
    header: str  # a template over the table's figures (e.g. the data path's worker count)
    cell: str  # a template over the row's figures
    missing: str = "-"  # the cell where the row has none of its figures


@dataclasses.dataclass(frozen=True)
class Table:
    columns: tuple[Column, ...]
    rows: Callable[[dict], list[dict]]  # the section's figures -> one dict of figures per row

    def render(self, figures: dict) -> str:
        header = [fill(c.header, figures) for c in self.columns]
        rows = [[fill(c.cell, row, c.missing) for c in self.columns] for row in self.rows(figures)]
        return "\n".join(markdown_table(header, rows))  # the first column left, the figures right


@dataclasses.dataclass(frozen=True)
class Text:
    template: str
    when: str | None = None  # a figure that must be truthy for the paragraph to appear


@dataclasses.dataclass(frozen=True)
class Section:
    key: str | None  # the report's key it renders, left out where that is empty (stage2 of a --teacher-shape run)
    heading: str | None  # a template; None (with key None): the page's opening paragraphs, always there
    figures: Callable[[dict], dict]  # the report -> what the templates read
    blocks: tuple[Text | Table, ...]


def _ordered(section: dict, order) -> list[str]:
    """The keys of `section` in the variants' order, any others after them."""
    return [key for key in order if key in section] + sorted(key for key in section if key not in order)


# ---------------------------------------------------------------- the page's opening: machine, command, models


def _machine_figures(report: dict) -> dict:
    m, r = report["machine"], report["resolved"]
    return {
        "m": m,
        "r": r,
        "o": report["options"],
        "command": report["command"],
        "features": ", ".join(m.get("cpu_features") or []) or "unknown",
        "gpu": f", GPU {m['gpu']}" if m["gpu"] else "",
        "busy": busy_machine(m),
        "teacher": f"{r['teacher']} " if r.get("teacher") else "",
        "teacher_millions": r["teacher_parameters"] / 1e6,
        "head_rows": r.get("teacher_vocab_size", r["vocab_size"]),
        "student": f", student {r['student_parameters'] / 1e6:.1f}M" if r.get("student_parameters") else "",
    }


OPENING = Section(
    None,
    None,
    _machine_figures,
    (
        Text(
            "Machine: {m[cpu]} ({m[cpu_cores]} cores, {m[torch_threads]} torch threads; CPU features {features}){gpu}; "
            "torch {m[torch]}, transformers {m[transformers]}; {m[date]}; load average {m[load_average_start][0]:.2f} "
            "at start.\nCommand: `{command}`"
        ),
        Text(
            "**Warning: other processes shared the CPU (load average {m[load_average_start][0]:.1f} at start, "
            "{m[load_average_end][0]:.1f} at the end, this run's own threads: {m[torch_threads]}, cores: "
            "{m[cpu_cores]}), so these timings, ratios included, are unreliable: rerun on an idle machine.**",
            when="busy",
        ),
        Text(
            "Teacher {teacher}({teacher_millions:.1f}M parameters, output head {head_rows:,} rows){student}, "
            "vocabulary {r[vocab_size]:,}; device {r[device]}, mixed precision {r[mixed_precision]}; batch "
            "{r[batch_size]} rows x {o[seq_len]} tokens."
        ),
    ),
)

# ---------------------------------------------------------------- stage 1


def _stage1_figures(report: dict) -> dict:
    s1, r, o = report["stage1"], report["resolved"], report["options"]
    teacher_dtype = s1.get("teacher_dtype", s1.get("autocast"))  # older reports: the teacher's autocast dtype
    rows = []
    fastest = s1[s1.get("fastest_forward", "forward")]["median_s"]
    for key, path in (
        ("forward", f"teacher forward, {teacher_dtype}"),
        ("forward_float32", "teacher forward, float32"),
    ):
        if key in s1:
            rows.append({"path": path, **s1[key], "vs_fastest": fastest / s1[key]["median_s"]})
    for mode, path in (
        ("topk", f"cache-logits topk K={o['k']}"),
        ("sampled", f"cache-logits sampled N={o['num_samples']}"),
    ):
        rows.append({"path": path, **s1[mode], "vs_fastest": s1[mode]["ratio_to_forward"]})
    per_batch = "; ".join(
        fill(
            "{mode}: teacher body {x[body_ms_per_batch]:.1f}, output head + extraction "
            "{x[head_extract_ms_per_batch]:.1f}, part write {x[write_ms_per_batch]:.1f} (on the writer thread; "
            "{x[write_wait_ms_per_batch]:.1f} waited for at the end)",
            {"mode": mode, "x": s1[mode]},
        )
        for mode in CACHE_MODES
    )
    peak_memory = None
    if "memory" in s1["forward"]:
        peak_memory = "; ".join(
            fill(
                "{key} {x[peak_mb]:,.0f} (+{x[increase_mb]:,.0f} over its start)", {"key": key, "x": s1[key]["memory"]}
            )
            for key in ("forward", *CACHE_MODES)
        )
    mfu = s1.get("mfu")
    mfu_cells = None
    if mfu:
        mfu_cells = ", ".join(
            fill("{key} {tflops:.1f} TFLOP/s", {"key": key, "tflops": mfu[key + "_tflops"]})
            + (f" = {mfu[key + '_mfu']:.1%} MFU" if mfu.get(key + "_mfu") else "")
            for key in ("forward", *CACHE_MODES)
        )
    return {
        "s1": s1,
        "rows": rows,
        "teacher_dtype": teacher_dtype,
        "per_batch": per_batch,
        "peak_memory": peak_memory,
        "dense_mb": r["batch_size"] * o["seq_len"] * r.get("teacher_vocab_size", r["vocab_size"]) * 4 / 2**20,
        "mfu": mfu,
        "mfu_cells": mfu_cells,
        "peak_tflops": ((mfu or {}).get("peak_bf16_flops") or 0) / 1e12,
    }


STAGE1 = Section(
    "stage1",
    "Stage 1: teacher forward vs cache-logits ({s1[rows]} rows, {s1[tokens_per_pass]:,} tokens per pass, median of "
    "{s1[repeats]} interleaved passes; the cache's teacher in {teacher_dtype}, measured against the fastest plain "
    "forward)",
    _stage1_figures,
    (
        Table(
            (
                Column("path", "{path}"),
                Column("tokens/s", "{tokens_per_s:,.0f}"),
                Column("vs fastest forward", "{vs_fastest:.3f}"),
                Column("target", ">= {target_ratio} {meets_target!m}", missing=""),
                Column("bytes/token", "{bytes_per_token:.1f}"),
                Column("storage", "{dense_over_cache:.0f}x smaller than dense fp16 ({dense_fp16_bytes_per_token:,} B)"),
            ),
            lambda figures: figures["rows"],
        ),
        Text("Per batch, ms: forward alone {s1[forward][ms_per_batch]:.1f}; {per_batch}."),
        Text(
            "Peak memory of one pass ({s1[memory_method]}), MB: {peak_memory}. A float32 [tokens, vocab] tensor of one "
            "batch is {dense_mb:,.0f} MB.",
            when="peak_memory",
        ),
        Text(
            "Model FLOPs utilisation on {mfu[device]} (peak {peak_tflops:.0f} TFLOP/s dense bf16; target >= "
            "{mfu[target]:.0%}): {mfu_cells}.",
            when="mfu",
        ),
    ),
)

# ---------------------------------------------------------------- stage 2 and the loss alone


def _stage2_figures(report: dict) -> dict:
    s2 = report["stage2"]
    ratios, variants = s2["ratios"], s2["variants"]
    rows = []
    for key in _ordered(variants, STEP_VARIANTS):
        v = variants[key]
        row = {**v, "vs_ce": v["step_ms"] / variants["ce"]["step_ms"]}
        if key in STEP_VARIANTS and STEP_VARIANTS[key].offline_kd:
            target = ratios["target_step_time_ratio"]
            row.update(target_ratio=target, meets_target=row["vs_ce"] <= target)
        rows.append(row)
    alone = s2["loss_alone"]
    loss_rows = [{"loss": key, **alone[key]} for key in LOSS_ALONE_CASES if key in alone]
    return {"s2": s2, "q": ratios, "la": alone, "rows": rows, "loss_rows": loss_rows}


STAGE2 = Section(
    "stage2",
    "Stage 2: training step ({s2[tokens_per_step]:,} tokens per step, median of {s2[rounds]} interleaved rounds)",
    _stage2_figures,
    (
        Table(
            (
                Column("step", "{label}"),
                Column("tokens/s", "{tokens_per_s:,.0f}"),
                Column("step ms", "{step_ms:.1f}"),
                Column("step time vs (a)", "{vs_ce:.3f}"),
                Column("target", "<= {target_ratio} {meets_target!m}", missing=""),
                *(Column(f"{phase} ms", f"{{{phase}_ms:.1f}}") for phase in STEP_PHASES),
            ),
            lambda figures: figures["rows"],
        ),
        Text(
            "Speed-up over online KD: (a) CE {q[ce_over_online_speed]:.2f}x, (b) topk KD "
            "{q[topk_over_online_speed]:.2f}x, (c) sampled KD {q[sampled_over_online_speed]:.2f}x."
        ),
        Text(
            "The loss alone on {la[positions]:,} positions x {la[vocab]:,} ({la[logits_dtype]} logits), forward + "
            "backward, ms:"
        ),
        Table(
            (
                Column("loss", "{loss}"),
                Column("forward", "{forward_ms:.1f}"),
                Column("backward", "{backward_ms:.1f}"),
                Column("total", "{total_ms:.1f}"),
            ),
            lambda figures: figures["loss_rows"],
        ),
    ),
)

# ---------------------------------------------------------------- data path, memory


DATA = Section(
    "data",
    "Data path: CacheRows + StepBatches + collate_rows through a DataLoader",
    lambda report: {"d": report["data"], "workers": report["data"]["topk"]["num_workers"]},
    (
        Table(
            (
                Column("cache", "{mode}"),
                Column("rows/s (DataLoader, {workers} worker(s))", "{rows_per_s_workers:,.0f}"),
                Column("rows/s (in process)", "{rows_per_s_in_process:,.0f}"),
                Column("rows/s a step consumes", "{step_rows_per_s:,.1f}"),
                Column("headroom", "{headroom:.0f}x"),
            ),
            lambda figures: [{"mode": mode, **figures["d"][mode]} for mode in _ordered(figures["d"], CACHE_MODES)],
        ),
    ),
)

MEMORY = Section(
    "memory",
    "Memory of one step ({mem[method]})",
    lambda report: {"mem": report["memory"]},
    (
        Text(
            "A float32 [tokens, vocab] tensor here is {mem[float32_full_vocab_mb]:.0f} MB. 'Saved by the loss' counts "
            "the [tokens, vocab] tensors autograd keeps from the loss call to the backward (saved-tensor hook)."
        ),
        Table(
            (
                Column("step", "{label}"),
                Column("peak MB", "{peak_mb:,.0f}"),
                Column("increase over step start MB", "{increase_mb:,.0f}"),
                Column("full-vocab float32 saved by loss", "{loss_full_vocab_float32_saved}"),
                Column("all full-vocab saved (dtypes)", "{loss_full_vocab_saved} ({dtypes})"),
                Column("loss saved MB", "{loss_saved_mb:,.0f}"),
            ),
            lambda figures: [
                {**v, "dtypes": ", ".join(v.get("loss_full_vocab_dtypes") or []) or "-"}
                for v in map(figures["mem"]["variants"].get, _ordered(figures["mem"]["variants"], STEP_VARIANTS))
            ],
        ),
    ),
)

# ---------------------------------------------------------------- fused output head


def _fused_figures(report: dict) -> dict:
    fused = report["fused_head"]
    heads = sorted(fused["heads"], key=lambda rows: (int(rows) == FUSED_WIDE_VOCAB, int(rows)))  # the wide one last
    variant_order = [f"{mode}_{kind}" for mode in FUSED_MODES for kind in ("fused", "unfused")]
    rows = [
        {**v, "head_rows": int(head), "step": f"{v['mode']} {'fused' if v['fused'] else 'unfused'}"}
        for head in heads
        for v in map(fused["heads"][head]["variants"].get, _ordered(fused["heads"][head]["variants"], variant_order))
    ]
    wide = fused["heads"].get(str(FUSED_WIDE_VOCAB), {})
    memory = wide.get("memory_ratio", {})
    ratios = ", ".join(
        fill("{mode} {ratio:.0%}", {"mode": k, "ratio": memory[k]}) for k in _ordered(memory, FUSED_MODES)
    )
    times = "; ".join(
        f"{int(head):,} rows: "
        + ", ".join(
            fill("{mode} {ratio:.2f}", {"mode": k, "ratio": section["fused_over_unfused_ce_step_time"][k]})
            for k in _ordered(section["fused_over_unfused_ce_step_time"], FUSED_MODES)
        )
        for head, section in ((head, fused["heads"][head]) for head in heads)
        if "fused_over_unfused_ce_step_time" in section
    )
    t = fused["targets"]
    return {
        "fused": fused,
        "rows": rows,
        "wide": FUSED_WIDE_VOCAB,
        "ratios": ratios or "-",
        "times": times or "-",
        "t": t,
        "none_saved": t["fused_full_vocab_saved"] == 0,
    }


FUSED_HEAD = Section(
    "fused_head",
    "Output head fused with the loss vs unfused ({fused[tokens_per_step]:,} tokens a step, {fused[rounds]} "
    "interleaved rounds; memory: {fused[memory_method]})",
    _fused_figures,
    (
        Text(
            "Memory is the step's peak over its start (the model and optimizer state already there), at the bench "
            "batch and at twice it; the largest batch is where the line through them reaches "
            "{fused[memory_budget_mb]:,} MB. 'Saved' counts [tokens, vocab] tensors autograd keeps for the backward."
        ),
        Table(
            (
                Column("head rows", "{head_rows:,}"),
                Column("step", "{step}"),
                Column("tokens/s", "{tokens_per_s:,.0f}"),
                Column("step ms", "{step_ms:,.0f}"),
                Column("memory +MB", "{increase_mb:,.0f}"),
                Column("+MB at 2x batch", "{increase_mb_2x:,.0f}"),
                Column("saved", "{full_vocab_saved}"),
                Column("largest batch", "{largest_batch:,.0f}"),
            ),
            lambda figures: figures["rows"],
        ),
        Text(
            "At {wide:,} rows: fused memory increase over unfused {ratios} (target <= {t[memory_ratio_target]:.0%}) "
            "{t[memory_meets_target]!m}. Fused step time over the unfused CE step, {times} (target <= 1) "
            "{t[fused_not_slower]!m}. [tokens, vocab] tensors saved by the fused steps: {t[fused_full_vocab_saved]} "
            "{none_saved!m}."
        ),
    ),
)

# ---------------------------------------------------------------- quality

QUALITY = Section(
    "quality",
    "Quality at equal budget ({qual[steps]} steps x {qual[batch_size]} rows, {qual[train_rows]} train rows; "
    "{qual[eval_rows]} val rows, {qual[eval_positions]:,} positions; teacher val ppl {qual[teacher_val_ppl]:.2f})",
    lambda report: {"qual": report["quality"]},
    (
        Table(
            (
                Column("student", "{label}"),
                Column("val ppl", "{val_ppl:.2f}"),
                Column("KL exact (full vocab)", "{kl_exact:.4f}"),
                Column("KL (cache estimator)", "{kl_cache:.4f}"),
                Column("top-1 agreement", "{top1_agreement:.1%}"),
                Column("train tokens/s", "{train_tokens_per_s:,.0f}"),
            ),
            lambda figures: [
                figures["qual"]["variants"][key] for key in _ordered(figures["qual"]["variants"], QUALITY_VARIANTS)
            ],
        ),
    ),
)

# ---------------------------------------------------------------- cross-tokenizer step

CROSS_TOKENIZER = Section(
    "cross_tokenizer",
    "Cross-tokenizer distill step against the same-tokenizer one",
    lambda report: {"x": report["cross_tokenizer"]},
    (
        Text(
            "The same student shape and caches; the cross-tokenizer student reads its own rows (a byte-level BPE of "
            "{x[student_vocab]:,} tokens trained on the train text), aligned with the teacher's by bytes, its targets "
            "carried to its vocabulary (AlignedCacheRows) and the loss's teacher_mask. Each step is timed from reading "
            "its rows to the optimizer step (medians, the two students alternating). Target: at most 1.10x."
        ),
        Table(
            (
                Column("cache", "{mode}"),
                Column("same tokenizer ms/step", "{same_ms:,.1f}"),
                Column("cross-tokenizer ms/step", "{cross_ms:,.1f}"),
                Column("ratio", "{ratio:.3f}x"),
                Column("rows read ms (same / cross)", "{same_rows_ms:,.1f} / {cross_rows_ms:,.1f}"),
                Column("coverage", "{coverage:.1%}"),
            ),
            lambda figures: [{"mode": mode, **figures["x"][mode]} for mode in CACHE_MODES if mode in figures["x"]],
        ),
    ),
)

SECTIONS = (OPENING, STAGE1, STAGE2, DATA, MEMORY, FUSED_HEAD, CROSS_TOKENIZER, QUALITY)


def render_markdown(report: dict, title: str = "Benchmark", level: int = 1) -> str:
    """The report as Markdown: a `level` heading `title`, then each section of SECTIONS the report holds (one level
    down). A --teacher-shape report (stage 1 alone) stops after stage 1."""
    blocks = [f"{'#' * level} {title}"]
    for section in SECTIONS:
        if section.key is not None and not report.get(section.key):
            continue
        figures = section.figures(report)
        if section.heading is not None:
            blocks.append(f"{'#' * (level + 1)} {fill(section.heading, figures)}")
        for block in section.blocks:
            if isinstance(block, Table):
                blocks.append(block.render(figures))
            elif block.when is None or figures.get(block.when):
                blocks.append(fill(block.template, figures))
    return "\n\n".join(blocks) + "\n"
