"""Shared fixtures. Tests never touch the network: open_clip is forced offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MMPROMPT_QUIET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mmprompt.data import FewShotDataModule  # noqa: E402
from mmprompt.classes import ClassSet  # noqa: E402
from mmprompt.model.backbone import BackboneSpec, get_tokenizer, load_clip  # noqa: E402

TINY = "mmprompt-tiny"


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def classes() -> ClassSet:
    return ClassSet("all", ("dog", "cat", "big red car", "oak tree"), "a photo of a {}.")


@pytest.fixture(scope="session")
def vit_b16():
    """ViT-B/16 with random weights (built once: ~7 s on 2 cores)."""
    clip = load_clip("ViT-B-16-quickgelu", pretrained=None)
    return clip, get_tokenizer("ViT-B-16-quickgelu"), BackboneSpec.from_clip(clip, "ViT-B-16-quickgelu")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The generated synthetic shapes (64 px) under a fresh data root, once per test module; a module
    may define its own ``data_root`` (that one wins)."""
    root = tmp_path_factory.mktemp("data")
    FewShotDataModule(dataset="synthetic", root=str(root), image_size=64).prepare_data()
    return root
