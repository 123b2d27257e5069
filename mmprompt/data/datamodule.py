"""`FewShotDataModule`: any registered dataset (or ``custom``) under the CoOp protocol.

Its ``__init__`` signature is the ``data:`` section of the YAML config. Every rank derives the same
splits from the files alone (sorted listings, seeded sampling); ``prepare_data`` does the one-time
work (synthetic generation, few-shot cache) and ``setup`` only reads.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

import lightning as L
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch.utils.data import DataLoader

from .catalog import Catalog, Item, require_files
from .check import refuse_catalog_problems
from .custom import resolve_spec
from .dataset import ItemDataset
from .distributed import per_device_batch, unrepeated_sampler, world_of
from .fewshot import SUBSAMPLES, cache_path, check_shots, class_subset, load_fewshot, relabel
from ..classes import ClassSet
from .registry import DatasetSpec, ensemble_templates
from .transforms import TRAIN_SCALE, build_transform, check_crop_scale

SubsampleName = Literal["all", "base", "new"]


def dataset_label(dataset: str, split_file: str | None) -> str:
    """``dataset`` as given, except ``custom``: the split file's folder name (``my_images/split.json`` -> my_images)."""
    if dataset.lower() == "custom" and split_file:
        return Path(split_file).absolute().parent.name or "custom"
    return dataset


