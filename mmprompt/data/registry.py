"""Name → dataset spec (folder, parser, template, mask source, protocols), timm-style.

Names are matched case-insensitively ignoring "-", "_" and spaces, so ``oxford_pets``,
``OxfordPets`` and ``oxford-pets`` are the same dataset. Unknown names list the valid ones.

The registry is the single source of what a dataset is: its names and aliases, its ``key`` (the
config stem ``configs/datasets/<key>.yaml`` and its name in sweeps and reports) and the protocols
whose standard dataset list holds it. `protocol_datasets` and `transfer_source` give ``mmprompt
sweep`` its defaults and ``mmprompt report`` its column order. Reading the registry imports no
torch (mask readers are imported when a mask source is built), so the report starts instantly.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .protocol import normalise_name
from .parsers import (
    parse_fgvc_aircraft,
    parse_imagenet,
    parse_imagenet_v2,
    parse_imagenet_wnid_folders,
    parse_zhou_split,
)

if TYPE_CHECKING:
    from .catalog import Catalog
    from .masks import MaskSource

#: the protocols a dataset can belong to (``DatasetSpec.protocols``); for the transfer protocols the
#: members are the target datasets, the source is the dataset with ``transfer_source=True``
BASE2NEW, FEWSHOT, CROSS_DATASET, DOMAIN_GENERALIZATION = "base2new", "fewshot", "cross_dataset", "domain_generalization"
PROTOCOLS = (BASE2NEW, FEWSHOT, CROSS_DATASET, DOMAIN_GENERALIZATION)
COOP_PROTOCOLS = (BASE2NEW, FEWSHOT, CROSS_DATASET)  # the 11 CoOp datasets, ImageNet being the source

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
    ``key`` is the config stem and the name sweeps and reports use (default: the lower-cased name
    with "_" for "-"); ``protocols`` the standard dataset lists holding it (targets, for transfer
    protocols); ``transfer_source`` marks the dataset the transfer protocols train on.
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
    key: str = ""
    protocols: tuple[str, ...] = ()
    transfer_source: bool = False

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", self.name.lower().replace("-", "_"))
        unknown = set(self.protocols) - set(PROTOCOLS)
        if unknown:
            raise ValueError(f"dataset {self.name!r}: unknown protocols {sorted(unknown)}; expected some of {PROTOCOLS}")

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


def variant(name: str, folder: str, image_dir: str, parser, layout_dirs: str, aliases: tuple[str, ...],
            key: str) -> DatasetSpec:
    """A test-only ImageNet variant (its own or imagenet's classnames.txt), a domain-generalisation target."""
    layout = f"<root>/{folder}/\n  classnames.txt   (or <root>/imagenet/classnames.txt)\n  {image_dir}/{layout_dirs}\n"
    return DatasetSpec(name, folder, image_dir, parser, layout, test_only=True, aliases=aliases, key=key,
                       protocols=(DOMAIN_GENERALIZATION,))


@dataclass(frozen=True)
class Deferred:
    """``mmprompt.data.<module>.<name>(...)``, imported on the first call: the mask readers import
    torch, and reading the registry (report, sweep, docs) must not."""

    module: str
    name: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(f"{__package__}.{self.module}"), self.name)(*args, **kwargs)


def mask_reader(name: str) -> Deferred:
    """The mask source class ``mmprompt.data.masks.<name>``, imported when a dataset builds its masks."""
    return Deferred("masks", name)


def _synthetic_specs() -> list[DatasetSpec]:
    from .synthetic import SYNTHETIC_VARIANTS, generate_synthetic
    from .world_suite import WORLD_SUITE

    return [
        zhou(v.folder, v.folder, "images", getattr(v, "template", DEFAULT_TEMPLATE), split_name=v.split_name,
             masks=_synthetic_masks, extra_layout="  masks/<class>/<image>.png\n",
             generate=partial(generate_synthetic, variant=v))
        for v in (*SYNTHETIC_VARIANTS, *WORLD_SUITE)
    ]


def _synthetic_masks() -> MaskSource:
    from .masks import ParallelMaskFolder

    return ParallelMaskFolder("masks", "images", required=True)


REGISTRY: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    for key in (spec.name, spec.key, *spec.aliases):
        REGISTRY[normalise_name(key)] = spec
    return spec


def specs() -> list[DatasetSpec]:
    """Every registered dataset once, in registration order (the papers' column order)."""
    return list({id(spec): spec for spec in REGISTRY.values()}.values())


