"""Reading task data rows: every field the loaders use is type-checked, and every error names file, row and field.

A row of the wrong shape (a list, a number, a string where a JSON object belongs), a string where a list belongs (which
Python would happily iterate character by character), an empty answer list or an empty split are all ``ValueError``s
that say what was found and what is expected.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """A data file that cannot be read as the task expects; the message names file, row and field."""


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


@dataclass(frozen=True)
class Row:
    """One row of a data file (or an object inside one), with typed accessors that fail with its location."""

    values: dict
    path: Path
    number: int
    where: str = ""  # the field path of a nested object, e.g. "requested_rewrite[0]."

    def error(self, name: str, problem: str) -> DataError:
        return DataError(f"{self.path}, row {self.number}: field {self.where}{name!r} {problem}")

    def _get(self, name: str):
        if self.values.get(name) is None:  # absent, JSON null, or a CSV column the row does not reach
            raise self.error(name, "is missing; every row needs it.")
        return self.values[name]

    def text(self, name: str) -> str:
        """A non-empty string (surrounding whitespace kept)."""
        value = self._get(name)
        if not isinstance(value, str):
            raise self.error(name, f"must be a string, got {_kind(value)} {value!r}.")
        if not value.strip():
            raise self.error(name, "is empty.")
        return value

    def texts(self, name: str, required: bool = True) -> list[str]:
        """A list of non-empty strings; an absent optional field is ``[]``."""
        if not required and self.values.get(name) is None:
            return []
        value = self._get(name)
        if not isinstance(value, list) or not all(isinstance(item, str) and item.strip() for item in value):
            raise self.error(name, f"must be a list of non-empty strings, got {_kind(value)} {value!r:.80}.")
        if required and not value:
            raise self.error(name, "is an empty list.")
        return value

    def child(self, name: str) -> "Row":
        """A nested JSON object."""
        value = self._get(name)
        if not isinstance(value, dict):
            raise self.error(name, f"must be a JSON object, got {_kind(value)} {value!r:.80}.")
        return Row(value, self.path, self.number, f"{self.where}{name}.")

    def first_child(self, name: str) -> "Row":
        """The first JSON object of a non-empty list of them."""
        value = self._get(name)
        if not isinstance(value, list) or not value or not isinstance(value[0], dict):
            raise self.error(name, f"must be a non-empty list of JSON objects, got {_kind(value)} {value!r:.80}.")
        return Row(value[0], self.path, self.number, f"{self.where}{name}[0].")


def _rows(numbered: list[tuple[int, object]], path: Path) -> list[Row]:
    """``(row number, value)`` pairs as Rows; a value that is not an object, or no rows at all, is an error."""
    rows = []
    for number, value in numbered:
        if not isinstance(value, dict):
            raise DataError(
                f"{path}, row {number}: expected a JSON object with the task's fields, got {_kind(value)}."
            )
        rows.append(Row(value, path, number))
    if not rows:
        raise DataError(f"{path} has no rows; an empty split cannot be trained on or evaluated.")
    return rows


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte {error.start}); re-save it as UTF-8.") from None


def read_json_rows(path: Path) -> list[Row]:
    """Rows of a ``.json`` list or a ``.jsonl`` file (numbered from 1), the failing line named on a decoding error."""
    text = _read_text(path)
    if path.suffix == ".jsonl":
        values = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    values.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}, line {number}: not valid JSON ({error.msg}).") from None
        return _rows(list(enumerate(values, start=1)), path)
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}).") from None
    if not isinstance(values, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {_kind(values)}.")
    return _rows(list(enumerate(values, start=1)), path)


def read_csv_rows(path: Path) -> list[Row]:
    """Rows of a CSV file with a header line, numbered by the line each starts on (the first row is line 2)."""
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    numbered, start = [], None
    for values in reader:
        numbered.append((start or 2, values))
        start = reader.line_num + 1  # the line after the last one read: where the next row starts
    return _rows(numbered, path)
