"""Every JSON file and table the package writes, written one way.

Files go through `mmprompt.files.write_text_atomic` (a reader sees the old file or the whole new
one, and the file gets the modes of the user's umask). Tables are lists of records (dicts; the
columns are the union of their keys in first-seen order) written as CSV and GitHub Markdown.
Torch-free, so ``mmprompt report`` and the data package use it as freely as the analysis callbacks.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from .files import write_text_atomic

Record = Mapping[str, Any]


def write_json_atomic(path: Path, data: Any, indent: int | None = None) -> None:
    """``data`` as JSON (ending in a newline) at ``path``, atomically and honouring the umask."""
    write_text_atomic(Path(path), json.dumps(data, indent=indent) + "\n")


def write_markdown(path: Path, text: str) -> None:
    """A Markdown file, atomically (see `write_json_atomic`)."""
    write_text_atomic(Path(path), text)


def record_columns(records: Sequence[Record]) -> list[str]:
    """The union of the records' keys in first-seen order: rows may leave columns out."""
    return list(dict.fromkeys(key for record in records for key in record))


def format_cell(value: Any) -> str:
    """Floats with 4 decimals, None as an empty cell, anything else as ``str``."""
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def escape_cell(text: str) -> str:
    """A cell that may hold "|" without ending itself."""
    return text.replace("|", "\\|")


def markdown_grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table of already formatted cells."""
    lines = ["| " + " | ".join(map(escape_cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(escape_cell, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown_table(records: Sequence[Record]) -> str:
    """A GitHub Markdown table of ``records`` (cells formatted by `format_cell`)."""
    columns = record_columns(records)
    return markdown_grid(columns, [[format_cell(record.get(column)) for column in columns] for record in records])


def csv_text(records: Sequence[Record], columns: Sequence[str] | None = None) -> str:
    """``records`` as CSV (missing cells empty); ``columns`` fixes the header, else `record_columns`."""
    handle = io.StringIO(newline="")
    writer = csv.DictWriter(handle, fieldnames=list(columns or record_columns(records)), restval="")
    writer.writeheader()
    writer.writerows(records)
    return handle.getvalue()


def write_csv(path: Path, records: Sequence[Record], columns: Sequence[str] | None = None) -> None:
    """``records`` as a CSV file, atomically (see `csv_text` and `write_json_atomic`)."""
    write_text_atomic(Path(path), csv_text(records, columns))


def write_table(records: Sequence[Record], stem: Path) -> tuple[Path, Path]:
    """``records`` as ``<stem>.csv`` and ``<stem>.md``; returns both paths."""
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    write_csv(csv_path, records)
    write_markdown(md_path, markdown_table(records))
    return csv_path, md_path
