"""Prompt tensors shared by several methods (each method file composes these)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..classes import ClassSet
from ..model.encoders import Injection
from .base import Adapter, BuildContext, check_depth

PROMPT_INIT_STD = 0.02


def prompt_fold_refusal(adapter: Adapter) -> str:
    """Why a method with prompt tokens has no folded open_clip form."""
    return (f"{type(adapter).__name__} adds prompt tokens, which join the attention of every input; no change of "
            "CLIP's weights reproduces that, so only the adapter form exists (--format adapter)")


def normal_parameter(*shape: int, std: float = PROMPT_INIT_STD) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * std)


class TextPromptStack(nn.Module):
    """Learnable text context at layer 0 (positions 1..n) plus deep prompts for layers 1..depth-1.

    With ``ctx_init`` ("a photo of a") the prompt reads "<ctx_init> <class>." and its first n tokens
    become learnable, starting from their word embeddings; the rest of ``ctx_init`` stays frozen
    text. Without it the context starts from N(0, 0.02) behind n placeholder tokens. Deep prompts
    start from N(0, 0.02).
    """

    def __init__(self, n_ctx: int, depth: int, ctx_init: str | None) -> None:
        super().__init__()
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
        self.n_ctx, self.depth, self.ctx_init = n_ctx, depth, ctx_init
        self.prefix = ctx_init if ctx_init else " ".join(["X"] * n_ctx)

    def build(self, context: BuildContext) -> None:
        spec = context.spec
        check_depth(self.depth, spec.text_layers, "text")
        if self.ctx_init:
            words = context.embed_words(self.ctx_init)
            if words.shape[0] < self.n_ctx:
                raise ValueError(
                    f"ctx_init {self.ctx_init!r} has {words.shape[0]} tokens, fewer than n_ctx={self.n_ctx}"
                )
            self.context = nn.Parameter(words[: self.n_ctx].detach().clone().float())
        else:
            self.context = normal_parameter(self.n_ctx, spec.text_width)
        self.deep = normal_parameter(self.depth - 1, self.n_ctx, spec.text_width) if self.depth > 1 else None

    def prompt_texts(self, classes: ClassSet) -> list[list[str]]:
        return [[f"{self.prefix} {name}." for name in classes.classnames]]

    def layer_prompts(self) -> dict[int, Tensor]:
        """{layer: (n, text_width)} for layers 0..depth-1."""
        prompts = {0: self.context}
        for index in range(1, self.depth):
            prompts[index] = self.deep[index - 1]
        return prompts


class TextPromptAdapter(Adapter):
    """Base of the methods whose text side is a `TextPromptStack` (CoOp, CoCoOp, TextDeep, IVLP, MaPLe).

    The prompt reads "<ctx_init or placeholders> <class>." and the stack's tensors are the text
    injection; subclasses add what else they learn.
    """

    def __init__(self, n_ctx: int, depth: int, ctx_init: str | None) -> None:
        super().__init__()
        self.text = TextPromptStack(n_ctx, depth, ctx_init)

    def build(self, context: BuildContext) -> None:
        self.text.build(context)

    def prompt_texts(self, classes: ClassSet) -> list[list[str]]:
        return self.text.prompt_texts(classes)

    def text_injection(self, image_features: Tensor | None = None) -> Injection:
        return Injection(prompts=self.text.layer_prompts())

    def fold_refusal(self) -> str | None:
        return prompt_fold_refusal(self)


class VisionPromptStack(nn.Module):
    """Independent vision prompts for layers 0..depth-1, appended after the patch tokens."""

    def __init__(self, n_ctx: int, depth: int, init: str = "normal", option: str = "n_ctx") -> None:
        super().__init__()
        if n_ctx < 1:
            raise ValueError(f"{option} must be >= 1, got {n_ctx}")
        if init not in ("normal", "vpt"):
            raise ValueError(f"init must be 'normal' (N(0, 0.02)) or 'vpt' (VPT's uniform), got {init!r}")
        self.n_ctx, self.depth, self.init = n_ctx, depth, init

    def build(self, context: BuildContext) -> None:
        spec = context.spec
        check_depth(self.depth, spec.vision_layers, "vision")
        if self.init == "vpt":  # VPT: uniform with the patch embedding's fan-in + width
            bound = math.sqrt(6.0 / (3 * spec.patch_size**2 + spec.vision_width))
            self.prompts = nn.Parameter(torch.empty(self.depth, self.n_ctx, spec.vision_width).uniform_(-bound, bound))
        else:
            self.prompts = normal_parameter(self.depth, self.n_ctx, spec.vision_width)

    def layer_prompts(self) -> dict[int, Tensor]:
        return {index: self.prompts[index] for index in range(self.depth)}


def text_to_vision_projections(count: int, context: BuildContext, zero_bias: bool = False) -> nn.ModuleList:
    """One Linear(text_width → vision_width) per layer: MaPLe's coupling function."""
    spec = context.spec
    layers = nn.ModuleList(nn.Linear(spec.text_width, spec.vision_width) for _ in range(count))
    if zero_bias:
        for layer in layers:
            nn.init.zeros_(layer.bias)
    return layers
