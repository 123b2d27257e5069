"""Name → dataset spec (folder, parser, template, mask source), timm-style.

Names are matched case-insensitively ignoring "-", "_" and spaces, so ``oxford_pets``,
``OxfordPets`` and ``oxford-pets`` are the same dataset. Unknown names list the valid ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable

from .catalog import Catalog
from .protocol import normalise_name
from .masks import (
    AircraftBoxes,
    CaltechContours,
    CarsBoxes,
    FlowersSegmentations,
    ImageNetValBoxes,
    MaskSource,
    ParallelMaskFolder,
    PetsTrimaps,
)
from .parsers import (
    parse_fgvc_aircraft,
    parse_imagenet,
    parse_imagenet_v2,
    parse_imagenet_wnid_folders,
    parse_zhou_split,
)

DEFAULT_TEMPLATE = "a photo of a {}."


@lru_cache(maxsize=1)
def ensemble_templates() -> tuple[str, ...]:
    """CLIP's 80 ImageNet prompts (open_clip keeps them as lambdas) as "{}" strings; imported on
    first use so reading a dataset tree doesn't import open_clip."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)

EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}
CALTECH_NAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}


@dataclass(frozen=True)
class DatasetSpec:
    """How one dataset lies on disk and how it is prompted.

    ``folder`` is under the data root, ``image_dir`` under ``folder``; ``parser`` turns the dataset
    folder into a `Catalog`; ``masks`` builds the dataset's `MaskSource` (None: no masks);
    ``renames`` are CoOp's class renames; ``generate`` builds the tree if absent (synthetic data).
    """

    name: str
    folder: str
    image_dir: str
    parser: Callable[[Path, "DatasetSpec"], Catalog]
    layout: str
    template: str = DEFAULT_TEMPLATE
    split_file: str = ""
    paths_relative_to_dataset: bool = False
    masks: Callable[[], MaskSource] | None = None
    renames: dict[str, str] = field(default_factory=dict)
    test_only: bool = False
    generate: Callable[[Path], None] | None = None
    aliases: tuple[str, ...] = ()
    cache_dir: str = ""
    cache_prefix: str = ""

    def dataset_dir(self, root: str | Path) -> Path:
        return Path(root) / self.folder

    def fewshot_cache_dir(self, root: str | Path) -> Path:
        """Where ``split_fewshot/`` goes: the dataset folder, or the custom split file's folder."""
        return Path(self.cache_dir) if self.cache_dir else self.dataset_dir(root)

    def read_catalog(self, root: str | Path) -> Catalog:
        return self.parser(self.dataset_dir(root), self)


def zhou_layout(folder: str, image_dir: str, split_file: str, extra: str = "") -> str:
    images = f"  {image_dir}/...\n" if image_dir else ""
    return f"<root>/{folder}/\n{images}  {split_file}\n{extra}"


def zhou(name: str, folder: str, image_dir: str, template: str = DEFAULT_TEMPLATE, extra_layout: str = "",
         split_name: str = "", **kw) -> DatasetSpec:
    """A dataset read from CoOp's ``split_zhou_<split_name or name>.json``."""
    split_file = f"split_zhou_{split_name or name}.json"
    return DatasetSpec(name, folder, image_dir, parse_zhou_split, zhou_layout(folder, image_dir, split_file, extra_layout),
                       template, split_file, **kw)


IMAGENET_LAYOUT = (
    "<root>/imagenet/\n  classnames.txt   ('<wnid> <name>' lines)\n  images/train/<wnid>/*.JPEG\n"
    "  images/val/<wnid>/*.JPEG\n  bboxes/val/<stem>.xml   (optional ILSVRC boxes)\n"
)


def variant(name: str, folder: str, image_dir: str, parser, layout_dirs: str, aliases: tuple[str, ...]) -> DatasetSpec:
    """A test-only ImageNet variant (its own or imagenet's classnames.txt)."""
    layout = f"<root>/{folder}/\n  classnames.txt   (or <root>/imagenet/classnames.txt)\n  {image_dir}/{layout_dirs}\n"
    return DatasetSpec(name, folder, image_dir, parser, layout, test_only=True, aliases=aliases)


