"""The ``mmprompt`` command's entry point: answers ``--help`` and ``--version`` without importing torch,
and runs the tools (`TOOLS`) with only the imports each needs (``report``, ``sweep``, ``methods``:
none of torch, so they start in a fraction of a second).

The Lightning stages, ``pretrain`` and the analysis aliases go to `mmprompt.run.cli.run_lightning_command`;
only that import pays for torch, Lightning and open_clip (~5-9 s). `main` is the one entry point
(``mmprompt.run.cli.main`` is the same function).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable

from .. import __version__
from ..files import UnreadableFile, UnwritableFile, is_write_error, unwritable
from .guards import error_text

#: errors the user can fix (a bad option, a missing file): one line on stderr, status 2
ERRORS_SHOWN_WITHOUT_TRACEBACK = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, NotImplementedError,
                                  UnreadableFile, UnwritableFile)

#: subcommands that are plain functions ``main(argv) -> int | Any`` rather than Lightning stages
TOOLS: dict[str, tuple[str, str]] = {
    "report": ("mmprompt.tools.report", "gather finished runs into paper-style tables"),
    "sweep": ("mmprompt.tools.sweep", "run a protocol sweep (methods × datasets × seeds), resumably"),
    "check-data": ("mmprompt.data.check", "check a dataset tree before training"),
    "make-split": ("mmprompt.data.custom", "write a split file from a class-per-folder tree"),
    "methods": ("mmprompt.tools.methods_table", "list the registered methods (name, class, defaults, trainable parameters)"),
    "export": ("mmprompt.tools.export", "adapter-only safetensors + JSON; bias methods also as a plain open_clip model"),
}
#: short aliases: ``mmprompt test --config RUN/config.yaml --config <preset>`` of a finished run (the
#: shipped ``configs/analysis/*.yaml``), written into that run's folder (`mmprompt.run.cli.AnalysisCLI`)
ALIASES: dict[str, tuple[str, str]] = {
    "interventions": ("analysis/interventions", "test a run under every route intervention: one table"),
    "prompt-analysis": ("analysis/prompts", "nearest words of text prompts; vision prompts vs fg/bg patches"),
}


def print_top_level_help() -> None:
    print(f"mmprompt {__version__}: prompt and bias adapters for a frozen CLIP\n")
    print("usage: mmprompt {fit,validate,test,predict} --config CONFIG.yaml [--key value ...]")
    print("       mmprompt pretrain --config configs/pretrain/world.yaml   (pretrain a tiny CLIP on the captioned world)")
    print("       mmprompt {" + ",".join([*TOOLS, *ALIASES]) + "} [options]\n")
    for command, (_, description) in {**TOOLS, **ALIASES}.items():
        print(f"  {command:<14} {description}")
    print("\nLightning stages: fit, validate, test, predict; `mmprompt fit --help` lists every option.")
    print("--config takes a file or a shipped config by name: demo, tiny, methods/maple, datasets/eurosat, ...")


def answer_without_imports(args: list[str]) -> int | None:
    """Exit status after printing the version or the top-level help; None when ``args`` ask for more."""
    if args and args[0] in ("--version", "-V"):
        print(f"mmprompt {__version__}")
        return 0
    if not args or args[0] in ("-h", "--help"):
        print_top_level_help()
        return 0
    return None


def shown_without_traceback(run: Callable[[], int]) -> int:
    """``run()``'s status; an error the user can fix is printed as one line and gives status 2
    (``MMPROMPT_DEBUG=1`` shows the traceback instead)."""
    try:
        return run()
    except (*ERRORS_SHOWN_WITHOUT_TRACEBACK, OSError) as error:
        if os.environ.get("MMPROMPT_DEBUG") or not shown_as_one_line(error):
            raise
        if is_write_error(error):  # a full disk or a read-only folder, from any writer
            error = unwritable(error.filename, error)
        print(f"mmprompt: error: {error_text(error)}", file=sys.stderr)
        return 2


def shown_as_one_line(error: BaseException) -> bool:
    """An error the user can fix: one of `ERRORS_SHOWN_WITHOUT_TRACEBACK`, or a write the disk or the
    folder's permissions refused (`mmprompt.files.is_write_error`)."""
    return isinstance(error, ERRORS_SHOWN_WITHOUT_TRACEBACK) or is_write_error(error)


def run_tool(command: str, argv: list[str]) -> int:
    """Run one of `TOOLS`: its module's ``main(argv)``."""
    tool_main: Callable[[list[str]], Any] = importlib.import_module(TOOLS[command][0]).main
    status = tool_main(argv)
    return status if isinstance(status, int) else 0


def main(argv: list[str] | None = None) -> int:
    """``mmprompt ...``: top-level help and version here; the tools import only what they need (report,
    sweep and methods no torch, so they start at once); the Lightning stages, ``pretrain`` and the
    aliases go to `mmprompt.run.cli.run_lightning_command`, imported only then."""
    args = list(sys.argv[1:] if argv is None else argv)
    status = answer_without_imports(args)
    if status is not None:
        return status
    if args[0] in TOOLS:
        return shown_without_traceback(lambda: run_tool(args[0], args[1:]))
    from .cli import run_lightning_command  # torch, Lightning and open_clip: seconds to import

    return shown_without_traceback(lambda: run_lightning_command(args))
