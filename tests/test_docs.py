"""docs/benchmarks.md is generated: the committed page is what `make docs` writes from the committed docs/bench-*.json,
and `python -m pipeline docs` writes it, or (--check) refuses a stale one with one error line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import run_cli

from pipeline.bench.docs import GENERATED_LINE, render_page
from pipeline.bench.report import render_markdown
from pipeline.docs import RESULTS_GENERATED_LINE, render_results_page

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _reports() -> dict:
    return {path.name: json.loads(path.read_text()) for path in sorted(DOCS.glob("bench-*.json"))}


def test_committed_benchmarks_page_is_what_make_docs_writes():
    reports = _reports()
    assert reports, "docs/ holds no bench-*.json"
    page = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    assert page.splitlines()[0] == GENERATED_LINE and "`make docs`" in GENERATED_LINE
    assert page == render_page(reports), "docs/benchmarks.md is stale: run make docs"
    for name, report in reports.items():  # one dated section per report, naming its machine, by bench's renderer
        heading = next(line for line in page.splitlines() if line.startswith(f"## {Path(name).stem}: "))
        assert (
            report["machine"]["date"][:10] in heading
            and (report["machine"]["gpu"] or report["machine"]["cpu"]) in heading
        )
        assert render_markdown(report, title=heading[3:], level=2) in page


def test_docs_command_writes_the_page_and_check_refuses_a_stale_one(tmp_path):
    name = "bench-cpu-xeon.json"
    shutil.copy(DOCS / name, tmp_path / name)
    stale = run_cli("docs", "--docs-dir", tmp_path, "--check")
    assert stale.returncode == 2 and stale.stderr.strip().splitlines()[-1].startswith("error:")
    assert "make docs" in stale.stderr
    run_cli("docs", "--docs-dir", tmp_path, check=True)
    page = (tmp_path / "benchmarks.md").read_text()
    assert page == render_page({name: json.loads((DOCS / name).read_text())})
    assert run_cli("docs", "--docs-dir", tmp_path, "--check").returncode == 0


def test_committed_results_page_is_what_make_docs_writes():
    reports = {path.name: json.loads(path.read_text()) for path in sorted(DOCS.glob("compare-*.json"))}
    assert reports, "docs/ holds no compare-*.json"
    page = (DOCS / "results.md").read_text(encoding="utf-8")
    assert page.splitlines()[0] == RESULTS_GENERATED_LINE
    assert page == render_results_page(reports, {p.name for p in DOCS.glob("compare-*.png")}), "run make docs"
    for name, report in reports.items():  # the index row's ratio is the report's own figures
        ratio = report["models"]["distilled"]["val_ppl"] / report["models"]["baseline"]["val_ppl"]
        row = next(line for line in page.splitlines() if line.startswith(f"| [{Path(name).stem}]"))
        assert f"{ratio:.3f}x" in row
        assert f"{report['models']['distilled']['val_ppl']:.2f}" in page
