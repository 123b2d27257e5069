"""The prompted encoders equal open_clip's own forward passes, on every attention path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mmprompt.model.attention import fused_attention, softmax_attention
from mmprompt.model.backbone import BackboneSpec, get_tokenizer, load_clip
from mmprompt.model.encoders import EncoderOptions, Injection, encode_image, encode_text, tokenize_prompts

TEXTS = ["a photo of a dog.", "a photo of a very big orange cat with black stripes.", "x."]
ATOL = 1e-5


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=atol, rtol=1e-4), f"max abs diff {(a - b).abs().max():.3g}"


@pytest.fixture(scope="module", params=["mmprompt-tiny", "mmprompt-tiny-wide"])
def tiny(request):
    torch.manual_seed(0)
    clip = load_clip(request.param)
    return clip, get_tokenizer(request.param), BackboneSpec.from_clip(clip, request.param)


def _check_equivalence(clip, tokenizer, spec, batch: int = 2, atol: float = ATOL) -> None:
    images = torch.randn(batch, 3, spec.image_size, spec.image_size)
    with torch.no_grad():
        reference_image = clip.encode_image(images)
        _close(encode_image(clip, images), reference_image, atol)
        _close(encode_image(clip, images, attend=softmax_attention), reference_image, atol)
        reference_text = clip.encode_text(tokenizer(TEXTS))
        prompts = tokenize_prompts(clip, tokenizer, TEXTS)
        _close(encode_text(clip, prompts), reference_text, atol)
        _close(encode_text(clip, prompts, attend=softmax_attention), reference_text, atol)


def test_runner_equals_open_clip_on_tiny_configs(tiny):
    _check_equivalence(*tiny)


@pytest.mark.slow
def test_runner_equals_open_clip_on_vit_b16(vit_b16):
    _check_equivalence(*vit_b16, batch=1, atol=5e-5)


def test_text_is_cut_after_longest_eot_and_chunks_agree(tiny):
    clip, tokenizer, _ = tiny
    full = tokenize_prompts(clip, tokenizer, TEXTS, truncate=False)
    cut = tokenize_prompts(clip, tokenizer, TEXTS)
    assert full.token_ids.shape[1] == 77
    assert cut.token_ids.shape[1] == int(tokenizer(TEXTS).argmax(-1).max()) + 1 < 20
    with torch.no_grad():
        reference = encode_text(clip, full)
        _close(encode_text(clip, cut), reference)
        _close(encode_text(clip, cut, chunk_size=1), reference)
        _close(encode_text(clip, cut, chunk_size=2), reference)


class LinearDelta(nn.Module):
    """A full-rank weight delta: adds ``x Wᵀ`` to a projection (merges into open_clip as ``W_frozen + W``)."""

    def __init__(self, d_in: int, d_out: int, std: float = 0.05) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


PROJECTION_SHAPES = {"q": (1, 1), "k": (1, 1), "v": (1, 1), "out": (1, 1), "fc": (1, 4), "proj": (4, 1)}


def _random_deltas(spec: BackboneSpec, tower: str) -> dict[int, dict[str, LinearDelta]]:
    """Deltas on every projection somewhere, the last layer (the pruned one) included; in eval mode
    (deterministic), so that every shortcut may run."""
    width, depth = (spec.text_width, spec.text_layers) if tower == "text" else (spec.vision_width, spec.vision_layers)
    layers = {1: ("q", "v", "fc"), 3: ("k", "out", "proj"), depth - 1: ("q", "k", "v", "out", "fc", "proj")}
    return {layer: {name: LinearDelta(PROJECTION_SHAPES[name][0] * width, PROJECTION_SHAPES[name][1] * width).eval()
                    for name in names} for layer, names in layers.items()}


def _random_injection(spec: BackboneSpec, tower: str, n: int = 2, groups: int | None = None) -> Injection:
    width = spec.text_width if tower == "text" else spec.vision_width
    first = torch.randn(groups, n, width) if groups else torch.randn(n, width)
    return Injection(
        prompts={0: first, 2: torch.randn(n, width)},
        attn_bias={1: torch.randn(width)},
        mlp_bias={0: torch.randn(width), 3: torch.randn(width)},
        deltas=_random_deltas(spec, tower),
    )


def test_fused_and_explicit_paths_agree_with_injections(tiny):
    clip, tokenizer, spec = tiny
    torch.manual_seed(1)
    images = torch.randn(2, 3, spec.image_size, spec.image_size)
    vision, text = _random_injection(spec, "vision"), _random_injection(spec, "text")
    prompts = tokenize_prompts(clip, tokenizer, TEXTS)
    with torch.no_grad():
        _close(encode_image(clip, images, vision), encode_image(clip, images, vision, softmax_attention))
        _close(encode_text(clip, prompts, text), encode_text(clip, prompts, text, softmax_attention))
        changed = encode_image(clip, images, vision)
    assert (changed - clip.encode_image(images)).abs().max() > 1e-3  # the injection does something


def test_grouped_text_context_equals_one_pass_per_group(tiny):
    clip, tokenizer, spec = tiny
    torch.manual_seed(2)
    grouped = _random_injection(spec, "text", groups=3)
    prompts = tokenize_prompts(clip, tokenizer, TEXTS)
    with torch.no_grad():
        together = encode_text(clip, prompts, grouped)
        assert together.shape == (3, len(TEXTS), spec.embed_dim)
        for group in range(3):
            single = Injection({0: grouped.prompts[0][group], 2: grouped.prompts[2]}, grouped.attn_bias,
                               grouped.mlp_bias, grouped.deltas)
            _close(together[group], encode_text(clip, prompts, single))


def test_text_context_replaces_positions_after_sos(tiny):
    """Injecting the real embeddings of positions 1..n as context must change nothing."""
    clip, tokenizer, _ = tiny
    prompts = tokenize_prompts(clip, tokenizer, ["a photo of a dog.", "a photo of a cat."])
    same = prompts.embeddings[0, 1:3].clone()  # "a photo" is identical in both prompts
    with torch.no_grad():
        _close(encode_text(clip, prompts, Injection(prompts={0: same})), encode_text(clip, prompts))


def test_vision_prompts_are_appended_after_patches_without_positional_embedding(tiny):
    clip, _, spec = tiny
    torch.manual_seed(3)
    images = torch.randn(1, 3, spec.image_size, spec.image_size)
    prompt = torch.randn(2, spec.vision_width)
    seen = {}

    def spy(q, k, v, mask, site):
        seen.setdefault(site.layer, site)
        return softmax_attention(q, k, v, mask, site)

    with torch.no_grad():
        encode_image(clip, images, Injection(prompts={0: prompt}), attend=spy)
    site = seen[0]
    assert site.seq_len == 1 + spec.num_patches + 2
    assert site.prompt_positions == (1 + spec.num_patches, 2 + spec.num_patches)
    assert sorted(seen) == list(range(spec.vision_layers))


def test_bad_injections_are_rejected(tiny):
    clip, _, spec = tiny
    images = torch.randn(1, 3, spec.image_size, spec.image_size)
    with pytest.raises(ValueError, match="none at layer 0"):
        encode_image(clip, images, Injection(prompts={1: torch.randn(2, spec.vision_width)}))
    with pytest.raises(ValueError, match=f"layers 0..{spec.vision_layers - 1}"):
        encode_image(clip, images, Injection(attn_bias={spec.vision_layers: torch.randn(spec.vision_width)}))
    with pytest.raises(ValueError, match="different token counts"):
        encode_image(clip, images, Injection(prompts={0: torch.randn(2, spec.vision_width),
                                                      1: torch.randn(3, spec.vision_width)}))


@pytest.mark.parametrize("pooled_only", [False, True])
def test_shared_prompt_prefix_is_encoded_once_and_exactly(tiny, pooled_only):
    clip, tokenizer, spec = tiny
    from mmprompt.model.encoders import shared_prefix_length

    texts = ["X X of a dog.", "X X of a very big orange cat.", "X X of a tree."]
    prompts = tokenize_prompts(clip, tokenizer, texts)
    assert shared_prefix_length(prompts.token_ids, prompts.eot_positions) == 5  # SOS X X of a
    torch.manual_seed(4)
    injection = _random_injection(spec, "text")
    for tensor in injection.tensors():
        tensor.requires_grad_(True)
    outputs, grads = [], []
    for share in (False, True):
        features = encode_text(clip, prompts, injection, pooled_only=pooled_only, share_prefix=share)
        outputs.append(features.detach())
        grads.append(torch.autograd.grad(features.square().sum(), list(injection.tensors())))
    _close(outputs[1], outputs[0])
    for shared, plain in zip(grads[1], grads[0]):
        _close(shared, plain)
    _close(outputs[0], encode_text(clip, prompts, injection).detach())


# ----------------------------------------------------------------------------- weight deltas


def _merged_clip(clip, deltas: dict[str, dict[int, dict[str, LinearDelta]]]):
    """A copy of ``clip`` with every delta's W added to the frozen weight it wraps (open_clip runs it)."""
    merged = copy.deepcopy(clip)
    blocks = {"text": merged.transformer.resblocks, "vision": merged.visual.transformer.resblocks}
    for tower, table in deltas.items():
        for layer, block_deltas in table.items():
            block = blocks[tower][layer]
            width = block.attn.embed_dim
            targets = {"q": block.attn.in_proj_weight[:width], "k": block.attn.in_proj_weight[width:2 * width],
                       "v": block.attn.in_proj_weight[2 * width:], "out": block.attn.out_proj.weight,
                       "fc": block.mlp.c_fc.weight, "proj": block.mlp.c_proj.weight}
            with torch.no_grad():
                for name, delta in block_deltas.items():
                    targets[name].add_(delta.weight)
    return merged


