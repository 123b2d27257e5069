"""The two ways of running one trained module that the benchmark compares.

- **fast**: mmprompt's defaults: text cut after the longest EOT (no length buckets), the prompt
  prefix shared by all classes encoded once, frozen prompt embeddings computed once, text features
  cached per evaluation, fused attention, last block for the pooled token only.
- **naive**: what the research code does: the full 77-token context, text features recomputed
  for every batch, explicit-softmax attention everywhere, and attention statistics recorded.

Both paths share the module and its weights (only speed options and caches are swapped), so they
compute the same logits; tests/test_perf.py checks that.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor

from mmprompt.model.attention import AttendFn, AttentionSite, attention_scores, softmax_attention
from mmprompt.model.encoders import EncoderOptions
from mmprompt.model.module import PromptCLIPModule, TextCaches

FAST_OPTIONS = EncoderOptions(truncate_text=True, bucket_text=False, prune_last_layer=True, share_text_prefix=True,
                              attention="fused", cache_text_features=True)
NAIVE_OPTIONS = EncoderOptions(truncate_text=False, bucket_text=False, prune_last_layer=False,
                               share_text_prefix=False, attention="explicit", cache_text_features=False)


def center_foreground(batch: int, num_patches: int) -> Tensor:
    """A stand-in foreground mask: the central quarter of the patch grid, for every image."""
    side = int(num_patches**0.5)
    grid = torch.zeros(side, side, dtype=torch.bool)
    grid[side // 4: side - side // 4, side // 4: side - side // 4] = True
    return grid.flatten().expand(batch, -1)


class StandInRecorder:
    """Used only when mmprompt.analysis has no StatisticsProbe: materialises the softmax and keeps
    the [cls]/EOT attention rows' prompt mass per layer, as a recorder would."""

    def __init__(self) -> None:
        self.prompt_mass: dict[tuple[str, int], Tensor] = {}

    def set_batch(self, foreground: Tensor | None, has_mask: Tensor | None) -> None:
        pass

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, site: AttentionSite) -> Tensor:
        probs = attention_scores(q, k, attn_mask).softmax(dim=-1)
        if site.prompt_positions:
            with torch.no_grad():
                rows = probs[..., 0, :] if site.tower == "vision" else probs.mean(dim=-2)
                mass = rows[..., list(site.prompt_positions)].sum(dim=-1).mean(dim=0)
                self.prompt_mass[(site.tower, site.layer)] = mass.float().cpu()
        return probs @ v


def statistics_probe(module: PromptCLIPModule):
    """The analysis engineers' recorder (`StatisticsProbe`), or None if it is not there."""
    try:
        from mmprompt.analysis import AttentionAccumulator, StatisticsProbe
    except ImportError:
        return None
    return StatisticsProbe(AttentionAccumulator.zeros(module.spec, module.device))


class ExplicitRecorder:
    """Records with ``probe``'s statistics but computes every attention with the explicit softmax."""

    def __init__(self, probe) -> None:
        self.probe = probe

    def set_batch(self, foreground: Tensor | None, has_mask: Tensor | None) -> None:
        self.probe.set_batch(foreground, has_mask)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, site: AttentionSite) -> Tensor:
        with torch.no_grad():
            if site.tower == "vision":
                self.probe.record_vision(q, k, site)
            else:
                self.probe.record_text(q, k, attn_mask, site)
        return softmax_attention(q, k, v, attn_mask, site)


def naive_recorder(module: PromptCLIPModule) -> tuple[AttendFn, str]:
    """The naive path's attend function (explicit softmax + recording) and what records."""
    probe = statistics_probe(module)
    if probe is None:
        return StandInRecorder(), "stand-in recorder (explicit softmax, prompt mass)"
    return ExplicitRecorder(probe), "mmprompt.analysis.StatisticsProbe over an explicit softmax"


@dataclass
class PathState:
    """Options, probe and text caches of one path, swapped into the shared module."""

    options: EncoderOptions
    probe: AttendFn | None = None
    caches: TextCaches = field(default_factory=TextCaches)


@contextmanager
def running(module: PromptCLIPModule, state: PathState, images: Tensor | None = None) -> Iterator[None]:
    """Run ``module`` as ``state`` says; restores the module's own options, probe and caches.

    The probe is attached first (`PromptCLIPModule.probed` drops the module's cached text features),
    then the path's own options and caches (`PromptCLIPModule.running_with`), so a path keeps its
    cache from one call to the next."""
    with ExitStack() as stack:
        if state.probe is not None:
            stack.enter_context(module.probed(state.probe))
        stack.enter_context(module.running_with(state.options, state.caches))
        if state.probe is not None and images is not None and hasattr(state.probe, "set_batch"):
            state.probe.set_batch(center_foreground(images.shape[0], module.spec.num_patches).to(images.device), None)
        yield


def make_paths(module: PromptCLIPModule) -> tuple[dict[str, PathState], str]:
    """fast, naive and recorded (fast + the recorder, for the recording-overhead measurement)."""
    naive_probe, recorder = naive_recorder(module)
    fast_probe = statistics_probe(module) or StandInRecorder()
    paths = {
        "fast": PathState(FAST_OPTIONS),
        "naive": PathState(NAIVE_OPTIONS, naive_probe),
        "recorded": PathState(FAST_OPTIONS, fast_probe),
    }
    return paths, recorder

