"""Route interventions (docs/analysis.md §3): evaluate a trained prompt model with one of the prompts' two
routes removed, per branch and layer range.

With the decomposition ``o_i = (1-λ_i) Ā_i v_X + β_i`` (see `decomposition`), each mode replaces a
head's output at the chosen sites by

============== ================================================================
full           ``(1-λ) Ā v_X + β`` (the normal attention; fused kernel)
no_prompts     ``Ā v_X`` — attention over X only, prompts dropped
attention_only ``(1-λ) Ā v_X`` — prompts stay in the softmax, prompt values zeroed (β removed)
bias_only      ``Ā v_X + β`` — prompt-free attention without the (1-λ) scaling, plus β
mean_bias      ``Ā v_X + β̄`` — β replaced by its mean over tokens and samples of the test data
============== ================================================================

β̄ is estimated in a first pass over the test dataloaders (summed over ranks), over the real-token
query rows that can see a prompt; it is added to exactly those rows (rows that can't see a prompt,
like text SOS under the causal mask, have β = 0 in every mode). The replacement happens in head
space, before the (linear) out-projection, so it is the same statement after it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, get_args

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from ..model.attention import AttentionSite, Branch, fused_attention, towers_of
from ..results import percent_accuracies
from .common import (
    LayerSpec, ReduceFn, as_loader_list, batch_to, fresh_loader, has_prompts, identity_reduce, limited,
    markdown_table, resolve_layers, run_folder, trainer_sum, write_table,
)
from .decomposition import Decomposition, decompose, rows_seeing_prompts

log = logging.getLogger(__name__)

Mode = Literal["full", "no_prompts", "attention_only", "bias_only", "mean_bias"]
MODES: tuple[str, ...] = get_args(Mode)
MeanOver = Literal["tokens_and_samples", "samples"]
SiteKey = tuple[str, int]


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown intervention mode {mode!r}; modes: {', '.join(MODES)}")


def target_layers(spec, branch: Branch, layers: LayerSpec) -> dict[str, frozenset[int]]:
    """{tower: layer indices} the intervention touches, checked against the model's depths."""
    towers = towers_of(branch)
    depths = {"text": spec.text_layers, "vision": spec.vision_layers}
    return {tower: resolve_layers(layers, depths[tower], tower) for tower in towers}


def intervened_output(mode: str, parts: Decomposition, v: Tensor, seeing: Tensor,
                      mean_bias: Tensor | None = None) -> Tensor:
    """A head's output (N, H, L, D) under ``mode``; ``seeing`` (L,) marks rows that may see a prompt."""
    free = parts.free_output(v)
    if mode == "no_prompts":
        return free
    if mode == "attention_only":
        return (1 - parts.prompt_mass).unsqueeze(-1) * free
    if mode == "bias_only":
        return free + parts.bias(v)
    if mode == "mean_bias":
        if mean_bias is None:
            raise ValueError("mean_bias mode needs the dataset mean of β: run the first pass (RouteIntervention does)")
        if mean_bias.dim() == 3:  # per position (H, L_max, D): this call's positions
            mean_bias = mean_bias[:, : v.shape[-2]]
        else:  # one vector per head (H, D)
            mean_bias = mean_bias.unsqueeze(-2)
        return free + seeing.to(v.device)[:, None] * mean_bias.to(v.dtype)
    if mode == "full":
        return parts.output(v)
    check_mode(mode)
    raise AssertionError(mode)


@dataclass
class InterventionProbe:
    """An AttendFn applying ``mode`` at the sites in ``targets`` ({tower: layers}); elsewhere the fused path."""

    mode: str
    targets: dict[str, frozenset[int]]
    mean_bias: dict[SiteKey, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_mode(self.mode)

    def targeted(self, site: AttentionSite) -> bool:
        return self.mode != "full" and site.layer in self.targets.get(site.tower, ())

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, site: AttentionSite) -> Tensor:
        if not self.targeted(site):
            return fused_attention(q, k, v, attn_mask, site)
        parts = decompose(q, k, attn_mask, site)
        seeing = rows_seeing_prompts(attn_mask, site)
        return intervened_output(self.mode, parts, v, seeing, self.mean_bias.get((site.tower, site.layer)))