SHARED_TEXTS = ["a photo of a dog.", "a photo of a very big orange cat.", "a photo of a tree."]


def test_weight_deltas_equal_open_clip_with_merged_weights_on_every_path(tiny):
    clip, tokenizer, spec = tiny
    torch.manual_seed(5)
    deltas = {tower: _random_deltas(spec, tower) for tower in ("text", "vision")}
    merged = _merged_clip(clip, deltas)
    images = torch.randn(2, 3, spec.image_size, spec.image_size)
    vision, text = Injection(deltas=deltas["vision"]), Injection(deltas=deltas["text"])
    with torch.no_grad():
        reference = merged.encode_image(images)
        assert (reference - clip.encode_image(images)).abs().max() > 1e-3  # the deltas do something
        for attend, pooled_only in ((softmax_attention, False), (fused_attention, True)):
            _close(encode_image(clip, images, vision, attend, pooled_only=pooled_only), reference)
        for texts in (TEXTS, SHARED_TEXTS):
            reference = merged.encode_text(tokenizer(texts))
            prompts = tokenize_prompts(clip, tokenizer, texts)
            _close(encode_text(clip, prompts, text, softmax_attention), reference)
            _close(encode_text(clip, prompts, text, pooled_only=True, share_prefix=True), reference)
            _close(encode_text(clip, prompts, text, chunk_size=2, bucket_by_length=True, pooled_only=True), reference)


