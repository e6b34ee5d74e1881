"""`sweep`: several students trained from one teacher cache over a grid of distill options, ranked.

The offline cache exists so that many students cost no further teacher passes; the sweep makes finding the best
recipe as cheap. Each grid point is a normal distill run (train.train: the real training step, resume points)
in `OUT_DIR/runs/NN-<point>/`, trained one after another; a killed sweep continues where it stopped (finished
runs are up to date, the interrupted one resumes). With --baseline the CE student on the same rows and steps is
trained too, as the reference of each point's perplexity ratio. Then every student is evaluated with the
evaluator of compare (evaluate.evaluate, the teacher as reference, all val rows of the cache): val perplexity,
exact KL to the teacher, top-1 agreement (students of another tokenizer than the teacher's: on their own rows, KL and
agreement at the aligned positions); and ranked by val bits per byte in OUT_DIR/sweep.json, sweep.md, and one
plot of the val-perplexity curves, curves.png.

The temperature is a property of the cache (the teacher's distribution was stored at it), so it cannot be swept
here: build a cache at another temperature (`make cache-logits TEMPERATURE=T NAME=...`) and sweep that one.
"""

from __future__ import annotations

import difflib
import itertools
import re
from pathlib import Path

import torch

from pipeline.batches import CacheRows
from pipeline.cache_format import CacheReader
from pipeline.config import StudentConfig, SweepConfig, TrainConfig, check, flag_fields, from_flags, to_flags
from pipeline.errors import PipelineError
from pipeline.evaluate import evaluate, evaluate_across_tokenizers
from pipeline.fsutil import atomic_write_bytes, atomic_write_json, folder_lock
from pipeline.models import count_parameters, load_causal_lm, load_tokenizer
from pipeline.plots import plot_val_ppl
from pipeline.rows import label_text_bytes
from pipeline.runs import read_metrics
from pipeline.student_data import built_student_rows
from pipeline.tables import markdown_table, number
from pipeline.teacher import tokenizer_hash
from pipeline.train import train

# Options a grid point may not change: they define the cache and the rows every student reads.
FIXED_BY_THE_CACHE = ("data_dir", "cache_dir", "teacher", "out_dir", "seq_len", "max_rows", "temperature")


def sweepable_options() -> dict[str, type]:
    """{option: type} of distill that a grid may set: training and student options, not the cache's."""
    options = {}
    for config_class in (TrainConfig, StudentConfig):
        for name, flag in flag_fields(config_class).items():
            if name not in FIXED_BY_THE_CACHE:
                annotation = str(flag.field.type).replace(" | None", "")
                options[name] = {"int": int, "float": float, "bool": bool}.get(annotation, str)
    return options


def _typed(name: str, value, kind: type):
    """A grid value as its option's type ("0.5" -> 0.5); "none" for an optional option."""
    if isinstance(value, str) and value.lower() in ("none", "null"):
        return None
    if kind is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise PipelineError(f"--grid {name}={value}: not a boolean; use true or false")
        return value.lower() in ("true", "1", "yes")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise PipelineError(f"--grid {name}={value}: not a {kind.__name__}") from None


