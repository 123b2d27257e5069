"""CLIP-LoRA: exact parameter count, zero-shot at init, equal to open_clip with merged weights, trains,
and its analysis is defined (no prompt tokens: λ = 0, every intervention is the identity)."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from mmprompt.adapters import Adapter, BuildContext, LoRA, ZeroShot
from mmprompt.analysis import AttentionAccumulator, InterventionProbe, StatisticsProbe, estimate_mean_bias
from mmprompt.analysis.interventions import MODES, target_layers
from mmprompt.data import FewShotDataModule
from mmprompt.classes import ClassSet
from mmprompt.model.encoders import encode_image, encode_text, tokenize_prompts
from mmprompt.tools.export import export_adapter, export_open_clip, load_adapter
from mmprompt.model.module import PromptCLIPModule

TINY = "mmprompt-tiny"
CLASSES = ClassSet("all", ("dog", "cat", "big red car", "oak tree"), "a photo of a {}.")
QKV_UPDATES_PER_LAYER = 3


def tiny_module(adapter: Adapter | None = None, seed: int = 0, std: float = 0.0) -> PromptCLIPModule:
    """``adapter`` (default LoRA) on the tiny CLIP in eval mode; ``std`` > 0 moves B (and A) off their init."""
    torch.manual_seed(seed)
    module = PromptCLIPModule(adapter if adapter is not None else LoRA(), model_name=TINY, pretrained=None)
    with torch.no_grad():
        for parameter in module.adapter.parameters():
            parameter.add_(torch.randn_like(parameter) * std)
    module.set_class_sets(test=[CLASSES])
    return module.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- size and init


def test_parameter_count_on_the_tiny_config_by_hand():
    module = tiny_module()
    rank, width, layers = 2, 64, 12  # mmprompt-tiny: both towers 12 layers of width 64
    assert module.adapter.num_trainable_parameters() == 2 * layers * QKV_UPDATES_PER_LAYER * rank * (width + width)
    assert module.adapter.num_trainable_parameters() == 18_432
    keys = list(module.state_dict())  # the checkpoint: A and B of every update, nothing of CLIP
    assert len(keys) == 2 * layers * QKV_UPDATES_PER_LAYER * 2
    assert keys[:2] == ["adapter.deltas.text.0.q.A", "adapter.deltas.text.0.q.B"]
    assert module.adapter.deltas["vision"]["11"]["v"].B.shape == (width, rank)


@pytest.mark.slow
def test_parameter_count_on_vit_b16_by_hand(vit_b16):
    clip, tokenizer, spec = vit_b16
    adapter = LoRA()
    adapter.build(BuildContext(spec, lambda text: torch.zeros(0, spec.text_width)))
    rank, text, vision = 2, 512, 768
    expected = 12 * QKV_UPDATES_PER_LAYER * rank * (text + text) + 12 * QKV_UPDATES_PER_LAYER * rank * (vision + vision)
    assert adapter.num_trainable_parameters() == expected == 184_320


def test_options_choose_towers_layers_and_projections():
    wide = PromptCLIPModule(LoRA(rank=4, projections=["v", "out", "fc"], layers=[1, 3], branch="vision"),
                            model_name="mmprompt-tiny-wide", pretrained=None)
    vision = 96  # mmprompt-tiny-wide: vision width 96, MLP 384
    assert wide.adapter.num_trainable_parameters() == 2 * 4 * (2 * vision + 2 * vision + (vision + 4 * vision))
    assert not wide.adapter.text_injection().deltas and sorted(wide.adapter.vision_injection().deltas) == [1, 3]
    with pytest.raises(ValueError, match="projections=\\['q', 'o'\\]: expected a non-empty list of q, k, v, out"):
        LoRA(projections=["q", "o"])
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRA(rank=0)
    with pytest.raises(ValueError, match="depth=9 is out of range: the text tower has 4 layers"):
        PromptCLIPModule(LoRA(depth=9), model_name="mmprompt-tiny-wide", pretrained=None)


def test_init_follows_loralib_and_the_official_scale():
    adapter = tiny_module().adapter
    update = adapter.deltas["text"]["0"]["q"]
    bound = 1 / 64 ** 0.5  # kaiming_uniform(a=√5) on (r, d_in): U(-1/√d_in, 1/√d_in)
    assert update.A.abs().max() <= bound and update.A.abs().max() > 0.8 * bound
    assert torch.equal(update.B, torch.zeros(64, 2))
    assert update.scale == pytest.approx(1 / 2 ** 0.5) and update.dropout.p == 0.25


def test_zero_b_gives_zero_shot_logits_exactly(images):
    lora, zero_shot = tiny_module(), tiny_module(ZeroShot())
    with torch.no_grad():
        assert torch.equal(lora(images, CLASSES), zero_shot(images, CLASSES))


# ----------------------------------------------------------------------------- equals merged weights


def merged_open_clip(module: PromptCLIPModule):
    """A copy of the frozen CLIP with ``W_qkv += scale · B A`` per update, run by open_clip's own forward."""
    clip = copy.deepcopy(module.clip)
    towers = {"text": clip.transformer.resblocks, "vision": clip.visual.transformer.resblocks}
    rows = {"q": 0, "k": 1, "v": 2}
    with torch.no_grad():
        for tower, layers in module.adapter.deltas.items():
            for layer, updates in layers.items():
                weight = towers[tower][int(layer)].attn.in_proj_weight
                width = weight.shape[1]
                for name, update in updates.items():
                    weight[rows[name] * width:(rows[name] + 1) * width] += update.scale * update.B @ update.A
    return clip


