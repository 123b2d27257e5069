"""Run configs that stand alone: paths made absolute, a checkpoint that replaces ``--config``, and
adapter options under their former names.

``mmprompt test --ckpt_path RUN/checkpoints/last.ckpt`` needs no other argument: the checkpoint holds
the model's hyper-parameters (adapter class_path and init_args included) and the datamodule's, and
they become the first ``--config`` of the command, so any file or flag given after them still wins.

Adapter options have one vocabulary (docs/methods.md): ``depth`` counts layers 0..depth-1, ``layers``
lists 0-based layer indices, ``n_ctx`` counts prompt tokens; the encoders' speed options sit under
``model.speed``. A config or flag that still uses a former name is refused with the new one; a
checkpoint written before the renames is read with the new names (`upgrade_hyper_parameters`, on
every path that reads saved hyper-parameters: ``--ckpt_path``, ``load_from_checkpoint``, export).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..model.checkpoint_io import read_checkpoint
from .guards import config_value

log = logging.getLogger(__name__)

#: data/model options that name files or folders; made absolute so a saved config runs from anywhere
PATH_OPTIONS = {"data": ("root", "split_file", "image_dir", "mask_dir"), "model": ("pretrained",)}
#: keys of a checkpoint's saved hyper-parameters that are not options of the config
NOT_OPTIONS = ("_instantiator", "_class_path", "image_size")  # image_size is linked from model.model_name


#: former adapter option names -> current ones (a count given as ``layers`` is ``depth``: `renamed_option`)
RENAMED_ADAPTER_OPTIONS = {"n_prompts": "n_ctx", "n_vision": "n_ctx_vision", "branches": "branch"}
#: the speed options PromptCLIPModule took flat before they moved under ``model.speed`` (EncoderOptions)
FORMER_SPEED_OPTIONS = ("text_chunk_size", "attention", "cache_text_features", "truncate_text", "bucket_text",
                        "prune_last_layer", "share_text_prefix")
ADAPTER_OPTIONS = ("model", "adapter", "init_args")


def renamed_option(name: str, value: Any) -> str | None:
    """The current name of an adapter option given under a former one; None when the name is current."""
    if name == "layers" and isinstance(value, int) and not isinstance(value, bool):
        return "depth"  # ``layers: 9`` once meant layers 0..8; ``layers`` now holds indices only
    return RENAMED_ADAPTER_OPTIONS.get(name)


def parsed_config(source: str) -> tuple[str, Mapping[str, Any]] | None:
    """(where, parsed YAML) of a ``--config`` file or string; None unless it parses to a mapping."""
    is_file = "\n" not in source and Path(source).is_file()
    try:
        config = yaml.safe_load(Path(source).read_text(encoding="utf-8") if is_file else source)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None  # not YAML (or a missing file): the config checks and jsonargparse report it
    return (f"--config {source if is_file else '<YAML string>'}", config) if isinstance(config, dict) else None


def options_given(args: list[str], section: tuple[str, ...]) -> list[tuple[str, str, Any]]:
    """(where, name, value) of every option directly under ``section`` (e.g. ``("model", "adapter",
    "init_args")``) in the ``--config`` files/strings and the flags of ``args``, in the order given (the
    last value of a name is the one jsonargparse keeps)."""
    flag = "--" + ".".join(section) + "."
    given = []
    for index, arg in enumerate(args):
        if arg.startswith(flag):
            name, has_value, value = arg[len(flag):].partition("=")
            value = value if has_value else (args[index + 1] if index + 1 < len(args) else "")
            given.append((f"{flag}{name}", name, flag_value(value)))
            continue
        source = config_value(args, index)
        parsed = parsed_config(source) if source is not None else None
        if parsed is None:
            continue
        where, options = parsed
        for key in section:
            options = options.get(key) if isinstance(options, dict) else None
        given.extend((where, name, value) for name, value in (options.items() if isinstance(options, dict) else ()))
    return given


def flag_value(text: str) -> Any:
    """A flag's value as jsonargparse reads it (YAML), the text itself when it is not YAML; None if empty."""
    try:
        return yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return text


def renamed_adapter_options(args: list[str]) -> list[str]:
    """One line per adapter option of ``args`` given under a former name, naming the new one."""
    problems = []
    for where, name, value in options_given(args, ADAPTER_OPTIONS):
        new = renamed_option(name, value)
        if new is not None:
            problems.append(f"{where}: model.adapter.init_args.{name}{'=' + str(value) if new == 'depth' else ''} "
                            f"is now {new}")
    return problems


