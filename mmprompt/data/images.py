"""The user's own images: files, folders and glob patterns as one sorted list, checked before use.

``mmprompt predict --images a.jpg photos/ 'shots/*.png'`` and ``mmprompt.load(...).classify`` read
images through here, so a missing or unreadable file stops the run with its name before any model
work, and the images are transformed exactly as the test split is (`build_transform`).
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ..files import UnreadableFile
from .catalog import to_rgb
from .parsers import IMAGE_EXTENSIONS

GLOB_CHARACTERS = "*?["


class ImageFile(NamedTuple):
    """One image as the user named it (``path`` as given or found, not made absolute)."""

    path: str


def images_in_folder(folder: Path) -> list[Path]:
    """The image files under ``folder`` and its sub-folders (hidden ones skipped), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def expand_one(spec: str) -> list[Path]:
    """A file, a folder (its images) or a glob pattern; an error names the spec that gives nothing."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = images_in_folder(path)
        if not found:
            raise FileNotFoundError(f"--images {spec}: the folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        return found
    if any(character in spec for character in GLOB_CHARACTERS):
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not found:
            raise FileNotFoundError(f"--images {spec}: the pattern matches no file")
        return found
    raise FileNotFoundError(f"--images {spec}: no such file or folder")


def expand_image_paths(specs: Sequence[str]) -> list[Path]:
    """Every image ``specs`` name, in the order given (each folder or pattern sorted), each once."""
    if not specs:
        raise ValueError("--images needs at least one image file, folder or glob pattern")
    return list(dict.fromkeys(path for spec in specs for path in expand_one(str(spec))))


def open_image(path: Path) -> Image.Image:
    """An image file as RGB, or an error naming the file."""
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except Exception as err:  # PIL raises several types for corrupt or foreign files
        raise UnreadableFile(f"cannot read image {path}: {err}") from err


def check_readable(paths: Sequence[Path]) -> None:
    """Open every image's header now (Pillow's ``verify``), so a file that is no image stops the run
    with its name before the model is built, not halfway through a folder."""
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as err:
            raise UnreadableFile(f"--images: cannot read image {path}: {err}; remove it or replace the file") from err


class ImageFiles(Dataset):
    """The images of ``paths`` as test-split batches: ``{"image": (3, H, W), "index": long}``; ``items``
    (``.path``) is what `mmprompt.run.predictions.PredictionWriter` writes in each row."""

    def __init__(self, paths: Sequence[Path], transform: v2.Compose) -> None:
        self.items = [ImageFile(str(path)) for path in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = open_image(Path(self.items[index].path))
        return {"image": self.transform(image).as_subclass(torch.Tensor), "index": torch.tensor(index)}