def test_updates_equal_open_clip_with_merged_in_projection_weights(images):
    module = tiny_module(std=0.2)
    merged = merged_open_clip(module)
    texts = [CLASSES.template.format(name) for name in CLASSES.classnames]
    with torch.no_grad():
        image = encode_image(module.clip, images, module.adapter.vision_injection())
        text = encode_text(module.clip, tokenize_prompts(module.clip, module.tokenizer, texts),
                           module.adapter.text_injection())
        reference_image, reference_text = merged.encode_image(images), merged.encode_text(module.tokenizer(texts))
        assert (reference_image - module.clip.encode_image(images)).abs().max() > 1e-2  # the updates matter
        assert torch.allclose(image, reference_image, atol=1e-5, rtol=1e-4)
        assert torch.allclose(text, reference_text, atol=1e-5, rtol=1e-4)
        logits = module(images, CLASSES)  # the module's fast path (pruned last layer, shared prefix)
        image, text = F.normalize(reference_image, dim=-1), F.normalize(reference_text, dim=-1)
        assert torch.allclose(logits, merged.logit_scale.exp() * image @ text.t(), atol=1e-4)


# ----------------------------------------------------------------------------- training


def test_gradients_reach_b_first_then_a_and_never_clip(images):
    module = tiny_module().train()
    labels = torch.tensor([0, 1, 2])
    optimizer = torch.optim.SGD(module.adapter.parameters(), lr=1.0)
    grads = []
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(module(images, CLASSES), labels).backward()
        grads.append({name: p.grad.abs().sum() for name, p in module.adapter.named_parameters()})
        optimizer.step()
    assert all(p.grad is None for p in module.clip.parameters())
    assert all(value > 0 for name, value in grads[0].items() if name.endswith(".B"))
    assert all(value == 0 for name, value in grads[0].items() if name.endswith(".A"))  # B = 0 at init
    assert all(value > 0 for name, value in grads[1].items())


def test_a_short_fit_on_synthetic_data_lowers_the_loss(data_root, tmp_path):
    torch.manual_seed(0)
    # the tiny random CLIP has far smaller activations than real CLIP: AdamW 1e-2 instead of the paper's 2e-4
    module = PromptCLIPModule(LoRA(), model_name=TINY, pretrained=None, warmup_epochs=0,
                              optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2))
    datamodule = FewShotDataModule(dataset="synthetic", root=str(data_root), image_size=64, shots=4,
                                   subsample="base", batch_size=8, eval_batch_size=10)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    classes = datamodule.train_classes

    def loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(module.eval()(batch["image"], classes), batch["label"]).item()

    before = loss()
    trainer = L.Trainer(max_epochs=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
                        default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=datamodule)
    assert isinstance(trainer.optimizers[0], torch.optim.AdamW)
    assert loss() < 0.8 * before, (before, loss())


# ----------------------------------------------------------------------------- analysis and export


def test_no_prompt_mass_and_every_intervention_is_the_identity(images):
    module = tiny_module(std=0.2)
    assert module.adapter.text_injection().num_prompts == module.adapter.vision_injection().num_prompts == 0
    targets = target_layers(module.spec, "both", "all")
    with torch.no_grad():
        plain = module(images, CLASSES)
        recorder = StatisticsProbe(AttentionAccumulator.zeros(module.spec))
        recorder.set_batch(torch.rand(3, 64) > 0.5, torch.ones(3, dtype=torch.bool))
        probes = {"record": recorder}
        mean_bias = estimate_mean_bias(module, [[{"image": images}]], targets)
        assert len(mean_bias) == 24 and all(bias.abs().max() == 0 for bias in mean_bias.values())
        probes.update({mode: InterventionProbe(mode, targets, mean_bias) for mode in MODES})
        for name, probe in probes.items():
            with module.probed(probe):  # text features are recomputed under the probe
                assert torch.allclose(module(images, CLASSES), plain, atol=1e-5, rtol=1e-4), name
    summary = recorder.accumulator.summary()
    assert summary["vision"]["images"] == [3] * 12
    assert torch.tensor(summary["vision"]["prompt_mass"]).abs().max() == 0  # λ = 0: no prompt tokens
    assert torch.tensor(summary["text"]["prompt_mass"]).abs().max() == 0


def test_exports_the_adapter_form_and_refuses_to_fold(images, tmp_path):
    module = tiny_module(std=0.2)
    export_adapter(module, tmp_path)
    loaded = load_adapter(tmp_path, clip=module.clip)
    with torch.no_grad():
        assert torch.equal(loaded(images, CLASSES), module(images, CLASSES))
    with pytest.raises(ValueError, match="LoRA adds weight deltas .*--format adapter"):
        export_open_clip(module, tmp_path)
