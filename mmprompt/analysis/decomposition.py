"""The prompt decomposition of one attention head (docs/analysis.md §1), written out.

For a query ``i``, real tokens ``X`` and prompt tokens ``P`` with scores ``s``:

- prompt mass ``λ_i = Σ_{m∈P} e^{s_im} / Σ_{t∈X∪P} e^{s_it}``
- prompt-free attention ``Ā_ij = softmax_{j∈X}(s_ij)``, within-prompt weights ``Â_im = softmax_{m∈P}(s_im)``
- head output ``o_i = (1-λ_i) Σ_{j∈X} Ā_ij v_j + λ_i Σ_{m∈P} Â_im v_m``

The second term is the bias ``β_i`` (in head space; the out-projection is linear, so it is the
bias after it too, up to the projection). Everything works on any subset of query rows, so the
statistics can decompose only the ``[cls]`` or EOT rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..model.attention import AttentionSite, attention_scores


@dataclass(frozen=True)
class Decomposition:
    """λ, Ā and Â of some query rows: shapes (..., Q) and (..., Q, L).

    ``free_attention`` is zero on prompt columns, ``prompt_attention`` zero on real-token columns
    (and all zero in a row that sees no prompt, e.g. text SOS under the causal mask).
    """

    prompt_mass: Tensor
    free_attention: Tensor
    prompt_attention: Tensor

    def free_output(self, v: Tensor) -> Tensor:
        """``Σ_{j∈X} Ā_ij v_j``: the prompt-free attention output (route 1 without the (1-λ) scaling)."""
        return self.free_attention @ v

    def bias(self, v: Tensor) -> Tensor:
        """``β_i = λ_i Σ_{m∈P} Â_im v_m``: what the prompts' values add (route 2), in head space."""
        return self.prompt_mass.unsqueeze(-1) * (self.prompt_attention @ v)

    def output(self, v: Tensor) -> Tensor:
        """``(1-λ) Ā v + β``: equals the ordinary softmax attention output."""
        return (1 - self.prompt_mass).unsqueeze(-1) * self.free_output(v) + self.bias(v)


def masked_softmax(scores: Tensor, keep: Tensor) -> Tensor:
    """Softmax over the columns where ``keep`` is True; rows with no finite kept score become 0."""
    probs = scores.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    return probs.nan_to_num(0.0)


def decompose_scores(scores: Tensor, prompt_mask: Tensor) -> Decomposition:
    """Split scores (..., Q, L) (additive mask already applied) at the prompt columns ``prompt_mask`` (L,)."""
    prompt_mask = prompt_mask.to(scores.device)
    real_lse = scores.masked_fill(prompt_mask, float("-inf")).logsumexp(dim=-1)
    prompt_lse = scores.masked_fill(~prompt_mask, float("-inf")).logsumexp(dim=-1)
    # λ = e^{lse_P} / (e^{lse_X} + e^{lse_P}); sigmoid(-inf) = 0 covers "no prompts" and masked prompts
    prompt_mass = torch.sigmoid(prompt_lse - real_lse)
    return Decomposition(prompt_mass, masked_softmax(scores, ~prompt_mask), masked_softmax(scores, prompt_mask))


def decompose(q: Tensor, k: Tensor, attn_mask: Tensor | None, site: AttentionSite) -> Decomposition:
    """Decomposition of every query row of one attention call."""
    return decompose_scores(attention_scores(q, k, attn_mask), site.prompt_mask)


def rows_seeing_prompts(attn_mask: Tensor | None, site: AttentionSite) -> Tensor:
    """(L,) bool: query rows that may attend to at least one prompt (all rows without a mask)."""
    prompt_mask = site.prompt_mask
    if not prompt_mask.any():
        return torch.zeros(site.seq_len, dtype=torch.bool)
    if attn_mask is None:
        return torch.ones(site.seq_len, dtype=torch.bool)
    return torch.isfinite(attn_mask.detach().cpu())[:, prompt_mask].any(dim=-1)


def row_scores(q: Tensor, k: Tensor, attn_mask: Tensor | None, rows: Tensor) -> Tensor:
    """Scores of selected query rows only: ``rows`` is (Q,) shared or (N, Q) per sequence → (N, H, Q, L).

    Recording the ``[cls]`` or EOT rows this way costs one row of the L×L score matrix per sequence.
    """
    n, heads, length, head_dim = q.shape
    if rows.dim() == 1:
        rows = rows.unsqueeze(0).expand(n, -1)
    index = rows.to(q.device)[:, None, :, None].expand(n, heads, rows.shape[-1], head_dim)
    picked = torch.gather(q, 2, index)
    scores = attention_scores(picked, k, None)
    if attn_mask is not None:
        scores = scores + attn_mask.to(scores.dtype)[rows.to(attn_mask.device)][:, None]
    return scores
