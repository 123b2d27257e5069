"""Built-in synthetic data: layout, determinism, atomic generation, exact masks, and the checker."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from data_fakes import make_fake
from mmprompt.data import FewShotDataModule, mask_to_patch_grid
from mmprompt.data.check import check_dataset, main
from mmprompt.data.synthetic import CLASSES, SYNTHETIC_VARIANTS, generate_synthetic


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate_synthetic(root)
    return root


def test_layout_and_sizes(root):
    d = root / "synthetic"
    split = json.loads((d / "split_zhou_Synthetic.json").read_text())
    assert {k: len(v) for k, v in split.items()} == {"train": 200, "val": 80, "test": 200}
    assert split["train"][0] == ["circle/circle_0000.png", 0, "circle"]
    assert len(list((d / "images").glob("*/*.png"))) == len(list((d / "masks").glob("*/*.png"))) == 480
    assert Image.open(d / "images" / "circle" / "circle_0000.png").size == (96, 96)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_generation_is_deterministic_and_idempotent(root, tmp_path):
    other = generate_synthetic(tmp_path)
    for rel in ("images/star/star_0005.png", "masks/arrow/arrow_0047.png", "split_zhou_Synthetic.json"):
        a, b = root / "synthetic" / rel, other / rel
        assert a.read_bytes() == b.read_bytes(), rel
    stamp = (other / "split_zhou_Synthetic.json").stat().st_mtime_ns
    generate_synthetic(tmp_path)
    assert (other / "split_zhou_Synthetic.json").stat().st_mtime_ns == stamp


def test_concurrent_generation_is_atomic(tmp_path):
    errors = []

    def run():
        try:
            generate_synthetic(tmp_path, SYNTHETIC_VARIANTS[1])
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic-shifted"]
    assert len(list((tmp_path / "synthetic-shifted" / "images").glob("*/*.png"))) == 480


def test_masks_are_exact_and_objects_have_class_colours(root):
    for label, (name, (colour, _)) in enumerate(CLASSES.items()):
        image = np.asarray(Image.open(root / "synthetic" / "images" / name / f"{name}_0003.png")).astype(float)
        mask = np.asarray(Image.open(root / "synthetic" / "masks" / name / f"{name}_0003.png")) > 0
        assert 0.03 < mask.mean() < 0.6
        assert np.abs(image[mask].mean(0) - colour).max() < 12, name


def test_classes_are_distinct_words_and_colours():
    assert list(CLASSES)[:3] == ["circle", "square", "triangle"] and len(CLASSES) == 10
    colours = [c for c, _ in CLASSES.values()]
    assert len({shape for _, shape in CLASSES.values()}) == 10
    assert min(np.abs(np.subtract(a, b)).sum() for i, a in enumerate(colours) for b in colours[i + 1:]) > 100


def test_default_datamodule_is_synthetic_with_aligned_masks(root):
    dm = FewShotDataModule(root=str(root), image_size=64, shots=4, batch_size=8)
    assert dm.spec.name == "synthetic" and dm.train_classes.classnames == tuple(CLASSES)
    dm.prepare_data()
    assert (root / "synthetic" / "split_fewshot" / "shot_4-seed_1.json").is_file()
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["has_mask"].all() and batch["image"].shape == (100, 3, 64, 64)
    assert set(batch["mask"].unique().tolist()) == {0.0, 1.0}
    grid = mask_to_patch_grid(batch["mask"], 8)
    assert grid.shape == (100, 64) and grid.any(1).all() and not grid.all(1).any()
    # the object's pixels carry the class colour in the transformed image too
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None]
    first = batch["image"][0].flatten(1) * std + mean
    inside = first[:, batch["mask"][0].flatten() > 0].mean(1) * 255
    assert (inside - torch.tensor(CLASSES["circle"][0])).abs().max() < 20


def test_shifted_variant_shares_classes(root):
    dm = FewShotDataModule("synthetic-shifted", root=str(root), image_size=32)
    assert dm.train_classes.classnames == tuple(CLASSES)
    assert (root / "synthetic-shifted" / "split_zhou_SyntheticShifted.json").is_file()


def test_checker_passes_on_synthetic(root, capsys):
    report = check_dataset("synthetic", root)
    assert report.ok and report.images_checked == 480 and report.masks_found == 480
    assert report.split_sizes == {"train": 200, "val": 80, "test": 200}
    assert report.class_counts["val"]["ring"] == 8
    assert main(["--dataset", "synthetic", "--root", str(root), "--limit", "10"]) == 0
    out = capsys.readouterr().out
    assert "  circle: 20 / 8 / 20" in out and "images opened: 30" in out and out.strip().endswith("OK")


def test_checker_reports_broken_tree_with_paths(tmp_path, capsys):
    fake = make_fake("OxfordPets", tmp_path)
    missing = fake.dataset_dir / "images" / "Bengal_1.jpg"
    missing.unlink()
    corrupt = fake.dataset_dir / "images" / "pug_21.jpg"
    corrupt.write_bytes(b"garbage")
    Image.new("L", (5, 5)).save(fake.dataset_dir / "annotations" / "trimaps" / "beagle_1.png")
    split = json.loads((fake.dataset_dir / "split_zhou_OxfordPets.json").read_text())
    split["test"].append(split["train"][0])
    (fake.dataset_dir / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    assert main(["--dataset", "oxford_pets", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"PROBLEM {missing}: image listed in the split does not exist" in out
    assert f"PROBLEM {corrupt}: cannot read image" in out
    assert "beagle_1.png is 5x5 but its image is 40x30" in out
    assert "PROBLEM images/Abyssinian_1.jpg: listed in both train and test" in out
    assert out.strip().endswith("4 problem(s)")


def test_checker_reports_missing_tree_and_unknown_name(tmp_path, capsys):
    assert main(["--dataset", "Food101", "--root", str(tmp_path)]) == 1
    assert f"PROBLEM {tmp_path / 'food-101'}: folder not found" in capsys.readouterr().out
    report = check_dataset("foodd", tmp_path)
    assert not report.ok and "valid names" in report.problems[0].message
