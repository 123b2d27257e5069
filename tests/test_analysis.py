"""The decomposition, the interventions and the [cls]→foreground statistics on hand-built inputs and
the tiny random-weight model (no Trainer here: see test_analysis_runs.py)."""

from __future__ import annotations

import os
from dataclasses import fields

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from mmprompt.adapters import MaPLe, VPTDeep, ZeroShot, BiasTuning
from mmprompt.analysis import (
    AttentionAccumulator, InterventionProbe, StatisticsProbe, attention_rollout, decompose, estimate_mean_bias,
    foreground_statistics, nearest_words, vision_prompt_similarity,
)
from mmprompt.analysis.common import resolve_layers
from mmprompt.analysis.decomposition import decompose_scores, rows_seeing_prompts
from mmprompt.analysis.interventions import MODES, MeanBiasCollector, intervened_output, target_layers
from mmprompt.analysis.statistics import patch_attention
from mmprompt.data.masks import mask_to_patch_grid
from mmprompt.analysis.decomposition import decompose_scores, rows_seeing_prompts
from mmprompt.model.attention import AttentionSite, fused_attention, softmax_attention
from mmprompt.classes import ClassSet
from mmprompt.data.transforms import build_transform, transform_pair
from mmprompt.model.attention import AttentionSite, fused_attention, softmax_attention
from mmprompt.model.encoders import Injection, encode_image
from mmprompt.model.module import PromptCLIPModule

CLASSES = ClassSet("all", ("cat", "dog", "car"))
TOL = dict(atol=1e-5, rtol=1e-4)


def make_module(adapter) -> PromptCLIPModule:
    torch.manual_seed(0)
    module = PromptCLIPModule(adapter, model_name="mmprompt-tiny", pretrained=None)
    module.set_class_sets(test=[CLASSES])
    return module.eval()


@pytest.fixture(scope="module")
def maple() -> PromptCLIPModule:
    module = make_module(MaPLe(depth=4))
    with torch.no_grad():  # move the prompts away from their init so every route matters
        for p in module.adapter.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return module


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def vision_site(num_patches: int = 6, num_prompts: int = 2) -> AttentionSite:
    length = 1 + num_patches + num_prompts
    return AttentionSite("vision", 0, length, tuple(range(1 + num_patches, length)), num_patches=num_patches)


def text_site(length: int = 7, num_prompts: int = 2) -> tuple[AttentionSite, torch.Tensor]:
    mask = torch.full((length, length), float("-inf")).triu(1)
    return AttentionSite("text", 0, length, tuple(range(1, 1 + num_prompts)), eot_positions=torch.tensor([5, 6])), mask


def qkv(length: int, n: int = 2, heads: int = 3, dim: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, heads, length, dim, generator=g, dtype=torch.float64) for _ in range(3)]


# ----------------------------------------------------------------------------- decomposition


@pytest.mark.parametrize("layout", ["vision", "text"])
def test_decomposition_reassembles_the_attention_output(layout):
    site, mask = (vision_site(), None) if layout == "vision" else text_site()
    q, k, v = qkv(site.seq_len)
    parts = decompose(q, k, mask, site)
    full = softmax_attention(q, k, v, mask, site)
    assert torch.allclose(parts.output(v), full, atol=1e-12)
    # λ is the softmax mass on the prompt columns, and Ā is a distribution over X only
    probs = torch.softmax(q @ k.transpose(-1, -2) / 2 + (mask if mask is not None else 0), dim=-1)
    assert torch.allclose(parts.prompt_mass, probs[..., site.prompt_mask].sum(-1), atol=1e-12)
    assert torch.allclose(parts.free_attention.sum(-1), torch.ones_like(parts.prompt_mass), atol=1e-12)
    assert parts.free_attention[..., site.prompt_mask].abs().max() == 0
    first_seeing = 0 if layout == "vision" else 1  # text SOS can't see the prompts (causal mask): λ = 0
    assert parts.prompt_mass[..., :first_seeing].abs().sum() == 0 and parts.prompt_mass[..., first_seeing:].min() > 0


def test_decomposition_without_prompts_is_plain_attention():
    site = AttentionSite("vision", 0, 7, (), num_patches=6)
    q, k, v = qkv(7)
    parts = decompose(q, k, None, site)
    assert parts.prompt_mass.abs().max() == 0
    assert parts.bias(v).abs().max() == 0
    assert torch.allclose(parts.free_output(v), softmax_attention(q, k, v, None, site), atol=1e-12)


