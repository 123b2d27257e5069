"""Adapters: exact parameter budgets, initialisation, zero-shot equivalence, and that they train."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from method_helpers import build_context, trained_adapters

from mmprompt.adapters import (
    IVLP, BiasTuning, CLIPAdapter, CoCoOp, CoOp, CoupledBiasTuning, KgCoOp, LoRA, MaPLe, PromptSRC,
    TextDeep, TipAdapter, TipAdapterF, VPTDeep, ZeroShot,
)
from mmprompt.adapters.base import PreparationContext
from mmprompt.tools import methods_table
from mmprompt.classes import ClassSet
from mmprompt.model.module import PromptCLIPModule

TINY = "mmprompt-tiny"
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("adapter, expected", [
    (MaPLe(), 3_555_072),
    (BiasTuning(), 11_520),
    (CoupledBiasTuning(), 3_550_464),
    (VPTDeep(), 73_728),
    (CoOp(), 8_192),
    (CoOp(n_ctx=4, ctx_init="a photo of a"), 2_048),
    (CoCoOp(), 35_360),
    (TextDeep(), 24_576),
    (IVLP(), 2 * 512 * 9 + 2 * 768 * 9),
    (BiasTuning(placement="both"), 2 * 11_520),
    (LoRA(), 184_320),
    (ZeroShot(), 0),
    (KgCoOp(), 2_048),
    (PromptSRC(), 46_080),
    (CLIPAdapter(), 512 * 128 + 128 * 512),
    (TipAdapter(), 0),
    (TipAdapterF(), 0),  # before its cache is sized: K·C·512 (below)
], ids=lambda value: type(value).__name__ if not isinstance(value, int) else str(value))
def test_trainable_parameter_counts_on_vit_b16(vit_b16, adapter, expected):
    adapter.build(build_context(*vit_b16))
    assert adapter.num_trainable_parameters() == expected


@pytest.mark.slow
def test_tip_adapter_f_trains_one_key_per_training_image_on_vit_b16(vit_b16):
    """K·C·512: 16 shots of Caltech101's 100 classes give 819,200 trainable parameters (ImageNet: 8,192,000)."""
    adapter = TipAdapterF()
    adapter.build(build_context(*vit_b16))
    assert adapter.parameter_formula() == "K·C·512"
    classes = ClassSet("all", tuple(f"class {i}" for i in range(100)))
    adapter.allocate(PreparationContext(classes, lambda crop_scale=None: range(16 * 100), None, "cpu"))
    assert adapter.num_trainable_parameters() == 819_200


@pytest.mark.slow
def test_docs_parameter_counts_are_the_built_ones_on_vit_b16(vit_b16):
    """The parameter column of docs/methods.md's generated table, rebuilt from each method's config."""
    context = build_context(*vit_b16)
    rows = methods_table.method_rows(REPO / "configs")
    docs = methods_table.counts_in_docs((REPO / "docs" / "methods.md").read_text())
    assert {row.info.name: methods_table.built_count(row, context) for row in rows} == docs


def test_counts_follow_the_backbone_widths():
    """mmprompt-tiny-wide has text width 32, vision width 96, 4 layers: nothing is hard-coded."""
    module = PromptCLIPModule(MaPLe(n_ctx=2, depth=3), model_name="mmprompt-tiny-wide", pretrained=None)
    assert module.adapter.num_trainable_parameters() == 3 * 2 * 32 + 3 * (32 * 96 + 96)
    bias = PromptCLIPModule(BiasTuning(layers=[1, 3], branch="vision"), model_name="mmprompt-tiny-wide",
                            pretrained=None)
    assert bias.adapter.num_trainable_parameters() == 2 * 96
    with pytest.raises(ValueError, match="depth=9 is out of range: the (text|vision) tower has 4 layers"):
        PromptCLIPModule(MaPLe(), model_name="mmprompt-tiny-wide", pretrained=None)


