"""The ``mmprompt`` command's entry point: answers ``--help`` and ``--version`` without importing torch.

Everything else goes to `mmprompt.cli.main` (LightningCLI stages and the tool subcommands); only
that import pays for torch, Lightning and open_clip (~7-9 s), so ``mmprompt --help`` stays instant.
"""

from __future__ import annotations

import sys

from . import __version__

#: subcommands that are plain functions ``main(argv) -> int | Any`` rather than Lightning stages
TOOLS: dict[str, tuple[str, str]] = {
    "report": ("mmprompt.report", "gather finished runs into paper-style tables"),
    "sweep": ("mmprompt.sweep", "run a protocol sweep (methods × datasets × seeds), resumably"),
    "check-data": ("mmprompt.data.check", "check a dataset tree before training"),
    "make-split": ("mmprompt.data.custom", "write a split file from a class-per-folder tree"),
    "methods": ("mmprompt.method_table", "list the registered methods (name, class, defaults, trainable parameters)"),
    "export": ("mmprompt.export", "adapter-only safetensors + JSON; bias methods also as a plain open_clip model"),
}
#: short aliases: ``mmprompt test`` of a finished run with one analysis callback (class_path), written
#: into that run's folder (`mmprompt.cli.analysis_main`)
ALIASES: dict[str, tuple[str, str]] = {
    "interventions": ("mmprompt.analysis.InterventionTable", "test a run under every route intervention: one table"),
    "prompt-analysis": ("mmprompt.analysis.PromptAnalysis", "nearest words of text prompts; vision prompts vs fg/bg patches"),
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


def main(argv: list[str] | None = None) -> int:
    """``mmprompt ...``: top-level help and version here, the rest in `mmprompt.cli.main`."""
    status = answer_without_imports(list(sys.argv[1:] if argv is None else argv))
    if status is not None:
        return status
    from .cli import main as run

    return run(argv)