def flat_speed_options(args: list[str]) -> list[str]:
    """One line per speed option of ``args`` given flat on the model, naming its place under ``model.speed``."""
    return [f"{where}: model.{name} is now model.speed.{name}"
            for where, name, _ in options_given(args, ("model",)) if name in FORMER_SPEED_OPTIONS]


def refuse_renamed_options(args: list[str]) -> None:
    """Refuse options under their former names, naming the new one: adapter options (jsonargparse would
    only say "not accepted", or take ``layers: 9`` for layer 9) and the speed flags now in ``model.speed``."""
    renamed, flat = renamed_adapter_options(args), flat_speed_options(args)
    explanations = []
    if renamed:
        explanations.append("Adapter options: depth = layers 0..depth-1, layers = 0-based layer indices (e.g. [0, 5]), "
                            "n_ctx = prompt tokens per layer (docs/methods.md)")
    if flat:
        explanations.append("Speed options sit under model.speed, e.g. `speed: {attention: explicit}` in YAML or "
                            "--model.speed.attention explicit (docs/performance.md)")
    if renamed or flat:
        raise ValueError("; ".join(renamed + flat) + ". " + ". ".join(explanations))


def current_init_args(init_args: dict[str, Any]) -> dict[str, Any]:
    """An adapter's init_args with former option names replaced (checkpoints written before the renames)."""
    return {renamed_option(name, value) or name: value for name, value in init_args.items()}


def former_names(hparams: Mapping[str, Any]) -> list[str]:
    """``"former -> current"`` for each saved model hyper-parameter under a former name (empty if none)."""
    adapter = hparams.get("adapter")
    init_args = adapter.get("init_args") if isinstance(adapter, Mapping) else None
    renamed = [f"adapter.init_args.{name} -> {new}" for name, value in (init_args or {}).items()
               if (new := renamed_option(name, value)) is not None]
    return renamed + [f"{name} -> speed.{name}" for name in FORMER_SPEED_OPTIONS if name in hparams]


def upgrade_hyper_parameters(hparams: Mapping[str, Any], source: str | None = None) -> dict[str, Any]:
    """Saved model hyper-parameters under the current names: adapter options renamed (`current_init_args`)
    and the flat speed flags moved into ``speed``. Current ones come back equal.

    Every path that reads a checkpoint's hyper-parameters calls this (``--ckpt_path``,
    ``PromptCLIPModule.load_from_checkpoint``, ``mmprompt export``); with ``source`` (the checkpoint)
    a warning names the renamed keys.
    """
    upgraded = dict(hparams)
    renames = former_names(hparams)
    if not renames:
        return upgraded
    adapter = upgraded.get("adapter")
    if isinstance(adapter, Mapping) and isinstance(adapter.get("init_args"), Mapping):
        upgraded["adapter"] = {**adapter, "init_args": current_init_args(dict(adapter["init_args"]))}
    flat = {name: upgraded.pop(name) for name in FORMER_SPEED_OPTIONS if name in upgraded}
    if flat:
        upgraded["speed"] = {**flat, **(upgraded.get("speed") or {})}  # a saved ``speed`` (never both) wins
    if source is not None:
        log.warning("%s was written before options were renamed; read with the current names: %s", source,
                    ", ".join(renames))
    return upgraded


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
        last = next((c for c in (path / "checkpoints" / "last.ckpt", path / "last.ckpt") if c.is_file()), None)
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
        return {}  # written before checkpoints described their adapter: the user's --config must say it
    config["model"] = upgrade_hyper_parameters(config["model"], source=str(path))
    return config


def with_checkpoint_config(args: list[str]) -> list[str]:
    """``args`` with the checkpoint's own config inserted as the first ``--config`` after the subcommand."""
    ckpt_path = ckpt_path_argument(args)
    if ckpt_path is not None:
        check_ckpt_path(ckpt_path)
    if not args or ckpt_path is None or not Path(ckpt_path).is_file():
        return args
    config = config_from_checkpoint(ckpt_path)
    if not config:
        return args
    return [args[0], "--config", yaml.safe_dump(config, sort_keys=False), *args[1:]]
