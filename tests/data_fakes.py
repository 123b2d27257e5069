"""Small fake dataset trees in the real CoOp layouts, for the data tests (and any test that needs one).

``make_fake(name, root)`` writes the tree of a registered dataset under ``root`` and returns a
`FakeTree` with what a correct reader must find: the class names after cleaning, the split sizes and
which images carry a foreground annotation. Images are tiny solid-colour files (fast to write/read).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

IMAGE_SIZE = (40, 30)  # (W, H): not square, so resize/crop is exercised


@dataclass
class FakeTree:
    name: str
    dataset_dir: Path
    classnames: list[str]
    sizes: dict[str, int]
    masked: set[str] = field(default_factory=set)  # item paths (relative to dataset_dir) with a mask


def write_image(path: Path, colour: int = 0, size: tuple[int, int] = IMAGE_SIZE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0], 3), (colour * 37) % 256, dtype=np.uint8)
    pixels[..., 1] = (colour * 91) % 256
    Image.fromarray(pixels).save(path)


def per_class_counts(counts: dict[str, int], n_classes: int) -> dict[str, int]:
    return {split: c * n_classes for split, c in counts.items()}


def write_zhou(
    dataset_dir: Path, split_name: str, image_prefix: str, raw_classes: list[str],
    relpath: Callable[[str, int, str, int], str], counts: dict[str, int],
) -> dict[str, list[list]]:
    """Images and ``split_zhou_<split_name>.json``; ``relpath(class, label, split, i)`` is the path
    as listed in the JSON, relative to ``dataset_dir/image_prefix``."""
    split: dict[str, list[list]] = {}
    for name, count in counts.items():
        rows = []
        for label, cls in enumerate(raw_classes):
            for i in range(count):
                rel = relpath(cls, label, name, i)
                write_image(dataset_dir / image_prefix / rel, label)
                rows.append([rel, label, cls])
        split[name] = rows
    (dataset_dir / f"split_zhou_{split_name}.json").write_text(json.dumps(split))
    return split


COUNTS = {"train": 3, "val": 2, "test": 2}


def simple_zhou(name: str, folder: str, image_dir: str, raw: list[str], clean: list[str], pattern: str):
    """A maker for a zhou-JSON dataset whose paths follow ``pattern`` (format keys cls, label, split, i)."""

    def make(root: Path) -> FakeTree:
        d = root / folder
        write_zhou(d, name, image_dir, raw, lambda c, l, s, i: pattern.format(cls=c, label=l, split=s, i=i), COUNTS)
        return FakeTree(name, d, clean, per_class_counts(COUNTS, len(raw)))

    return make


OFFSETS = {"train": 0, "val": 10, "test": 20}


def make_caltech(root: Path) -> FakeTree:
    """Folders keep Caltech's raw names (``airplanes``, ``Faces``); the JSON has CoOp's new names."""
    d = root / "caltech-101"
    folders = ["accordion", "airplanes", "Faces", "ant"]
    names = ["accordion", "airplane", "face", "ant"]
    write_zhou(d, "Caltech101", "101_ObjectCategories", names,
               lambda c, l, s, i: f"{folders[l]}/image_{OFFSETS[s] + i:04d}.jpg", COUNTS)
    # contours (box_coord = [y1 y2 x1 x2], 1-based; obj_contour relative to the box corner)
    write_caltech_contour(d / "Annotations" / "accordion" / "annotation_0000.mat", box=[5, 20, 10, 30],
                          xs=[0, 20, 0], ys=[0, 0, 15])
    write_caltech_contour(d / "Annotations" / "Faces_2" / "annotation_0000.mat", box=[1, 30, 1, 40],
                          xs=[0, 39, 39, 0], ys=[0, 0, 29, 29])
    masked = {"101_ObjectCategories/accordion/image_0000.jpg", "101_ObjectCategories/Faces/image_0000.jpg"}
    return FakeTree("Caltech101", d, names, per_class_counts(COUNTS, 4), masked)


def write_caltech_contour(path: Path, box: list[int], xs: list[float], ys: list[float]) -> None:
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {"box_coord": np.array([box], dtype=np.float64), "obj_contour": np.array([xs, ys], dtype=np.float64)})


PET_BREEDS = [
    "Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle", "Bengal", "Birman",
    "Bombay", "boxer", "British_Shorthair", "chihuahua", "Egyptian_Mau", "english_cocker_spaniel", "english_setter",
    "german_shorthaired", "great_pyrenees", "havanese", "japanese_chin", "keeshond", "leonberger", "Maine_Coon",
    "miniature_pinscher", "newfoundland", "Persian", "pomeranian", "pug", "Ragdoll", "Russian_Blue", "saint_bernard",
    "samoyed", "scottish_terrier", "shiba_inu", "Siamese", "Sphynx", "staffordshire_bull_terrier", "wheaten_terrier",
    "yorkshire_terrier",
]


def make_pets(root: Path) -> FakeTree:
    """37 breeds (so base/new = 19/18), one trimap for the first image."""
    d = root / "oxford_pets"
    counts = {"train": 2, "val": 1, "test": 1}
    write_zhou(d, "OxfordPets", "images", PET_BREEDS, lambda c, l, s, i: f"{c}_{OFFSETS[s] + i + 1}.jpg", counts)
    trimap = np.full((IMAGE_SIZE[1], IMAGE_SIZE[0]), 2, dtype=np.uint8)
    trimap[5:15, 10:20] = 1
    trimap[4, 10:20] = 3
    path = d / "annotations" / "trimaps" / "Abyssinian_1.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(trimap).save(path)
    return FakeTree("OxfordPets", d, [b.replace("_", " ") for b in PET_BREEDS], per_class_counts(counts, 37),
                    {"images/Abyssinian_1.jpg"})


def make_cars(root: Path) -> FakeTree:
    """Paths in the JSON are relative to the dataset folder (cars_train/..., cars_test/...)."""
    from scipy.io import savemat

    d = root / "stanford_cars"
    names = ["2012 Tesla Model S", "2012 BMW M3 coupe", "2007 Volvo XC90 SUV"]
    folder = {"train": "cars_train", "val": "cars_train", "test": "cars_test"}
    base = {"train": 0, "val": 100, "test": 0}
    write_zhou(d, "StanfordCars", "", names, lambda c, l, s, i: f"{folder[s]}/{base[s] + 10 * l + i + 1:05d}.jpg", COUNTS)
    dtype = [(k, "O") for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    for name, fname, box in (("devkit/cars_train_annos.mat", "00001.jpg", (3, 4, 12, 10)),
                             ("cars_test_annos_withlabels.mat", "00001.jpg", (1, 1, 40, 30))):
        annos = np.zeros((1, 1), dtype=dtype)
        for k, v in zip(("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"), box):
            annos[0, 0][k] = np.array([[v]], dtype=np.uint8)
        annos[0, 0]["class"], annos[0, 0]["fname"] = np.array([[1]], dtype=np.uint8), np.array([fname])
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        savemat(str(d / name), {"annotations": annos})
    return FakeTree("StanfordCars", d, names, per_class_counts(COUNTS, 3), {"cars_train/00001.jpg", "cars_test/00001.jpg"})


def make_flowers(root: Path) -> FakeTree:
    """``jpg/image_XXXXX.jpg`` + ``segmim/segmim_XXXXX.jpg`` (background blue ≈ (0, 0, 254))."""
    d = root / "oxford_flowers"
    names = ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"]
    write_zhou(d, "OxfordFlowers", "jpg", names,
               lambda c, l, s, i: f"image_{100 * l + OFFSETS[s] + i + 1:05d}.jpg", COUNTS)
    seg = np.zeros((IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=np.uint8)
    seg[...] = (0, 0, 254)
    seg[10:20, 0:20] = (200, 120, 40)  # the flower
    (d / "segmim").mkdir()
    Image.fromarray(seg).save(d / "segmim" / "segmim_00001.jpg", quality=90)
    return FakeTree("OxfordFlowers", d, names, per_class_counts(COUNTS, 3), {"jpg/image_00001.jpg"})


make_food = simple_zhou("Food101", "food-101", "images", ["apple_pie", "baby_back_ribs", "sushi"],
                        ["apple pie", "baby back ribs", "sushi"], "{cls}/{split}{i}.jpg")
make_sun = simple_zhou("SUN397", "sun397", "SUN397", ["abbey", "airplane_cabin", "outdoor apartment building"],
                       ["abbey", "airplane cabin", "outdoor apartment building"], "{label}/{cls}/sun_{split}{i}.jpg")
make_dtd = simple_zhou("DescribableTextures", "dtd", "images", ["banded", "blotchy", "zigzagged"],
                       ["banded", "blotchy", "zigzagged"], "{cls}/{cls}_{split}{i}.jpg")
make_eurosat = simple_zhou("EuroSAT", "eurosat", "2750", ["AnnualCrop", "Forest", "SeaLake", "Highway"],
                           ["Annual Crop Land", "Forest", "Sea or Lake", "Highway or Road"], "{cls}/{cls}_{split}{i}.jpg")
make_ucf = simple_zhou("UCF101", "ucf101", "UCF-101-midframes", ["Apply_Eye_Makeup", "Archery", "Baby_Crawling"],
                       ["Apply Eye Makeup", "Archery", "Baby Crawling"], "{cls}/v_{label}_{split}{i}.jpg")


AIRCRAFT_VARIANTS = ["707-320", "Boeing 717", "F-16A/B", "A300B4"]


def make_aircraft(root: Path) -> FakeTree:
    """``variants.txt`` + ``images_variant_<split>.txt`` (``<id> <variant>``) + ``images_box.txt``."""
    d = root / "fgvc_aircraft"
    image_id = 1000000
    for split, count in COUNTS.items():
        lines = []
        for variant in AIRCRAFT_VARIANTS:
            for _ in range(count):
                image_id += 1
                write_image(d / "images" / f"{image_id}.jpg", AIRCRAFT_VARIANTS.index(variant))
                lines.append(f"{image_id} {variant}")
        (d / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    (d / "variants.txt").write_text("\n".join(AIRCRAFT_VARIANTS) + "\n")
    (d / "images_box.txt").write_text("1000001 11 6 30 25\n")
    return FakeTree("FGVCAircraft", d, AIRCRAFT_VARIANTS, per_class_counts(COUNTS, 4), {"images/1000001.jpg"})


WNIDS = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great_white_shark",
         "n01491361": "tiger shark", "n01494475": "hammerhead"}


def write_classnames(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    # deliberately not in sorted wnid order: labels must still follow the sorted wnids
    items = sorted(WNIDS.items(), reverse=True)
    (d / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in items))


def sorted_names(wnids=None) -> list[str]:
    return [WNIDS[w].replace("_", " ") for w in sorted(wnids or WNIDS)]


def write_class_folders(base: Path, folders: list[str], count: int, ext: str = "JPEG") -> None:
    for label, folder in enumerate(folders):
        for i in range(count):
            write_image(base / folder / f"{folder}_{i:04d}.{ext}", label)


def make_imagenet(root: Path) -> FakeTree:
    """``images/{train,val}/<wnid>/`` + ``classnames.txt`` + one ILSVRC XML box for a val image."""
    d = root / "imagenet"
    write_classnames(d)
    write_class_folders(d / "images" / "train", sorted(WNIDS), 3)
    write_class_folders(d / "images" / "val", sorted(WNIDS), 2)
    (d / "images" / "train" / "n01440764" / ".hidden").write_text("ignored")
    xml = ("<annotation><size><width>80</width><height>60</height></size>"
           "<object><name>n01440764</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>40</xmax><ymax>30</ymax></bndbox></object>"
           "</annotation>")
    (d / "bboxes" / "val").mkdir(parents=True)
    (d / "bboxes" / "val" / "n01440764_0000.xml").write_text(xml)
    return FakeTree("ImageNet", d, sorted_names(), {"train": 15, "test": 10}, {"images/val/n01440764/n01440764_0000.JPEG"})


def make_imagenet_v2(root: Path) -> FakeTree:
    d = root / "imagenetv2"
    write_classnames(d)
    write_class_folders(d / "imagenetv2-matched-frequency-format-val", [str(i) for i in range(len(WNIDS))], 2, "jpeg")
    # folder i is label i in classnames.txt order (not sorted)
    names = [n.replace("_", " ") for _, n in sorted(WNIDS.items(), reverse=True)]
    return FakeTree("ImageNetV2", d, names, {"test": 10})


def make_imagenet_sketch(root: Path) -> FakeTree:
    """Uses imagenet's classnames.txt (no copy in its own folder)."""
    write_classnames(root / "imagenet")
    d = root / "imagenet-sketch"
    write_class_folders(d / "images", sorted(WNIDS), 2)
    return FakeTree("ImageNetSketch", d, sorted_names(), {"test": 10})


