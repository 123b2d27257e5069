"""The fast path changes speed, never results: every exact shortcut equals the plain computation.

Tiny configs only (ViT-B/16 is marked slow). Nothing here times anything: see bench/bench.py.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import replace

import pytest
import torch
from method_helpers import adapter_id, registered_adapters, trained_adapters, trains_at_build

from mmprompt.adapters import CoCoOp, MaPLe
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


def running_as(module: PromptCLIPModule, **options) -> AbstractContextManager:
    """The same weights under other speed options, with text caches of their own (the caches depend on
    the options); the module's options and caches come back on leaving."""
    return module.running_with(replace(module.speed, **options))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("adapter_class", registered_adapters(), ids=adapter_id)
def test_fast_path_logits_equal_the_naive_path(adapter_class, images):
    module = _module(adapter_class())
    with torch.no_grad():
        fast = module(images, CLASSES)
        with running_as(module, **NAIVE):
            naive = module(images, CLASSES)
    _close(fast, naive, atol=1e-4)


def test_truncated_context_text_features_equal_full_context():
    module = _module(MaPLe(n_ctx=2, depth=9))
    with torch.no_grad():
        truncated = module.encode_classes(CLASSES)
        assert module.prompts_for(CLASSES)[0].token_ids.shape[1] < 20
        with running_as(module, truncate_text=False):
            full = module.encode_classes(CLASSES)
            assert module.prompts_for(CLASSES)[0].token_ids.shape[1] == 77
    _close(truncated, full)


@pytest.mark.parametrize("chunk_size", [1, 3, 7])
def test_chunked_text_pass_equals_unchunked(chunk_size):
    module = _module(MaPLe(n_ctx=2, depth=9))
    with torch.no_grad():
        whole = module.encode_classes(CLASSES)
        with running_as(module, text_chunk_size=chunk_size):
            chunked = module.encode_classes(CLASSES)
        with running_as(module, text_chunk_size=None, bucket_text=True):
            plain = module.encode_classes(CLASSES)
    _close(chunked, whole)
    _close(plain, whole)


def test_cached_and_uncached_evaluation_predict_the_same(images):
    module = _module(MaPLe(n_ctx=2, depth=9))
    batches = [images, images.flip(0), images * 0.5]
    with torch.no_grad():
        module.on_test_epoch_start()
        with running_as(module) as caches:
            cached = [module(batch, CLASSES) for batch in batches]
            assert list(caches.features) == [CLASSES]  # encoded once, reused for the later batches
        with running_as(module, cache_text_features=False) as caches:
            uncached = [module(batch, CLASSES) for batch in batches]
            assert not caches.features
    for a, b in zip(cached, uncached):
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        _close(a, b)


def test_running_with_other_options_keeps_its_own_caches_and_restores_the_module(images):
    module = _module(MaPLe(n_ctx=2, depth=9))
    own = module.speed
    with torch.no_grad():
        module.on_test_epoch_start()
        fast = module(images, CLASSES)
        cached = module.text_features(CLASSES)
        with module.running_with(NAIVE | {"cache_text_features": True}) as caches:
            assert module.speed.attention == "explicit" and not module.speed.truncate_text
            naive = module(images, CLASSES)
            assert list(caches.features) == [CLASSES] and len(caches.prompts) == 1
        again = module(images, CLASSES)
        assert module.speed == own and module.text_features(CLASSES) is cached  # its own cache, as before the block
    assert caches.features[CLASSES] is not cached
    _close(naive, fast)
    assert torch.equal(again, fast)


def test_text_cache_is_bypassed_while_text_prompts_train():
    module = _module(MaPLe(n_ctx=2, depth=3)).train()
    with torch.enable_grad(), running_as(module) as caches:
        first = module.text_features(CLASSES)
    assert first.requires_grad and not caches.features


@pytest.mark.parametrize("adapter_class", trained_adapters(), ids=adapter_id)
def test_training_gradients_equal_the_naive_path(adapter_class, images):
    module = _module(adapter_class()).train()
    for dropout in (m for m in module.adapter.modules() if isinstance(m, torch.nn.Dropout)):
        dropout.eval()  # its masks take the shape of the path's tensors (truncated text is shorter): off here
    labels = torch.tensor([0, 2, 5])

    def gradients() -> list[torch.Tensor]:
        module.adapter.zero_grad()
        torch.nn.functional.cross_entropy(module(images, CLASSES), labels).backward()
        return [p.grad.clone() for p in module.adapter.parameters() if p.requires_grad]

    fast = gradients()
    with running_as(module, **NAIVE):
        naive = gradients()
    assert len(fast) == len(naive) > 0
    for a, b in zip(fast, naive):
        _close(a, b, atol=1e-5)


def test_only_the_training_free_methods_have_nothing_to_train_at_build():
    """The gradient test above covers every other method; Tip-Adapter-F's keys appear with its cache
    (tests/test_methods_feature_cache.py)."""
    assert {a.__name__ for a in registered_adapters() if not trains_at_build(a)} == {"ZeroShot", "TipAdapter",
                                                                                     "TipAdapterF"}


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
        with running_as(module, **NAIVE):
            naive = module(images, CLASSES)
    _close(fast, naive, atol=1e-3)