@dataclass
class MeanBiasCollector:
    """An AttendFn that leaves attention unchanged and sums β per position over samples.

    Sums are kept per position (H, L, D) with counts (L,), padded to the longest sequence seen (text
    chunks differ in length). Real-token rows and prompt rows are averaged separately: a prompt slot
    carries its output to the next layer, and its β is prompt-to-prompt attention, not a bias on X.
    """

    targets: dict[str, frozenset[int]]
    sums: dict[SiteKey, Tensor] = field(default_factory=dict)
    counts: dict[SiteKey, Tensor] = field(default_factory=dict)
    prompt_rows: dict[SiteKey, Tensor] = field(default_factory=dict)

    def observe(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, site: AttentionSite) -> None:
        if site.layer in self.targets.get(site.tower, ()):
            self.add(site, decompose(q, k, attn_mask, site).bias(v), attn_mask)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, site: AttentionSite) -> Tensor:
        self.observe(q, k, v, attn_mask, site)
        return fused_attention(q, k, v, attn_mask, site)

    def add(self, site: AttentionSite, bias: Tensor, attn_mask: Tensor | None) -> None:
        rows = rows_seeing_prompts(attn_mask, site).to(bias.device)
        key = (site.tower, site.layer)
        sums = (bias.detach().double() * rows[:, None]).sum(dim=0)
        counts = rows.double() * bias.shape[0]
        self.sums[key] = padded_add(self.sums.get(key), sums, dim=1)
        self.counts[key] = padded_add(self.counts.get(key), counts, dim=0)
        prompt_rows = site.prompt_mask.to(bias.device).long()
        self.prompt_rows[key] = padded_add(self.prompt_rows.get(key), prompt_rows, dim=0).clamp(max=1)

    def reduce(self, reduce: ReduceFn) -> None:
        """Sum over ranks (every rank holds the same keys and shapes)."""
        for key in sorted(self.sums):
            self.sums[key] = reduce(self.sums[key])
            self.counts[key] = reduce(self.counts[key])

    def means(self, mean_over: MeanOver) -> dict[SiteKey, Tensor]:
        """β̄ per site and position (H, L, D): over samples only, or pooled over the tokens of each
        group (real tokens, prompts) and samples."""
        if mean_over not in get_args(MeanOver):
            raise ValueError(f"mean_over must be 'tokens_and_samples' or 'samples', got {mean_over!r}")
        means = {}
        for key, sums in self.sums.items():
            counts = self.counts[key]
            if mean_over == "tokens_and_samples":
                sums, counts = pooled_by_group(sums, counts, self.prompt_rows[key].bool())
            means[key] = (sums / counts.clamp(min=1)[:, None]).float()
        return means