def test_maple_starts_from_a_photo_and_keeps_the_suffix_frozen(classes):
    module = PromptCLIPModule(MaPLe(depth=3), model_name=TINY, pretrained=None)
    tokenizer, embedding = module.tokenizer, module.clip.token_embedding
    a_photo = tokenizer(["a photo"])[0][1:3]
    assert a_photo.tolist() == [320, 1125]
    assert torch.equal(module.adapter.text.context.detach(), embedding(a_photo))
    texts = module.adapter.prompt_texts(classes)
    assert texts == [[f"a photo of a {name}." for name in classes.classnames]]
    prompts, templates = module.prompts_for(classes)
    assert templates == 1
    dog = tokenizer(["a photo of a dog."])[0]
    assert dog[3:5].tolist() == [539, 320]  # "of a" stays as frozen token embeddings
    assert torch.equal(prompts.embeddings[0, 3:7], embedding(dog[3:7]))
    vision = module.adapter.vision_injection()
    assert sorted(vision.prompts) == [0, 1, 2]
    assert torch.allclose(vision.prompts[0], module.adapter.projections[0](module.adapter.text.context))


@pytest.mark.parametrize("adapter", [BiasTuning(depth=5, placement="both"), CoupledBiasTuning(depth=4)],
                         ids=["independent", "coupled"])
def test_zero_initialised_bias_equals_zero_shot_exactly(adapter, classes):
    torch.manual_seed(0)
    zero_shot = PromptCLIPModule(ZeroShot(), model_name=TINY, pretrained=None)
    torch.manual_seed(0)
    biased = PromptCLIPModule(adapter, model_name=TINY, pretrained=None)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(biased(images, classes), zero_shot(images, classes))


def test_zero_shot_ensemble_averages_normalised_template_features(classes):
    ensemble = ClassSet("all", classes.classnames, classes.template, ("a photo of a {}.", "a drawing of a {}."))
    module = PromptCLIPModule(ZeroShot(ensemble=True), model_name=TINY, pretrained=None)
    single = PromptCLIPModule(ZeroShot(), model_name=TINY, pretrained=None)
    single.clip = module.clip
    with torch.no_grad():
        photo = single.encode_classes(ClassSet("a", classes.classnames, "a photo of a {}."))
        drawing = single.encode_classes(ClassSet("b", classes.classnames, "a drawing of a {}."))
        expected = F.normalize(photo + drawing, dim=-1)
        assert torch.allclose(module.encode_classes(ensemble), expected, atol=1e-6)
    with pytest.raises(ValueError, match="no ensemble templates"):
        module.encode_classes(classes)


#: every registered method that trains from its build (tests/test_perf.py names the training-free ones), as
#: registered, and variants whose options change what is trained
TRAINED_ADAPTERS = [
    *trained_adapters(),
    lambda: CoOp(n_ctx=4, ctx_init="a photo of a"), lambda: BiasTuning(layers=[0, 5], placement="mlp", branch="vision"),
]


@pytest.mark.parametrize("make_adapter", TRAINED_ADAPTERS, ids=lambda make: repr(make()).split("(")[0])
def test_only_adapter_parameters_get_gradients_and_the_loss_falls(make_adapter, classes):
    torch.manual_seed(0)
    module = PromptCLIPModule(make_adapter(), model_name=TINY, pretrained=None)
    module.train()
    assert not module.clip.training  # the frozen backbone stays in eval mode
    labels = torch.arange(8) % len(classes.classnames)
    prototypes = 2 * torch.randn(len(classes.classnames), 3, 64, 64)  # a learnable problem: one look per class
    images = prototypes[labels] + 0.3 * torch.randn(8, 3, 64, 64)
    optimizer = torch.optim.Adam(module.adapter.parameters(), lr=1e-2)  # tiny random CLIP: activations ~0.02
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(module(images, classes), labels)
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is None for p in module.clip.parameters())
            assert all(p.grad is not None for p in module.adapter.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
