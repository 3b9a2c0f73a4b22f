"""Markdown tables and number formatting for every report renderer (report.md's sections,
crv-sweep-summary): one table writer and one interval formatter, so that the stages'
sections read alike."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def format_value(value: Any) -> str:
    """A report value as a table cell: floats to 4 significant digits, float lists to 3."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, float) for v in value):
        return "[" + ", ".join(f"{v:.3g}" for v in value) + "]"
    return str(value)


def escape_cell(text: str) -> str:
    """Text that may hold `|` or newlines, safe inside one Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", "\\n")


def interval(
    value: float | None, ci: Sequence[float | None] | None, *, fmt: str = ".3f", scale: float = 1.0
) -> str:
    """`value [low, high]` in format `fmt` after multiplying by `scale` (100: percentage
    points); "n/a" without a value, the value alone without a complete interval."""
    if value is None:
        return "n/a"
    text = f"{scale * value:{fmt}}"
    if ci and None not in ci:
        text += f" [{scale * ci[0]:{fmt}}, {scale * ci[1]:{fmt}}]"
    return text


def markdown_rows(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Cells already formatted as text, under `header`, as a Markdown table (an empty
    cell is a single space)."""
    lines = ["|" + "|".join(f" {c} " if c else " " for c in r) + "|" for r in [header, *rows]]
    lines.insert(1, "|" + "---|" * len(header))
    return "\n".join(lines) + "\n"


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts as a Markdown table; columns default to the first row's keys."""
    if not rows:
        return "_(no rows)_\n"
    columns = list(columns or rows[0].keys())
    return markdown_rows(columns, [[format_value(row.get(c, "")) for c in columns] for row in rows])


def scalar_rows(section: dict[str, Any]) -> list[dict[str, Any]]:
    """The scalar entries of a report section (and its two-number intervals) as
    `metric` / `value` rows."""
    return [
        {"metric": k, "value": v}
        for k, v in section.items()
        if isinstance(v, (int, float, str)) or (isinstance(v, list) and len(v) == 2)
    ]
