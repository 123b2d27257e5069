"""The prompted encoders equal open_clip's own forward passes, on every attention path."""

from __future__ import annotations

import pytest
import torch

from mmprompt.attention import softmax_attention
from mmprompt.backbone import BackboneSpec, get_tokenizer, load_clip
from mmprompt.encoders import Injection, encode_image, encode_text, tokenize_prompts

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


def _random_injection(spec: BackboneSpec, tower: str, n: int = 2, groups: int | None = None) -> Injection:
    width = spec.text_width if tower == "text" else spec.vision_width
    first = torch.randn(groups, n, width) if groups else torch.randn(n, width)
    return Injection(
        prompts={0: first, 2: torch.randn(n, width)},
        attn_bias={1: torch.randn(width)},
        mlp_bias={0: torch.randn(width), 3: torch.randn(width)},
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
            single = Injection({0: grouped.prompts[0][group], 2: grouped.prompts[2]}, grouped.attn_bias, grouped.mlp_bias)
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
    from mmprompt.encoders import shared_prefix_length

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
