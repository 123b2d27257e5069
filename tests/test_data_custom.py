"""Bring-your-own dataset: make_split, the ``custom`` datamodule, its YAML form and its errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from PIL import Image

from data_fakes import make_class_folders
from mmprompt.data import FewShotDataModule, make_split
from mmprompt.data.check import main as check_main
from mmprompt.data.custom import main as make_split_main
from mmprompt.run.commands import main

CLASSES = {"red_fox": 10, "grey wolf": 10, "coyote": 10, "dingo": 10}


@pytest.fixture
def tree(tmp_path) -> Path:
    images = make_class_folders(tmp_path / "animals", CLASSES)
    masks = tmp_path / "masks"
    (masks / "red_fox").mkdir(parents=True)
    m = Image.new("L", (40, 30), 0)
    m.paste(255, (0, 0, 20, 30))  # left half is the fox
    m.save(masks / "red_fox" / "000.png")
    return images


def test_make_split_is_seeded_and_proportional(tree):
    split = make_split(tree, ratios=(0.5, 0.2, 0.3), seed=7)
    assert (tree / "split.json").is_file() and json.loads((tree / "split.json").read_text()) == split
    assert {k: len(v) for k, v in split.items()} == {"train": 20, "val": 8, "test": 12}
    assert Counter(row[2] for row in split["train"]) == {c: 5 for c in CLASSES}
    # labels follow the sorted folder names; paths are relative to the root
    assert {row[2]: row[1] for row in split["test"]} == {"coyote": 0, "dingo": 1, "grey wolf": 2, "red_fox": 3}
    assert all((tree / row[0]).is_file() for rows in split.values() for row in rows)
    FewShotDataModule("custom", split_file=str(tree / "split.json"), shots=1).prepare_data()
    assert (tree / "split_fewshot").is_dir()  # the cache sits beside the classes and is not one
    assert make_split(tree, tree / "again.json", (0.5, 0.2, 0.3), seed=7) == split
    assert make_split(tree, tree / "other.json", (0.5, 0.2, 0.3), seed=8) != split


def test_make_split_cli(tree, capsys):
    assert make_split_main([str(tree), "--split_file", str(tree.parent / "s.json"), "--ratios", "0.6", "0.2", "0.2"]) == 0
    assert "4 classes, train 24, val 8, test 8" in capsys.readouterr().out
    assert main(["make-split", str(tree), "--ratios", "0.6", "0.6", "0.2"]) == 2
    captured = capsys.readouterr()
    assert "mmprompt: error: ratios" in captured.err and "summing to 1" in captured.err and not captured.out


def test_make_split_refuses_a_single_class(tmp_path, capsys):
    (tmp_path / "only").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "only" / "a.png")
    assert main(["make-split", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "only one class folder ('only')" in captured.err and "at least 2 classes" in captured.err
    assert not (tmp_path / "split.json").exists()


def test_empty_class_folder_is_an_error(tree):
    (tree / "jackal").mkdir()
    with pytest.raises(ValueError, match=f"class folder {tree / 'jackal'} holds no images"):
        make_split(tree)


def test_custom_datamodule_runs_every_protocol(tree):
    make_split(tree, seed=1)
    mask_dir = tree.parent / "masks"
    dm = FewShotDataModule("custom", split_file=str(tree / "split.json"), mask_dir=str(mask_dir), shots=2,
                           subsample="base", image_size=16, template="a photo of a {}, a wild dog.")
    assert dm.train_classes.classnames == ("coyote", "dingo")
    assert [c.classnames for c in dm.eval_classes("test")] == [("coyote", "dingo"), ("grey wolf", "red fox")]
    assert dm.train_classes.template == "a photo of a {}, a wild dog."
    dm.prepare_data()
    assert (tree / "split_fewshot" / "split-shot_2-seed_1.json").is_file()
    dm.setup("fit")
    assert len(dm.datasets["train"][0]) == 4 and len(dm.datasets["val"][0]) == 4
    dm.setup("test")
    new = dm.datasets["test"][1]
    assert sorted({it.label for it in new.items}) == [0, 1] and len(new) == 6
    # the one mask (red_fox/000.png) loads wherever the split lists it, and only there
    all_dm = FewShotDataModule("custom", split_file=str(tree / "split.json"), mask_dir=str(mask_dir), shots=None,
                               image_size=16)
    all_dm.setup("fit")
    all_dm.setup("test")
    sets = [*all_dm.datasets["train"], *all_dm.datasets["val"], *all_dm.datasets["test"]]
    found = [s[i] for s in sets for i, it in enumerate(s.items) if it.path == "red_fox/000.png"]
    assert len(found) == 1 and found[0]["has_mask"] and abs(found[0]["mask"].mean().item() - 0.5) < 0.15
    assert sum(int(s[i]["has_mask"]) for s in sets for i in range(len(s))) == 1


def test_custom_from_yaml_config(tree):
    """The YAML the docs show: ``data: {dataset: custom, ...}`` through jsonargparse."""
    from jsonargparse import ArgumentParser

    make_split(tree)
    config = yaml.safe_load(f"""
