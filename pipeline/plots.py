"""The validation-perplexity plot of compare and sweep: one curve per training run, perplexity against tokens seen.

Low level: imports no stage. Callers pass the records of each run's metrics.jsonl (runs.read_metrics); the records
that carry a val_ppl are the curve's points.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.fsutil import atomic_path


def plot_val_ppl(
    runs: dict[str, list[dict]],
    out_path: str | Path,
    *,
    title: str,
    reference: tuple[str, ...] = (),
    markers: bool = True,
    size: tuple[float, float] = (7, 4.2),
    legend_fontsize: float | None = None,
) -> None:
    """Write a PNG of val perplexity (log scale) against training tokens seen, one line per run.

    runs: {label: metrics records}; reference: labels drawn as a dashed black line (a sweep's CE baseline);
    markers: a dot at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    for label, records in runs.items():
        points = [r for r in records if "val_ppl" in r]
        style = {"linestyle": "--", "color": "black"} if label in reference else {}
        if markers:
            style["marker"] = "o"
        ax.plot([r["tokens_seen"] for r in points], [r["val_ppl"] for r in points], label=label, **style)
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("val perplexity")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=legend_fontsize)
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
