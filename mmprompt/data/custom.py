"""Bring your own dataset: a folder of images plus a CoOp-format split file, no code.

``dataset: custom`` with ``split_file`` (``{"train"|"val"|"test": [[relative_path, label, classname],
...]}``), ``image_dir`` (the folder the paths are relative to; default: the split file's folder),
optional ``mask_dir`` (masks at the same relative paths, or the same stem with ``.png``; non-zero =
foreground) and optional ``template``. Few-shot caches go to ``<split file folder>/split_fewshot/``.

`make_split` writes such a split file from a class-per-folder tree (``<root>/<class>/<image>``).
"""

from __future__ import annotations

import argparse
import random
from dataclasses import replace
from functools import partial
from pathlib import Path

from .catalog import SPLITS, list_dirs, list_files, write_json_atomic
from .fewshot import FEWSHOT_DIR
from .masks import ParallelMaskFolder
from .parsers import IMAGE_EXTENSIONS, parse_zhou_split
from .registry import DEFAULT_TEMPLATE, DatasetSpec, get_spec, normalise_name

CUSTOM_LAYOUT = (
    "<image_dir>/<any relative path>/<image>\n<split_file>   {\"train\"|\"val\"|\"test\": [[relative_path, label, classname], ...]}\n"
    "<mask_dir>/<same relative path>   (optional; non-zero pixels = foreground)\n"
)
DEFAULT_RATIOS = (0.5, 0.2, 0.3)


def custom_spec(
    split_file: str | None, image_dir: str | None = None, mask_dir: str | None = None, template: str | None = None
) -> DatasetSpec:
    """A `DatasetSpec` for a user's split file; relative paths are resolved against the working
    directory (where ``mmprompt fit`` runs)."""
    if not split_file:
        raise ValueError("dataset 'custom' needs split_file (a JSON split file); expected layout:\n" + CUSTOM_LAYOUT)
    split = Path(split_file).absolute()
    images = Path(image_dir).absolute() if image_dir else split.parent
    if mask_dir is not None and not Path(mask_dir).is_dir():
        raise FileNotFoundError(f"mask_dir not found: {Path(mask_dir).absolute()}; expected layout:\n{CUSTOM_LAYOUT}")
    masks = partial(ParallelMaskFolder, str(Path(mask_dir).absolute())) if mask_dir else None
    return DatasetSpec(
        name="custom", folder=str(images), image_dir="", parser=parse_zhou_split, layout=CUSTOM_LAYOUT,
        template=template or DEFAULT_TEMPLATE, split_file=str(split), paths_relative_to_dataset=True, masks=masks,
        cache_dir=str(split.parent), cache_prefix=f"{split.stem}-",
    )


