"""Checks the CLI makes before it runs anything, so bad input ends in one clear paragraph.

- a YAML syntax error in a ``--config`` file names the file and line (jsonargparse names neither);
- ``--ckpt_path`` fills in the model options the command line left at their defaults, and refuses
  a backbone that contradicts the checkpoint's (Lightning would silently take the checkpoint's);
- an explicit ``--version`` never reuses the folder of a finished or resumable run, except to
  resume it with ``fit --ckpt_path last``.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from ..results import LAST_CKPT, RESULTS_FILE

log = logging.getLogger(__name__)

#: model options that decide what the checkpoint's tensors mean: a different value is refused
IDENTITY_OPTIONS = ("model_name", "force_quick_gelu")
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID")


# ---------------------------------------------------------------------- --config files

def check_config_syntax(path: Path) -> None:
    """Raise naming ``path`` (and line and column) when it is not a YAML mapping of options: a syntax
    error, an empty file, a list or a scalar, or bytes that are not UTF-8."""
    try:
        with open(path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
    except UnicodeDecodeError as err:
        raise ValueError(f"--config {path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                         "save the file as UTF-8 YAML") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = f" ({err.context} at line {err.context_mark.line + 1})" if err.context and err.context_mark else ""
        raise ValueError(f"--config {path}: YAML syntax error at{where}: {err.problem}{context}; "
                         "fix the file (indentation, a missing ':' or closing bracket)") from None
    except yaml.YAMLError as err:
        raise ValueError(f"--config {path}: not valid YAML: {err}") from None
    if not isinstance(config, dict):
        found = "is empty" if config is None else f"holds a {type(config).__name__}, not a mapping"
        raise ValueError(f"--config {path} {found}; expected a YAML mapping of options, e.g. "
                         "`model: {...}`, `data: {...}`, `trainer: {...}`")


# ---------------------------------------------------------------------- --ckpt_path hyper-parameters

def init_defaults(cls: type) -> dict[str, Any]:
    """The defaults of ``cls.__init__``'s keyword parameters (the options a user did not set)."""
    return {name: parameter.default for name, parameter in inspect.signature(cls.__init__).parameters.items()
            if parameter.default is not inspect.Parameter.empty}


def plain_option(value: Any) -> Any:
    """An option as plain data, so parsed, default and saved values compare: a jsonargparse
    Namespace or an options object (`mmprompt.model.encoders.EncoderOptions`) becomes a dict."""
    return value.as_dict() if callable(getattr(value, "as_dict", None)) else value


def checkpoint_model_options(given: dict[str, Any], saved: dict[str, Any], defaults: dict[str, Any],
                             ckpt_path: str) -> dict[str, Any]:
    """The checkpoint's model options to apply: those the config and command line left at their
    defaults. A backbone option (`IDENTITY_OPTIONS`) set to another value is refused, naming both;
    any other option set explicitly keeps its value, with a warning naming both."""
    updates: dict[str, Any] = {}
    conflicts: list[str] = []
    given = {key: plain_option(value) for key, value in given.items()}
    defaults = {key: plain_option(value) for key, value in defaults.items()}
    for key, value in saved.items():
        if key not in given:
            continue
        if key in defaults and given[key] == defaults[key] or given[key] == value:
            updates[key] = value
        elif key in IDENTITY_OPTIONS:
            conflicts.append(f"--model.{key} {given[key]!r} but the checkpoint was trained with {value!r}")
        else:
            log.warning("--model.%s %r overrides %r stored in %s", key, given[key], value, ckpt_path)
    if conflicts:
        raise ValueError(f"--ckpt_path {ckpt_path} does not match the model options: " + "; ".join(conflicts)
                         + ". Drop the option (the checkpoint's value is used) or use a checkpoint of that model.")
    return updates


# ---------------------------------------------------------------------- --version reuse

def is_global_rank_zero() -> bool:
    """True in the process that chooses the run folder (launchers set one of `RANK_VARIABLES`)."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def run_dir_state(run_dir: Path) -> str | None:
    """``finished`` (results.json), ``resumable`` (a last checkpoint) or None (free to start over)."""
    if (run_dir / RESULTS_FILE).is_file():
        return "finished"
    if (run_dir / LAST_CKPT).is_file():
        return "resumable"
    return None


def refuse_reused_run_dir(run_dir: Path, subcommand: str, ckpt_path: str | None) -> None:
    """Refuse to write a new run into the folder of a finished or resumable one: it would overwrite
    config.yaml, hparams.yaml and metrics.csv, add last-v1.ckpt and keep the old results.json.
    ``fit --ckpt_path last`` resumes that run and is allowed."""
    state = run_dir_state(run_dir)
    if state is None or (subcommand == "fit" and ckpt_path == "last"):
        return
    raise ValueError(
        f"--version {run_dir.name}: {run_dir} already holds a {state} run; choose another --version "
        f"(or leave it out for the next free version_N), remove the folder, or resume it with "
        f"`mmprompt fit ... --version {run_dir.name} --ckpt_path last`"
    )


# ---------------------------------------------------------------------- the tiny CLIP's world

def outside_tiny_world(bundled: bool, generated: bool, dataset: str, pretrained: str) -> str | None:
    """The warning when the bundled tiny CLIP (``bundled``: weights shipped in the package, pretrained
    on the generated captioned world) is adapted to a dataset that is not generated (``generated``):
    it has never seen a photo, so such a run ends near chance. None when the pair is fine."""
    if not bundled or generated:
        return None
    return (f"--model.pretrained {pretrained} is the bundled tiny CLIP: it knows only the generated captioned world "
            f"(world-shapes, synthetic), not dataset {dataset}; expect accuracy near chance. Real images need a real "
            "CLIP: --model.model_name ViT-B-16-quickgelu --model.pretrained openai (or a local weights file)")


# ---------------------------------------------------------------------- messages

def error_text(error: BaseException) -> str:
    """The message of ``error`` without a traceback: an error re-raised from a DataLoader worker
    carries the worker's traceback in its message; keep only its last line, the original message."""
    text = str(error)
    marker = "Original Traceback (most recent call last):"
    if marker not in text:
        return text
    last = [line for line in text.split(marker, 1)[1].splitlines() if line.strip()][-1]
    name, _, message = last.partition(": ")
    exception_name = all(part.isidentifier() for part in name.split("."))
    return message if message and exception_name else last
