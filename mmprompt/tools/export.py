"""``mmprompt export``: hand a trained adapter to someone who uses plain open_clip.

Two forms, from a checkpoint alone:

* **adapter** (every method): ``adapter.safetensors`` (the adapter's tensors) and
  ``adapter_config.json`` (adapter class_path/init_args, backbone name and weights, class sets,
  package version). ``load_adapter(folder, clip)`` puts it back onto any open_clip model of that
  architecture in one call.
* **open_clip** (bias methods only): the learned biases folded into the frozen weights and saved
  as a plain open_clip state dict, so ``open_clip.create_model(name, pretrained=file)`` runs the
  adapted model with zero overhead. In block ``j`` the runner adds ``b_attn`` after the layer scale
  of the attention output and ``b_mlp`` after that of the MLP output; with
  ``ls(y) = γ ⊙ y`` (``γ = 1`` for CLIP's Identity) ``γ ⊙ (W h + c) + b = γ ⊙ (W h + c + b / γ)``, so
  ``out_proj.bias += b_attn / γ`` and ``c_proj.bias += b_mlp / γ`` are exact. Prompt methods can't
  be folded: prompt tokens take part in attention (a softmax over more keys, per input), which no
  change of CLIP's weights reproduces, so they export the adapter form only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..files import write_bytes_atomic
from ..model.encoders import Injection
from ..tables import write_json_atomic

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.pt"


# ---------------------------------------------------------------------- the adapter form


def export_adapter(module: Any, out_dir: Path) -> list[Path]:
    """Write ``adapter.safetensors`` + ``adapter_config.json`` of a PromptCLIPModule into ``out_dir``."""
    from safetensors.torch import save

    from ..model.module import ADAPTER_PREFIX

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {key[len(ADAPTER_PREFIX):]: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}
    write_bytes_atomic(out_dir / ADAPTER_WEIGHTS, save(tensors))  # save_file would make it 0600
    write_json_atomic(out_dir / ADAPTER_CONFIG, module.describe(), indent=2)
    return [out_dir / ADAPTER_WEIGHTS, out_dir / ADAPTER_CONFIG]


def load_adapter(folder: str | Path, clip: nn.Module | None = None) -> Any:
    """A ready PromptCLIPModule (eval mode, class sets from the export) from an exported adapter.

    ``clip`` is any open_clip model of the exported architecture (its weights are used, frozen);
    None builds the exported ``model_name``/``pretrained`` with `mmprompt.model.backbone.load_clip`.
    """
    from safetensors.torch import load_file

    from ..model.module import ADAPTER_PREFIX, PromptCLIPModule, build_adapter, class_set_from_record

    folder = Path(folder)
    described = json.loads((folder / ADAPTER_CONFIG).read_text())
    pretrained = None if clip is not None else described["pretrained"]
    module = PromptCLIPModule(build_adapter(described["adapter_config"]), model_name=described["model_name"],
                              pretrained=pretrained, force_quick_gelu=described["force_quick_gelu"])
    if clip is not None:
        module.use_clip(clip)
    state = {ADAPTER_PREFIX + key: value for key, value in load_file(str(folder / ADAPTER_WEIGHTS)).items()}
    module.load_state_dict(state)
    sets = {stage: [class_set_from_record(r) for r in records] for stage, records in described["class_sets"].items()}
    module.set_class_sets(train=(sets.get("fit") or [None])[0], validate=sets.get("validate"), test=sets.get("test"))
    return module.eval()


# ---------------------------------------------------------------------- the folded open_clip form


def static_bias_injections(adapter: Any) -> dict[str, Injection]:
    """The adapter's text and vision injections, if the method declares itself foldable
    (`Adapter.fold_refusal` None: learned biases only, checked when the module is built).

    Raises ValueError with the method's reason when it is not.
    """
    reason = adapter.fold_refusal()
    if reason is not None:
        raise ValueError(reason)
    return {"text": adapter.text_injection(), "vision": adapter.vision_injection()}


def layer_scale(module: nn.Module, width: int, like: Tensor) -> Tensor:
    """The per-channel gain γ of an open_clip layer scale (ones for Identity)."""
    gamma = getattr(module, "gamma", None)
    return torch.ones(width, dtype=like.dtype, device=like.device) if gamma is None else gamma.detach()


def fold_bias(linear_bias: Tensor | None, bias: Tensor, gamma: Tensor, where: str) -> None:
    """``linear_bias += bias / γ`` in place: the same update after the layer scale, exactly."""
    if linear_bias is None:
        raise ValueError(f"{where} has no bias parameter to fold a learned bias into")
    if bool((gamma == 0).any()):
        raise ValueError(f"{where}: the layer scale has zero channels, a bias added after it can't be folded")
    linear_bias.data += (bias.detach().to(linear_bias.dtype) / gamma.to(linear_bias.dtype))


def fold_biases_into_clip(module: Any) -> nn.Module:
    """A copy of ``module.clip`` whose out_proj/c_proj biases include the adapter's learned biases."""
    import copy

    injections = static_bias_injections(module.adapter)
    clip = copy.deepcopy(module.clip)
    towers = {"text": clip.transformer.resblocks, "vision": clip.visual.transformer.resblocks}
    for tower, injection in injections.items():
        blocks = towers[tower]
        for index, bias in injection.attn_bias.items():
            block = blocks[index]
            gamma = layer_scale(block.ls_1, bias.shape[-1], bias)
            fold_bias(block.attn.out_proj.bias, bias, gamma, f"{tower} block {index} attn.out_proj")
        for index, bias in injection.mlp_bias.items():
            block = blocks[index]
            gamma = layer_scale(block.ls_2, bias.shape[-1], bias)
            fold_bias(block.mlp.c_proj.bias, bias, gamma, f"{tower} block {index} mlp.c_proj")
    return clip