def test_delta_tensors_count_as_the_injections_and_get_gradients(tiny):
    _, _, spec = tiny
    delta = LinearDelta(spec.vision_width, spec.vision_width)
    injection = Injection(deltas={0: {"v": delta}})
    assert list(injection.tensors()) == [delta.weight] and injection.requires_grad
    delta.weight.requires_grad_(False)
    assert not injection.requires_grad  # frozen deltas: features may be cached


def test_a_delta_in_training_mode_gets_its_own_pass_per_class(tiny):
    """Dropout in a delta draws per token: the prefix every class shares is then not shared."""
    clip, tokenizer, spec = tiny
    prompts = tokenize_prompts(clip, tokenizer, SHARED_TEXTS)
    delta = nn.Sequential(nn.Dropout(0.5), LinearDelta(spec.text_width, spec.text_width))
    calls = []

    def spy(q, k, v, mask, site):
        calls.append(q.shape[0])
        return softmax_attention(q, k, v, mask, site)

    for training, batch_sizes in ((False, {1, len(SHARED_TEXTS)}), (True, {len(SHARED_TEXTS)})):
        calls.clear()
        injection = Injection(deltas={0: {"q": delta.train(training)}})
        assert injection.stochastic == training
        with torch.no_grad():
            encode_text(clip, prompts, injection, spy, share_prefix=True)
        assert set(calls) == batch_sizes


def test_bad_deltas_are_rejected(tiny):
    clip, _, spec = tiny
    images = torch.randn(1, 3, spec.image_size, spec.image_size)
    delta = LinearDelta(spec.vision_width, spec.vision_width)
    with pytest.raises(ValueError, match="projection 'o'; expected one of q, k, v, out, fc, proj"):
        encode_image(clip, images, Injection(deltas={0: {"o": delta}}))
    with pytest.raises(TypeError, match="delta 'q' at layer 1 is a function; expected an nn.Module"):
        encode_image(clip, images, Injection(deltas={1: {"q": lambda x: x}}))
    with pytest.raises(ValueError, match=f"deltas at layers \\[{spec.vision_layers}\\]"):
        encode_image(clip, images, Injection(deltas={spec.vision_layers: {"q": delta}}))


# ----------------------------------------------------------------------------- speed options


def test_speed_options_come_from_a_mapping_and_name_unknown_keys():
    assert EncoderOptions.parse(None) == EncoderOptions()
    assert EncoderOptions.parse({"text_chunk_size": 250}).text_chunk_size == 250
    assert EncoderOptions.parse(EncoderOptions(attention="explicit")).attention == "explicit"
    with pytest.raises(ValueError, match="unknown speed option\\(s\\) 'chunk_size'; expected some of attention, "
                                         "text_chunk_size"):
        EncoderOptions.parse({"chunk_size": 250})
    with pytest.raises(ValueError, match="speed.attention must be 'fused' or 'explicit', got 'flash'"):
        EncoderOptions(attention="flash")
    with pytest.raises(ValueError, match="speed.text_chunk_size must be a positive number"):
        EncoderOptions(text_chunk_size=0)
    assert EncoderOptions.parse(EncoderOptions(bucket_text=True).as_dict()) == EncoderOptions(bucket_text=True)


def test_a_probe_or_explicit_attention_turns_the_call_pattern_shortcuts_off():
    fast = EncoderOptions(bucket_text=True, text_chunk_size=7)
    assert fast.shortcuts(probed=False) == fast
    explicit = EncoderOptions(attention="explicit", bucket_text=True)
    for effective in (fast.shortcuts(probed=True), explicit.shortcuts(probed=False)):
        assert not (effective.bucket_text or effective.prune_last_layer or effective.share_text_prefix)
    assert fast.shortcuts(probed=True).text_chunk_size == 7 and fast.shortcuts(probed=True).truncate_text