def probe_output(mode: str, q, k, v, mask, site, mean_bias=None):
    probe = InterventionProbe(mode, {site.tower: frozenset({site.layer})},
                              {(site.tower, site.layer): mean_bias} if mean_bias is not None else {})
    return probe(q, k, v, mask, site)


@pytest.mark.parametrize("layout", ["vision", "text"])
def test_attention_only_is_the_model_with_zero_prompt_values(layout):
    site, mask = (vision_site(), None) if layout == "vision" else text_site()
    q, k, v = qkv(site.seq_len)
    zeroed = v.clone()
    zeroed[:, :, site.prompt_mask] = 0
    attention_only = probe_output("attention_only", q, k, v, mask, site)
    assert torch.allclose(attention_only, softmax_attention(q, k, zeroed, mask, site), atol=1e-12)
    # ... which is no-prompts scaled by (1-λ): the re-weighting is all that is left of the prompts
    lam = decompose(q, k, mask, site).prompt_mass
    no_prompts = probe_output("no_prompts", q, k, v, mask, site)
    assert torch.allclose(attention_only, (1 - lam).unsqueeze(-1) * no_prompts, atol=1e-12)
    assert not torch.allclose(attention_only, no_prompts, atol=1e-3)


def test_attention_only_equals_no_prompts_when_the_prompts_get_no_mass():
    site = vision_site()
    q, k, v = qkv(site.seq_len)
    mask = torch.zeros(site.seq_len, site.seq_len, dtype=torch.float64)
    mask[:, site.prompt_mask] = -1e4  # prompt keys that no query picks: λ → e^-1e4 = 0
    attention_only = probe_output("attention_only", q, k, v, mask, site)
    assert torch.allclose(attention_only, probe_output("no_prompts", q, k, v, mask, site), atol=1e-12)
    assert torch.allclose(attention_only, softmax_attention(q, k, v, mask, site), atol=1e-12)


def test_bias_only_with_zero_bias_is_prompt_free_attention():
    site = vision_site()
    q, k, v = qkv(site.seq_len)
    v[:, :, site.prompt_mask] = 0  # β = λ Â v_P = 0
    bias_only = probe_output("bias_only", q, k, v, None, site)
    x = ~site.prompt_mask  # attention over X alone, prompts not in the sequence at all
    reference = softmax_attention(q[:, :, :, :], k[:, :, x], v[:, :, x], None, site)
    assert torch.allclose(bias_only, reference, atol=1e-12)
    assert not torch.allclose(bias_only, softmax_attention(q, k, v, None, site), atol=1e-3)


def test_mean_bias_equals_bias_only_when_the_bias_is_a_constant():
    site = vision_site()
    targets = {"vision": frozenset({0})}
    collector = MeanBiasCollector(targets)
    g = torch.Generator().manual_seed(3)
    prompt_values = torch.randn(1, 3, 2, 4, generator=g, dtype=torch.float64)
    batches = []
    for _ in range(3):  # zero queries: uniform attention, so β = |P|/L · mean(v_P) for every token and image
        q = torch.zeros(2, 3, site.seq_len, 4, dtype=torch.float64)
        k, v = torch.randn(2, 3, site.seq_len, 4, generator=g, dtype=torch.float64), torch.randn(
            2, 3, site.seq_len, 4, generator=g, dtype=torch.float64)
        v[:, :, site.prompt_mask] = prompt_values
        collector(q, k, v, None, site)
        batches.append((q, k, v))
    mean = collector.means("tokens_and_samples")[("vision", 0)]
    expected = (2 / site.seq_len) * prompt_values[0].mean(dim=1)  # (H, D)
    assert mean.shape == (3, site.seq_len, 4)
    assert torch.allclose(mean.double(), expected[:, None].expand_as(mean), atol=1e-6)
    for q, k, v in batches:
        mean_bias = probe_output("mean_bias", q, k, v, None, site, mean)
        assert torch.allclose(mean_bias, probe_output("bias_only", q, k, v, None, site), atol=1e-6)
        assert not torch.allclose(mean_bias, probe_output("no_prompts", q, k, v, None, site), atol=1e-3)


