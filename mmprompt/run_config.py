"""Run configs that stand alone: paths made absolute, and a checkpoint that replaces ``--config``.

``mmprompt test --ckpt_path RUN/checkpoints/last.ckpt`` needs no other argument: the checkpoint holds
the model's hyper-parameters (adapter class_path and init_args included) and the datamodule's, and
they become the first ``--config`` of the command, so any file or flag given after them still wins.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .checkpoint_io import read_checkpoint

#: data/model options that name files or folders; made absolute so a saved config runs from anywhere
PATH_OPTIONS = {"data": ("root", "split_file", "image_dir", "mask_dir"), "model": ("pretrained",)}
#: keys of a checkpoint's saved hyper-parameters that are not options of the config
NOT_OPTIONS = ("_instantiator", "_class_path", "image_size")  # image_size is linked from model.model_name


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


def ckpt_path_argument(args: list[str]) -> str | None:
    """The value of ``--ckpt_path`` in ``args``, if any."""
    for index, arg in enumerate(args):
        if arg == "--ckpt_path" and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith("--ckpt_path="):
            return arg.split("=", 1)[1]
    return None


def config_from_checkpoint(path: str | Path) -> dict[str, Any]:
    """``{"model": ..., "data": ...}`` from a checkpoint's saved hyper-parameters (empty if it has none)."""
    checkpoint = read_checkpoint(path)  # an unreadable or foreign file is one clear error, naming it
    config = {}
    for section, key in (("model", "hyper_parameters"), ("data", "datamodule_hyper_parameters")):
        values = {k: v for k, v in (checkpoint.get(key) or {}).items() if k not in NOT_OPTIONS}
        if values:
            config[section] = values
    if "adapter" not in config.get("model", {}):
        return {}  # written before checkpoints described their adapter: the user's --config must say it
    return config


def with_checkpoint_config(args: list[str]) -> list[str]:
    """``args`` with the checkpoint's own config inserted as the first ``--config`` after the subcommand."""
    ckpt_path = ckpt_path_argument(args)
    if not args or ckpt_path is None or not Path(ckpt_path).is_file():
        return args
    config = config_from_checkpoint(ckpt_path)
    if not config:
        return args
    return [args[0], "--config", yaml.safe_dump(config, sort_keys=False), *args[1:]]
