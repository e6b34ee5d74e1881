"""How the gain from distillation changes with the corpus: docs/corpus-size.png from the compare reports kept in docs/
of the embedded corpus's three slices (SERIES: Hamlet, four tragedies, every work), against train tokens:

    left:  distilled / baseline val perplexity, best vs best and final vs final
    right: val bits per byte of the teacher and of each student's best checkpoint

    .venv/bin/python docs/corpus_size.py      (docs/history.md, "2026-12-06: the gain against corpus size")
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

docs = Path(__file__).resolve().parent
SERIES = ("compare-default-xeon.json", "compare-tragedies-xeon.json", "compare-all-xeon.json")  # one recipe, 3 sizes
reports = sorted((json.loads((docs / name).read_text()) for name in SERIES), key=lambda r: r["data"]["train_tokens"])
tokens = [r["data"]["train_tokens"] for r in reports]
names = [r["data"]["corpus_name"].removeprefix("shakespeare-") for r in reports]

fig, (ratio_ax, bpb_ax) = plt.subplots(1, 2, figsize=(10, 4))
for title, ratio in (
    ("best vs best", lambda r: r["best"]["distilled"]["val_ppl"] / r["best"]["baseline"]["val_ppl"]),
    ("final vs final", lambda r: r["models"]["distilled"]["val_ppl"] / r["models"]["baseline"]["val_ppl"]),
):
    ratio_ax.plot(tokens, [ratio(r) for r in reports], marker="o", label=title)
ratio_ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
ratio_ax.set_ylabel("distilled / baseline val perplexity")
for label, figures in (
    ("teacher", lambda r: r["models"]["teacher"]),
    ("distilled (best)", lambda r: r["best"]["distilled"]),
    ("baseline (best)", lambda r: r["best"]["baseline"]),
):
    bpb_ax.plot(tokens, [figures(r)["val_bits_per_byte"] for r in reports], marker="o", label=label)
bpb_ax.set_ylabel("val bits per byte")
for ax in (ratio_ax, bpb_ax):
    ax.set_xscale("log")
    ax.set_xlabel("train tokens (" + ", ".join(names) + ")")
    ax.grid(True, alpha=0.3)
    ax.legend()
fig.suptitle("Distillation's gain against corpus size (embedded corpus, same student)")
fig.tight_layout()
fig.savefig(docs / "corpus-size.png", dpi=110)
print(f"wrote {docs / 'corpus-size.png'} from {len(reports)} reports")
