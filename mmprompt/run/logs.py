"""A CSV logger whose ``metrics.csv`` survives ``--ckpt_path last``.

Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts, so a resumed run used to
keep only the epochs after the resume. This writer keeps the earlier rows: on its first save it
drops only the training and validation rows at or after the first step the new process logs (the
part of the killed run after its last checkpoint, which the resumed run logs again), then appends
as Lightning does. Test rows are kept at any step: they are an earlier finished run's results.

Only public Lightning API: the earlier rows are read, and the file is moved aside, before Lightning's
writer is created (`open_writer`), since that writer deletes any metrics.csv it finds.
"""

from __future__ import annotations

import csv
import os
import warnings

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


def row_step(row: dict[str, str]) -> float:
    """The ``step`` of a CSV row (rows without one sort first, so they are kept)."""
    try:
        return float(row.get("step") or "-inf")
    except ValueError:
        return float("-inf")


def is_test_row(row: dict[str, str]) -> bool:
    """A row of a finished run's test: kept even at a later step, since a resumed run that fails
    (a full disk) would otherwise leave no record of the results its results.json reports."""
    return any(key.startswith("test/") and value for key, value in row.items())


class KeepEarlierRowsWriter(ExperimentWriter):
    """`ExperimentWriter` that keeps the rows an earlier process wrote before the resumed step
    (``earlier_rows``, merged in on the first save); create it with `open_writer`."""

    earlier_rows: list[dict[str, str]] | None = None

    def save(self) -> None:
        if self.earlier_rows is not None and self.metrics:
            self.write_earlier_rows(min(float(row["step"]) for row in self.metrics))
        super().save()

    def write_earlier_rows(self, first_new_step: float) -> None:
        """Rewrite metrics.csv with the earlier rows logged before ``first_new_step``; the parent's
        ``save`` then appends (or rewrites with a wider header) as usual."""
        kept = [row for row in self.earlier_rows or [] if row_step(row) < first_new_step or is_test_row(row)]
        self.earlier_rows = None
        if not kept:
            self._fs.rm_file(self.metrics_file_path)
            return
        self.metrics_keys = sorted({key for row in kept for key in row})
        with self._fs.open(self.metrics_file_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)


class KeepEarlierRowsCSVLogger(CSVLogger):
    """`CSVLogger` with `KeepEarlierRowsWriter`: a resumed run's metrics.csv holds every epoch."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = open_writer(self.log_dir)
        return self._experiment


def open_writer(log_dir: str) -> KeepEarlierRowsWriter:
    """A `KeepEarlierRowsWriter` for ``log_dir`` holding the rows of its metrics.csv. Lightning's writer
    deletes a metrics.csv it finds when it is created (warning that the folder is not empty, which a
    run folder never is): the file is renamed aside for that moment and back at once, so a process
    that dies before its first save still leaves every earlier row in metrics.csv."""
    path = os.path.join(log_dir, ExperimentWriter.NAME_METRICS_FILE)
    aside = f"{path}.earlier"
    earlier = None
    if os.path.isfile(path):
        with open(path, newline="") as handle:
            earlier = list(csv.DictReader(handle))
        os.replace(path, aside)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
            writer = KeepEarlierRowsWriter(log_dir=log_dir)
    finally:
        if earlier is not None:
            os.replace(aside, path)
    writer.earlier_rows = earlier
    return writer