def test_text_rows_that_cannot_see_prompts_get_no_mean_bias():
    site, mask = text_site()
    assert rows_seeing_prompts(mask, site).tolist() == [False] + [True] * 6
    q, k, v = qkv(site.seq_len)
    out = probe_output("mean_bias", q, k, v, mask, site, torch.ones(3, 4, dtype=torch.float64))
    assert torch.allclose(out[:, :, 0], v[:, :, 0], atol=1e-12)  # SOS attends to itself only
    assert torch.allclose(out[:, :, 1:], probe_output("no_prompts", q, k, v, mask, site)[:, :, 1:] + 1, atol=1e-12)


# ----------------------------------------------------------------------------- options


def test_layer_ranges_and_their_errors():
    assert resolve_layers("0:3", 12, "vision") == {0, 1, 2}
    assert resolve_layers("4:", 6, "text") == {4, 5}
    assert resolve_layers([1, 5], 12, "vision") == {1, 5}
    assert resolve_layers("all", 3, "text") == {0, 1, 2}
    with pytest.raises(ValueError, match=r"layers='10:14' is out of range: the vision tower has layers 0..11"):
        resolve_layers("10:14", 12, "vision")
    with pytest.raises(ValueError, match="is not a layer range"):
        resolve_layers("three", 12, "vision")
    with pytest.raises(ValueError, match="unknown intervention mode 'bias'"):
        InterventionProbe("bias", {})
    with pytest.raises(ValueError, match="branch must be"):
        target_layers(None, "image", "all")


# ----------------------------------------------------------------------------- statistics


def test_fg_ratio_on_hand_built_attention():
    foreground = torch.zeros(2, 16, dtype=torch.bool)
    foreground[0, :4] = True  # |FG| = 4 of 16
    foreground[1, 3:11] = True  # |FG| = 8 of 16
    uniform = torch.full((2, 1, 16), 1 / 16)
    share, ratio, valid = foreground_statistics(uniform, foreground)
    assert torch.allclose(ratio, torch.ones(2, 1)) and valid.all()
    assert torch.allclose(share[:, 0], torch.tensor([0.25, 0.5]))
    on_foreground = foreground[:, None].float() / foreground.sum(-1)[:, None, None]
    _, ratio, _ = foreground_statistics(on_foreground, foreground)
    assert torch.allclose(ratio[:, 0], torch.tensor([16 / 4, 16 / 8]))
    _, _, valid = foreground_statistics(uniform, torch.zeros(2, 16, dtype=torch.bool))
    assert not valid.any()  # no foreground: the image does not count


def test_masks_follow_the_test_crop_to_the_patch_grid():
    """A 128x64 image (object in the right 40x40 corner) is resized to 64x32 and center-cropped to 32x32:
    the crop keeps columns 16..47 of the resized image, so the object lands in the right half."""
    image = Image.fromarray(np.zeros((64, 128, 3), dtype=np.uint8))
    mask = np.zeros((64, 128), dtype=np.float32)
    mask[:, 88:128] = 1.0  # resized: columns 44..63 → cropped: columns 28..31 (a 4-pixel strip)
    mask[16:48, 48:80] = 1.0  # resized: rows 8..23, columns 24..39 → cropped: columns 8..23
    _, aligned = transform_pair(build_transform(False, image_size=32), image, mask)
    grid = mask_to_patch_grid(aligned[None], patch_size=8).view(4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1:3, 1:3] = True  # the central square; the 4-pixel strip covers half of column 3: counts (≥ 50%)
    expected[:, 3] = True
    assert torch.equal(grid, expected)
    # attention only on those patches: fg_ratio = #patches / |FG|
    attention = grid.flatten().float()[None, None] / grid.sum()
    _, ratio, _ = foreground_statistics(attention, grid.flatten()[None])
    assert ratio.item() == pytest.approx(16 / 8)