def pooled_by_group(sums: Tensor, counts: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """Sums (H, L, D) and counts (L,) replaced at every position by the total of its group (bool (L,))."""
    pooled_sums, pooled_counts = torch.zeros_like(sums), torch.zeros_like(counts)
    for member in (groups, ~groups):
        pooled_sums[:, member] = sums[:, member].sum(dim=1, keepdim=True)
        pooled_counts[member] = counts[member].sum()
    return pooled_sums, pooled_counts


def padded_add(total: Tensor | None, addition: Tensor, dim: int) -> Tensor:
    """``total + addition``, zero-padding the shorter one along ``dim``."""
    if total is None:
        return addition
    size = max(total.shape[dim], addition.shape[dim])

    def pad(t: Tensor) -> Tensor:
        widths = [0, 0] * (t.dim() - 1 - dim) + [0, size - t.shape[dim]]
        return F.pad(t, widths)

    return pad(total) + pad(addition)


@torch.no_grad()
def estimate_mean_bias(module, loaders, targets: dict[str, frozenset[int]], mean_over: MeanOver = "tokens_and_samples",
                       max_batches: int | None = None, reduce: ReduceFn = identity_reduce) -> dict[SiteKey, Tensor]:
    """First pass of ``mean_bias``: β̄ per (tower, layer) over the batches of ``loaders`` (one per test class set)."""
    collector = MeanBiasCollector(targets)
    with module.probed(collector):
        for index, loader in enumerate(as_loader_list(loaders)):
            classes = module.class_sets("test")[index]
            for batch in limited(fresh_loader(loader), max_batches):
                module(batch_to(batch, module.device)["image"], classes)
    collector.reduce(reduce)
    return collector.means(mean_over)


def first_pass_batches(trainer: L.Trainer, mean_batches: int | None) -> int | None:
    """Batches per test dataloader of the β̄ pass: ``mean_batches``, else as many as the test runs."""
    if mean_batches is not None:
        return mean_batches
    limits = [n for n in trainer.num_test_batches if n != float("inf")]
    return int(max(limits)) if limits else None


def intervention_probe(module, trainer: L.Trainer, mode: str, targets: dict[str, frozenset[int]],
                       mean_over: MeanOver, mean_batches: int | None) -> InterventionProbe:
    """The probe of ``mode``; for ``mean_bias`` after the first pass that measures β̄ (summed over ranks)."""
    probe = InterventionProbe(mode, targets)
    if mode == "mean_bias":
        probe.mean_bias = estimate_mean_bias(module, trainer.test_dataloaders, targets, mean_over,
                                             first_pass_batches(trainer, mean_batches), trainer_sum(trainer))
    return probe


class RouteIntervention(L.Callback):
    """Evaluate the test set with one prompt route removed (add under ``trainer.callbacks``): the
    run's test metrics (and results.json) are those of the intervened model.

    Args:
        mode: full, no_prompts, attention_only, bias_only or mean_bias (see the module docstring).
        branch: which tower's attention to intervene in: text, vision or both.
        layers: 0-based layer indices: "all", one index, "a:b" (half-open), "a,b,c" or a list;
            checked per tower.
        mean_over: mean_bias only: β̄ averaged over "tokens_and_samples" (a dataset constant per
            layer and head) or over "samples" only (one vector per position).
        mean_batches: mean_bias only: batches per test dataloader in the first pass (null: as many
            as the test runs, i.e. ``limit_test_batches``).
    """

    def __init__(self, mode: Mode = "full", branch: Branch = "both", layers: str | int | list[int] | None = "all",
                 mean_over: MeanOver = "tokens_and_samples", mean_batches: int | None = None) -> None:
        check_mode(mode)
        towers_of(branch)
        self.mode, self.branch, self.layers = mode, branch, layers
        self.mean_over, self.mean_batches = mean_over, mean_batches
        self._attached: tuple[Any, InterventionProbe] | None = None  # (module, probe) between two hooks

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        targets = target_layers(pl_module.spec, self.branch, self.layers)
        probe = intervention_probe(pl_module, trainer, self.mode, targets, self.mean_over, self.mean_batches)
        pl_module.attach_probe(probe)
        self._attached = (pl_module, probe)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._detach()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._detach()

    def _detach(self) -> None:
        if self._attached is not None:
            module, probe = self._attached
            module.detach_probe(probe)
            self._attached = None


@torch.no_grad()
def class_set_accuracies(module, loaders, limits: Sequence[int | float],
                         reduce: ReduceFn = identity_reduce) -> dict[str, float]:
    """Accuracy (%) per test class set, named as the module logs it (``test/<set>/acc``, and ``test/hm``
    for base and new), over the first ``limits[i]`` batches of loader i on every rank, counts summed."""
    fractions: dict[str, float] = {}
    for index, loader in enumerate(as_loader_list(loaders)):
        classes = module.class_sets("test")[index]
        counts = torch.zeros(2, dtype=torch.float64, device=module.device)
        for batch in limited(fresh_loader(loader), limits[index]):
            batch = batch_to(batch, module.device)
            predictions = module(batch["image"], classes).argmax(dim=-1)
            counts[0] += (predictions == batch["label"]).sum()
            counts[1] += len(predictions)
        correct, total = reduce(counts).tolist()
        if total:
            fractions[classes.name] = correct / total
    return percent_accuracies("test", fractions)


class InterventionTable(L.Callback):
    """After the test, evaluate the same test batches under every mode and write the table
    ``interventions.csv`` / ``.md`` (one row per mode, one column per test metric; rank 0).

    What ``mmprompt interventions`` adds to ``mmprompt test``. The run's own test metrics stay those
    of the model as given; the table is in ``table`` on every rank.

    Args:
        modes: the modes to evaluate, in table order (default: all five).
        branch: which tower's attention to intervene in: text, vision or both.
        layers: 0-based layer indices: "all", one index, "a:b" (half-open), "a,b,c" or a list.
        mean_over: mean_bias only: "tokens_and_samples" or "samples" (see `RouteIntervention`).
        mean_batches: mean_bias only: batches per test dataloader in the first pass (null: as many
            as the test runs).
        output_dir: folder for the table; null: the run's log folder (``trainer.log_dir``).
        write_tables: false keeps the table in memory only (``table``).
        print_table: print the Markdown table at the end.
    """

    def __init__(self, modes: list[Mode] | None = None, branch: Branch = "both",
                 layers: str | int | list[int] | None = "all",
                 mean_over: MeanOver = "tokens_and_samples", mean_batches: int | None = None,
                 output_dir: str | None = None, write_tables: bool = True, print_table: bool = True) -> None:
        self.modes = list(MODES if modes is None else modes)
        for mode in self.modes:
            check_mode(mode)
        towers_of(branch)
        self.branch, self.layers, self.mean_over, self.mean_batches = branch, layers, mean_over, mean_batches
        self.output_dir, self.write_tables, self.print_table = output_dir, write_tables, print_table
        self.table: dict[str, dict[str, float]] = {}

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        target_layers(pl_module.spec, self.branch, self.layers)  # a bad range fails before the test runs
        if not has_prompts(pl_module.adapter, self.branch):
            log.warning("%s has no prompts in branch %r: every intervention equals the full model",
                        type(pl_module.adapter).__name__, self.branch)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Every rank evaluates its shard under each mode (the counts are summed); rank 0 writes."""
        targets = target_layers(pl_module.spec, self.branch, self.layers)
        limits = list(trainer.num_test_batches)  # one per test dataloader, as limit_test_batches made them
        self.table = {}
        for mode in self.modes:
            probe = intervention_probe(pl_module, trainer, mode, targets, self.mean_over, self.mean_batches)
            with pl_module.probed(probe):
                self.table[mode] = class_set_accuracies(pl_module, trainer.test_dataloaders, limits, trainer_sum(trainer))
        folder = run_folder(trainer, self.output_dir) if self.write_tables else None  # a collective: every rank
        if trainer.is_global_zero:
            self.write(folder)

    def rows(self) -> list[dict[str, Any]]:
        return [{"mode": mode, "branch": self.branch, "layers": str(self.layers), **metrics}
                for mode, metrics in self.table.items()]

    def write(self, folder: Path | None = None) -> None:
        """The table as CSV + Markdown in ``folder`` (if given); printed when ``print_table``."""
        if folder is not None:
            write_table(self.rows(), folder / "interventions")
        if self.print_table:
            print(markdown_table([{"mode": mode, **metrics} for mode, metrics in self.table.items()]))


def evaluate_interventions(module, datamodule, modes: Sequence[str] = MODES, branch: Branch = "both",
                           layers: LayerSpec = "all", trainer_kwargs: dict[str, Any] | None = None,
                           output_dir: str | Path | None = None, mean_over: MeanOver = "tokens_and_samples",
                           ) -> dict[str, dict[str, float]]:
    """Test ``module`` under every mode; returns {mode: {metric: value}} (accuracies in percent).

    One test run with an `InterventionTable`. ``trainer_kwargs`` go to the `lightning.Trainer`
    (accelerator, devices, strategy, limit_test_batches, ...). With ``output_dir`` the table is
    written as ``interventions.csv`` and ``interventions.md``.
    """
    table = InterventionTable(list(modes), branch, layers, mean_over, output_dir=None if output_dir is None else
                              str(output_dir), write_tables=output_dir is not None, print_table=False)
    target_layers(module.spec, branch, layers)  # fail before any evaluation
    kwargs = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False,
              "enable_checkpointing": False, **(trainer_kwargs or {})}
    trainer = L.Trainer(**{**kwargs, "callbacks": [*kwargs.get("callbacks", []), table]})
    trainer.test(module, datamodule=datamodule, verbose=False)
    return table.table
