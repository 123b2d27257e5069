"""The contract between data modules and the CLIP module: which classes a classifier head covers.

The model never owns class names: it asks the datamodule which classes each stage covers, so a
model trained on base classes evaluates novel classes without any change of its own. Both sides
import these types from here (a neutral module, torch-free), so adapters never depend on the data
package and the data package never depends on the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class ClassSet:
    """The classes one classifier head covers, with the dataset's zero-shot prompt templates.

    ``name`` labels metrics (``base``, ``new``, ``all`` or a dataset name), ``template`` is the
    dataset's single hand-crafted template (``"a photo of a {}."``) and ``ensemble_templates`` the
    optional list used for template ensembling.
    """

    name: str
    classnames: tuple[str, ...]
    template: str = "a photo of a {}."
    ensemble_templates: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.classnames:
            raise ValueError(f"class set {self.name!r} has no classes")
        if "{}" not in self.template:
            raise ValueError(f"template {self.template!r} of class set {self.name!r} has no '{{}}' slot")

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


@runtime_checkable
class ProvidesClassSets(Protocol):
    """What `PromptCLIPModule` reads from ``trainer.datamodule``.

    Batches are dicts: ``image`` (N,3,H,W float, normalised), ``label`` (N,) long, and, where the
    dataset has foreground masks, ``mask`` (N,H,W) float in [0,1] aligned with the transformed image
    plus ``has_mask`` (N,) bool (False rows carry an all-zero mask).
    """

    @property
    def train_classes(self) -> ClassSet: ...

    def eval_classes(self, stage: str) -> list[ClassSet]:
        """One ClassSet per dataloader of ``stage`` ("validate" or "test"), in dataloader order."""
        ...


@runtime_checkable
class ProvidesTrainingSet(Protocol):
    """What a cache model reads from ``trainer.datamodule`` (`mmprompt.adapters.base.Adapter.prepare`):
    the few-shot training images of `train_classes` with the training transform, and its validation images."""

    @property
    def train_classes(self) -> ClassSet: ...

    def training_set(self, crop_scale: tuple[float, float] | None = None) -> Any:
        """A map-style dataset of ``{"image", "label", ...}`` items; ``crop_scale`` overrides the random
        resized crop's area range (None: the datamodule's own)."""
        ...

    def validation_set(self) -> Any:
        """The few-shot validation images of `train_classes` with the evaluation transform (a cache
        model's hyper-parameter search)."""
        ...
