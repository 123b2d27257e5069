"""Shared fixtures. Tests never touch the network: open_clip is forced offline.

Two loops: ``pytest -m "not slow"`` is the everyday one; ``slow`` marks every test that starts a
process (the CLI in a subprocess, DDP, torchrun, pip), builds ViT-B/16 or trains a model for real. A
test that starts a process without the mark fails (`_processes_only_in_slow_tests`), so the fast loop
stays fast.
"""

from __future__ import annotations

import os
import subprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MMPROMPT_QUIET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.multiprocessing  # noqa: E402

from mmprompt.classes import ClassSet  # noqa: E402
from mmprompt.data import FewShotDataModule  # noqa: E402
from mmprompt.model.backbone import BackboneSpec, get_tokenizer, load_clip  # noqa: E402
from run_helpers import ProcessInFastTest, torch_threads  # noqa: E402

TINY = "mmprompt-tiny"


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    torch.set_num_threads(torch_threads())


@pytest.fixture(autouse=True)
def _processes_only_in_slow_tests(request, monkeypatch) -> None:
    """Outside ``@pytest.mark.slow`` starting Python in a process (the CLI, torchrun, pip: what costs
    seconds) or spawning DDP workers (``ddp_spawn``) fails the test. Other programs (``sleep``, the
    ``fc-list`` a plotting library may call) are let through."""
    if request.node.get_closest_marker("slow"):
        return
    start = subprocess.Popen.__init__

    def refuse(*args, **kwargs):
        raise ProcessInFastTest(f"{request.node.nodeid} starts a process: mark it @pytest.mark.slow")

    def refuse_python(self, args, *rest, **kwargs):
        program = args if isinstance(args, (str, bytes, os.PathLike)) else args[0]
        if os.path.basename(os.fsdecode(program)).startswith("python"):
            refuse()
        start(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse_python)
    monkeypatch.setattr(torch.multiprocessing, "start_processes", refuse)


@pytest.fixture
def classes() -> ClassSet:
    return ClassSet("all", ("dog", "cat", "big red car", "oak tree"), "a photo of a {}.")


@pytest.fixture(scope="session")
def vit_b16():
    """ViT-B/16 with random weights (built once: ~7 s on 2 cores)."""
    clip = load_clip("ViT-B-16-quickgelu", pretrained=None)
    return clip, get_tokenizer("ViT-B-16-quickgelu"), BackboneSpec.from_clip(clip, "ViT-B-16-quickgelu")


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """One data root for the session: the generated synthetic shapes (64 px) are written once; generated
    datasets a test asks for (``world-shapes`` of the demo, ...) are added on first use. Tests read it and
    may add few-shot split files (deterministic per seed); a test that damages data works on a copy."""
    root = tmp_path_factory.mktemp("data")
    FewShotDataModule(dataset="synthetic", root=str(root), image_size=64).prepare_data()
    return root
