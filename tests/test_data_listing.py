"""ImageNet-size trees: one scandir pass per folder, the listing cached beside the few-shot cache and
listed again only where a folder changed; a second process (another rank) only reads it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from data_fakes import make_fake

import mmprompt.data.listing as listing
from mmprompt.data import FewShotDataModule, get_spec
from mmprompt.data.catalog import list_dirs, list_files
from mmprompt.data.parsers import IMAGE_EXTENSIONS

IMAGENET_LISTING = ("imagenet", "split_fewshot", "listing.json")


def former_list_files(path: Path) -> list[str]:
    """``catalog.list_files`` before it used scandir (one stat per file)."""
    return sorted(p.name for p in path.iterdir() if p.is_file() and not p.name.startswith("."))


def former_list_dirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_scandir_listing_equals_the_former_listing(tmp_path):
    for name in ("b.jpg", "a.JPEG", ".hidden.jpg", "notes.txt"):
        (tmp_path / name).write_text("x")
    for name in ("sub", ".git", "z"):
        (tmp_path / name).mkdir()
    (tmp_path / "link.jpg").symlink_to(tmp_path / "b.jpg")
    (tmp_path / "dirlink").symlink_to(tmp_path / "z")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    assert list_files(tmp_path) == former_list_files(tmp_path) == ["a.JPEG", "b.jpg", "link.jpg", "notes.txt"]
    assert list_dirs(tmp_path) == former_list_dirs(tmp_path) == ["dirlink", "sub", "z"]


@pytest.fixture
def counted_listings(monkeypatch) -> list[Path]:
    """The folders `FolderListing` actually lists (not read from its cache), in order."""
    listed: list[Path] = []

    def counting(path: Path) -> list[str]:
        listed.append(Path(path))
        return list_files(path)

    monkeypatch.setattr(listing, "list_files", counting)
    return listed


def uncached_catalog(root: Path):
    """The catalog with the cache file out of the way (what every run computed before the cache)."""
    cache = root.joinpath(*IMAGENET_LISTING)
    moved = cache.with_suffix(".bak")
    cache.rename(moved)
    try:
        return get_spec("ImageNet").read_catalog(root)
    finally:
        cache.unlink(missing_ok=True)
        moved.rename(cache)


def test_imagenet_listing_is_cached_and_relisted_only_where_a_folder_changed(tmp_path, counted_listings):
    make_fake("ImageNet", tmp_path)
    spec = get_spec("ImageNet")
    first = spec.read_catalog(tmp_path)
    assert len(counted_listings) == 10 and tmp_path.joinpath(*IMAGENET_LISTING).is_file()  # 5 wnids x train/val
    counted_listings.clear()
    assert spec.read_catalog(tmp_path) == first and counted_listings == []  # nothing listed again
    folder = tmp_path / "imagenet" / "images" / "train" / "n01440764"
    (folder / "n01440764_9999.JPEG").write_bytes((folder / "n01440764_0000.JPEG").read_bytes())
    (tmp_path / "imagenet" / "images" / "val" / "n01443537" / "n01443537_0001.JPEG").unlink()
    changed = spec.read_catalog(tmp_path)
    assert sorted(counted_listings) == [folder, tmp_path / "imagenet" / "images" / "val" / "n01443537"]
    assert len(changed.split("train")) == len(first.split("train")) + 1
    assert len(changed.split("test")) == len(first.split("test")) - 1
    counted_listings.clear()
    assert changed == uncached_catalog(tmp_path) and len(counted_listings) == 10  # the cache changes nothing


def test_a_corrupt_or_foreign_listing_cache_is_listed_again(tmp_path, counted_listings):
    make_fake("ImageNet", tmp_path)
    expected = get_spec("ImageNet").read_catalog(tmp_path)
    cache = tmp_path.joinpath(*IMAGENET_LISTING)
    for text in ('{"version": 1, "folders": ', '{"version": 1, "suffixes": [".png"], "folders": {}}'):
        cache.write_text(text)
        counted_listings.clear()
        assert get_spec("ImageNet").read_catalog(tmp_path) == expected and len(counted_listings) == 10
    assert listing.read_entries(cache, IMAGE_EXTENSIONS)  # rewritten whole


def test_after_prepare_data_another_rank_lists_nothing(tmp_path, counted_listings):
    """Lightning runs prepare_data on local rank 0 and holds every rank at a barrier until it ends;
    a fresh datamodule (another rank's) then reads the listing written there."""
    make_fake("ImageNet", tmp_path)
    FewShotDataModule(dataset="ImageNet", root=str(tmp_path), shots=2).prepare_data()
    assert len(counted_listings) == 10
    counted_listings.clear()
    other_rank = FewShotDataModule(dataset="ImageNet", root=str(tmp_path), shots=2)
    other_rank.setup("fit")
    assert counted_listings == [] and len(other_rank.datasets["train"][0]) == 2 * 5  # 2 shots x 5 classes
