"""The one module that reads a Lightning command line (``mmprompt fit|validate|test|predict|pretrain``
and the analysis aliases) before jsonargparse parses it. Each reader is one of the few things a
parser cannot do itself:

- ``--config NAME`` names a shipped config (`mmprompt.run.shipped`) when no such file exists;
- a ``--config`` file that is not a YAML mapping is refused naming its file and line (jsonargparse
  names neither);
- ``--ckpt_path``'s checkpoint supplies the model and data options, as the first ``--config``, so
  that everything given after it wins;
- ``--images a.jpg dir/`` becomes the one JSON list jsonargparse takes;
- ``trainer.limit_*_batches: 1`` means one batch (jsonargparse reads ``float | int`` as 1.0).

The tools (``report``, ``sweep``, ...) parse their own options with argparse.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from .guards import check_config_syntax
from .shipped import resolve_config

CONFIG_FLAGS = ("--config", "-c")
HELP_FLAGS = ("-h", "--help")
CKPT_PATH_FLAG = "--ckpt_path"
IMAGES_FLAG = "--images"
BATCH_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")


# ---------------------------------------------------------------------- one option's value

def flag_values(args: list[str], flag: str) -> list[str]:
    """Every value of ``flag`` in ``args`` (``--flag X`` or ``--flag=X``), in order."""
    values = []
    for index, arg in enumerate(args):
        if arg == flag and index + 1 < len(args):
            values.append(args[index + 1])
        elif arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
    return values


def asks_for_help(args: list[str]) -> bool:
    """Whether ``args`` ask for the usage (jsonargparse prints it)."""
    return any(arg in HELP_FLAGS for arg in args)


def config_at(args: list[str], index: int) -> str | None:
    """The ``--config`` value that ``args[index]`` starts (``--config X``, ``-c X``, ``--config=X``), else None."""
    arg = args[index]
    if arg in CONFIG_FLAGS:
        return args[index + 1] if index + 1 < len(args) else None
    return arg.split("=", 1)[1] if arg.startswith("--config=") else None


def config_paths(args: list[str]) -> Iterator[str]:
    """The values of every ``--config``/``-c`` option in ``args``, in order."""
    for index in range(len(args)):
        value = config_at(args, index)
        if value is not None:
            yield value


def is_config_file(source: str) -> bool:
    """Whether a ``--config`` value names an existing file (a YAML string, e.g. a checkpoint's config, does not)."""
    return "\n" not in source and Path(source).is_file()


def ckpt_path_argument(args: list[str]) -> str | None:
    """The value of ``--ckpt_path`` in ``args``, if any (the last, the one jsonargparse keeps)."""
    values = flag_values(args, CKPT_PATH_FLAG)
    return values[-1] if values else None


# ---------------------------------------------------------------------- --config

def with_shipped_configs(args: list[str]) -> list[str]:
    """``args`` with every ``--config NAME`` that is not a file replaced by the shipped config's path."""
    resolved = list(args)
    for index, arg in enumerate(resolved):
        if arg in CONFIG_FLAGS and index + 1 < len(resolved):
            resolved[index + 1] = resolve_config(resolved[index + 1])
        elif arg.startswith("--config="):
            resolved[index] = "--config=" + resolve_config(arg.split("=", 1)[1])
    return resolved


def check_config_files(args: list[str]) -> None:
    """Check the syntax of every ``--config`` file that exists (jsonargparse reports missing ones)."""
    for value in config_paths(args):
        if is_config_file(value):
            check_config_syntax(Path(value))


def with_first_config(args: list[str], config: Mapping[str, Any]) -> list[str]:
    """``args`` with ``config`` as the first ``--config`` after the subcommand: every file or flag wins over it."""
    return [args[0], "--config", yaml.safe_dump(dict(config), sort_keys=False), *args[1:]]


# ---------------------------------------------------------------------- predict --images

def images_as_one_value(args: list[str]) -> list[str]:
    """``--images a.jpg dir/ 'g/*.png'`` (or ``--images=a.jpg``) as the one JSON list jsonargparse takes
    (``--images '["a.jpg", ...]'``); a list already written as one value is left as it is."""
    out, index = [], 0
    while index < len(args):
        flag, has_value, value = args[index].partition("=")
        if flag != IMAGES_FLAG:
            out.append(args[index])
            index += 1
            continue
        end = index + 1
        while not has_value and end < len(args) and not args[end].startswith("--"):
            end += 1
        values = [value] if has_value else args[index + 1:end]
        out += [IMAGES_FLAG, values[0] if len(values) == 1 and values[0].startswith("[") else json.dumps(values)]
        index = end
    return out


# ---------------------------------------------------------------------- trainer.limit_*_batches

def parsed_config(source: str) -> Mapping[str, Any] | None:
    """The parsed YAML of a ``--config`` file or string; None unless it parses to a mapping."""
    try:
        config = yaml.safe_load(Path(source).read_text(encoding="utf-8") if is_config_file(source) else source)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None  # not YAML (or a missing file): the config checks and jsonargparse report it
    return config if isinstance(config, dict) else None


def flag_value(text: str) -> Any:
    """A flag's value as jsonargparse reads it (YAML), the text itself when it is not YAML; None if empty."""
    try:
        return yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return text


def options_given(args: list[str], section: tuple[str, ...]) -> list[tuple[str, Any]]:
    """(name, value) of every option directly under ``section`` (e.g. ``("trainer",)``) in the ``--config``
    files/strings and the flags of ``args``, in the order given (jsonargparse keeps the last)."""
    flag = "--" + ".".join(section) + "."
    given: list[tuple[str, Any]] = []
    for index, arg in enumerate(args):
        if arg.startswith(flag):
            name, has_value, value = arg[len(flag):].partition("=")
            value = value if has_value else (args[index + 1] if index + 1 < len(args) else "")
            given.append((name, flag_value(value)))
            continue
        source = config_at(args, index)
        options = parsed_config(source) if source is not None else None
        for key in section:
            options = options.get(key) if isinstance(options, dict) else None
        given.extend(options.items() if isinstance(options, dict) else ())
    return given


def one_batch_limits(args: list[str]) -> list[str]:
    """The ``trainer.limit_*_batches`` whose last value in ``args`` is the integer 1 (a flag "1" or a YAML
    ``1``). Lightning reads an int as a number of batches and a float as a fraction, but jsonargparse
    parses its ``float | int`` as 1.0: every batch, the opposite of what was asked."""
    last = {name: value for name, value in options_given(args, ("trainer",)) if name in BATCH_LIMITS}
    return [name for name, value in last.items() if value == 1 and type(value) is int]


# ---------------------------------------------------------------------- all of it

def prepared_args(args: list[str]) -> list[str]:
    """A Lightning command line made ready for jsonargparse: shipped config names resolved, every
    ``--config`` file's syntax checked (first: the readers above skip a file that is not a mapping),
    and ``--images`` as one value."""
    args = with_shipped_configs(list(args))
    check_config_files(args)
    return images_as_one_value(args)