def test_statistics_probe_counts_only_masked_images_and_keeps_outputs():
    site = vision_site(num_patches=4, num_prompts=2)
    q, k, v = (t.float() for t in qkv(site.seq_len, n=3))
    accumulator = AttentionAccumulator(*(torch.zeros(s, dtype=torch.float64) for s in
                                         [(1, 3), (1,), (1, 3), (1, 3), (1,), (1, 3), (1,)]))
    probe = StatisticsProbe(accumulator)
    foreground = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    probe.set_batch(foreground, torch.tensor([True, False, True]))
    out = probe(q, k, v, None, site)
    assert torch.allclose(out, fused_attention(q, k, v, None, site))
    parts = decompose(q, k, None, site)
    _, ratio, _ = foreground_statistics(patch_attention(decompose_scores(
        (q[:, :, :1] @ k.transpose(-1, -2)) / 2, site.prompt_mask), 4), foreground)
    assert accumulator.masked_images.tolist() == [2.0] and accumulator.images.tolist() == [3.0]
    assert torch.allclose(accumulator.fg_ratio[0].float(), ratio[[0, 2]].sum(0), atol=1e-6)
    assert torch.allclose(accumulator.cls_mass[0].float(), parts.prompt_mass[:, :, 0].sum(0), atol=1e-6)
    summary = accumulator.summary()
    assert summary["vision"]["fg_ratio"][0][1] == pytest.approx(float(ratio[[0, 2], 1].mean()), abs=1e-6)
    assert summary["vision"]["fg_ratio"][0][1] != pytest.approx(1.0, abs=1e-3)


def test_accumulators_add_up_across_ranks():
    spec = make_module(ZeroShot()).spec
    parts = [AttentionAccumulator.zeros(spec) for _ in range(2)]
    for rank, acc in enumerate(parts):
        acc.add_vision(3, torch.full((2, 2), 0.1 * (rank + 1)), torch.full((2, 2), 0.5), torch.full((2, 2), 2.0 + rank),
                       torch.tensor([True, rank == 0]))
        acc.add_text(1, torch.full((4, 2), 0.2))
    other_rank = iter([getattr(parts[1], f.name) for f in fields(AttentionAccumulator)])
    total = parts[0].reduced(lambda t: t + next(other_rank))  # what the all-reduce (sum) of two ranks returns
    summary = total.summary()
    assert summary["vision"]["fg_ratio"][3] == pytest.approx([(2.0 * 2 + 3.0) / 3] * 2)
    assert summary["vision"]["prompt_mass"][3] == pytest.approx([(0.1 * 2 + 0.2 * 2) / 4] * 2)
    assert summary["text"]["prompt_mass"][1] == pytest.approx([0.2, 0.2])
    assert summary["vision"]["masked_images"][3] == 3


# ----------------------------------------------------------------------------- on the tiny model


@pytest.mark.parametrize("adapter", [MaPLe(depth=4), BiasTuning(depth=4), ZeroShot()], ids=["maple", "bias", "zs"])
def test_recording_leaves_logits_unchanged(adapter, images):
    module = make_module(adapter)
    with torch.no_grad():
        plain = module(images, CLASSES)
        probe = StatisticsProbe(AttentionAccumulator.zeros(module.spec))
        probe.set_batch(torch.rand(3, 64) > 0.5, torch.ones(3, dtype=torch.bool))
        with module.probed(probe):
            recorded = module(images, CLASSES)
    assert torch.allclose(recorded, plain, **TOL)
    summary = probe.accumulator.summary()
    assert summary["vision"]["images"] == [3] * 12 and summary["text"]["sequences"] == [3] * 12
    cls_mass = torch.tensor(summary["vision"]["prompt_mass"])
    if isinstance(adapter, MaPLe):
        assert (cls_mass > 0).all() and (torch.tensor(summary["text"]["prompt_mass"])[1:] > 0).all()
    else:
        assert cls_mass.abs().max() == 0  # no prompts: λ = 0 and Ā is the attention itself


@pytest.mark.parametrize("adapter", [BiasTuning(depth=4, init_std=0.5), ZeroShot()], ids=["bias", "zs"])
def test_interventions_are_identity_without_prompts(adapter, images):
    module = make_module(adapter)
    targets = target_layers(module.spec, "both", "all")
    with torch.no_grad():
        plain = module(images, CLASSES)
        mean_bias = estimate_mean_bias(module, [[{"image": images}]], targets)
        assert all(bias.abs().max() == 0 for bias in mean_bias.values()) and len(mean_bias) == 24
        for mode in MODES:
            with module.probed(InterventionProbe(mode, targets, mean_bias)):
                assert torch.allclose(module(images, CLASSES), plain, **TOL), mode


class CallCounter:
    """A probe that counts attention calls per tower and returns the fused output."""

    def __init__(self) -> None:
        self.calls = {"text": 0, "vision": 0}

    def __call__(self, q, k, v, attn_mask, site):
        self.calls[site.tower] += 1
        return fused_attention(q, k, v, attn_mask, site)


