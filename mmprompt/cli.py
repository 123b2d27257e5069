"""``mmprompt``: LightningCLI for fit/validate/test/predict, plus the tool subcommands.

``mmprompt fit --config configs/demo.yaml`` trains, then tests the final model and writes
``results.json`` into the run folder ``<out_dir>/<name>/<version>/`` next to the resolved
``config.yaml``, the CSV/TensorBoard logs and ``checkpoints/last.ckpt``.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any, Callable

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO

from . import __version__
from .checkpoint_io import AtomicCheckpointIO
from .data.catalog import write_json_atomic
from .data.datamodule import FewShotDataModule
from .launch import agree_with_rank_zero, launched_by_torchrun, slurm_version
from .module import PromptCLIPModule
from .report import RESULTS_FILE

RUN_DIR_ENV = "MMPROMPT_RUN_DIR"  # rank 0 picks the run folder; DDP workers it launches inherit it
ERRORS_SHOWN_WITHOUT_TRACEBACK = (ValueError, FileNotFoundError, NotADirectoryError, NotImplementedError)

#: subcommands that are plain functions ``main(argv) -> int | Any`` rather than Lightning stages
TOOLS: dict[str, tuple[str, str]] = {
    "report": ("mmprompt.report", "gather finished runs into paper-style tables"),
    "sweep": ("mmprompt.sweep", "run a protocol sweep (methods × datasets × seeds), resumably"),
    "check-data": ("mmprompt.data.check", "check a dataset tree before training"),
    "make-split": ("mmprompt.data.custom", "write a split file from a class-per-folder tree"),
    "interventions": ("mmprompt.analysis.interventions", "evaluate a checkpoint under every route intervention"),
    "prompt-analysis": ("mmprompt.analysis.prompts", "nearest words of text prompts; vision prompts vs fg/bg patches"),
}


def image_size_of(model_name: str) -> int:
    """The input size of an open_clip architecture, so data.image_size always matches the model."""
    import open_clip

    from .backbone import register_bundled_configs

    register_bundled_configs()
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"unknown model.model_name {model_name!r}; see open_clip.list_models()")
    size = config["vision_cfg"]["image_size"]
    return size[0] if isinstance(size, (list, tuple)) else size


def next_free_version(parent: Path) -> str:
    """``version_N`` for the smallest N whose folder does not exist yet."""
    index = 0
    while (parent / f"version_{index}").exists():
        index += 1
    return f"version_{index}"


def claim_run_dir(out_dir: str, name: str, version: str | None) -> Path:
    """The run folder, created now so that two runs started together never share one.

    DDP worker processes (LOCAL_RANK > 0) re-run this command; they take the folder rank 0 chose.
    Under torchrun rank 0 chooses and the others ask it; srun tasks derive one version (launch.py).
    """
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited and os.environ.get("LOCAL_RANK", "0") != "0":
        return Path(inherited)
    version = version or slurm_version()
    if version is None and launched_by_torchrun():
        run_dir = agree_with_rank_zero(lambda: create_run_dir(out_dir, name, None))
    else:
        run_dir = create_run_dir(out_dir, name, version)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir


def create_run_dir(out_dir: str, name: str, version: str | None) -> Path:
    """``<out_dir>/<name>/<version>``, or the next free ``version_N`` claimed atomically by mkdir."""
    parent = Path(out_dir) / name
    parent.mkdir(parents=True, exist_ok=True)
    if version is not None:
        run_dir = parent / version
        run_dir.mkdir(exist_ok=True)
    else:
        while True:
            run_dir = parent / next_free_version(parent)
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                continue
    return run_dir


class MMPromptCLI(LightningCLI):
    """LightningCLI with run folders, adapter-only checkpoints, test-after-fit and results.json."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--out_dir", type=str, default="runs", help="Parent folder of all runs.")
        parser.add_argument("--name", type=str | None, default=None,
                            help="Run group; default '<Adapter>-<dataset>'.")
        parser.add_argument("--version", type=str | None, default=None,
                            help="Run folder inside the group; default the next free 'version_N'.")
        parser.add_argument("--protocol", type=str, default="custom",
                            help="Label stored in results.json (base2new, fewshot, cross_dataset, ...).")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit, test the final model and write results.json.")
        parser.link_arguments("model.model_name", "data.image_size", compute_fn=image_size_of)
        if "verbose" in parser.get_defaults():  # validate/test: our summary names base/new; Lightning's table can't
            parser.set_defaults(verbose=False)

    # ------------------------------------------------------------------ run folder, loggers, checkpoints

    def _run_config(self) -> Any:
        return self.config[self.subcommand]

    def _default_name(self) -> str:
        config = self._run_config()
        return f"{config.model.adapter.class_path.rsplit('.', 1)[-1]}-{config.data.dataset}"

    def instantiate_trainer(self, **kwargs: Any):
        config = self._run_config()
        trainer_config = self._get(self.config_init, "trainer", default={})
        self.run_dir = claim_run_dir(config.out_dir, config.name or self._default_name(), config.version)
        out_dir, name, version = str(self.run_dir.parent.parent), self.run_dir.parent.name, self.run_dir.name
        kwargs.setdefault("default_root_dir", str(self.run_dir))
        if trainer_config.get("logger") in (None, True):
            kwargs["logger"] = [CSVLogger(out_dir, name=name, version=version),
                                TensorBoardLogger(out_dir, name=name, version=version, default_hp_metric=False)]
        callbacks = list(trainer_config.get("callbacks") or [])
        if not any(isinstance(callback, ModelCheckpoint) for callback in callbacks):
            callbacks.append(ModelCheckpoint(dirpath=self.run_dir / "checkpoints", save_last=True))
        if kwargs.get("logger", trainer_config.get("logger")) and self.subcommand == "fit":
            callbacks.append(LearningRateMonitor(logging_interval="epoch"))
        kwargs["callbacks"] = callbacks
        plugins = trainer_config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    # ------------------------------------------------------------------ after the stages

    def after_fit(self) -> None:
        if self._run_config().test_after_fit and not self.trainer.interrupted:
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            self._write_results()

    def after_test(self) -> None:
        self._write_results()

    def _write_results(self) -> None:
        results = getattr(self.model, "test_results", None)
        if not results or not self.trainer.is_global_zero or self.trainer.fast_dev_run:
            return
        config = self._run_config()
        payload = {
            "name": self.run_dir.parent.name, "version": self.run_dir.name, "protocol": config.protocol,
            "method": type(self.model.adapter).__name__, "dataset": config.data.dataset, "seed": config.data.seed,
            "shots": config.data.shots, "subsample": config.data.subsample, "model_name": config.model.model_name,
            "stage": self.subcommand, "metrics": results,
        }
        write_json_atomic(self.run_dir / RESULTS_FILE, payload, indent=2)
        print_results(results, self.run_dir)


