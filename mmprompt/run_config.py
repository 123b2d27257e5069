"""Run configs that stand alone: paths made absolute, a checkpoint that replaces ``--config``, and
adapter options under their former names.

``mmprompt test --ckpt_path RUN/checkpoints/last.ckpt`` needs no other argument: the checkpoint holds
the model's hyper-parameters (adapter class_path and init_args included) and the datamodule's, and
they become the first ``--config`` of the command, so any file or flag given after them still wins.

Adapter options have one vocabulary (docs/methods.md): ``depth`` counts layers 0..depth-1, ``layers``
lists 0-based layer indices, ``n_ctx`` counts prompt tokens. A config that still uses a former name
is refused with the new one; a checkpoint written before the renames is read with the new names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .checkpoint_io import read_checkpoint
from .guards import config_paths

#: data/model options that name files or folders; made absolute so a saved config runs from anywhere
PATH_OPTIONS = {"data": ("root", "split_file", "image_dir", "mask_dir"), "model": ("pretrained",)}
#: keys of a checkpoint's saved hyper-parameters that are not options of the config
NOT_OPTIONS = ("_instantiator", "_class_path", "image_size")  # image_size is linked from model.model_name


#: former adapter option names -> current ones (a count given as ``layers`` is ``depth``: `renamed_option`)
RENAMED_ADAPTER_OPTIONS = {"n_prompts": "n_ctx", "n_vision": "n_ctx_vision", "branches": "branch"}
ADAPTER_FLAG = "--model.adapter.init_args."


def renamed_option(name: str, value: Any) -> str | None:
    """The current name of an adapter option given under a former one; None when the name is current."""
    if name == "layers" and isinstance(value, int) and not isinstance(value, bool):
        return "depth"  # ``layers: 9`` once meant layers 0..8; ``layers`` now holds indices only
    return RENAMED_ADAPTER_OPTIONS.get(name)


def adapter_options_given(args: list[str]) -> list[tuple[str, str, Any]]:
    """(where, name, value) of every adapter init_arg in the ``--config`` files/strings and flags of ``args``."""
    given = []
    for source in config_paths(args):
        is_file = "\n" not in source and Path(source).is_file()
        text = Path(source).read_text(encoding="utf-8") if is_file else source
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError:
            continue  # not YAML (or a missing file): the config checks and jsonargparse report it
        adapter = ((config.get("model") or {}).get("adapter") if isinstance(config, dict) else None) or {}
        init_args = adapter.get("init_args") if isinstance(adapter, dict) else None
        for name, value in (init_args or {}).items():
            given.append((f"--config {source if is_file else '<YAML string>'}", name, value))
    for index, arg in enumerate(args):
        if arg.startswith(ADAPTER_FLAG):
            name, has_value, value = arg[len(ADAPTER_FLAG):].partition("=")
            value = value if has_value else (args[index + 1] if index + 1 < len(args) else "")
            given.append((f"{ADAPTER_FLAG}{name}", name, yaml.safe_load(value) if value else None))
    return given


def refuse_renamed_options(args: list[str]) -> None:
    """Refuse adapter options under their former names, naming the new one (jsonargparse would only say
    "not accepted", or take ``layers: 9`` for layer 9)."""
    problems = []
    for where, name, value in adapter_options_given(args):
        new = renamed_option(name, value)
        if new is not None:
            problems.append(f"{where}: model.adapter.init_args.{name}{'=' + str(value) if new == 'depth' else ''} "
                            f"is now {new}")
    if problems:
        raise ValueError("; ".join(problems) + ". Adapter options: depth = layers 0..depth-1, layers = 0-based "
                         "layer indices (e.g. [0, 5]), n_ctx = prompt tokens per layer (docs/methods.md)")


def current_init_args(init_args: dict[str, Any]) -> dict[str, Any]:
    """An adapter's init_args with former option names replaced (checkpoints written before the renames)."""
    return {renamed_option(name, value) or name: value for name, value in init_args.items()}


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
    adapter = config["model"]["adapter"]
    adapter["init_args"] = current_init_args(adapter.get("init_args") or {})
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