def _check_option(name: str, options: dict) -> None:
    if name == "temperature":
        raise PipelineError(
            "the temperature is fixed by the cache (its distributions were stored at it); build a cache at another "
            "temperature (make cache-logits TEMPERATURE=T NAME=...) and sweep that cache"
        )
    if name.replace("-", "_") in FIXED_BY_THE_CACHE:
        raise PipelineError(f"--grid cannot change {name}: it defines the cache and the rows every student reads")
    if name not in options:
        close = difflib.get_close_matches(name, options, n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; options: {', '.join(sorted(options))}"
        raise PipelineError(f"--grid: distill has no option {name}{hint}")


def grid_points(config: SweepConfig) -> list[dict]:
    """The points of the grid, each {option: typed value}, in order: --grid-file's, then --grid's combinations."""
    options = sweepable_options()
    axes: dict[str, list] = {}
    listed: list[dict] = []
    if config.grid_file:
        path = Path(config.grid_file)
        if not path.is_file():
            raise PipelineError(f"--grid-file {path} does not exist")
        text = path.read_text()
        try:
            import yaml

            spec = yaml.safe_load(text)
        except Exception as exc:
            raise PipelineError(
                f"--grid-file {path} is not YAML or JSON ({type(exc).__name__}); see sweep --help"
            ) from exc
        if isinstance(spec, dict):
            axes.update({k: v if isinstance(v, list) else [v] for k, v in spec.items()})
        elif isinstance(spec, list) and all(isinstance(p, dict) for p in spec):
            listed = spec
        else:
            raise PipelineError(f"--grid-file {path} must hold {{option: [values]}} or a list of {{option: value}}")
    for item in config.grid.split():
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise PipelineError(f'--grid takes option=value1,value2 items separated by spaces, got "{item}"')
        axes[name.strip()] = values.split(",")
    points = [dict(p) for p in listed]
    if axes:
        names = list(axes)
        points += [dict(zip(names, combo)) for combo in itertools.product(*(axes[n] for n in names))]
    typed = []
    for point in points:
        clean = {}
        for name, value in point.items():
            name = name.replace("-", "_")
            _check_option(name, options)
            clean[name] = _typed(name, value, options[name])
        typed.append(clean)
    if not typed:
        raise PipelineError("the grid is empty; pass --grid or --grid-file with at least one value")
    return typed


def point_name(index: int, point: dict) -> str:
    """The run folder name of a point: its index and its settings, e.g. 02-alpha-0.3_lr-0.001."""
    settings = "_".join(f"{k}-{v}" for k, v in point.items()) or "defaults"
    return f"{index:02d}-" + re.sub(r"[^A-Za-z0-9._-]+", "-", settings)


def training_seconds(run_dir: Path) -> float:
    """Seconds the run spent training, from its metrics.jsonl: each record's tokens over its tokens/s (evaluation
    time excluded; correct across resumes)."""
    seconds, tokens_before = 0.0, 0
    for record in read_metrics(run_dir):
        seconds += (record["tokens_seen"] - tokens_before) / max(record["tokens_per_s"], 1e-9)
        tokens_before = record["tokens_seen"]
    return seconds


def sweep(config: SweepConfig, student_config: StudentConfig) -> dict:
    """Train every grid point (and the baseline), evaluate them all on the val split, write the ranked table."""
    check(config, student_config)
    base = config.train
    out_dir = Path(base.out_dir)
    points = grid_points(config)
    base_flags = to_flags(base)
    base_student = to_flags(student_config)
    student_names = set(base_student)

    with folder_lock(out_dir, "a sweep"):
        runs: dict[str, dict] = {}
        jobs = []
        if config.baseline:
            jobs.append(("baseline", {}, False))
        jobs += [(point_name(i, point), point, True) for i, point in enumerate(points, start=1)]
        for number, (name, point, distill) in enumerate(jobs, start=1):
            settings = ", ".join(f"{k}={v}" for k, v in point.items()) or "CE only"
            print(f"sweep: [{number}/{len(jobs)}] {name}: {settings}")
            train_flags = {**base_flags, **{k: v for k, v in point.items() if k not in student_names}}
            train_flags.update(out_dir=str(out_dir / "runs" / name), resume=True)
            student_flags = {**base_student, **{k: v for k, v in point.items() if k in student_names}}
            run_dir = train(from_flags(TrainConfig, **train_flags), from_flags(StudentConfig, **student_flags), distill)
            runs[name] = {"settings": point, "distill": distill, "path": str(run_dir)}

        figures = _evaluate_runs(base, runs)
        report = _report(config, runs, figures, base_student)
    atomic_write_json(out_dir / "sweep.json", report)
    atomic_write_bytes(out_dir / "sweep.md", render_markdown(report).encode())
    plot_val_ppl(
        {name: read_metrics(run["path"]) for name, run in runs.items()},
        out_dir / "curves.png",
        title="Held-out perplexity of the sweep's students",
        reference=tuple(name for name, run in runs.items() if not run["distill"]),
        markers=False,
        size=(8, 4.8),
        legend_fontsize=7,
    )
    print(render_markdown(report))
    print(f"sweep: wrote {out_dir / 'sweep.json'}, {out_dir / 'sweep.md'} and {out_dir / 'curves.png'}")
    return report


def _evaluate_runs(base: TrainConfig, runs: dict) -> dict:
    """The teacher and every student on the val split, with compare's evaluator: students of the teacher's tokenizer
    on all val rows of the cache (evaluate.evaluate, the teacher as reference), students of another tokenizer on
    their own rows over the same text (evaluate.evaluate_across_tokenizers). Each figure says its tokenizer."""
    val_cache = CacheReader(base.cache_dir, "val")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher_tokenizer = load_tokenizer(base.teacher)
    by_tokenizer: dict[str, list[str]] = {}  # tokenizer hash -> the runs that read it
    for name, run in runs.items():
        by_tokenizer.setdefault(tokenizer_hash(load_tokenizer(run["path"])), []).append(name)
    teacher_hash = tokenizer_hash(teacher_tokenizer)
    models = {"teacher": load_causal_lm(base.teacher).to(device)}
    models.update({name: load_causal_lm(runs[name]["path"]).to(device) for name in by_tokenizer.pop(teacher_hash, [])})
    temperature = float(val_cache.attrs["temperature"])
    figures = evaluate(
        models,
        CacheRows(val_cache),
        batch_size=base.steps.batch_size,
        reference="teacher",
        temperature=temperature,
        num_samples=int(val_cache.attrs.get("num_samples", 0)),
        desc="sweep eval",
        text_bytes=label_text_bytes(base.data_dir, "val", base.seq_len, len(val_cache), teacher_tokenizer),
    )
    for name in figures:
        figures[name]["tokenizer"] = teacher_hash
    for student_hash, names in by_tokenizer.items():
        tokenizer = load_tokenizer(runs[names[0]]["path"])
        student = built_student_rows(base.data_dir, teacher_tokenizer, tokenizer, int(val_cache.attrs["vocab_size"]))
        students = {name: load_causal_lm(runs[name]["path"]).to(device) for name in names}
        across = evaluate_across_tokenizers(
            models["teacher"],
            students,
            student.data_dir,
            base.data_dir,
            val_cache,
            student.maps,
            count=len(val_cache),
            batch_size=base.steps.batch_size,
            temperature=temperature,
        )["models"]
        for name in names:
            figures[name] = {**across[name], "tokenizer": student_hash}
            models[name] = students[name]
    for name in runs:
        figures[name]["parameters"] = count_parameters(models[name])
    return figures


def _report(config: SweepConfig, runs: dict, figures: dict, base_student: dict) -> dict:
    baseline = figures.get("baseline")
    rows = []
    for name, run in runs.items():
        f = figures[name]
        same_tokens = baseline is not None and f["tokenizer"] == baseline["tokenizer"]  # perplexities comparable
        rows.append(
            {
                "name": name,
                "settings": run["settings"],
                "distill": run["distill"],
                "val_ppl": f["val_ppl"],
                "val_bits_per_byte": f["val_bits_per_byte"],
                "ratio_to_baseline": f["val_ppl"] / baseline["val_ppl"] if same_tokens else None,
                "kl_exact": f["kl_exact"],
                "kl_to_teacher": f.get("kl_to_teacher"),
                "top1_agreement": f["top1_agreement"],
                "coverage": f.get("coverage"),
                "train_seconds": training_seconds(Path(run["path"])),
                "parameters": f["parameters"],
                "path": run["path"],
            }
        )
    rows.sort(key=lambda r: r["val_bits_per_byte"])  # the order of val perplexity among runs of one tokenizer
    base = config.train
    cache_attrs = CacheReader(base.cache_dir, "val").attrs
    return {
        "ranked": rows,
        "teacher_val_ppl": figures["teacher"]["val_ppl"],
        "eval_positions": figures["teacher"]["positions"],
        "cache": {"dir": base.cache_dir, "mode": cache_attrs["mode"], "temperature": cache_attrs["temperature"]},
        "base_options": {k: v for k, v in to_flags(base).items() if k not in ("out_dir", "resume")},
        "base_student": base_student,
        "grid": config.grid,
        "grid_file": config.grid_file,
    }


def render_markdown(report: dict) -> str:
    cache = report["cache"]
    out = [
        "# Sweep",
        "",
        f"Cache {cache['dir']} ({cache['mode']}, T={cache['temperature']}: the temperature is the cache's); "
        f"{report['eval_positions']:,} val positions; teacher val perplexity {report['teacher_val_ppl']:.2f}. "
        "Ranked by val bits per byte (the order of val perplexity among students of one tokenizer, and a scale "
        "students of different tokenizers share); ratio = val perplexity over the baseline's (CE only: the sweep's "
        "base student, same rows and steps), for students of the baseline's tokenizer.",
        "",
    ]
    cross = any(row.get("coverage") is not None for row in report["ranked"])  # students of another tokenizer
    rows = []
    for rank, row in enumerate(report["ranked"], start=1):
        settings = ", ".join(f"{k}={v}" for k, v in row["settings"].items())
        if not row["distill"]:  # the baseline: the sweep's base student
            settings = f"CE only, student_init={report['base_student']['student_init']}"
        rows.append(
            [
                str(rank),
                row["name"],
                settings,
                number(row["val_ppl"], "{:.2f}"),
                number(row.get("val_bits_per_byte"), "{:.4f}"),
                number(row["ratio_to_baseline"], "{:.3f}"),
                number(row["kl_exact"], "{:.4f}"),
                number(row["top1_agreement"], "{:.1%}"),
                *([number(row.get("coverage"), "{:.1%}")] if cross else []),
                number(row["train_seconds"], "{:.0f}"),
                f"{row['parameters']:,}",
            ]
        )
    header = [
        "rank",
        "student",
        "settings",
        "val ppl",
        "bits/byte",
        "ratio",
        "KL exact",
        "top-1 agreement",
        *(["coverage"] if cross else []),
        "train s",
        "parameters",
    ]
    out += markdown_table(header, rows, align="rll" + "r" * (len(header) - 3))
    out += ["", "![val perplexity against training tokens](curves.png)"]
    return "\n".join(out) + "\n"
