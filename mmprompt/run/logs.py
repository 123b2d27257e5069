"""A CSV logger whose ``metrics.csv`` survives ``--ckpt_path last``.

Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts, so a resumed run used to
keep only the epochs after the resume. This writer keeps the earlier rows: on its first save it
drops only the training and validation rows at or after the first step the new process logs (the
part of the killed run after its last checkpoint, which the resumed run logs again), then appends
as Lightning does. Test rows are kept at any step: they are an earlier finished run's results.
"""

from __future__ import annotations

import csv

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
    """`ExperimentWriter` that keeps the rows an earlier process wrote before the resumed step."""

    def _check_log_dir_exists(self) -> None:
        """Lightning deletes metrics.csv here; read it instead and merge it in on the first save."""
        self.earlier_rows: list[dict[str, str]] | None = None
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.earlier_rows = list(csv.DictReader(handle))

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
            self._experiment = KeepEarlierRowsWriter(log_dir=self.log_dir)
        return self._experiment