def test_probed_nests_restores_on_errors_and_recomputes_text_features(maple, images):
    """The public probe API: text features cached before are not reused (the text tower runs through
    the probe), probes stack and come off in any order, an exception still detaches."""
    outer, inner = CallCounter(), CallCounter()
    with torch.no_grad():
        maple(images, CLASSES)  # text features cached
        with maple.probed(outer) as attached:
            assert attached is outer and maple.attention_probe is outer
            maple(images, CLASSES)
            maple(images, CLASSES)  # cached again, now through the probe: text runs once
            assert outer.calls == {"text": 12, "vision": 24}
            with maple.probed(inner):
                maple(images, CLASSES)
            assert inner.calls == {"text": 12, "vision": 12}  # the latest probe gives the output
            assert outer.calls == {"text": 12, "vision": 24}  # counting is not observing: it was set aside
            assert maple.attention_probe is outer
        assert maple.attention_probe is None
        with pytest.raises(RuntimeError, match="boom"), maple.probed(outer):
            raise RuntimeError("boom")
        assert maple.attention_probe is None
        maple.attach_probe(outer)
        maple.attach_probe(inner)
        maple.detach_probe(outer)  # hooks of two callbacks end in any order
        assert maple.attention_probe is inner
        maple.detach_probe(inner)
    with pytest.raises(ValueError, match="is not attached"):
        maple.detach_probe(inner)


def test_observers_record_while_an_intervention_gives_the_output(maple, images):
    """A StatisticsProbe stacked on an intervention records the intervened model and changes nothing:
    under no_prompts in every vision layer, the [cls] attention of the model without vision prompts."""
    targets = target_layers(maple.spec, "vision", "all")
    zero_shot = make_module(ZeroShot())  # the same backbone (seed 0)
    foreground = torch.rand(3, 64, generator=torch.Generator().manual_seed(2)) > 0.5
    recorded = {}
    with torch.no_grad():
        alone = encode_image(maple.clip, images, maple.adapter.vision_injection(), InterventionProbe("no_prompts", targets))
        for name, module, probes in (("zs", zero_shot, []), ("intervened", maple, [InterventionProbe("no_prompts", targets)])):
            statistics = StatisticsProbe(AttentionAccumulator.zeros(module.spec))
            statistics.set_batch(foreground, None)
            for probe in [*probes, statistics]:
                module.attach_probe(probe)
            features = module.image_features(images)
            for probe in [*probes, statistics]:
                module.detach_probe(probe)
            recorded[name] = torch.tensor(statistics.accumulator.summary()["vision"]["fg_ratio"])
    assert torch.allclose(features, torch.nn.functional.normalize(alone.float(), dim=-1), **TOL)
    assert torch.allclose(recorded["intervened"], recorded["zs"], atol=1e-4)


def test_full_mode_equals_normal_logits_and_other_modes_change_them(maple, images):
    targets = target_layers(maple.spec, "both", "all")
    with torch.no_grad():
        plain = maple(images, CLASSES)
        logits = {}
        for mode in ("full", "no_prompts", "attention_only", "bias_only"):
            with maple.probed(InterventionProbe(mode, targets)):
                logits[mode] = maple(images, CLASSES)
    assert torch.allclose(logits["full"], plain, **TOL)
    for mode in ("no_prompts", "attention_only", "bias_only"):
        assert (logits[mode] - plain).abs().max() > 1e-3, mode


def test_no_prompts_on_vision_is_the_model_without_vision_prompts(maple, images):
    """Real tokens never see the prompts, so [cls] is exactly what it is without prompt tokens."""
    injection = maple.adapter.vision_injection()
    targets = target_layers(maple.spec, "vision", "all")
    with torch.no_grad():
        dropped = encode_image(maple.clip, images, injection, InterventionProbe("no_prompts", targets))
        without = encode_image(maple.clip, images, Injection(attn_bias=injection.attn_bias, mlp_bias=injection.mlp_bias))
        prompted = encode_image(maple.clip, images, injection)
    assert torch.allclose(dropped, without, **TOL)
    assert (dropped - prompted).abs().max() > 1e-3


