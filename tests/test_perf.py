"""The fast path changes speed, never results: every exact shortcut equals the plain computation.

Tiny configs only (ViT-B/16 is marked slow). Nothing here times anything: see bench/bench.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mmprompt.adapters import IVLP, BiasTuning, CoCoOp, CoOp, CoupledBiasTuning, LoRA, MaPLe, VPTDeep, ZeroShot
from mmprompt.model.attention import softmax_attention
from mmprompt.classes import ClassSet
from mmprompt.model.encoders import encode_image, encode_text, length_buckets, tokenize_prompts
from mmprompt.model.module import PromptCLIPModule

TINY = "mmprompt-tiny"
ATOL = 2e-5
CLASSES = ClassSet("mixed", ("dog", "cat", "greater swiss mountain dog", "oak tree", "red-breasted merganser",
                             "x", "sports car", "american black bear", "tench", "hen"))
NAIVE = {"truncate_text": False, "bucket_text": False, "prune_last_layer": False, "attention": "explicit",
         "cache_text_features": False}


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=atol, rtol=1e-4), f"max abs diff {(a - b).abs().max():.3g}"


def _perturb(module: PromptCLIPModule, seed: int = 0) -> PromptCLIPModule:
    """Random adapter weights, so zero-initialised biases and prompts actually do something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.adapter.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return module


def _module(adapter, model_name: str = TINY) -> PromptCLIPModule:
    torch.manual_seed(0)
    return _perturb(PromptCLIPModule(adapter, model_name=model_name, pretrained=None).eval())


def _with_options(module: PromptCLIPModule, **options) -> PromptCLIPModule:
    """The same weights under other speed options (the caches depend on them, so clear both)."""
    module.speed = replace(module.speed, **options)
    module._prompt_cache.clear()
    module._text_cache.clear()
    return module


ADAPTERS = [ZeroShot, CoOp, VPTDeep, IVLP, MaPLe, BiasTuning, CoupledBiasTuning, CoCoOp, LoRA]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("adapter_class", ADAPTERS, ids=lambda c: c.__name__)
def test_fast_path_logits_equal_the_naive_path(adapter_class, images):
    module = _module(adapter_class())
    with torch.no_grad():
        fast = module(images, CLASSES)
        naive = _with_options(module, **NAIVE)(images, CLASSES)
    _close(fast, naive, atol=1e-4)


def test_truncated_context_text_features_equal_full_context():
    module = _module(MaPLe(n_ctx=2, depth=9))
    with torch.no_grad():
        truncated = module.encode_classes(CLASSES)
        assert module.prompts_for(CLASSES)[0].token_ids.shape[1] < 20
        full = _with_options(module, truncate_text=False).encode_classes(CLASSES)
        assert module.prompts_for(CLASSES)[0].token_ids.shape[1] == 77
    _close(truncated, full)


@pytest.mark.parametrize("chunk_size", [1, 3, 7])
def test_chunked_text_pass_equals_unchunked(chunk_size):
    module = _module(MaPLe(n_ctx=2, depth=9))
    with torch.no_grad():
        whole = module.encode_classes(CLASSES)
        chunked = _with_options(module, text_chunk_size=chunk_size).encode_classes(CLASSES)
        plain = _with_options(module, text_chunk_size=None, bucket_text=True).encode_classes(CLASSES)
    _close(chunked, whole)
    _close(plain, whole)


def test_cached_and_uncached_evaluation_predict_the_same(images):
    module = _module(MaPLe(n_ctx=2, depth=9))
    batches = [images, images.flip(0), images * 0.5]
    with torch.no_grad():
        module.on_test_epoch_start()
        cached = [module(batch, CLASSES) for batch in batches]
        assert CLASSES in module._text_cache  # encoded once, reused for the later batches
        _with_options(module, cache_text_features=False)
        uncached = [module(batch, CLASSES) for batch in batches]
        assert not module._text_cache
    for a, b in zip(cached, uncached):
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        _close(a, b)


