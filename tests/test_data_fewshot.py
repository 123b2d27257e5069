"""Few-shot sampling, its JSON cache, base/novel selection and the datamodule's stages."""

from __future__ import annotations

import json
from collections import Counter

import pytest

import mmprompt.data.fewshot as fewshot
from data_fakes import PET_BREEDS, make_class_folders, make_fake
from mmprompt.data import FewShotDataModule, make_split


@pytest.fixture(scope="module")
def pool_root(tmp_path_factory):
    """A custom dataset with 6 classes of 12 images, split 6/3/3 per class."""
    root = tmp_path_factory.mktemp("pool")
    make_class_folders(root / "images", {f"class_{i}": 12 for i in range(6)})
    make_split(root / "images", root / "split.json", ratios=(0.5, 0.25, 0.25), seed=0)
    return root


def module(root, **kw) -> FewShotDataModule:
    return FewShotDataModule("custom", split_file=str(root / "split.json"), image_size=16, **kw)


def test_k_per_class_and_min_k_4_for_val(pool_root):
    for shots, train_k, val_k in ((1, 1, 1), (4, 4, 3), (16, 6, 3)):
        subset = module(pool_root, shots=shots, seed=1).fewshot()
        assert Counter(it.label for it in subset["train"]) == {i: train_k for i in range(6)}
        assert Counter(it.label for it in subset["val"]) == {i: val_k for i in range(6)}
    full = module(pool_root, shots=-1).fewshot()
    assert (len(full["train"]), len(full["val"])) == (36, 18)
    assert module(pool_root, shots=None).fewshot() == full


def test_same_seed_same_split_and_cache_reused(pool_root, monkeypatch):
    first = module(pool_root, shots=2, seed=3)
    first.prepare_data()
    cache = pool_root / "split_fewshot" / "split-shot_2-seed_3.json"
    assert cache.is_file()
    data = json.loads(cache.read_text())
    assert data["shots"] == 2 and data["seed"] == 3 and len(data["train"]) == 12
    assert all(not p.startswith("/") for p, _, _ in data["train"])  # portable: relative paths
    again = module(pool_root, shots=2, seed=3).fewshot()
    assert again == first.fewshot()

    def fail(*a, **k):
        raise AssertionError("sampled although a valid cache exists")

    monkeypatch.setattr(fewshot, "sample_fewshot", fail)
    assert module(pool_root, shots=2, seed=3).fewshot() == again
    assert not list((pool_root / "split_fewshot").glob(".*tmp"))  # atomic write leaves no temp file


def test_different_seeds_draw_different_subsets(pool_root):
    a, b = (module(pool_root, shots=2, seed=s).fewshot()["train"] for s in (1, 2))
    assert a != b and len(a) == len(b) == 12


def test_sampling_is_independent_of_listing_order(pool_root):
    catalog = module(pool_root).catalog
    shuffled = type(catalog)(catalog.classnames, {k: list(reversed(v)) for k, v in catalog.splits.items()})
    assert fewshot.sample_fewshot(catalog, 2, 1) == fewshot.sample_fewshot(shuffled, 2, 1)


def test_stale_cache_is_redrawn(tmp_path):
    make_class_folders(tmp_path / "images", {"a": 6, "b": 6})
    make_split(tmp_path / "images", tmp_path / "split.json")
    first = module(tmp_path, shots=1).fewshot()
    split = json.loads((tmp_path / "split.json").read_text())
    split["train"] = [row for row in split["train"] if row[0] not in {it.path for it in first["train"]}]
    (tmp_path / "split.json").write_text(json.dumps(split))
    with pytest.warns(UserWarning, match="drawn from another split listing"):
        redrawn = module(tmp_path, shots=1).fewshot()
    assert not {it.path for it in redrawn["train"]} & {it.path for it in first["train"]}


@pytest.mark.parametrize("shots", [0, -2, -16])
def test_nonpositive_shots_is_an_error(shots):
    with pytest.raises(ValueError, match=f"shots must be a positive integer.*shots={shots}"):
        FewShotDataModule("synthetic", shots=shots)


def test_bad_subsample_is_an_error():
    with pytest.raises(ValueError, match="one of .*'novel'"):
        FewShotDataModule("synthetic", test_subsamples=["novel"])


def test_base_to_novel_on_37_pets(tmp_path):
    make_fake("OxfordPets", tmp_path)
    dm = FewShotDataModule("OxfordPets", root=str(tmp_path), shots=2, subsample="base", image_size=16)
    names = [b.replace("_", " ") for b in PET_BREEDS]
    assert dm.train_classes.name == "base" and dm.train_classes.classnames == tuple(names[:19])
    assert [c.name for c in dm.eval_classes("validate")] == ["base"]
    base, new = dm.eval_classes("test")
    assert (base.name, base.num_classes, new.name, new.num_classes) == ("base", 19, "new", 18)
    assert new.classnames == tuple(names[19:])
    dm.setup("fit")
    train = dm.datasets["train"][0]
    assert sorted({it.label for it in train.items}) == list(range(19)) and len(train) == 38
    dm.setup("test")
    loaders = dm.test_dataloader()
    assert isinstance(loaders, list) and len(loaders) == 2
    new_items = loaders[1].dataset.items
    assert sorted({it.label for it in new_items}) == list(range(18))
    # relabelled: new label 0 is the 20th breed (label 19 in the full set)
    assert all(it.path.startswith(f"images/{PET_BREEDS[19 + it.label]}_") for it in new_items)


def test_all_subsample_gives_one_test_loader(tmp_path):
    make_fake("DescribableTextures", tmp_path)
    dm = FewShotDataModule("dtd", root=str(tmp_path), shots=1, image_size=16)
    dm.setup("test")
    assert not isinstance(dm.test_dataloader(), list)
    assert [c.name for c in dm.eval_classes("test")] == ["all"]
    dm2 = FewShotDataModule("dtd", root=str(tmp_path), test_subsamples=["base", "new", "all"])
    assert [c.num_classes for c in dm2.eval_classes("test")] == [2, 1, 3]


def test_validate_stage_and_dataloader_before_setup(tmp_path):
    make_fake("Food101", tmp_path)
    dm = FewShotDataModule("Food101", root=str(tmp_path), shots=1, image_size=16)
    with pytest.raises(RuntimeError, match="call setup"):
        dm.val_dataloader()
    dm.setup("validate")
    assert len(dm.val_dataloader().dataset) == 3


@pytest.mark.slow
def test_another_process_draws_the_same_split(pool_root):
    """What a second rank or machine does: a fresh interpreter with another hash seed, no cache."""
    import os
    import subprocess
    import sys

    code = (
        "import json; from mmprompt.data.custom import resolve_spec; from mmprompt.data.fewshot import load_fewshot\n"
        f"catalog = resolve_spec('custom', {str(pool_root / 'split.json')!r}).read_catalog('.')\n"
        "print(json.dumps({k: [list(i) for i in v] for k, v in load_fewshot(catalog, 3, 5, None).items()}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         timeout=120).stdout
    here = module(pool_root, shots=3, seed=5).fewshot(write=False)
    assert json.loads(out) == {k: [list(i) for i in v] for k, v in here.items()}
    assert not (pool_root / "split_fewshot" / "split-shot_3-seed_5.json").exists()