def wnid_subset_maker(name: str, folder: str, image_dir: str):
    """ImageNet-A/-R: a subset of the wnids (200 of 1000 in reality), labelled in sorted order."""
    subset = ["n01494475", "n01443537", "n01491361"]

    def make(root: Path) -> FakeTree:
        d = root / folder
        write_classnames(d)
        write_class_folders(d / image_dir, subset, 2, "jpg")
        (d / image_dir / "README.txt").write_text("not a class")
        return FakeTree(name, d, sorted_names(subset), {"test": 6})

    return make


FAKES: dict[str, Callable[[Path], FakeTree]] = {
    "Caltech101": make_caltech,
    "OxfordPets": make_pets,
    "StanfordCars": make_cars,
    "OxfordFlowers": make_flowers,
    "Food101": make_food,
    "FGVCAircraft": make_aircraft,
    "SUN397": make_sun,
    "DescribableTextures": make_dtd,
    "EuroSAT": make_eurosat,
    "UCF101": make_ucf,
    "ImageNet": make_imagenet,
    "ImageNetV2": make_imagenet_v2,
    "ImageNetSketch": make_imagenet_sketch,
    "ImageNetA": wnid_subset_maker("ImageNetA", "imagenet-adversarial", "imagenet-a"),
    "ImageNetR": wnid_subset_maker("ImageNetR", "imagenet-rendition", "imagenet-r"),
}


def make_fake(name: str, root: str | Path) -> FakeTree:
    """Write the fake tree of dataset ``name`` under ``root``."""
    return FAKES[name](Path(root))


def make_class_folders(root: Path, counts: dict[str, int], size: tuple[int, int] = IMAGE_SIZE) -> Path:
    """A class-per-folder tree ``<root>/<class>/<i>.png`` (input of ``make_split``)."""
    for label, (cls, n) in enumerate(counts.items()):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            write_image(root / cls / f"{i:03d}.png", label, size)
    return root
