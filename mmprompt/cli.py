"""``mmprompt``: LightningCLI for fit/validate/test/predict, plus the tool subcommands.

``mmprompt fit --config configs/demo.yaml`` trains, then tests the final model and writes
``results.json`` into the run folder ``<out_dir>/<name>/<version>/`` next to the resolved
``config.yaml``, the CSV/TensorBoard logs and ``checkpoints/last.ckpt``.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO

from .checkpoint_io import AtomicCheckpointIO, read_checkpoint
from .commands import TOOLS, answer_without_imports
from .data.datamodule import FewShotDataModule
from .files import UnreadableFile
from .guards import (checkpoint_model_options, check_config_files, error_text, init_defaults, is_global_rank_zero,
                     refuse_reused_run_dir)
from .launch import agree_with_rank_zero, launched_by_torchrun, slurm_version
from .module import PromptCLIPModule
from .predictions import PredictionWriter
from .results import RESULTS_FILE
from .run_config import absolute_path_options, with_checkpoint_config
from .run_logs import KeepEarlierRowsCSVLogger
from .shipped import with_shipped_configs
from .tables import write_json_atomic

RUN_DIR_ENV = "MMPROMPT_RUN_DIR"  # rank 0 picks the run folder; DDP workers it launches inherit it
# cli_main always passes the (rewritten) command line as ``args``: Lightning's warning about that is noise
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
ERRORS_SHOWN_WITHOUT_TRACEBACK = (ValueError, FileNotFoundError, NotADirectoryError, NotImplementedError, UnreadableFile)


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


def add_run_folder_arguments(parser: LightningArgumentParser, default_name: str) -> None:
    """--out_dir/--name/--version: where a run's folder goes (shared by every LightningCLI here)."""
    parser.add_argument("--out_dir", type=str, default="runs", help="Parent folder of all runs.")
    parser.add_argument("--name", type=str | None, default=None, help=f"Run group; default {default_name}.")
    parser.add_argument("--version", type=str | None, default=None,
                        help="Run folder inside the group; default the next free 'version_N'.")


class MMPromptCLI(LightningCLI):
    """LightningCLI with run folders, adapter-only checkpoints, test-after-fit and results.json."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_run_folder_arguments(parser, "'<Adapter>-<dataset>'")
        parser.add_argument("--protocol", type=str, default="custom",
                            help="Label stored in results.json (base2new, fewshot, cross_dataset, ...).")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit, test the final model and write results.json.")
        parser.add_argument("--compare_zero_shot", type=bool, default=False,
                            help="After fit, also test zero-shot CLIP (same backbone and classes) and print both.")
        parser.link_arguments("model.model_name", "data.image_size", compute_fn=image_size_of)
        if "verbose" in parser.get_defaults():  # validate/test: our summary names base/new; Lightning's table can't
            parser.set_defaults(verbose=False)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if args is None or isinstance(args, list):
            check_config_files(sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces every model option with the checkpoint's; apply only those left at their
        defaults and refuse a conflicting backbone (`mmprompt.guards.checkpoint_model_options`).
        (`with_checkpoint_config` already put the checkpoint's own config first.)"""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        saved = read_checkpoint(ckpt_path).get("hyper_parameters") or {}
        model = self.config[subcommand].model
        given = {key: model.get(key) for key in saved if key in model}
        updates = checkpoint_model_options(given, saved, init_defaults(self.model_class), ckpt_path)
        if updates:
            self.config = self.parser.parse_object({subcommand: {"model": updates}}, self.config)

    # ------------------------------------------------------------------ run folder, loggers, checkpoints

    def _run_config(self) -> Any:
        return self.config[self.subcommand]

    def before_instantiate_classes(self) -> None:
        absolute_path_options(self._run_config())  # config.yaml and checkpoints re-run from any folder

    def _default_name(self) -> str:
        config = self._run_config()
        return f"{config.model.adapter.class_path.rsplit('.', 1)[-1]}-{self.datamodule.name}"

    def instantiate_trainer(self, **kwargs: Any):
        config = self._run_config()
        trainer_config = self._get(self.config_init, "trainer", default={})
        self.run_dir = claim_run_dir(config.out_dir, config.name or self._default_name(), config.version)
        if config.version is not None and is_global_rank_zero():
            refuse_reused_run_dir(self.run_dir, self.subcommand, config.get("ckpt_path"))
        out_dir, name, version = str(self.run_dir.parent.parent), self.run_dir.parent.name, self.run_dir.name
        kwargs.setdefault("default_root_dir", str(self.run_dir))
        if trainer_config.get("logger") is not False:
            kwargs["logger"] = run_loggers(out_dir, name, version, trainer_config.get("logger"))
        callbacks = list(trainer_config.get("callbacks") or [])
        if not any(isinstance(callback, ModelCheckpoint) for callback in callbacks):
            callbacks.append(ModelCheckpoint(dirpath=self.run_dir / "checkpoints", save_last=True))
        if self.subcommand == "predict" and not any(isinstance(c, PredictionWriter) for c in callbacks):
            callbacks.append(PredictionWriter(self.run_dir))
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
        config = self._run_config()
        if config.test_after_fit and not self.trainer.interrupted:
            baseline = self._test_zero_shot() if config.compare_zero_shot else None
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            self._write_results(baseline)

    def _test_zero_shot(self) -> dict[str, float]:
        """Zero-shot CLIP's test accuracies on the same classes, with the run's callbacks and loggers
        set aside (they describe the tuned model); every rank runs it, so DDP stays in step."""
        from lightning.pytorch.callbacks import ProgressBar

        from .adapters import ZeroShot

        hparams = self.model.hparams
        baseline = PromptCLIPModule(ZeroShot(), model_name=hparams.model_name, pretrained=hparams.pretrained,
                                    force_quick_gelu=hparams.force_quick_gelu)
        baseline.use_clip(self.model.clip)  # the very same frozen backbone, random weights too
        callbacks, loggers = self.trainer.callbacks, self.trainer.loggers
        self.trainer.callbacks = [callback for callback in callbacks if isinstance(callback, ProgressBar)]
        self.trainer.loggers = []
        try:
            self.trainer.test(baseline, datamodule=self.datamodule, verbose=False)
        finally:
            self.trainer.callbacks, self.trainer.loggers = callbacks, loggers
        return baseline.test_results

    def after_test(self) -> None:
        self._write_results()

    def after_predict(self) -> None:
        for callback in self.trainer.callbacks:
            if isinstance(callback, PredictionWriter) and callback.written:
                print("\n".join(f"  predictions: {path}" for path in callback.written))

    def _write_results(self, zero_shot: dict[str, float] | None = None) -> None:
        results = getattr(self.model, "test_results", None)
        if not results or not self.trainer.is_global_zero or self.trainer.fast_dev_run:
            return
        config = self._run_config()
        payload = {
            "name": self.run_dir.parent.name, "version": self.run_dir.name, "protocol": config.protocol,
            "method": type(self.model.adapter).__name__, "dataset": self.datamodule.name, "seed": config.data.seed,
            "shots": config.data.shots, "subsample": config.data.subsample, "model_name": config.model.model_name,
            "pretrained": config.model.pretrained,
            "stage": self.subcommand, "metrics": results,
        }
        columns = {type(self.model.adapter).__name__: results}
        if zero_shot is not None:
            payload["zero_shot_metrics"] = zero_shot
            columns = {"zero-shot": zero_shot, **columns}
        write_json_atomic(self.run_dir / RESULTS_FILE, payload, indent=2)
        print_results(columns, self.run_dir)