data:
  dataset: custom
  split_file: {tree / 'split.json'}
  mask_dir: {tree.parent / 'masks'}
  template: "a photo of a {{}}, a wild animal."
  shots: 4
  image_size: 32
""")
    parser = ArgumentParser()
    parser.add_class_arguments(FewShotDataModule, "data")
    cfg = parser.parse_object(config)
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, FewShotDataModule) and dm.shots == 4 and dm.image_size == 32
    assert dm.train_classes.num_classes == 4 and dm.train_classes.template == "a photo of a {}, a wild animal."


def test_custom_checker(tree, capsys):
    make_split(tree)
    args = ["--dataset", "custom", "--split_file", str(tree / "split.json"), "--mask_dir", str(tree.parent / "masks")]
    assert check_main(args) == 0
    out = capsys.readouterr().out
    assert "classes: 4" in out and "with a foreground mask: 1" in out and "red fox: 5 / 2 / 3" in out
    (tree / "dingo" / "003.png").write_bytes(b"")
    assert check_main(args) == 1
    assert f"PROBLEM {tree / 'dingo' / '003.png'}" in capsys.readouterr().out


def write_split(path: Path, rows: dict) -> Path:
    path.write_text(json.dumps(rows))
    return path


def test_label_and_classname_must_agree(tree):
    split = write_split(tree / "bad.json", {"train": [["coyote/000.png", 0, "coyote"], ["dingo/000.png", 0, "dingo"]]})
    with pytest.raises(ValueError, match="label 0 is called 'coyote' at 'coyote/000.png' but 'dingo' at 'dingo/000.png'"):
        FewShotDataModule("custom", split_file=str(split)).train_classes
    write_split(split, {"train": [["coyote/000.png", 0, "coyote"]], "test": [["coyote/001.png", 1, "coyote"]]})
    with pytest.raises(ValueError, match="class 'coyote' has label 0 at 'coyote/000.png' but 1"):
        FewShotDataModule("custom", split_file=str(split)).train_classes


def test_empty_class_in_split_file(tree):
    split = write_split(tree / "gap.json", {"train": [["coyote/000.png", 0, "coyote"], ["dingo/000.png", 2, "dingo"]]})
    with pytest.raises(ValueError, match=r"labels without any entry \(empty classes\): \[1\]"):
        FewShotDataModule("custom", split_file=str(split)).train_classes


@pytest.mark.parametrize("bad", ["../outside.png", "coyote/../../outside.png", "/etc/passwd"])
def test_paths_escaping_the_image_folder_are_rejected(tree, bad):
    split = write_split(tree / "escape.json", {"train": [[bad, 0, "coyote"]]})
    with pytest.raises(ValueError, match="absolute or escapes the image folder"):
        FewShotDataModule("custom", split_file=str(split)).train_classes


def test_mask_with_other_size_is_an_error(tree):
    make_split(tree, ratios=(1.0, 0.0, 0.0))
    bad = tree.parent / "masks" / "coyote" / "000.png"
    bad.parent.mkdir()
    Image.new("L", (20, 20), 255).save(bad)
    dm = FewShotDataModule("custom", split_file=str(tree / "split.json"), mask_dir=str(tree.parent / "masks"),
                           shots=None, image_size=16)
    dm.setup("fit")
    ds = dm.datasets["train"][0]
    index = [it.path for it in ds.items].index("coyote/000.png")
    with pytest.raises(ValueError, match=f"mask {bad} is 20x20 but its image is 40x30"):
        ds[index]


def test_custom_option_errors(tree, tmp_path):
    with pytest.raises(ValueError, match="dataset 'custom' needs split_file"):
        FewShotDataModule("custom")
    with pytest.raises(FileNotFoundError, match="mask_dir not found"):
        FewShotDataModule("custom", split_file=str(tree / "split.json"), mask_dir=str(tmp_path / "none"))
    with pytest.raises(ValueError, match="split_file only apply to dataset 'custom', not 'OxfordPets'"):
        FewShotDataModule("OxfordPets", split_file="x.json")
    with pytest.raises(FileNotFoundError, match=f"custom split file not found: {tmp_path / 'missing.json'}"):
        FewShotDataModule("custom", split_file=str(tmp_path / "missing.json")).train_classes
