"""Markdown tables for the run summaries, search trials, model cards and benchmark reports."""

from __future__ import annotations

from typing import Iterable


def markdown_table(header: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    """A GitHub-flavoured table: one header row, a separator, one line per row (cells already formatted)."""
    header = [str(cell) for cell in header]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
