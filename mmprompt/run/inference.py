"""Classify any image with a trained checkpoint (or zero-shot): ``mmprompt.load`` in Python and
``mmprompt predict --images ...`` on the command line share the pieces here.

Class names come with the checkpoint (the union of the classes it was tested on: base and new for a
base-to-novel run) or from a list the user gives (``--classes names.txt``, ``classes=[...]``), so a
prompt learned on some classes can be asked about others, as in the novel-class evaluation. Images
get the test split's transform, so a file classified here scores exactly as it would in ``mmprompt
test``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from ..classes import ClassSet
from ..data.images import ImageFiles, check_readable, expand_image_paths, open_image
from ..data.registry import ensemble_templates
from ..data.transforms import build_transform
from ..model.checkpoint_io import read_checkpoint
from ..model.module import PromptCLIPModule, class_set_from_record

ImageInput = str | os.PathLike | Image.Image
#: the class set of images classified outside a dataset (``predictions_images.csv``)
IMAGES = "images"
DEFAULT_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class Prediction:
    """One image's top-k classes, most probable first, with their softmax probabilities."""

    labels: tuple[str, ...]
    probabilities: tuple[float, ...]

    @property
    def label(self) -> str:
        return self.labels[0]

    @property
    def probability(self) -> float:
        return self.probabilities[0]


def top_k_predictions(probabilities: Tensor, classnames: Sequence[str], k: int) -> list[Prediction]:
    """Per row of (N, C) probabilities, the ``k`` largest (at most C) with their class names."""
    values, indices = probabilities.float().topk(min(k, len(classnames)), dim=-1)
    return [Prediction(tuple(classnames[i] for i in row_indices.tolist()), tuple(row_values.tolist()))
            for row_values, row_indices in zip(values, indices)]


def read_class_file(path: str | os.PathLike) -> tuple[str, ...]:
    """Class names from a text file, one per line (blank lines and ``#`` comments skipped)."""
    where = f"--classes {path}"
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: no such file (expected a text file with one class name per line)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{where}: cannot read it as UTF-8 text ({err}); expected one class name per line") from err
    names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return checked_classnames(names, where)


def checked_classnames(names: Sequence[str], where: str) -> tuple[str, ...]:
    """``names`` as a tuple, refusing an empty list and repeated names (two logits for one class)."""
    repeated = sorted({name for name in names if list(names).count(name) > 1})
    if not names or repeated:
        problem = f"repeats {repeated[:5]}" if repeated else "names no class"
        raise ValueError(f"{where} {problem}; give each class name once")
    return tuple(names)


def union_of(sets: Sequence[ClassSet], name: str = IMAGES) -> ClassSet:
    """One class set holding every class of ``sets`` once, in order (base then new), with the first
    set's templates: what an image of unknown class is compared against."""
    names = tuple(dict.fromkeys(classname for classes in sets for classname in classes.classnames))
    return ClassSet(name, names, sets[0].template, sets[0].ensemble_templates)


def checkpoint_class_sets(checkpoint: dict[str, Any]) -> list[ClassSet]:
    """The class sets a checkpoint was tested on (``[]`` for one that records none)."""
    records = ((checkpoint.get("mmprompt") or {}).get("class_sets") or {})
    return [class_set_from_record(record) for record in records.get("test") or records.get("validate") or []]


def image_classes(checkpoint: dict[str, Any] | None, classes: str | os.PathLike | Sequence[str] | None,
                  where: str, template: str | None = None) -> ClassSet:
    """The classes images are ranked over: ``classes`` (a file, or names) with the checkpoint's
    template, else every class of the checkpoint; ``where`` names the checkpoint in errors."""
    saved = checkpoint_class_sets(checkpoint) if checkpoint is not None else []
    if classes is None:
        if checkpoint is None:
            raise ValueError("--images without --ckpt_path is zero-shot: give the class names with --classes FILE "
                             "(one class name per line)")
        if not saved:
            raise ValueError(f"{where} records no class names; give them with --classes FILE (one per line)")
        return union_of(saved)
    names = read_class_file(classes) if isinstance(classes, (str, os.PathLike)) else \
        checked_classnames(list(classes), "classes")
    template = saved[0].template if saved else template or DEFAULT_TEMPLATE
    return ClassSet(IMAGES, names, template, saved[0].ensemble_templates if saved else ensemble_templates())


def checkpoint_transform(checkpoint: dict[str, Any], image_size: int) -> v2.Compose:
    """The test transform the checkpoint's run used (its data.mean/std, CLIP's by default)."""
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    return build_transform(False, image_size, data.get("mean", OPENAI_DATASET_MEAN), data.get("std", OPENAI_DATASET_STD))