def export_open_clip(module: Any, out_dir: Path) -> Path:
    """Save the folded CLIP as a plain state dict that ``open_clip.create_model(name, pretrained=file)`` loads."""
    clip = fold_biases_into_clip(module)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / OPEN_CLIP_WEIGHTS
    torch.save({key: value.detach().cpu() for key, value in clip.state_dict().items()}, path)
    return path


# ---------------------------------------------------------------------- command line


def export_checkpoint(ckpt_path: Path, out_dir: Path, form: str = "auto", overwrite: bool = False) -> list[Path]:
    """Export a checkpoint: the adapter form always (unless ``form="open_clip"``), the folded form when
    possible; into an empty ``out_dir`` unless ``overwrite`` (`clear_out_dir`)."""
    from ..model.checkpoint_io import read_checkpoint
    from ..model.module import PromptCLIPModule
    from ..run.config import is_pretraining_checkpoint, pretraining_checkpoint_error

    if not ckpt_path.is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
    checkpoint = read_checkpoint(ckpt_path)
    if is_pretraining_checkpoint(checkpoint):
        raise pretraining_checkpoint_error(ckpt_path, checkpoint)
    hyper_parameters = checkpoint.get("hyper_parameters") or {}
    if "adapter" not in hyper_parameters:
        raise ValueError(f"--ckpt_path {ckpt_path} does not describe an adapter (no 'adapter' in its hyper-parameters): "
                         "expected a checkpoint written by `mmprompt fit` (RUN/checkpoints/last.ckpt)")
    if hyper_parameters.get("pretrained") is None:
        print("  note: the backbone has random weights (pretrained: null); the open_clip export holds them")
    module = PromptCLIPModule.load_from_checkpoint(ckpt_path, map_location="cpu").eval()
    clear_out_dir(out_dir, overwrite)
    written = export_adapter(module, out_dir) if form in ("auto", "adapter", "both") else []
    if form in ("open_clip", "both"):
        written.append(export_open_clip(module, out_dir))
    elif form == "auto":
        try:
            written.append(export_open_clip(module, out_dir))
        except ValueError as reason:
            print(f"  no open_clip export: {reason}")
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmprompt export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", type=Path, required=True, help="a checkpoint written by mmprompt fit")
    parser.add_argument("--out_dir", type=Path, default=None,
                        help="folder for the exported files (default: <run folder>/export)")
    parser.add_argument("--format", choices=("auto", "adapter", "open_clip", "both"), default="auto",
                        help="auto: the adapter form, plus the folded open_clip model when the method allows it")
    parser.add_argument("--overwrite", action="store_true",
                        help="export into a folder that is not empty (an earlier export's files are removed first)")
    return parser


EXPORTED_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, OPEN_CLIP_WEIGHTS)


def clear_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out_dir`` unless ``overwrite``; then remove an earlier export's files, so
    no file of it (an open_clip model of another adapter) is left beside the new export."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out_dir {out_dir} is a file; expected a folder for the exported files")
    present = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if present and not overwrite:
        raise FileExistsError(f"--out_dir {out_dir} is not empty ({', '.join(present[:5])}{', ...' if len(present) > 5 else ''}); "
                              "choose an empty or new folder, or give --overwrite to replace an earlier export")
    for name in EXPORTED_FILES:
        (out_dir / name).unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = args.out_dir or args.ckpt_path.resolve().parent.parent / "export"
    for path in export_checkpoint(args.ckpt_path, out_dir, args.format, args.overwrite):
        print(f"  exported: {path}")
    return 0