def protocol_datasets(protocol: str) -> tuple[str, ...]:
    """The keys of the datasets in ``protocol``'s standard list (targets, for transfer protocols)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; datasets are listed for: {', '.join(PROTOCOLS)}")
    return tuple(spec.key for spec in specs() if protocol in spec.protocols)


def transfer_source() -> str:
    """The key of the dataset the transfer protocols (cross-dataset, domain generalisation) train on."""
    (source,) = [spec.key for spec in specs() if spec.transfer_source]
    return source


def dataset_key(name: str) -> str:
    """The key of a registered dataset as any of its names spells it (``EuroSAT`` -> ``eurosat``,
    ``pets`` -> ``oxford_pets``); any other name (a custom dataset's label) as it is."""
    spec = REGISTRY.get(normalise_name(name))
    return spec.key if spec is not None else name


def canonical_names() -> list[str]:
    return sorted({spec.name for spec in REGISTRY.values()} | {"custom"}, key=str.lower)


def get_spec(name: str) -> DatasetSpec:
    """The spec registered under ``name`` (case/punctuation-insensitive); lists valid names otherwise."""
    spec = REGISTRY.get(normalise_name(name))
    if spec is None:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(canonical_names())}")
    return spec


# In the papers' column order: the 11 CoOp datasets (ImageNet first), then the ImageNet variants.
for _spec in [
    DatasetSpec("ImageNet", "imagenet", "images", parse_imagenet, IMAGENET_LAYOUT, masks=mask_reader("ImageNetValBoxes"),
                protocols=(BASE2NEW, FEWSHOT), transfer_source=True),
    zhou("Caltech101", "caltech-101", "101_ObjectCategories", masks=mask_reader("CaltechContours"),
         renames=CALTECH_NAMES, extra_layout="  Annotations/<class>/annotation_XXXX.mat   (optional contours)\n",
         aliases=("caltech-101",), protocols=COOP_PROTOCOLS),
    zhou("OxfordPets", "oxford_pets", "images", "a photo of a {}, a type of pet.", masks=mask_reader("PetsTrimaps"),
         extra_layout="  annotations/trimaps/<stem>.png   (optional trimaps)\n", aliases=("pets",), key="oxford_pets",
         protocols=COOP_PROTOCOLS),
    zhou("StanfordCars", "stanford_cars", "", paths_relative_to_dataset=True, masks=mask_reader("CarsBoxes"),
         extra_layout="  cars_train/ cars_test/   (split paths are relative to the dataset folder)\n"
                      "  devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat   (optional boxes)\n",
         aliases=("cars",), key="stanford_cars", protocols=COOP_PROTOCOLS),
    zhou("OxfordFlowers", "oxford_flowers", "jpg", "a photo of a {}, a type of flower.",
         masks=mask_reader("FlowersSegmentations"), extra_layout="  segmim/segmim_XXXXX.jpg   (optional segmentations)\n",
         aliases=("flowers102", "flowers"), key="oxford_flowers", protocols=COOP_PROTOCOLS),
    zhou("Food101", "food-101", "images", "a photo of {}, a type of food.", protocols=COOP_PROTOCOLS),
    DatasetSpec("FGVCAircraft", "fgvc_aircraft", "images", parse_fgvc_aircraft,
                "<root>/fgvc_aircraft/\n  images/<id>.jpg\n  variants.txt\n  images_variant_{train,val,test}.txt\n"
                "  images_box.txt   (optional boxes)\n",
                "a photo of a {}, a type of aircraft.", masks=mask_reader("AircraftBoxes"), aliases=("aircraft",),
                key="fgvc_aircraft", protocols=COOP_PROTOCOLS),
    zhou("SUN397", "sun397", "SUN397", protocols=COOP_PROTOCOLS),
    zhou("DescribableTextures", "dtd", "images", "{} texture.", aliases=("dtd",), key="dtd", protocols=COOP_PROTOCOLS),
    zhou("EuroSAT", "eurosat", "2750", "a centered satellite photo of {}.", renames=EUROSAT_NAMES,
         protocols=COOP_PROTOCOLS),
    zhou("UCF101", "ucf101", "UCF-101-midframes", "a photo of a person doing {}.", protocols=COOP_PROTOCOLS),
    variant("ImageNetV2", "imagenetv2", "imagenetv2-matched-frequency-format-val", parse_imagenet_v2,
            "0/ ... 999/   (folder = label)", ("imagenet-v2",), "imagenetv2"),
    variant("ImageNetSketch", "imagenet-sketch", "images", parse_imagenet_wnid_folders, "<wnid>/*", ("imagenet-sketch",),
            "imagenet_sketch"),
    variant("ImageNetA", "imagenet-adversarial", "imagenet-a", parse_imagenet_wnid_folders, "<wnid>/*  (200 classes)",
            ("imagenet-adversarial",), "imagenet_a"),
    variant("ImageNetR", "imagenet-rendition", "imagenet-r", parse_imagenet_wnid_folders, "<wnid>/*  (200 classes)",
            ("imagenet-rendition",), "imagenet_r"),
    *_synthetic_specs(),
]:
    register(_spec)
