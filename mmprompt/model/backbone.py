"""Build a frozen open_clip CLIP from a name plus a pretrained tag or a local checkpoint file.

Everything downstream reads widths, depths and head counts from `BackboneSpec`, never from
constants, so the same adapters run on ViT-B/16 and on the tiny test configs shipped here.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

log = logging.getLogger(__name__)

BUNDLED_CONFIG_DIR = Path(__file__).parents[1] / "model_configs"  # package data of mmprompt/ (setup.cfg)
BUNDLED_WEIGHTS_DIR = Path(__file__).parents[1] / "weights"
#: pretrained tags whose weights ship in the package: (model_name, tag) -> file in BUNDLED_WEIGHTS_DIR
BUNDLED_PRETRAINED = {("mmprompt-tiny", "synthetic-world"): "mmprompt-tiny-synthetic-world.pt"}
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
CHECKPOINT_FORMATS = (
    "an OpenAI TorchScript archive, a plain state dict, or an open_clip training checkpoint "
    "(a dict with a 'state_dict' entry)"
)


def register_bundled_configs() -> None:
    """Make the tiny JSON configs in the package known to open_clip (idempotent)."""
    if "mmprompt-tiny" not in open_clip.list_models():
        open_clip.add_model_config(BUNDLED_CONFIG_DIR)


@dataclass(frozen=True)
class BackboneSpec:
    """Sizes of both towers, read from a built model."""

    model_name: str
    embed_dim: int
    text_width: int
    text_layers: int
    text_heads: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    context_length: int

    @classmethod
    def from_clip(cls, clip: nn.Module, model_name: str) -> "BackboneSpec":
        visual = clip.visual
        image_size = visual.image_size
        patch_size = visual.patch_size
        return cls(
            model_name=model_name,
            embed_dim=clip.text_projection.shape[1],
            text_width=clip.transformer.width,
            text_layers=len(clip.transformer.resblocks),
            text_heads=clip.transformer.resblocks[0].attn.num_heads,
            vision_width=visual.transformer.width,
            vision_layers=len(visual.transformer.resblocks),
            vision_heads=visual.transformer.resblocks[0].attn.num_heads,
            image_size=image_size[0] if isinstance(image_size, tuple) else image_size,
            patch_size=patch_size[0] if isinstance(patch_size, tuple) else patch_size,
            context_length=clip.context_length,
        )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def is_local_checkpoint(pretrained: str | None) -> bool:
    """A pretrained value that names an existing file (or looks like a path) is a local checkpoint."""
    if pretrained is None:
        return False
    return os.path.sep in pretrained or Path(pretrained).suffix in {".pt", ".pth", ".bin", ".ckpt"}


def bundled_weights(model_name: str, pretrained: str | None) -> Path | None:
    """The packaged weights file of a bundled tag (e.g. ``mmprompt-tiny`` + ``synthetic-world``), else None."""
    if pretrained is None or pretrained not in {tag for _, tag in BUNDLED_PRETRAINED}:
        return None
    file = BUNDLED_PRETRAINED.get((model_name, pretrained))
    if file is None:
        models = sorted(name for name, tag in BUNDLED_PRETRAINED if tag == pretrained)
        raise ValueError(f"pretrained={pretrained!r} holds weights for model_name {models}, not {model_name!r}")
    return BUNDLED_WEIGHTS_DIR / file


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def read_checkpoint_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], bool]:
    """Read CLIP weights from a local file; returns (state dict, whether it is OpenAI's format).

    OpenAI's format (TorchScript archive, or a state dict saved from it with its three extra keys)
    is reported so the caller can insist on QuickGELU, which those weights were trained with.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist; expected {CHECKPOINT_FORMATS}")
    try:
        if _is_torchscript_archive(path):
            state_dict = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
            is_openai = True
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
                loaded = loaded["state_dict"]
            if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
                raise ValueError(f"it holds a {type(loaded).__name__}, not a mapping of names to tensors")
            state_dict = dict(loaded)
            is_openai = any(key in state_dict for key in OPENAI_EXTRA_KEYS)
    except Exception as error:  # truncated zips, pickles and archives fail in many different ways
        raise ValueError(f"could not read checkpoint {path}: {error}. Expected {CHECKPOINT_FORMATS}.") from error
    for key in OPENAI_EXTRA_KEYS:
        state_dict.pop(key, None)
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module."):]: value for key, value in state_dict.items()}
    return state_dict, is_openai


def shape_mismatches(expected: dict[str, tuple[int, ...]], given: dict[str, tuple[int, ...]],
                     noun: str = "keys", limit: int = 3) -> list[str]:
    """Missing, unexpected and differently shaped entries of ``given`` against ``expected``, in words."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = [f"{key}: checkpoint {given[key]} vs model {expected[key]}"
             for key in sorted(set(expected) & set(given)) if given[key] != expected[key]]
    return [f"{len(items)} {kind} (first: {items[:limit]})"
            for kind, items in ((f"missing {noun}", missing), (f"unexpected {noun}", unexpected),
                                ("shape mismatches", wrong)) if items]


def shapes_of(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state_dict.items()}


def _load_weights_strictly(model: nn.Module, state_dict: dict[str, torch.Tensor], source: Path, model_name: str) -> None:
    problems = shape_mismatches(shapes_of(model.state_dict()), shapes_of(state_dict))
    if problems:
        raise ValueError(
            f"checkpoint {source} does not match architecture {model_name!r}: " + "; ".join(problems)
            + ". Pass the model_name the weights were trained with."
        )
    model.load_state_dict(state_dict, strict=True)


def freeze(model: nn.Module) -> nn.Module:
    """Freeze every parameter (logit_scale included) and put the model in eval mode."""
    model.requires_grad_(False)
    return model.eval()


def load_clip(model_name: str, pretrained: str | None = None, force_quick_gelu: bool = False) -> nn.Module:
    """Build a frozen open_clip CLIP.

    ``pretrained`` is an open_clip tag (``"openai"``, needs the weights cache or network), a tag whose
    weights ship in the package (``"synthetic-world"`` for ``mmprompt-tiny``), a path to a local
    checkpoint file, or None for random weights. OpenAI weights always get QuickGELU: a GELU
    model with OpenAI weights runs without error but is silently worse.
    """
    register_bundled_configs()
    if model_name not in open_clip.list_models():
        raise ValueError(
            f"unknown model_name {model_name!r}; choose one of open_clip's architectures, e.g. "
            f"ViT-B-16-quickgelu, ViT-B-32-quickgelu, ViT-L-14, or the bundled tiny configs "
            f"{sorted(p.stem for p in BUNDLED_CONFIG_DIR.glob('*.json'))}"
        )
    pretrained = str(bundled_weights(model_name, pretrained) or pretrained) if pretrained is not None else None
    if is_local_checkpoint(pretrained):
        state_dict, is_openai = read_checkpoint_state_dict(pretrained)
        quick_gelu = force_quick_gelu or is_openai
        if is_openai and not open_clip.get_model_config(model_name).get("quick_gelu", False):
            log.info("%s holds OpenAI weights: building %s with QuickGELU", pretrained, model_name)
        model = create_before_loading(model_name, quick_gelu)
        _load_weights_strictly(model, state_dict, Path(pretrained), model_name)
    else:
        quick_gelu = force_quick_gelu or pretrained == "openai"
        model = open_clip.create_model(model_name, pretrained=pretrained, force_quick_gelu=quick_gelu)
    return freeze(model)


def create_before_loading(model_name: str, quick_gelu: bool) -> nn.Module:
    """open_clip's model with random weights, without its "initialized randomly" warning: the caller loads
    the real weights next, and the warning would tell users the opposite of what happens."""
    logging.disable(logging.WARNING)
    try:
        return open_clip.create_model(model_name, pretrained=None, force_quick_gelu=quick_gelu)
    finally:
        logging.disable(logging.NOTSET)


def get_tokenizer(model_name: str):
    """open_clip's tokenizer for ``model_name`` (the BPE vocabulary ships with open_clip)."""
    register_bundled_configs()
    return open_clip.get_tokenizer(model_name)
