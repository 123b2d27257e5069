"""Small pieces every analysis shares: branches and layer ranges, what prompts a model has, cross-rank
sums, test batches, output folders and tables."""

from __future__ import annotations

import csv
from contextlib import contextmanager
from itertools import chain, islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ..model.attention import AttendFn, towers_of
from ..tables import markdown_table, write_table  # re-exported: the analyses write their tables through these

LayerSpec = str | int | Sequence[int] | None
ReduceFn = Callable[[Tensor], Tensor]

def resolve_layers(layers: LayerSpec, depth: int, tower: str, option: str = "layers") -> frozenset[int]:
    """Layer indices of one tower from ``None``/"all", an int, "a:b" (half-open), "a,b,c" or a list."""
    if layers is None or layers == "all":
        return frozenset(range(depth))
    if isinstance(layers, int):
        chosen = [layers]
    elif isinstance(layers, str):
        chosen = parse_layer_string(layers, depth, option)
    else:
        chosen = [int(layer) for layer in layers]
    bad = [layer for layer in chosen if not 0 <= layer < depth]
    if not chosen or bad:
        raise ValueError(f"{option}={layers!r} is out of range: the {tower} tower has layers 0..{depth - 1}")
    return frozenset(chosen)


def parse_layer_string(text: str, depth: int, option: str) -> list[int]:
    """"3", "0:9" (start defaults to 0, stop to depth) or "0,2,5"."""
    try:
        if ":" in text:
            start, _, stop = text.partition(":")
            first, last = int(start or 0), int(stop or depth)
            if first >= last:
                raise ValueError
            return list(range(first, last))
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{option}={text!r} is not a layer range: use 'all', '3', '0:9' or '0,2,5'") from None


def text_prompts_of(adapter) -> dict[int, Tensor]:
    """{layer: (n, width)} learned text prompts; for image-conditioned context (CoCoOp), whose text
    injection needs image features, the shared part: its prompt stack ``adapter.text``."""
    if adapter.conditions_text_on_image:
        stack = getattr(adapter, "text", None)
        return stack.layer_prompts() if hasattr(stack, "layer_prompts") else {}
    return adapter.text_injection().prompts


def vision_prompts_of(adapter) -> dict[int, Tensor]:
    """{layer: (n, width)} vision prompts."""
    return adapter.vision_injection().prompts


def has_prompts(adapter, branch: str) -> bool:
    """Whether any tower in ``branch`` receives prompt tokens (CoCoOp counts: its context is a prompt)."""
    towers = towers_of(branch)
    text = "text" in towers and (adapter.conditions_text_on_image or bool(text_prompts_of(adapter)))
    return text or ("vision" in towers and bool(vision_prompts_of(adapter)))


def identity_reduce(tensor: Tensor) -> Tensor:
    return tensor


def trainer_sum(trainer) -> ReduceFn:
    """Sum over ranks through the trainer's strategy (a no-op on one device)."""
    return lambda tensor: trainer.strategy.reduce(tensor, reduce_op="sum")


def run_folder(trainer, output_dir: str | None) -> Path:
    """Where results go: the configured folder, else the run's log folder, else its root folder.

    Call it on every rank, never under ``if trainer.is_global_zero``: ``trainer.log_dir`` is a
    broadcast, and a collective reached by rank 0 alone waits forever.
    """
    folder = Path(output_dir or trainer.log_dir or trainer.default_root_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def as_loader_list(loaders) -> list[DataLoader]:
    if loaders is None:
        return []
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


def unsharded_batches(loaders) -> Iterator[dict[str, Tensor]]:
    """The test batches in order, one loader after the other, as one process sees them with any
    number of processes (a rank's loader holds only its shard)."""
    def in_order(loader) -> Iterable:
        if not isinstance(loader, DataLoader):
            return loader
        size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", 1)
        return DataLoader(loader.dataset, batch_size=size, collate_fn=loader.collate_fn,
                          num_workers=loader.num_workers)

    return chain.from_iterable(in_order(loader) for loader in as_loader_list(loaders))


def limited(batches: Iterable, limit: int | float | None) -> Iterator:
    """The first ``limit`` items (all for None or inf, as in Lightning's ``num_test_batches``)."""
    return islice(batches, None if limit is None or limit == float("inf") else int(limit))


def first_items(loader, count: int) -> dict[str, Tensor] | None:
    """The first ``count`` samples of a DataLoader's dataset, collated: the same images for any
    number of processes (a rank's batches are only its shard of the data)."""
    if count < 1 or not isinstance(loader, DataLoader):
        return None
    dataset = loader.dataset
    samples = [dataset[index] for index in range(min(count, len(dataset)))]
    return loader.collate_fn(samples) if samples else None


def fresh_loader(loader):
    """A second, independent iterator over a DataLoader's batches (same sampler, so each rank keeps its
    shard) that can run while Lightning's iterator over the original is open; other iterables as they are."""
    if not isinstance(loader, DataLoader):
        return loader
    return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn,
                      num_workers=loader.num_workers)


def batch_to(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) if isinstance(value, Tensor) else value for key, value in batch.items()}