class PretrainCLI(MMPromptCLI):
    """``mmprompt pretrain``: the same run folders, loggers and atomic checkpoints, for `PretrainCLIP`;
    after fit the weights are exported as a plain open_clip state dict (``open_clip_weights.pt``)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_run_folder_arguments(parser, "'pretrain-<model_name>'")
        parser.link_arguments("model.model_name", "data.image_size", compute_fn=image_size_of)
        parser.link_arguments("model.model_name", "data.tokenizer")

    def _default_name(self) -> str:
        return f"pretrain-{self._run_config().model.model_name}"

    def after_fit(self) -> None:
        if self.trainer.is_global_zero and not self.trainer.interrupted and not self.trainer.fast_dev_run:
            path = self.model.export(self.run_dir / PRETRAINED_WEIGHTS_FILE)
            print(f"  open_clip weights: {path}")


PRETRAINED_WEIGHTS_FILE = "open_clip_weights.pt"


def pretrain_main(argv: list[str]) -> PretrainCLI:
    """``mmprompt pretrain [--config world.yaml] [--key value ...]`` = fit of `PretrainCLIP` on the captioned world."""
    from .pretrain import PretrainCLIP, WorldDataModule

    return PretrainCLI(PretrainCLIP, WorldDataModule, args=["fit", *with_shipped_configs(argv)], seed_everything_default=0,
                       save_config_kwargs={"overwrite": True})


def run_loggers(out_dir: str, name: str, version: str, user_loggers: Any) -> list[Logger]:
    """CSV + TensorBoard in the run folder, then the user's own loggers (W&B, MLflow, ...) added to them.

    CSV comes first so ``trainer.log_dir`` (where config.yaml goes) is always the run folder.
    """
    extra = [] if user_loggers in (None, True) else list(user_loggers) if isinstance(user_loggers, (list, tuple)) \
        else [user_loggers]
    return [KeepEarlierRowsCSVLogger(out_dir, name=name, version=version),
            TensorBoardLogger(out_dir, name=name, version=version, default_hp_metric=False), *extra]


def print_results(columns: dict[str, dict[str, float]], run_dir: Path) -> None:
    """Accuracies (%) of one or more models side by side, one row per metric."""
    metrics = list(next(iter(reversed(columns.values()))))
    width = max(len(name) for name in metrics)
    header = "".join(f"  {title:>10}" for title in columns)
    rows = [f"  {name:<{width}}" + "".join(f"  {column.get(name, float('nan')):10.2f}" for column in columns.values())
            for name in metrics]
    print("\n" + "\n".join([f"  {'':<{width}}{header}", *rows]))
    print(f"  results: {run_dir / RESULTS_FILE}")


def run_tool(command: str, argv: list[str]) -> int:
    module_name, _ = TOOLS[command]
    tool_main: Callable[[list[str]], Any] = importlib.import_module(module_name).main
    status = tool_main(argv)
    return status if isinstance(status, int) else 0


def cli_main(args: list[str] | None = None) -> MMPromptCLI:
    """Run LightningCLI (importable for tests: ``cli_main(["fit", "--config", ...])``)."""
    args = with_checkpoint_config(with_shipped_configs(list(sys.argv[1:] if args is None else args)))
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
    quick = answer_without_imports(argv)
    if quick is not None:
        return quick
    try:
        if argv[0] in TOOLS:
            return run_tool(argv[0], argv[1:])
        if argv[0] == "pretrain":
            pretrain_main(argv[1:])
            return 0
        cli_main(None if from_command_line else argv)
    except ERRORS_SHOWN_WITHOUT_TRACEBACK as error:
        if os.environ.get("MMPROMPT_DEBUG"):
            raise
        print(f"mmprompt: error: {error_text(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
