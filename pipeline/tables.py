"""Markdown tables: the one table formatter of the reports (bench, compare, sweep, the model cards).

Low level: imports no stage. A table is a header and rows of cells already formatted as text; `number` formats a
figure (or "-" where there is none), `cell_text` makes any text safe inside a cell.
"""

from __future__ import annotations

import math


def number(value, spec: str = "{:,.0f}") -> str:
    """`value` formatted with `spec`; "-" for None or a float that is not finite (a figure the run did not have)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return spec.format(value)


def cell_text(text) -> str:
    """Text safe inside a Markdown table cell or a one-line quote: pipes escaped, newlines as spaces."""
    return str(text).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    """The lines of a GitHub Markdown table. `align`: one letter per column, "l" (left) or "r" (right); by default
    the first column left and the others right (a label, then figures). An empty cell is written as one space."""
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"align {align!r} must give l or r for each of the {len(header)} columns")

    def line(cells) -> str:
        return "|" + "|".join(f" {cell} " if cell != "" else " " for cell in cells) + "|"

    return [line(header), "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|", *map(line, rows)]
