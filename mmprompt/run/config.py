"""Run configs that stand alone: paths made absolute, and a checkpoint that replaces ``--config``.

``mmprompt test --ckpt_path RUN/checkpoints/last.ckpt`` needs no other argument: the checkpoint holds
the model's hyper-parameters (adapter class_path and init_args included) and the datamodule's, and
they become the first ``--config`` of the command, so any file or flag given after them still wins.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from ..model.checkpoint_io import read_checkpoint
from ..results import LAST_CKPT

#: data/model options that name files or folders; made absolute so a saved config runs from anywhere
PATH_OPTIONS = {"data": ("root", "split_file", "image_dir", "mask_dir"), "model": ("pretrained",)}
#: keys of a checkpoint's saved hyper-parameters that are not options of the config
NOT_OPTIONS = ("image_size",)  # linked from model.model_name


def absolute_path_options(config: Any) -> None:
    """Make the path options of a parsed run config absolute (in place), resolved against the cwd.

    ``model.pretrained`` changes only when it names an existing file (it may also be a tag like "openai").
    """
    for section, options in PATH_OPTIONS.items():
        values = config.get(section)
        for option in options:
            value = values.get(option) if values is not None else None
            if not isinstance(value, str) or not value or "://" in value:
                continue
            if section == "model" and not Path(value).is_file():
                continue
            values[option] = os.path.abspath(os.path.expanduser(value))


#: ``--ckpt_path`` values that Lightning resolves itself (not file names)
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc")
PRETRAINED_WEIGHTS_FILE = "open_clip_weights.pt"  # what `mmprompt pretrain` exports when it finishes


def check_ckpt_path(ckpt_path: str) -> None:
    """Refuse a ``--ckpt_path`` that names a folder or a missing file, naming it (jsonargparse would
    only say that ``model.adapter`` is required, since no checkpoint config could be read)."""
    if ckpt_path in LIGHTNING_CKPT_NAMES or "://" in ckpt_path or ckpt_path.startswith("registry:"):
        return
    path = Path(ckpt_path)
    expected = "expected a .ckpt file written by mmprompt fit, e.g. RUN/checkpoints/last.ckpt"
    if path.is_dir():
        last = next((c for c in (path / LAST_CKPT, path / LAST_CKPT.name) if c.is_file()), None)
        raise ValueError(f"--ckpt_path {path} is a folder; {expected}" + (f" (here: {last})" if last else ""))
    if not path.exists():
        raise FileNotFoundError(f"--ckpt_path {path}: no such file; {expected}")


def is_pretraining_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """True for a checkpoint of `mmprompt pretrain` (a whole CLIP, no adapter)."""
    hparams = checkpoint.get("hyper_parameters") or {}
    return "adapter" not in hparams and any(str(key).startswith("clip.") for key in checkpoint.get("state_dict", {}))


def pretraining_checkpoint_error(path: str | Path, checkpoint: Mapping[str, Any]) -> ValueError:
    """What to do with a pretraining checkpoint where an adapter's was expected: use its weights as the backbone."""
    model_name = (checkpoint.get("hyper_parameters") or {}).get("model_name", "MODEL")
    run = Path(path).absolute().parent.parent
    return ValueError(f"--ckpt_path {path} is a checkpoint of `mmprompt pretrain`: it holds a whole CLIP, not an adapter. Train an "
                      f"adapter on its weights with --model.model_name {model_name} --model.pretrained "
                      f"{run / PRETRAINED_WEIGHTS_FILE} (written when pretraining finished)")


def config_from_checkpoint(path: str | Path) -> dict[str, Any]:
    """``{"model": ..., "data": ...}`` from a checkpoint's saved hyper-parameters (empty if it has none)."""
    checkpoint = read_checkpoint(path)  # an unreadable or foreign file is one clear error, naming it
    if is_pretraining_checkpoint(checkpoint):
        raise pretraining_checkpoint_error(path, checkpoint)
    config = {}
    for section, key in (("model", "hyper_parameters"), ("data", "datamodule_hyper_parameters")):
        values = {k: v for k, v in (checkpoint.get(key) or {}).items() if k not in NOT_OPTIONS}
        if values:
            config[section] = values
    if "adapter" not in config.get("model", {}):
        return {}  # not an adapter checkpoint of `mmprompt fit`: the user's --config must say the adapter
    return config