def split_counts(n: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """Images per split for a class of ``n``: rounded train and val, the rest test, except that a
    split with a non-zero ratio gets at least one image (so a small class is trained and tested;
    one image at 50% would round to none). `images_needed` says how many that takes."""
    keep_test = int(ratios[2] > 0)
    n_train = min(n - keep_test, max(int(ratios[0] > 0), round(n * ratios[0])))
    n_val = min(n - n_train - keep_test, round(n * ratios[1]))
    return n_train, n_val, n - n_train - n_val


def images_needed(ratios: tuple[float, float, float]) -> int:
    """The fewest images a class needs: one for each of train and test that ``ratios`` asks for."""
    return int(ratios[0] > 0) + int(ratios[2] > 0)


def class_images(root: Path, classes: list[str], needed: int) -> dict[str, list[str]]:
    """The sorted image names of each class folder; a folder with fewer than ``needed`` is an error."""
    images = {cls: [n for n in list_files(root / cls) if n.lower().endswith(IMAGE_EXTENSIONS)] for cls in classes}
    empty = [cls for cls, names in images.items() if not names]
    if empty:
        raise ValueError(f"class folder {root / empty[0]} holds no images ({', '.join(IMAGE_EXTENSIONS)}); remove it or add images")
    small = [f"{cls} ({len(names)})" for cls, names in images.items() if len(names) < needed]
    if small:
        raise ValueError(f"{len(small)} class folder(s) in {root} hold fewer than {needed} images: {', '.join(small[:10])}; "
                         "each class needs one image to train on and one to test (--ratios with a zero train or test "
                         "share needs one); add images or remove those folders")
    return images


def make_split(
    root: str | Path, output: str | Path | None = None, ratios: tuple[float, float, float] = DEFAULT_RATIOS, seed: int = 1,
    overwrite: bool = False,
) -> dict[str, list[list]]:
    """Write (and return) a split file for ``<root>/<class>/<image>``: classes are the sorted folder
    names except ``split_fewshot`` (label = position), each class's sorted images shuffled by ``random.Random(seed)`` and cut
    by ``ratios`` (train, val, test; see `split_counts`). Paths are relative to ``root``; ``output`` defaults to
    ``<root>/split.json``. An existing file is kept unless ``overwrite``: runs' saved configs point at it."""
    root = Path(root)
    output = Path(output) if output else root / "split.json"
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}; expected <root>/<class>/<image>")
    if output.exists() and not overwrite:
        raise FileExistsError(f"split file {output} already exists, and runs' saved configs may point at it: a new "
                              "draw would change their partition; give another --split_file, or --overwrite to replace it")
    if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1) > 1e-6:
        raise ValueError(f"ratios must be three non-negative numbers (train, val, test) summing to 1; got {ratios}")
    classes = [name for name in list_dirs(root) if name != FEWSHOT_DIR]  # the cache may live beside the classes
    if len(classes) < 2:
        found = f"only one class folder ({classes[0]!r})" if classes else "no class folders"
        raise ValueError(f"{found} in {root}; expected <root>/<class>/<image> with at least 2 classes "
                         "(base-to-novel splits the classes into base and novel halves)")
    rng = random.Random(seed)
    split: dict[str, list[list]] = {name: [] for name in SPLITS}
    for label, (cls, images) in enumerate(class_images(root, classes, images_needed(ratios)).items()):
        rng.shuffle(images)
        start = 0
        for name, count in zip(SPLITS, split_counts(len(images), ratios)):
            split[name].extend([f"{cls}/{img}", label, cls] for img in sorted(images[start : start + count]))
            start += count
    write_json_atomic(output, split)
    return split


def main(argv: list[str] | None = None) -> int:
    """``mmprompt make-split ROOT [--split_file FILE] [--ratios TR VA TE] [--seed S] [--overwrite]``."""
    parser = argparse.ArgumentParser(prog="mmprompt make-split", description=make_split.__doc__)
    parser.add_argument("root", help="class-per-folder image tree: <root>/<class>/<image>")
    parser.add_argument("--split_file", dest="output", default=None, help="split file to write (default: <root>/split.json)")
    parser.add_argument("--ratios", type=float, nargs=3, default=DEFAULT_RATIOS, metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing split file (a new draw)")
    args = parser.parse_args(argv)
    split = make_split(args.root, args.output, tuple(args.ratios), args.seed, args.overwrite)
    classes = {row[2] for rows in split.values() for row in rows}
    print(f"wrote {args.output or Path(args.root) / 'split.json'}: {len(classes)} classes, "
          + ", ".join(f"{name} {len(rows)}" for name, rows in split.items()))
    return 0


def resolve_spec(
    dataset: str, split_file: str | None = None, image_dir: str | None = None, mask_dir: str | None = None,
    template: str | None = None,
) -> DatasetSpec:
    """The spec for a datamodule's options: ``custom`` is built from them; a registered dataset
    only accepts a ``template`` override (the custom options would be silently ignored there)."""
    if normalise_name(dataset) == "custom":
        return custom_spec(split_file, image_dir, mask_dir, template)
    spec = get_spec(dataset)
    given = [name for name, value in (("split_file", split_file), ("image_dir", image_dir), ("mask_dir", mask_dir)) if value]
    if given:
        raise ValueError(f"{', '.join(given)} only apply to dataset 'custom', not {spec.name!r}")
    return replace(spec, template=template) if template else spec