def _synthetic_specs() -> list[DatasetSpec]:
    from .synthetic import SYNTHETIC_VARIANTS, generate_synthetic
    from .world import WORLD_SHAPES

    return [
        zhou(v.folder, v.folder, "images", split_name=v.split_name, masks=_synthetic_masks,
             extra_layout="  masks/<class>/<image>.png\n", generate=partial(generate_synthetic, variant=v))
        for v in (*SYNTHETIC_VARIANTS, WORLD_SHAPES)
    ]


def _synthetic_masks() -> MaskSource:
    return ParallelMaskFolder("masks", "images", required=True)


REGISTRY: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    for key in (spec.name, *spec.aliases):
        REGISTRY[normalise_name(key)] = spec
    return spec


def canonical_names() -> list[str]:
    return sorted({spec.name for spec in REGISTRY.values()} | {"custom"}, key=str.lower)


def get_spec(name: str) -> DatasetSpec:
    """The spec registered under ``name`` (case/punctuation-insensitive); lists valid names otherwise."""
    spec = REGISTRY.get(normalise_name(name))
    if spec is None:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(canonical_names())}")
    return spec


for _spec in [
    zhou("Caltech101", "caltech-101", "101_ObjectCategories", masks=CaltechContours, renames=CALTECH_NAMES,
         extra_layout="  Annotations/<class>/annotation_XXXX.mat   (optional contours)\n", aliases=("caltech-101",)),
    zhou("OxfordPets", "oxford_pets", "images", "a photo of a {}, a type of pet.", masks=PetsTrimaps,
         extra_layout="  annotations/trimaps/<stem>.png   (optional trimaps)\n", aliases=("pets",)),
    zhou("StanfordCars", "stanford_cars", "", paths_relative_to_dataset=True, masks=CarsBoxes,
         extra_layout="  cars_train/ cars_test/   (split paths are relative to the dataset folder)\n"
                      "  devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat   (optional boxes)\n",
         aliases=("cars",)),
    zhou("OxfordFlowers", "oxford_flowers", "jpg", "a photo of a {}, a type of flower.", masks=FlowersSegmentations,
         extra_layout="  segmim/segmim_XXXXX.jpg   (optional segmentations)\n", aliases=("flowers102", "flowers")),
    zhou("Food101", "food-101", "images", "a photo of {}, a type of food."),
    DatasetSpec("FGVCAircraft", "fgvc_aircraft", "images", parse_fgvc_aircraft,
                "<root>/fgvc_aircraft/\n  images/<id>.jpg\n  variants.txt\n  images_variant_{train,val,test}.txt\n"
                "  images_box.txt   (optional boxes)\n",
                "a photo of a {}, a type of aircraft.", masks=AircraftBoxes, aliases=("aircraft",)),
    zhou("SUN397", "sun397", "SUN397"),
    zhou("DescribableTextures", "dtd", "images", "{} texture.", aliases=("dtd",)),
    zhou("EuroSAT", "eurosat", "2750", "a centered satellite photo of {}.", renames=EUROSAT_NAMES),
    zhou("UCF101", "ucf101", "UCF-101-midframes", "a photo of a person doing {}."),
    DatasetSpec("ImageNet", "imagenet", "images", parse_imagenet, IMAGENET_LAYOUT, masks=ImageNetValBoxes),
    variant("ImageNetV2", "imagenetv2", "imagenetv2-matched-frequency-format-val", parse_imagenet_v2,
            "0/ ... 999/   (folder = label)", ("imagenet-v2",)),
    variant("ImageNetSketch", "imagenet-sketch", "images", parse_imagenet_wnid_folders, "<wnid>/*", ("imagenet-sketch",)),
    variant("ImageNetA", "imagenet-adversarial", "imagenet-a", parse_imagenet_wnid_folders, "<wnid>/*  (200 classes)",
            ("imagenet-adversarial",)),
    variant("ImageNetR", "imagenet-rendition", "imagenet-r", parse_imagenet_wnid_folders, "<wnid>/*  (200 classes)",
            ("imagenet-rendition",)),
    *_synthetic_specs(),
]:
    register(_spec)
