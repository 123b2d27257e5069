"""Every registered dataset read from a fake tree in its real layout, and the layout errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_fakes import FAKES, make_fake
from mmprompt.data import FewShotDataModule, get_spec
from mmprompt.data.fewshot import class_subset
from mmprompt.data.registry import canonical_names, ensemble_templates

TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "Food101": "a photo of {}, a type of food.",
    "UCF101": "a photo of a person doing {}.",
}


@pytest.mark.parametrize("name", list(FAKES))
def test_catalog_matches_fake_tree(name, tmp_path):
    fake = make_fake(name, tmp_path)
    spec = get_spec(name)
    catalog = spec.read_catalog(tmp_path)
    assert list(catalog.classnames) == fake.classnames
    assert {split: len(items) for split, items in catalog.splits.items()} == fake.sizes
    for items in catalog.splits.values():
        assert {it.label for it in items} == set(range(len(fake.classnames)))
        assert all((fake.dataset_dir / it.path).is_file() for it in items)
    assert spec.template == TEMPLATES.get(name, "a photo of a {}.")


@pytest.mark.parametrize("name", list(FAKES))
def test_datamodule_loads_every_dataset_with_its_masks(name, tmp_path):
    fake = make_fake(name, tmp_path)
    dm = FewShotDataModule(name, root=str(tmp_path), shots=2, image_size=16, eval_batch_size=64)
    n = len(fake.classnames)
    assert dm.train_classes.classnames == tuple(fake.classnames)  # before setup
    if dm.spec.test_only:
        with pytest.raises(ValueError, match="test-only"):
            dm.setup("fit")
    else:
        dm.prepare_data()
        dm.setup("fit")
        per_class_val = min(2, fake.sizes.get("val", fake.sizes["test"]) // n)
        assert len(dm.datasets["train"][0]) == 2 * n
        assert len(dm.datasets["val"][0]) == per_class_val * n
        batch = next(iter(dm.train_dataloader()))
        assert batch["image"].shape == (4, 3, 16, 16) and batch["mask"].shape == (4, 16, 16)
        cache = dm.spec.dataset_dir(tmp_path) / "split_fewshot" / "shot_2-seed_1.json"
        again = FewShotDataModule(name, root=str(tmp_path), shots=2)
        assert cache.is_file() and again.fewshot() == dm.fewshot()
        assert json.loads(cache.read_text())["train"] == [[it.path, it.label, fake.classnames[it.label]]
                                                          for it in dm.fewshot()["train"]]
    assert dm.class_set("base").classnames == tuple(fake.classnames[: (n + 1) // 2])
    assert dm.class_set("new").classnames == tuple(fake.classnames[(n + 1) // 2 :])
    dm.setup("test")
    test_ds = dm.datasets["test"][0]
    assert len(test_ds) == fake.sizes["test"]
    samples = [test_ds[i] for i in range(len(test_ds))]
    masked = {test_ds.items[i].path for i, s in enumerate(samples) if s["has_mask"]}
    assert masked == {p for p in fake.masked if p in {it.path for it in test_ds.items}}
    assert all(s["mask"].sum() == 0 for s in samples if not s["has_mask"])
    assert all(s["mask"].sum() > 0 for s in samples if s["has_mask"])
    assert sorted({int(s["label"]) for s in samples}) == list(range(n))


def test_every_masked_train_image_yields_a_mask(tmp_path):
    """Train-split annotations too (Pets trimap, Caltech contours, Cars train boxes, Flowers)."""
    for name in ("OxfordPets", "Caltech101", "StanfordCars", "OxfordFlowers", "FGVCAircraft"):
        fake = make_fake(name, tmp_path)
        spec = get_spec(name)
        source = spec.masks()
        found = set()
        for items in spec.read_catalog(tmp_path).splits.values():
            for it in items:
                if source(fake.dataset_dir, it.path, (40, 30)) is not None:
                    found.add(it.path)
        assert found == fake.masked, name


def test_names_are_cleaned_like_coop(tmp_path):
    make_fake("EuroSAT", tmp_path)
    make_fake("Food101", tmp_path)
    make_fake("UCF101", tmp_path)
    assert get_spec("eurosat").read_catalog(tmp_path).classnames[:3] == ("Annual Crop Land", "Forest", "Sea or Lake")
    assert get_spec("food-101").read_catalog(tmp_path).classnames[0] == "apple pie"
    assert get_spec("ucf_101").read_catalog(tmp_path).classnames[0] == "Apply Eye Makeup"


def test_stanford_cars_paths_are_relative_to_dataset_folder(tmp_path):
    make_fake("StanfordCars", tmp_path)
    catalog = get_spec("StanfordCars").read_catalog(tmp_path)
    assert catalog.splits["train"][0].path == "cars_train/00001.jpg"
    assert catalog.splits["test"][0].path == "cars_test/00001.jpg"
    make_fake("OxfordPets", tmp_path)
    assert get_spec("OxfordPets").read_catalog(tmp_path).splits["train"][0].path == "images/Abyssinian_1.jpg"


def test_imagenet_labels_follow_sorted_wnids_and_validate_on_test(tmp_path):
    make_fake("ImageNet", tmp_path)
    catalog = get_spec("imagenet").read_catalog(tmp_path)
    assert catalog.classnames == ("tench", "goldfish", "great white shark", "tiger shark", "hammerhead")
    assert catalog.splits["train"][0].path == "images/train/n01440764/n01440764_0000.JPEG"
    assert catalog.split("val") is catalog.splits["test"]
    # V2: folder i is the i-th line of classnames.txt (which the fake writes unsorted)
    make_fake("ImageNetV2", tmp_path)
    v2 = get_spec("ImageNetV2").read_catalog(tmp_path)
    assert v2.classnames[0] == "hammerhead" and v2.splits["test"][0].path.startswith("imagenetv2-matched-frequency-format-val/0/")


def test_splits_do_not_depend_on_listing_order(tmp_path, monkeypatch):
    """Ranks on different filesystems list folders in different orders; the catalog must not care."""
    make_fake("ImageNet", tmp_path)
    make_fake("ImageNetA", tmp_path)
    before = [get_spec(n).read_catalog(tmp_path) for n in ("ImageNet", "ImageNetA")]
    original = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(sorted(original(self), reverse=True)))
    after = [get_spec(n).read_catalog(tmp_path) for n in ("ImageNet", "ImageNetA")]
    assert before == after


def test_ensemble_templates_are_the_80_clip_prompts(tmp_path):
    make_fake("DescribableTextures", tmp_path)
    cs = FewShotDataModule("dtd", root=str(tmp_path)).train_classes
    assert cs.template == "{} texture."
    assert len(cs.ensemble_templates) == 80 == len(ensemble_templates())
    assert cs.ensemble_templates[0] == "a bad photo of a {}." and all("{}" in t for t in cs.ensemble_templates)


def test_template_override(tmp_path):
    make_fake("Food101", tmp_path)
    dm = FewShotDataModule("Food101", root=str(tmp_path), template="an image of {}.")
    assert dm.train_classes.template == "an image of {}."


# -- bad input -------------------------------------------------------------------------------------


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="unknown dataset 'pets2'.*OxfordPets.*synthetic") as err:
        FewShotDataModule("pets2")
    assert "ImageNetR" in str(err.value) and "custom" in canonical_names()


def test_missing_root_names_path_and_layout(tmp_path):
    dm = FewShotDataModule("OxfordPets", root=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert str(tmp_path / "nope" / "oxford_pets") in msg and "split_zhou_OxfordPets.json" in msg and "expected layout" in msg


def test_missing_split_file_names_it(tmp_path):
    (tmp_path / "dtd" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"dtd/split_zhou_DescribableTextures\.json") as err:
        get_spec("dtd").read_catalog(tmp_path)
    assert "images/" in str(err.value)


def test_missing_aircraft_list_and_unknown_variant(tmp_path):
    fake = make_fake("FGVCAircraft", tmp_path)
    (fake.dataset_dir / "images_variant_val.txt").unlink()
    with pytest.raises(FileNotFoundError, match="images_variant_val.txt"):
        get_spec("FGVCAircraft").read_catalog(tmp_path)
    (fake.dataset_dir / "images_variant_val.txt").write_text("1000001 Concorde\n")
    with pytest.raises(ValueError, match="'Concorde'.*variants.txt"):
        get_spec("FGVCAircraft").read_catalog(tmp_path)


def test_imagenet_missing_class_folder_and_classnames(tmp_path):
    fake = make_fake("ImageNet", tmp_path)
    for f in (fake.dataset_dir / "images" / "val" / "n01443537").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match="n01443537 holds no images"):
        get_spec("ImageNet").read_catalog(tmp_path)
    (fake.dataset_dir / "images" / "val" / "n01443537").rmdir()
    with pytest.raises(FileNotFoundError, match="images/val/n01443537"):
        get_spec("ImageNet").read_catalog(tmp_path)
    (fake.dataset_dir / "classnames.txt").unlink()
    with pytest.raises(FileNotFoundError, match="classnames.txt"):
        get_spec("ImageNet").read_catalog(tmp_path)


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_bad_listed_image_raises_naming_it(tmp_path, damage):
    fake = make_fake("Food101", tmp_path)
    dm = FewShotDataModule("Food101", root=str(tmp_path), shots=None, image_size=16)
    dm.setup("test")
    ds = dm.datasets["test"][0]
    path = fake.dataset_dir / ds.items[1].path
    if damage == "missing":
        path.unlink()
        with pytest.raises(FileNotFoundError, match=str(path)):
            ds[1]
    else:
        path.write_bytes(b"not a jpeg at all")
        with pytest.raises(OSError, match=f"cannot read image {path}"):
            ds[1]
    assert ds[0]["image"].shape == (3, 16, 16)  # other images still load


def test_split_json_with_wrong_shape_is_rejected(tmp_path):
    d = tmp_path / "eurosat"
    (d / "2750").mkdir(parents=True)
    (d / "split_zhou_EuroSAT.json").write_text(json.dumps({"train": [["Forest/1.jpg", "0", "Forest"]]}))
    with pytest.raises(ValueError, match=r"train\[0\].*\[relative_path, int_label, classname\]"):
        get_spec("EuroSAT").read_catalog(tmp_path)
    (d / "split_zhou_EuroSAT.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected a JSON object with keys 'train'"):
        get_spec("EuroSAT").read_catalog(tmp_path)


def test_base_new_halves_for_odd_counts():
    assert (len(class_subset(37, "base")), len(class_subset(37, "new"))) == (19, 18)
    assert class_subset(10, "new") == [5, 6, 7, 8, 9]
    assert class_subset(1, "base") == [0]
    with pytest.raises(ValueError, match="'new'.*1 class"):
        class_subset(1, "new")


def test_test_only_variants_report_test_loader(tmp_path):
    make_fake("ImageNetR", tmp_path)
    dm = FewShotDataModule("imagenet-rendition", root=str(tmp_path), image_size=16)
    dm.prepare_data()
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["label"].tolist() == [0, 0, 1, 1, 2, 2]
    assert [c.name for c in dm.eval_classes("test")] == ["all"]
    assert dm.eval_classes("test")[0].classnames == ("goldfish", "tiger shark", "hammerhead")
    assert torch.equal(batch["has_mask"], torch.zeros(6, dtype=torch.bool))