def test_per_position_mean_bias_equals_bias_only_on_identical_images(maple, images):
    """One intervened layer, so its input is the same in the first (unmodified) pass and in the test pass."""
    same = images[:1].expand(4, -1, -1, -1)
    targets = target_layers(maple.spec, "vision", "2")
    with torch.no_grad():
        means = estimate_mean_bias(maple, [[{"image": same[:2]}, {"image": same[2:]}]], targets, mean_over="samples")
        features = {mode: encode_image(maple.clip, same, maple.adapter.vision_injection(),
                                       InterventionProbe(mode, targets, means)) for mode in ("mean_bias", "bias_only")}
        pooled = estimate_mean_bias(maple, [[{"image": same}]], targets)  # tokens and images: differs per token
        mixed = encode_image(maple.clip, same, maple.adapter.vision_injection(), InterventionProbe("mean_bias", targets, pooled))
    assert set(means) == {("vision", 2)}
    assert torch.allclose(features["mean_bias"], features["bias_only"], **TOL)
    assert (mixed - features["bias_only"]).abs().max() > 1e-4


def test_rollout_is_row_stochastic_and_resets_fresh_prompts():
    g = torch.Generator().manual_seed(0)
    matrices = [torch.rand(1, 5, 5, generator=g).softmax(-1) for _ in range(3)]
    rollout = attention_rollout(matrices, prompt_positions=(4,), fresh_prompt_layers=frozenset({2}))
    assert torch.allclose(rollout.sum(-1), torch.ones(1, 5))
    # after the reset the prompt row only mixes the prompt's own position before layer 2
    partial = attention_rollout(matrices[:2])
    partial[:, 4] = torch.eye(5)[4]
    mixed = 0.5 * matrices[2] + 0.5 * torch.eye(5)
    assert torch.allclose(rollout, mixed / mixed.sum(-1, keepdim=True) @ partial)


# ----------------------------------------------------------------------------- prompt analysis


def test_nearest_words_of_the_initial_context_are_its_words():
    module = make_module(MaPLe(depth=2))
    rows = nearest_words(module, k=3)
    assert [(r["layer"], r["position"], r["nearest"]) for r in rows[:2]] == [(0, 0, "a"), (0, 1, "photo")]
    assert rows[0]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert {r["layer"] for r in rows} == {0, 1}
    with pytest.raises(ValueError, match="BiasTuning has no text prompts"):
        nearest_words(make_module(BiasTuning()))


def test_vision_prompt_similarity_compares_foreground_and_background():
    module = make_module(VPTDeep(n_ctx=2, depth=3))
    mask = torch.zeros(2, 64, 64)
    mask[:, :32] = 1.0
    batch = {"image": torch.randn(2, 3, 64, 64), "mask": mask, "has_mask": torch.tensor([True, True])}
    rows = vision_prompt_similarity(module, [batch])
    assert len(rows) == 12 and [r["injected"] for r in rows[:4]] == [True, True, True, False]
    assert rows[0]["images"] == 2
    for row in rows:
        assert -1 <= row["hidden_fg"] <= 1 and -1 <= row["key_bg"] <= 1
        assert row["hidden_fg_minus_bg"] == pytest.approx(row["hidden_fg"] - row["hidden_bg"])
    assert any(abs(r["key_fg_minus_bg"]) > 1e-4 for r in rows)
    with pytest.raises(ValueError, match="ZeroShot has no vision prompts"):
        vision_prompt_similarity(make_module(ZeroShot()), [batch])


def test_overlays_put_models_side_by_side(maple, images, tmp_path):
    from mmprompt.analysis import attention_maps, compare_attention_overlays

    zero_shot = make_module(ZeroShot())
    maps = {layer: attention_maps(maple, images, layer) for layer in ("rollout", 0, 11)}
    for layer, grid in maps.items():
        assert grid.shape == (3, 8, 8) and torch.allclose(grid.sum((1, 2)), torch.ones(3), atol=1e-5), layer
    assert not torch.allclose(maps[0], maps[11], atol=1e-4)
    # same backbone: at layer 0 the patch-renormalised [cls] row can't depend on the prompts (float noise
    # only); deeper layers see what the prompts wrote into the tokens
    gap = {j: (attention_maps(zero_shot, images, j) - maps[j]).abs().max() for j in (0, 11)}
    assert gap[0] < 2e-4 and gap[11] > 5 * gap[0]
    path = compare_attention_overlays({"zero-shot": zero_shot, "MaPLe": maple}, images, tmp_path / "o.png", layer=3,
                                      masks=torch.zeros(3, 64, 64))
    assert path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="overlay_layer=12 must be 'rollout' or a vision layer 0..11"):
        attention_maps(maple, images, 12)
