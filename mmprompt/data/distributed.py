"""How data is split over processes: every evaluation image counted once, the recipe's batch kept.

Lightning's default ``DistributedSampler`` pads validation/test/predict sets with duplicated images
to a multiple of the world size, so a metric on N processes counts some images twice. Evaluation
loaders here carry an ``UnrepeatedDistributedSampler`` instead (rank r reads images r, r+W, r+2W, …;
shards differ by at most one image); torchmetrics and the analysis callbacks sum exact counts across
ranks. Lightning leaves a loader alone when its sampler already is a ``DistributedSampler``.

``data.batch_size`` is the global training batch: each of W processes takes ``batch_size / W``, so
a recipe (batch 4, its learning rate and its number of steps) is the same on one device or many.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset


def world_of(trainer: Any) -> tuple[int, int]:
    """``(world_size, global_rank)`` of the trainer running this datamodule; ``(1, 0)`` without one."""
    if trainer is None:
        return 1, 0
    return int(getattr(trainer, "world_size", 1)), int(getattr(trainer, "global_rank", 0))


def per_device_batch(batch_size: int, world_size: int) -> int:
    """The share of the global ``data.batch_size`` one process takes; refuses what doesn't divide."""
    if batch_size % world_size:
        divisors = [n for n in range(1, batch_size + 1) if batch_size % n == 0]
        raise ValueError(
            f"data.batch_size={batch_size} is the global batch and must divide evenly over the {world_size} "
            f"processes (trainer.devices × trainer.num_nodes); use a number of devices in {divisors} or a "
            f"batch_size that is a multiple of {world_size}"
        )
    return batch_size // world_size


def unrepeated_sampler(dataset: Dataset, world_size: int, rank: int, split: str) -> UnrepeatedDistributedSampler | None:
    """This rank's shard of an evaluation set without padding duplicates; None on one process."""
    if world_size <= 1:
        return None
    size = len(dataset)  # type: ignore[arg-type]
    if 0 < size < world_size:
        raise ValueError(
            f"the {split} set has {size} images, fewer than the {world_size} processes: every process needs "
            f"at least one; evaluate on at most {size} devices (e.g. --trainer.devices 1)"
        )
    return UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
