"""Route interventions (SPEC §4): evaluate a trained prompt model with one of the prompts' two
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

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, get_args

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention import AttentionSite, fused_attention
from ..checkpoint_io import read_checkpoint
from ..guards import check_config_syntax
from .common import (
    Branch, LayerSpec, ReduceFn, as_loader_list, batch_to, fresh_loader, identity_reduce, markdown_table, probe_installed,
    resolve_layers, towers_of, trainer_sum, write_table,
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

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, site: AttentionSite) -> Tensor:
        if site.layer in self.targets.get(site.tower, ()):
            self.add(site, decompose(q, k, attn_mask, site).bias(v), attn_mask)
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
    with probe_installed(module, collector):
        for index, loader in enumerate(as_loader_list(loaders)):
            classes = module.class_sets("test")[index]
            for batch_index, batch in enumerate(fresh_loader(loader)):
                if max_batches is not None and batch_index >= max_batches:
                    break
                module(batch_to(batch, module.device)["image"], classes)
    collector.reduce(reduce)
    return collector.means(mean_over)


class RouteIntervention(L.Callback):
    """Evaluate the test set with one prompt route removed (add under ``trainer.callbacks``).

    Args:
        mode: full, no_prompts, attention_only, bias_only or mean_bias (see the module docstring).
        branch: which tower's attention to intervene in: text, vision or both.
        layers: layer range: "all", one index, "a:b" (half-open) or a list; checked per tower.
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
        self._installed = None

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        targets = target_layers(pl_module.spec, self.branch, self.layers)
        probe = InterventionProbe(self.mode, targets)
        if self.mode == "mean_bias":
            probe.mean_bias = estimate_mean_bias(pl_module, trainer.test_dataloaders, targets, self.mean_over,
                                                 self.first_pass_batches(trainer), trainer_sum(trainer))
        self._installed = probe_installed(pl_module, probe)
        self._installed.__enter__()

    def first_pass_batches(self, trainer: L.Trainer) -> int | None:
        if self.mean_batches is not None:
            return self.mean_batches
        limits = [n for n in trainer.num_test_batches if n != float("inf")]
        return int(max(limits)) if limits else None

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._installed is not None:
            self._installed.__exit__(None, None, None)
            self._installed = None


def merge_results(results: list[dict[str, Any]]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for per_loader in results:
        merged.update({key: float(value) for key, value in per_loader.items()})
    return merged


def evaluate_interventions(module, datamodule, modes: Sequence[str] = MODES, branch: Branch = "both",
                           layers: LayerSpec = "all", trainer_kwargs: dict[str, Any] | None = None,
                           output_dir: str | Path | None = None, mean_over: MeanOver = "tokens_and_samples",
                           ) -> dict[str, dict[str, float]]:
    """Test ``module`` under every mode; returns {mode: {metric: value}} (accuracies in percent).

    ``trainer_kwargs`` go to each `lightning.Trainer` (accelerator, devices, strategy, limit_test_batches, ...).
    With ``output_dir`` the table is written as ``interventions.csv`` and ``interventions.md``.
    """
    for mode in modes:
        check_mode(mode)
    target_layers(module.spec, branch, layers)  # fail before any evaluation
    if not has_prompts(module, branch):
        log.warning("%s has no prompts in branch %r: every intervention equals the full model",
                    type(module.adapter).__name__, branch)
    kwargs = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False,
              "enable_checkpointing": False, **(trainer_kwargs or {})}
    table: dict[str, dict[str, float]] = {}
    for mode in modes:
        callback = RouteIntervention(mode, branch, layers, mean_over)
        trainer = L.Trainer(**{**kwargs, "callbacks": [*kwargs.get("callbacks", []), callback]})
        table[mode] = merge_results(trainer.test(module, datamodule=datamodule, verbose=False))
    if output_dir is not None:
        rows = [{"mode": mode, "branch": branch, "layers": str(layers), **metrics} for mode, metrics in table.items()]
        write_table(rows, Path(output_dir) / "interventions")
    return table


