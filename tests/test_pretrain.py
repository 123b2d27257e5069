"""`mmprompt pretrain`: the recipe runs through the CLI, its loss falls, and its weights load in plain open_clip."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import open_clip
import pytest
import torch

from mmprompt.backbone import BUNDLED_CONFIG_DIR, bundled_weights, load_clip
from mmprompt.cli import PRETRAINED_WEIGHTS_FILE, main
from mmprompt.encoders import encode_image
from mmprompt.pretrain import EpochStream, PretrainCLIP, encode_captions, warmup_cosine

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "pretrain" / "world.yaml"
QUICK = REPO / "configs" / "pretrain" / "world_quick.yaml"


def test_epoch_stream_gives_new_indices_each_epoch_and_the_same_on_resume():
    sampler = EpochStream(5)
    assert list(sampler) == [0, 1, 2, 3, 4]
    sampler.set_epoch(2)
    assert list(sampler) == [10, 11, 12, 13, 14] and len(sampler) == 5


def test_schedule_warms_up_then_decays_to_zero():
    factors = [warmup_cosine(step, 10, 110) for step in range(111)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[60] == pytest.approx(0.5) and factors[110] == pytest.approx(0.0)


def test_truncated_caption_encoding_equals_open_clip_with_gradients():
    module = PretrainCLIP(init_seed=3)
    clip = module.clip
    ids = module.tokenizer(["a photo of a small red star.", "ring", "there is a large blue heart on a plain background"])
    expected = clip.encode_text(ids)
    got = encode_captions(clip, ids)
    assert torch.allclose(got, expected, atol=1e-5)
    images = torch.randn(2, 3, 64, 64)
    assert torch.allclose(encode_image(clip, images, pooled_only=True), clip.encode_image(images), atol=1e-5)
    got.sum().backward()
    assert clip.token_embedding.weight.grad is not None and clip.token_embedding.weight.grad.abs().sum() > 0
