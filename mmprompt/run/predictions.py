"""`PredictionWriter`: ``mmprompt predict`` writes one CSV per class set into the run folder.

Each row is one image: its path (relative to the dataset folder), the true label and class when the
split has them, the predicted class and the top-k classes with their probabilities. Under DDP every
rank predicts a share of the images; the rows are gathered on rank 0 (a collective every rank
calls), de-duplicated by image index (a padding sampler repeats a few) and written in dataset order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from torch import Tensor

from ..tables import write_csv
from .inference import top_k_predictions

PREDICTIONS_PATTERN = "predictions_{name}.csv"
Row = dict[str, Any]


def prediction_rows(output: dict[str, Tensor], batch: dict[str, Tensor], items: Sequence[Any],
                    classnames: tuple[str, ...], top_k: int) -> list[Row]:
    """One row per image of a predict batch; ``items`` are the dataset's items (``.path``) by index."""
    ranked = top_k_predictions(output["probability"], classnames, top_k)
    rows = []
    for i, (index, prediction) in enumerate(zip(batch["index"].tolist(), ranked)):
        row: Row = {"index": index, "path": str(items[index].path)}
        if "label" in batch:  # a dataset's split; the user's own images (--images) have no labels
            label = int(batch["label"][i])
            row.update(label=label, label_name=classnames[label] if 0 <= label < len(classnames) else "")
        row["prediction"] = classnames[int(output["prediction"][i])]
        for rank, (name, probability) in enumerate(zip(prediction.labels, prediction.probabilities), start=1):
            row[f"top{rank}"] = name
            row[f"top{rank}_prob"] = round(probability, 6)
        rows.append(row)
    return rows


def gather_rows(rows: list[Row]) -> list[Row]:
    """Every rank's rows on every rank (a collective: call it on all ranks), one per image index."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list[list[Row] | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, rows)
        rows = [row for part in parts for row in part or []]
    return sorted({row["index"]: row for row in rows}.values(), key=lambda row: row["index"])


def write_rows(path: Path, rows: list[Row]) -> None:
    """CSV written next to the target and renamed, so a reader never sees half a file."""
    write_csv(path, rows, None if rows else ["index", "path"])


class PredictionWriter(L.Callback):
    """Writes ``predictions_<class set>.csv`` (base, new, all, ...) into ``out_dir`` after predict.

    Args:
        out_dir: the folder of the CSV files (the CLI passes the run folder).
        top_k: how many ranked classes (and probabilities) each row keeps.
    """

    def __init__(self, out_dir: str | Path, top_k: int = 5) -> None:
        self.out_dir, self.top_k = Path(out_dir), top_k
        self.rows: dict[int, list[Row]] = {}
        #: the files of the last predict run (rank 0 only)
        self.written: list[Path] = []

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows, self.written = {}, []

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        loaders = trainer.predict_dataloaders
        dataset = (loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders).dataset
        classes = pl_module.class_sets("predict")[dataloader_idx]
        self.rows.setdefault(dataloader_idx, []).extend(
            prediction_rows(outputs, batch, dataset.items, classes.classnames, self.top_k))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for index, classes in enumerate(pl_module.class_sets("predict")):
            rows = gather_rows(self.rows.get(index, []))  # every rank, before the rank-0 branch
            if trainer.is_global_zero:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                path = self.out_dir / PREDICTIONS_PATTERN.format(name=classes.name)
                write_rows(path, rows)
                self.written.append(path)