def has_prompts(module, branch: Branch) -> bool:
    """Whether any tower in ``branch`` receives prompt tokens (CoCoOp counts: its context is a prompt)."""
    for tower in towers_of(branch):
        if tower == "vision" and module.adapter.vision_injection().prompts:
            return True
        if tower == "text":
            try:
                if module.adapter.text_injection().prompts:
                    return True
            except ValueError:  # image-conditioned text prompts (CoCoOp)
                return True
    return False


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmprompt interventions",
        description="Test a trained prompt model with one attention route removed per mode (SPEC §4).",
    )
    parser.add_argument("--config", required=True, help="the run's config.yaml (model: and data: sections)")
    parser.add_argument("--ckpt_path", default=None,
                        help="checkpoint with the trained adapter (default: checkpoints/last.ckpt next to the config)")
    add_allow_no_checkpoint(parser)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="modes to evaluate")
    parser.add_argument("--branch", default="both", choices=("text", "vision", "both"))
    parser.add_argument("--layers", default="all", help="'all', '3', '0:9' (half-open) or '0,2,5'")
    parser.add_argument("--mean_over", default="tokens_and_samples", choices=get_args(MeanOver))
    parser.add_argument("--out_dir", "--output_dir", dest="output_dir", default=None, help="folder for interventions.csv/.md (default: config's folder)")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", default="auto")
    parser.add_argument("--limit_test_batches", type=batch_limit, default=None,
                        help="an int (batches per dataloader) or a float fraction, as in lightning.Trainer")
    return parser


def batch_limit(text: str) -> int | float:
    """Lightning's meaning: "2" is two batches, "0.5" half of them (so "1" must stay an int)."""
    return int(text) if text.isdigit() else float(text)


def add_allow_no_checkpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow_no_checkpoint", action="store_true",
                        help="evaluate the untrained adapter when the run has no checkpoint (zero-shot runs)")


def default_checkpoint(config_path: str | Path, allow_missing: bool = False) -> str | None:
    """``checkpoints/last.ckpt`` of the run folder holding the config. Without one the numbers would
    be the untrained adapter's, so that is an error unless ``allow_missing`` (``--allow_no_checkpoint``)."""
    path = Path(config_path).parent / "checkpoints" / "last.ckpt"
    if path.is_file():
        return str(path)
    if not allow_missing:
        raise FileNotFoundError(
            f"no --ckpt_path given and the run of --config {config_path} has no {path}: the results would be "
            "the untrained adapter's; pass --ckpt_path, or --allow_no_checkpoint to evaluate it untrained"
        )
    log.warning("no --ckpt_path and no %s: evaluating the untrained adapter (--allow_no_checkpoint)", path)
    return None


def load_run(config_path: str | Path, ckpt_path: str | None = None):
    """(module, datamodule) from a LightningCLI ``config.yaml``, with the checkpoint's adapter loaded.

    ``data.image_size`` is linked to the model in the CLI (so absent from the saved config): it is
    taken from the model here too. ``seed_everything`` is applied first, as the CLI does, so a
    random-weight backbone (which checkpoints don't hold) comes back identical.
    """
    import yaml

    from ..data.datamodule import FewShotDataModule
    from ..module import PromptCLIPModule

    check_config_syntax(Path(config_path))
    config = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
    missing = [section for section in ("model", "data") if section not in config]
    if missing:
        raise ValueError(f"{config_path} has no {' / '.join(missing)} section: pass the config.yaml of a run")
    if config.get("seed_everything") is not None:  # a random-weight backbone (pretrained: null) is rebuilt as trained
        L.seed_everything(config["seed_everything"], verbose=False)
    module = instantiate_section(PromptCLIPModule, config["model"])
    datamodule = instantiate_section(FewShotDataModule, {"image_size": module.spec.image_size, **config["data"]})
    if ckpt_path:
        checkpoint = read_checkpoint(ckpt_path)
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"])
    return module, datamodule


def instantiate_section(cls: type, section: dict[str, Any]):
    """``cls`` from one config section, with jsonargparse resolving class_path/init_args values."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "section", fail_untyped=False)
    return parser.instantiate_classes(parser.parse_object({"section": section})).section


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """``mmprompt interventions --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt ...``"""
    args = build_parser().parse_args(argv)
    module, datamodule = load_run(args.config, args.ckpt_path or default_checkpoint(args.config, args.allow_no_checkpoint))
    trainer_kwargs: dict[str, Any] = {"accelerator": args.accelerator, "devices": args.devices}
    if args.limit_test_batches is not None:
        trainer_kwargs["limit_test_batches"] = args.limit_test_batches
    output_dir = args.output_dir or str(Path(args.config).parent)
    table = evaluate_interventions(module, datamodule, args.modes, args.branch, args.layers, trainer_kwargs,
                                   output_dir, args.mean_over)
    rows = [{"mode": mode, **metrics} for mode, metrics in table.items()]
    print(markdown_table(rows))
    return table