def print_results(results: dict[str, float], run_dir: Path) -> None:
    width = max(len(name) for name in results)
    print("\n" + "\n".join(f"  {name:<{width}}  {value:6.2f}" for name, value in results.items()))
    print(f"  results: {run_dir / RESULTS_FILE}")


def run_tool(command: str, argv: list[str]) -> int:
    module_name, _ = TOOLS[command]
    tool_main: Callable[[list[str]], Any] = importlib.import_module(module_name).main
    status = tool_main(argv)
    return status if isinstance(status, int) else 0


def print_top_level_help() -> None:
    print(f"mmprompt {__version__}: prompt and bias adapters for a frozen CLIP\n")
    print("usage: mmprompt {fit,validate,test,predict} --config CONFIG.yaml [--key value ...]")
    print("       mmprompt {" + ",".join(TOOLS) + "} [options]\n")
    for command, (_, description) in TOOLS.items():
        print(f"  {command:<14} {description}")
    print("\nLightning stages: fit, validate, test, predict; `mmprompt fit --help` lists every option.")


def cli_main(args: list[str] | None = None) -> MMPromptCLI:
    """Run LightningCLI (importable for tests: ``cli_main(["fit", "--config", ...])``)."""
    return MMPromptCLI(
        PromptCLIPModule,
        FewShotDataModule,
        args=args,
        seed_everything_default=1,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("--version", "-V"):
        print(f"mmprompt {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print_top_level_help()
        return 0
    try:
        if argv[0] in TOOLS:
            return run_tool(argv[0], argv[1:])
        cli_main(None if from_command_line else argv)
    except ERRORS_SHOWN_WITHOUT_TRACEBACK as error:
        if os.environ.get("MMPROMPT_DEBUG"):
            raise
        print(f"mmprompt: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