def test_running_with_other_options_keeps_its_own_caches_and_restores_the_module(images):
    module = _module(MaPLe(n_ctx=2, depth=9))
    own = module.speed
    with torch.no_grad():
        module.on_test_epoch_start()
        fast = module(images, CLASSES)
        with module.running_with(NAIVE | {"cache_text_features": True}) as caches:
            assert module.speed.attention == "explicit" and not module.speed.truncate_text
            naive = module(images, CLASSES)
            assert list(caches.features) == [CLASSES] and len(caches.prompts) == 1
        again = module(images, CLASSES)
    assert module.speed == own and list(module._text_cache) == [CLASSES]  # its own, as before the block
    assert caches.features[CLASSES] is not module._text_cache[CLASSES]
    _close(naive, fast)
    assert torch.equal(again, fast)


def test_text_cache_is_bypassed_while_text_prompts_train():
    module = _module(MaPLe(n_ctx=2, depth=3)).train()
    with torch.enable_grad():
        first = module.text_features(CLASSES)
    assert first.requires_grad and not module._text_cache


def test_training_gradients_equal_the_naive_path(images):
    module = _module(MaPLe(n_ctx=2, depth=9)).train()
    labels = torch.tensor([0, 2, 5])

    def gradients() -> list[torch.Tensor]:
        module.adapter.zero_grad()
        torch.nn.functional.cross_entropy(module(images, CLASSES), labels).backward()
        return [p.grad.clone() for p in module.adapter.parameters()]

    fast = gradients()
    _with_options(module, **NAIVE)
    naive = gradients()
    for a, b in zip(fast, naive):
        _close(a, b, atol=1e-5)


def test_length_buckets_cover_every_prompt_once_and_respect_chunk_size():
    eot = torch.tensor([5, 9, 5, 7, 12, 7, 7, 5, 9, 6])
    for chunk_size, min_size in ((None, 1), (None, 4), (2, 1), (3, 16)):
        buckets = length_buckets(eot, chunk_size, min_size)
        assert sorted(torch.cat(buckets).tolist()) == list(range(len(eot)))
        assert all(len(b) <= (chunk_size or len(eot)) for b in buckets)
    assert all(len(set(eot[b].tolist())) == 1 for b in length_buckets(eot, None, 1))  # exact lengths


def test_pooled_only_and_buckets_equal_plain_encoders_with_grouped_context():
    module = _module(CoCoOp())
    clip, spec = module.clip, module.spec
    prompts = tokenize_prompts(clip, module.tokenizer, [f"a photo of a {name}." for name in CLASSES.classnames])
    injection = module.adapter.text_injection(torch.nn.functional.normalize(torch.randn(2, spec.embed_dim), dim=-1))
    images = torch.randn(2, 3, spec.image_size, spec.image_size)
    with torch.no_grad():
        reference = encode_text(clip, prompts, injection, softmax_attention)
        assert reference.shape[:2] == (2, len(CLASSES.classnames))
        _close(encode_text(clip, prompts, injection, bucket_by_length=True, pooled_only=True), reference)
        _close(encode_text(clip, prompts, injection, chunk_size=3, bucket_by_length=True), reference)
        _close(encode_image(clip, images, pooled_only=True), clip.encode_image(images))


def test_a_probe_sees_the_plain_call_pattern():
    """Recorders expect one full pass per layer: with a probe set, no bucketing and no pruning."""
    module = _module(MaPLe(n_ctx=2, depth=3))
    calls = []

    def probe(q, k, v, mask, site):
        calls.append((site.tower, site.layer, q.shape[0], q.shape[2]))
        return softmax_attention(q, k, v, mask, site)

    with torch.no_grad(), module.probed(probe):
        module(torch.randn(2, 3, 64, 64), CLASSES)
    text = [c for c in calls if c[0] == "text"]
    vision = [c for c in calls if c[0] == "vision"]
    assert len(text) == module.spec.text_layers and {c[2] for c in text} == {len(CLASSES.classnames)}
    assert len(vision) == module.spec.vision_layers and len({c[3] for c in vision}) == 1


@pytest.mark.slow
def test_fast_path_equals_naive_path_on_vit_b16():
    module = _module(MaPLe(), model_name="ViT-B-16-quickgelu")
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        fast = module(images, CLASSES)
        naive = _with_options(module, **NAIVE)(images, CLASSES)
    _close(fast, naive, atol=1e-3)