class Classifier:
    """A trained (or zero-shot) model ready for images: `classify`, `encode_images`, `encode_text`.

    ``module`` is the `PromptCLIPModule` (frozen CLIP + adapter) it runs; ``classes`` the class set
    `classify` ranks over. Images are paths or PIL images; every call runs without gradients.
    """

    def __init__(self, module: PromptCLIPModule, classes: ClassSet, transform: v2.Compose, batch_size: int = 32) -> None:
        self.module, self.classes, self.transform, self.batch_size = module.eval(), classes, transform, batch_size

    @property
    def classnames(self) -> tuple[str, ...]:
        return self.classes.classnames

    def pixels(self, images: Sequence[ImageInput]) -> Tensor:
        """(N, 3, H, W) model inputs of paths or PIL images, transformed like the test split."""
        opened = [image.convert("RGB") if isinstance(image, Image.Image) else open_image(Path(image)) for image in images]
        return torch.stack([self.transform(image).as_subclass(Tensor) for image in opened]).to(self.module.device)

    def batches(self, images: ImageInput | Sequence[ImageInput]) -> list[Tensor]:
        listed = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
        return [self.pixels(listed[i:i + self.batch_size]) for i in range(0, len(listed), self.batch_size)]

    @torch.no_grad()
    def logits(self, images: ImageInput | Sequence[ImageInput]) -> Tensor:
        """(N, C) logits over `classnames`, the module's own forward."""
        return torch.cat([self.module(batch, self.classes) for batch in self.batches(images)])

    def classify(self, images: ImageInput | Sequence[ImageInput], top_k: int = 5) -> list[Prediction]:
        """Each image's ``top_k`` classes with their probabilities (softmax over `classnames`)."""
        return top_k_predictions(self.logits(images).softmax(dim=-1), self.classnames, top_k)

    @torch.no_grad()
    def encode_images(self, images: ImageInput | Sequence[ImageInput]) -> Tensor:
        """(N, D) normalised image features, with the adapter's vision prompts or biases."""
        return torch.cat([self.module.image_features(batch) for batch in self.batches(images)])

    @torch.no_grad()
    def encode_text(self, classnames: Sequence[str] | None = None) -> Tensor:
        """(C, D) normalised text features of class names (default `classnames`) through the adapter's
        prompts: what images are compared against. Image-conditioned adapters (CoCoOp) have no
        image-free text features and refuse."""
        if self.module.adapter.conditions_text_on_image:
            raise ValueError(f"{type(self.module.adapter).__name__} conditions its text on each image: "
                             "its text features exist only per image (use classify or logits)")
        names = self.classnames if classnames is None else checked_classnames(list(classnames), "encode_text")
        classes = ClassSet("text", tuple(names), self.classes.template, self.classes.ensemble_templates)
        return self.module.text_features(classes)


def load(checkpoint: str | os.PathLike, classes: str | os.PathLike | Sequence[str] | None = None,
         device: str | torch.device = "cpu") -> Classifier:
    """A `Classifier` from a checkpoint written by ``mmprompt fit``; ``classes`` (names, or a text file
    with one per line) replaces the checkpoint's own class names."""
    saved = read_checkpoint(checkpoint)
    module = PromptCLIPModule.load_from_checkpoint(checkpoint, map_location="cpu").to(device)
    chosen = image_classes(saved, classes, f"checkpoint {checkpoint}")
    return Classifier(module, chosen, checkpoint_transform(saved, module.spec.image_size))


# ---------------------------------------------------------------------- mmprompt predict --images

def add_image_options(parser: Any) -> None:
    """``mmprompt predict``'s options for images outside a dataset."""
    parser.add_argument("--images", type=list[str] | None, default=None,
                        help="Image files, folders (their images, sorted) or glob patterns to classify instead of "
                             "the dataset's test split; the CSV goes to the run folder (predictions_images.csv).")
    parser.add_argument("--classes", type=str | None, default=None,
                        help="With --images: a text file with one class name per line (default: the checkpoint's "
                             "classes); without a checkpoint this is zero-shot classification.")
    parser.add_argument("--top_k", type=int, default=5, help="Ranked classes (with probabilities) per CSV row.")
    parser.add_argument("--overlay", type=bool, default=False,
                        help="With --images: also write each image's [cls] attention overlay to <run>/overlays/.")


def checked_image_paths(config: Any) -> list[Path]:
    """The files of ``--images``, each opened once, and ``--classes`` read: called before the model is
    built, so a bad file stops ``mmprompt predict`` at once, naming it."""
    paths = expand_image_paths(config.images)
    check_readable(paths)
    if config.classes is not None:
        read_class_file(config.classes)
    return paths


def image_loader(paths: Sequence[Path], datamodule: Any) -> DataLoader:
    """The images batched and transformed like the test split."""
    transform = build_transform(False, datamodule.image_size, datamodule.mean, datamodule.std)
    return DataLoader(ImageFiles(paths, transform), batch_size=datamodule.eval_batch_size,
                      num_workers=datamodule.num_workers, shuffle=False)


def predict_images(trainer: Any, model: PromptCLIPModule, datamodule: Any, config: Any, paths: Sequence[Path],
                   run_dir: Path, ckpt_path: str | None) -> Any:
    """``mmprompt predict --images ...``: rank the images over the checkpoint's classes (or ``--classes``),
    writing ``predictions_images.csv`` through the run's `PredictionWriter` and, with ``--overlay``,
    one attention overlay per image."""
    from ..analysis.overlays import ImageOverlayWriter
    from .predictions import PredictionWriter

    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: with --images give a checkpoint file "
                                "(e.g. runs/demo/version_0/checkpoints/last.ckpt)")
    if ckpt_path is None and model.adapter.num_trainable_parameters() > 0:
        raise ValueError(f"--images without --ckpt_path would classify with an untrained "
                         f"{type(model.adapter).__name__}: give --ckpt_path RUN/checkpoints/last.ckpt, or "
                         "--config methods/zero_shot for zero-shot CLIP")
    loader = image_loader(paths, datamodule)
    saved = read_checkpoint(ckpt_path) if ckpt_path else None
    model.set_class_sets(test=[image_classes(saved, config.classes, f"--ckpt_path {ckpt_path}",
                                             datamodule.hparams.get("template"))])
    for callback in trainer.callbacks:
        if isinstance(callback, PredictionWriter):
            callback.top_k = config.top_k
    if config.overlay:
        trainer.callbacks.append(ImageOverlayWriter(run_dir / "overlays"))
    return trainer.predict(model, dataloaders=loader, ckpt_path=ckpt_path, return_predictions=False)