class FewShotDataModule(L.LightningDataModule):
    """Few-shot / base-to-novel / cross-dataset data for prompt learning (docs/datasets.md)."""

    def __init__(
        self,
        dataset: str = "synthetic",
        root: str = "data",
        shots: int | None = 16,
        seed: int = 1,
        subsample: SubsampleName = "all",
        test_subsamples: list[SubsampleName] | None = None,
        batch_size: int = 4,
        eval_batch_size: int = 100,
        num_workers: int = 0,
        image_size: int = 224,
        mean: tuple[float, float, float] = OPENAI_DATASET_MEAN,
        std: tuple[float, float, float] = OPENAI_DATASET_STD,
        with_masks: bool = True,
        crop_scale: tuple[float, float] = TRAIN_SCALE,
        template: str | None = None,
        split_file: str | None = None,
        image_dir: str | None = None,
        mask_dir: str | None = None,
        name: str | None = None,
    ) -> None:
        """
        Args:
            dataset: Registered name (e.g. ``OxfordPets``, ``eurosat``, ``ImageNetR``, ``synthetic``) or ``custom``.
            root: Data root holding one folder per dataset (``<root>/oxford_pets``, ...).
            shots: Training images per class (K); ``-1`` or ``null`` for all. Val gets min(K, 4) per class.
            seed: Seed of the few-shot draw (CoOp reports seeds 1, 2, 3).
            subsample: Classes to train and validate on: ``all``, ``base`` (first ⌈n/2⌉ sorted labels) or ``new``.
            test_subsamples: One test dataloader per entry; default ``[base, new]`` when subsample is base, else ``[subsample]``.
            batch_size: Training batch size, global: each of W processes takes ``batch_size / W`` (must divide).
            eval_batch_size: Validation/test/predict batch size per process (it does not change results).
            num_workers: DataLoader worker processes.
            image_size: Side of the square model input.
            mean: Normalisation mean (CLIP's by default).
            std: Normalisation std (CLIP's by default).
            with_masks: Load foreground masks where the dataset has them (batch ``mask``/``has_mask``).
            crop_scale: Area range of the training RandomResizedCrop; CoOp's (0.08, 1) suits large photos
                of one object, small images with small objects need a larger lower bound.
            template: Override the dataset's zero-shot template (must contain ``{}``).
            split_file: ``custom`` only: JSON split ``{"train"|"val"|"test": [[path, label, classname], ...]}``.
            image_dir: ``custom`` only: folder the split paths are relative to (default: the split file's folder).
            mask_dir: ``custom`` only: folder of masks at the same relative paths (non-zero = foreground).
            name: Dataset label in run names, results.json and reports; default the registered name, or
                for ``custom`` the split file's folder name, so two custom datasets never share a label.
        """
        super().__init__()
        self.save_hyperparameters()
        self.spec: DatasetSpec = resolve_spec(dataset, split_file, image_dir, mask_dir, template)
        if self.spec.name != "custom" and Path(root).exists() and not Path(root).is_dir():
            raise NotADirectoryError(f"--data.root {root} is a file; expected the data root folder, which holds one "
                                     f"folder per dataset ({self.spec.dataset_dir(root)} for {self.spec.name})")
        self.root, self.shots, self.seed = root, check_shots(shots), seed
        self.subsample = subsample
        self.test_subsamples = list(test_subsamples or (["base", "new"] if subsample == "base" else [subsample]))
        for entry in [subsample, *self.test_subsamples]:
            if entry not in SUBSAMPLES:
                raise ValueError(f"subsample / test_subsamples entries must be one of {SUBSAMPLES}; got {entry!r}")
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.image_size, self.mean, self.std, self.with_masks = image_size, tuple(mean), tuple(std), with_masks
        self.crop_scale = check_crop_scale(crop_scale)
        self.datasets: dict[str, list[ItemDataset]] = {}
        #: the dataset's label in run names, results.json and reports
        self.name = name or dataset_label(dataset, split_file)

    # -- what the model asks -------------------------------------------------------------------

    @cached_property
    def catalog(self) -> Catalog:
        """The parsed split listing (synthetic data is generated first if absent)."""
        if self.spec.generate is not None:
            self.spec.generate(self.root)
        return self.spec.read_catalog(self.root)

    def class_set(self, subsample: str) -> ClassSet:
        """Class names of ``subsample`` in relabelled order, with the dataset's templates."""
        names = tuple(self.catalog.classnames[i] for i in class_subset(len(self.catalog.classnames), subsample))
        return ClassSet(subsample, names, self.spec.template, ensemble_templates())

    @property
    def train_classes(self) -> ClassSet:
        return self.class_set(self.subsample)

    def eval_classes(self, stage: str) -> list[ClassSet]:
        """One ClassSet per dataloader of ``stage`` ("validate"/"fit" or "test"/"predict")."""
        return [self.class_set(s) for s in self.eval_subsamples(stage)]

    def eval_subsamples(self, stage: str) -> list[str]:
        if stage in ("validate", "val", "fit"):
            return [self.subsample]
        if stage in ("test", "predict"):
            return self.test_subsamples
        raise ValueError(f"unknown stage {stage!r}; expected 'validate' or 'test'")

    # -- Lightning hooks -----------------------------------------------------------------------

    def fewshot(self, write: bool = True) -> dict[str, list[Item]]:
        """The few-shot train/val items (all classes, original labels), cached as JSON."""
        if self.spec.test_only:
            raise ValueError(
                f"dataset {self.spec.name!r} is test-only (it has only a test split); train on another "
                "dataset and evaluate on it with `mmprompt test`"
            )
        path = cache_path(self.spec.fewshot_cache_dir(self.root), self.shots, self.seed, self.spec.cache_prefix)
        return load_fewshot(self.catalog, self.shots, self.seed, path, write=write)

    def prepare_data(self) -> None:
        """One process per node: generate synthetic data and write the few-shot cache."""
        if not self.spec.test_only:
            self.fewshot(write=True)
        else:
            _ = self.catalog

    def setup(self, stage: str) -> None:
        self.check_listing(stage)
        if stage == "fit":
            subset = self.fewshot()
            self.datasets["train"] = [self.make_dataset(subset["train"], self.subsample, train=True)]
            self.datasets["val"] = [self.make_dataset(subset["val"], self.subsample, train=False)]
        elif stage == "validate":
            self.datasets["val"] = [self.make_dataset(self.fewshot()["val"], self.subsample, train=False)]
        elif stage in ("test", "predict"):
            self.datasets["test"] = [
                self.make_dataset(self.catalog.split("test"), s, train=False) for s in self.test_subsamples
            ]

    def check_listing(self, stage: str) -> None:
        """Before anything runs: the listing has no empty split or class, no image listed twice (as
        ``mmprompt check-data`` checks), and fit also finds the test split and its files, so a
        missing test image stops the run before training rather than after it."""
        where = f"dataset {self.spec.name} at {self.spec.dataset_dir(self.root)}"
        refuse_catalog_problems(self.catalog, where)
        if stage == "fit" and "test" not in self.catalog.splits:
            raise ValueError(f"{where}: the split listing has no test split (it has: {', '.join(self.catalog.splits)}); "
                             "fit tests the trained model on it")
        if stage == "fit":
            require_files(self.spec.dataset_dir(self.root), self.catalog.split("test"), f"{where} (test images)")

    def training_set(self, crop_scale: tuple[float, float] | None = None) -> ItemDataset:
        """The few-shot training images of `train_classes` with the training transform, for a method
        that builds something from them before training (a cache model's keys); ``crop_scale``
        overrides ``data.crop_scale`` for that pass."""
        scale = self.crop_scale if crop_scale is None else check_crop_scale(crop_scale)
        return self.make_dataset(self.fewshot()["train"], self.subsample, train=True, crop_scale=scale)

    def validation_set(self) -> ItemDataset:
        """The few-shot validation images of `train_classes` with the evaluation transform, for a method
        that searches its hyper-parameters on them before evaluating (a cache model's α and β)."""
        return self.make_dataset(self.fewshot()["val"], self.subsample, train=False)

    def make_dataset(self, items: list[Item], subsample: str, train: bool,
                     crop_scale: tuple[float, float] | None = None) -> ItemDataset:
        kept = class_subset(len(self.catalog.classnames), subsample)
        masks = self.spec.masks() if self.with_masks and self.spec.masks is not None else None
        transform = build_transform(train, self.image_size, self.mean, self.std, crop_scale or self.crop_scale)
        where = f"dataset {self.spec.name} ({'training' if train else 'evaluation'} images)"
        require_files(self.spec.dataset_dir(self.root), items, where)
        return ItemDataset(self.spec.dataset_dir(self.root), relabel(items, kept), transform, masks, self.spec.name)

    def loaders(self, key: str, batch_size: int, shuffle: bool) -> list[DataLoader]:
        """Loaders of ``key``; on several processes evaluation loaders read unpadded shards."""
        if key not in self.datasets:
            raise RuntimeError(f"no {key} data: call setup() with the matching stage first")
        world_size, rank = world_of(self.trainer)
        return [
            DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                       persistent_workers=self.num_workers > 0,
                       sampler=None if key == "train" else unrepeated_sampler(ds, world_size, rank, key))
            for ds in self.datasets[key]
        ]

    def train_dataloader(self) -> DataLoader:
        """Batches of ``batch_size / world size``: ``data.batch_size`` is the global batch of the recipe."""
        world_size, _ = world_of(self.trainer)
        return self.loaders("train", per_device_batch(self.batch_size, world_size), shuffle=True)[0]

    def val_dataloader(self) -> DataLoader:
        return self.loaders("val", self.eval_batch_size, shuffle=False)[0]

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        loaders = self.loaders("test", self.eval_batch_size, shuffle=False)
        return loaders if len(loaders) > 1 else loaders[0]

    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        return self.test_dataloader()
