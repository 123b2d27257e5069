"""``mmprompt``: LightningCLI for fit/validate/test/predict, plus the tool subcommands.

``mmprompt fit --config configs/demo.yaml`` trains, then tests the final model and writes
``results.json`` into the run folder ``<out_dir>/<name>/<version>/`` next to the resolved
``config.yaml``, the CSV/TensorBoard logs and ``checkpoints/last.ckpt``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from .backbone import BUNDLED_PRETRAINED
from .checkpoint_io import AtomicCheckpointIO, read_checkpoint
from .commands import ALIASES, main  # noqa: F401 (main: the one entry point, importable from here too)
from .data.datamodule import FewShotDataModule
from .files import UnreadableFile, is_write_error, unwritable
from .guards import (checkpoint_model_options, check_config_files, config_paths, error_text, init_defaults,
                     is_global_rank_zero, outside_tiny_world, plain_option, refuse_reused_run_dir)
from .launch import agree_with_rank_zero, launched_by_torchrun, slurm_version
from .inference import add_image_options, checked_image_paths, images_as_one_value, predict_images
from .module import PromptCLIPModule
from .predictions import PredictionWriter
from .results import LAST_CKPT, RESULTS_FILE
from .run_config import (PRETRAINED_WEIGHTS_FILE, absolute_path_options, ckpt_path_argument, options_given,
                         with_checkpoint_config)
from .run_folder import SIGTERM_STATUS, RunLock, SaveOnSigterm, last_checkpoint_required, sigterm_message
from .run_logs import KeepEarlierRowsCSVLogger
from .shipped import with_shipped_configs
from .tables import write_json_atomic

log = logging.getLogger(__name__)
RUN_DIR_ENV = "MMPROMPT_RUN_DIR"  # rank 0 picks the run folder; DDP workers it launches inherit it
# cli_main always passes the (rewritten) command line as ``args``: Lightning's warning about that is noise
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")


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
    try:
        if version is None and launched_by_torchrun():
            run_dir = agree_with_rank_zero(lambda: create_run_dir(out_dir, name, None))
        else:
            run_dir = create_run_dir(out_dir, name, version)
    except OSError as err:
        if not is_write_error(err):
            raise
        raise unwritable(err.filename, err, f"the run folder (--out_dir {out_dir}):") from err
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

    run_lock: RunLock | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """The run folder's lock (`instantiate_trainer`) is held while the command runs, here."""
        try:
            super().__init__(*args, **kwargs)
        finally:
            if self.run_lock is not None:
                self.run_lock.release()

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Option errors raise (`mmprompt.commands.main` prints one line) instead of a usage dump; --help keeps it."""
        return super().init_parser(**{"exit_on_error": False, **kwargs})

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_run_folder_arguments(parser, "'<Adapter>-<dataset>'")
        parser.add_argument("--protocol", type=str, default="custom",
                            help="Label stored in results.json (base2new, fewshot, cross_dataset, ...).")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit, test the final model and write results.json.")
        parser.add_argument("--compare_zero_shot", type=bool, default=False,
                            help="After fit, also test zero-shot CLIP (same backbone and classes) and print both.")
        parser.link_arguments("model.model_name", "data.image_size", compute_fn=image_size_of)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if "verbose" in parser.get_defaults():  # validate/test: our summary names base/new; Lightning's table can't
            parser.set_defaults(verbose=False)  # (the stage's own arguments exist only after add_arguments_to_parser)
        if subcommand == "predict":
            add_image_options(parser)  # --images, --classes, --top_k, --overlay
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        given = sys.argv[1:] if args is None else args  # a list; a dict or Namespace is already parsed
        if isinstance(given, list):
            check_config_files(given)  # first: the readers below skip a config that is not a YAML mapping
        self.one_batch_limits = one_batch_limits(given) if isinstance(given, list) else []
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
        given = {key: plain_option(model.get(key)) for key in saved if key in model}
        updates = checkpoint_model_options(given, saved, init_defaults(self.model_class), ckpt_path)
        if updates:
            self.config = self.parser.parse_object({subcommand: {"model": updates}}, self.config)

    # ------------------------------------------------------------------ run folder, loggers, checkpoints

    def _run_config(self) -> Any:
        return self.config[self.subcommand]

    def before_instantiate_classes(self) -> None:
        absolute_path_options(self._run_config())  # config.yaml and checkpoints re-run from any folder
        if self.subcommand == "predict" and self._run_config().get("images") is not None:
            self.image_paths = checked_image_paths(self._run_config())  # a bad file stops it before any model work

    def _default_name(self) -> str:
        config = self._run_config()
        data = "images" if config.get("images") is not None else self.datamodule.name  # predict --images
        return f"{config.model.adapter.class_path.rsplit('.', 1)[-1]}-{data}"

    def instantiate_trainer(self, **kwargs: Any):
        config = self._run_config()
        trainer_config = self._get(self.config_init, "trainer", default={})
        self.run_dir = claim_run_dir(config.out_dir, config.name or self._default_name(), config.version)
        if is_global_rank_zero():
            self.run_lock = RunLock(self.run_dir).acquire()
            if config.version is not None:
                refuse_reused_run_dir(self.run_dir, self.subcommand, config.get("ckpt_path"))
        last_checkpoint_required(self.run_dir, self.subcommand, config.get("ckpt_path"))
        out_dir, name, version = str(self.run_dir.parent.parent), self.run_dir.parent.name, self.run_dir.name
        kwargs.setdefault("default_root_dir", str(self.run_dir))
        kwargs.update({name: 1 for name in self.one_batch_limits})  # one batch, not 1.0 = every batch
        if trainer_config.get("logger") is not False:
            kwargs["logger"] = run_loggers(out_dir, name, version, trainer_config.get("logger"))
        callbacks = list(trainer_config.get("callbacks") or [])
        if not any(isinstance(callback, ModelCheckpoint) for callback in callbacks):
            # no version counter: last.ckpt stays the newest even after the folder moved (last-v1.ckpt otherwise)
            callbacks.append(ModelCheckpoint(dirpath=self.run_dir / "checkpoints", save_last=True,
                                             enable_version_counter=False))
        if self.subcommand == "fit":
            callbacks.append(SaveOnSigterm(self.run_dir / LAST_CKPT))
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

    def before_fit(self) -> None:
        """Warn once when the bundled tiny CLIP meets a dataset outside its generated world."""
        if not isinstance(self.model, PromptCLIPModule) or not isinstance(self.datamodule, FewShotDataModule):
            return  # pretraining: the world itself
        hparams, spec = self.model.hparams, self.datamodule.spec
        warning = outside_tiny_world((hparams.model_name, hparams.pretrained) in BUNDLED_PRETRAINED,
                                     spec.generate is not None, self.datamodule.name, hparams.pretrained)
        if warning:
            rank_zero_warn(warning)

    # ------------------------------------------------------------------ after the stages

    def after_fit(self) -> None:
        config = self._run_config()
        if config.test_after_fit and not self.trainer.interrupted:
            try:
                baseline = self._test_zero_shot() if config.compare_zero_shot else None
                self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            except UnreadableFile as error:  # a test image whose contents are broken: training is not lost
                raise UnreadableFile(f"{error_text(error)}; training finished and is saved in "
                                     f"{self.run_dir / LAST_CKPT}: once the file is fixed, `mmprompt test --config "
                                     f"{self.run_dir / 'config.yaml'} --ckpt_path {self.run_dir / LAST_CKPT}` "
                                     "tests it") from error
            self._write_results(baseline)

    def _test_zero_shot(self) -> dict[str, float]:
        """Zero-shot CLIP's test accuracies on the same classes, with the run's callbacks and loggers
        set aside (they describe the tuned model); every rank runs it, so DDP stays in step."""
        from lightning.pytorch.callbacks import ProgressBar

        from .adapters import ZeroShot

        hparams = self.model.hparams
        baseline = PromptCLIPModule(ZeroShot(), model_name=hparams.model_name, pretrained=hparams.pretrained,
                                    force_quick_gelu=hparams.force_quick_gelu, speed=self.model.speed)
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

    def predict(self, model: PromptCLIPModule, datamodule: FewShotDataModule | None = None, **kwargs: Any) -> Any:
        """The dataset's test split, or with ``--images`` the user's own images (`mmprompt.inference`)."""
        config = self._run_config()
        if config.get("images") is None:
            return self.trainer.predict(model, datamodule=datamodule, **kwargs)
        return predict_images(self.trainer, model, datamodule, config, self.image_paths, self.run_dir,
                              kwargs.get("ckpt_path"))

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


def pretrain_main(argv: list[str]) -> PretrainCLI:
    """``mmprompt pretrain [--config world.yaml] [--key value ...]`` = fit of `PretrainCLIP` on the captioned world."""
    from .pretrain import PretrainCLIP, WorldDataModule

    return PretrainCLI(PretrainCLIP, WorldDataModule, args=["fit", *with_shipped_configs(argv)], seed_everything_default=0,
                       save_config_kwargs={"overwrite": True})


class AnalysisCLI(MMPromptCLI):
    """``mmprompt interventions`` / ``prompt-analysis``: MMPromptCLI's ``test`` (the same config loader,
    image-size link, seed and ``--ckpt_path`` handling) of a finished run, writing only its analysis
    callback's files into ``output_dir``: no new run folder, loggers, config.yaml or results.json."""

    def __init__(self, *args: Any, output_dir: Path, trainer_options: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        self.output_dir, self.trainer_options = output_dir, dict(trainer_options or {})
        super().__init__(*args, **kwargs)

    def instantiate_trainer(self, **kwargs: Any):
        self.run_dir = self.output_dir
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # no logger; Lightning's own checkpoint callback saves nothing in a test
        kwargs.update({name: 1 for name in self.one_batch_limits})
        kwargs.update(default_root_dir=str(self.output_dir), logger=False, **self.trainer_options)
        return LightningCLI.instantiate_trainer(self, **kwargs)

    def after_test(self) -> None:
        if self.trainer.is_global_zero:
            print(f"  written to: {self.output_dir}")


#: the former command-line flags of the aliases, as LightningCLI options (and `batch_limit`)
ALIAS_TRAINER_FLAGS = {"--accelerator": "--trainer.accelerator", "--devices": "--trainer.devices"}
LIMIT_FLAG = "--limit_test_batches"
ALIAS_OUTPUT_FLAGS = ("--out_dir", "--output_dir")
ALLOW_NO_CHECKPOINT = "--allow_no_checkpoint"


def import_object(class_path: str) -> Any:
    module_name, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def takes_a_list(annotation: Any) -> bool:
    """True for ``list[X]`` and ``list[X] | None``: such alias options take several values (``--modes a b``)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [member for member in typing.get_args(annotation) if member is not type(None)]
        return all(typing.get_origin(member) is list for member in members)
    return typing.get_origin(annotation) is list


def callback_options(callback: type) -> dict[str, bool]:
    """{init argument: takes a list} of an analysis callback: the alias's own options."""
    hints = typing.get_type_hints(callback.__init__)
    return {name: takes_a_list(hints.get(name)) for name in inspect.signature(callback).parameters}


def batch_limit(text: str) -> int | float:
    """Lightning's meaning: "2" is two batches, "0.5" half of them, "1" one batch (see `one_batch_limits`)."""
    return int(text) if text.isdigit() else float(text)


BATCH_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")


def one_batch_limits(args: list[str]) -> list[str]:
    """The ``trainer.limit_*_batches`` whose last value in ``args`` is the integer 1 (a flag "1" or a YAML
    ``1``). Lightning reads an int as a number of batches and a float as a fraction, but jsonargparse
    parses its ``float | int`` as 1.0: every batch, the opposite of what was asked."""
    last = {name: value for _, name, value in options_given(args, ("trainer",)) if name in BATCH_LIMITS}
    return [name for name, value in last.items() if value == 1 and type(value) is int]


def split_flag(tokens: list[str], index: int) -> tuple[str, list[str], int]:
    """The flag at ``index``, its values (``--x=v``, ``--x v`` or ``--x v1 v2 ...``) and the next index."""
    flag, has_value, value = tokens[index].partition("=")
    if has_value:
        return flag, [value], index + 1
    end = index + 1
    while end < len(tokens) and not tokens[end].startswith("--"):
        end += 1
    return flag, tokens[index + 1:end], end


@dataclass
class AliasCommandLine:
    """An alias's command line sorted out: its callback's options, its own, and `mmprompt test`'s."""

    test_args: list[str] = field(default_factory=list)
    init_args: dict[str, str] = field(default_factory=dict)
    output_dir: Path | None = None
    allow_missing: bool = False
    trainer_options: dict[str, Any] = field(default_factory=dict)

    def add(self, flag: str, values: list[str], options: dict[str, bool], given: list[str]) -> None:
        """One flag with its values; ``given`` is how it was written (``--x v`` or ``--x=v``)."""
        name, rest = flag[2:], values[1:]
        if flag == ALLOW_NO_CHECKPOINT:
            self.allow_missing, rest = True, values
        elif flag in ALIAS_OUTPUT_FLAGS and values:
            self.output_dir = Path(values[0])
        elif flag == LIMIT_FLAG and values:
            self.trainer_options["limit_test_batches"] = batch_limit(values[0])
        elif name in options and name != "output_dir" and values:
            takes_list = options[name]
            self.init_args[name] = "[" + ", ".join(values) + "]" if takes_list else values[0]
            rest = [] if takes_list else values[1:]
        else:  # an option of `mmprompt test`, as given; the former short flags renamed
            self.test_args += [ALIAS_TRAINER_FLAGS.get(flag, flag) + given[0][len(flag):], *given[1:]]
            rest = []
        self.test_args += rest


def read_alias_command_line(argv: list[str], options: dict[str, bool]) -> AliasCommandLine:
    """Sort an alias's arguments (see `alias_test_args`); positional values stay with `mmprompt test`'s."""
    command = AliasCommandLine()
    index = 0
    while index < len(argv):
        if not argv[index].startswith("--"):
            command.test_args.append(argv[index])
            index += 1
            continue
        flag, values, after = split_flag(argv, index)
        command.add(flag, values, options, argv[index:after])
        index = after
    return command


def alias_test_args(class_path: str, argv: list[str]) -> tuple[list[str], Path, dict[str, Any]]:
    """``mmprompt test`` arguments for an alias's command line, the folder its files go to, and the
    Trainer options it sets itself (``--limit_test_batches``, see `batch_limit`).

    The callback's init arguments are options (``--modes full bias_only``, ``--k 3``); ``--out_dir``
    (or ``--output_dir``) is that folder, by default the run folder of the first ``--config`` or of
    ``--ckpt_path``; every other option is ``mmprompt test``'s. Without ``--ckpt_path`` the run's
    ``checkpoints/last.ckpt`` is tested (``--allow_no_checkpoint``: the untrained adapter if none).
    The run's own callbacks are replaced by the alias's one.
    """
    command = read_alias_command_line(argv, callback_options(import_object(class_path)))
    passed = command.test_args
    config = next((Path(c) for c in config_paths(passed) if Path(c).is_file()), None)
    ckpt_path = ckpt_path_argument(passed)
    if ckpt_path is None and config is not None:
        ckpt_path = default_checkpoint(config, command.allow_missing)
        passed += ["--ckpt_path", ckpt_path] if ckpt_path else []
    output_dir = command.output_dir or run_folder_of(config, ckpt_path)
    callback = [{"class_path": class_path, "init_args": {"output_dir": str(output_dir)}}]
    extra = [arg for name, value in command.init_args.items() for arg in (f"--trainer.callbacks.init_args.{name}", value)]
    args = ["test", *passed, "--trainer.callbacks", yaml.safe_dump(callback, default_flow_style=True), *extra]
    return args, output_dir, command.trainer_options


def run_folder_of(config: Path | None, ckpt_path: str | None) -> Path:
    """The run folder an alias analyses: the folder of its config.yaml, else of its checkpoint."""
    if config is not None:
        return config.parent
    if ckpt_path is not None and ckpt_path not in ("last", "best"):
        folder = Path(ckpt_path).parent
        return folder.parent if folder.name == "checkpoints" else folder
    raise ValueError("give --config RUN/config.yaml (the run's saved config) or --ckpt_path RUN/checkpoints/last.ckpt")


def default_checkpoint(config_path: Path, allow_missing: bool = False) -> str | None:
    """``checkpoints/last.ckpt`` of the run folder holding the config. Without one the numbers would
    be the untrained adapter's, so that is an error unless ``allow_missing`` (``--allow_no_checkpoint``)."""
    path = config_path.parent / LAST_CKPT
    if path.is_file():
        return str(path)
    if not allow_missing:
        raise FileNotFoundError(
            f"no --ckpt_path given and the run of --config {config_path} has no {path}: the results would be "
            "the untrained adapter's; pass --ckpt_path, or --allow_no_checkpoint to evaluate it untrained"
        )
    log.warning("no --ckpt_path and no %s: evaluating the untrained adapter (--allow_no_checkpoint)", path)
    return None


def print_alias_help(alias: str) -> None:
    class_path, description = ALIASES[alias]
    callback = import_object(class_path)
    options = " ".join(f"[--{name} ...]" for name in callback_options(callback) if name != "output_dir")
    print(f"usage: mmprompt {alias} [--config RUN/config.yaml] [--ckpt_path CKPT] [--out_dir DIR] "
          f"[--allow_no_checkpoint] [--limit_test_batches N] {options} [any `mmprompt test` option]\n")
    print(f"{description}.\nThe same as `mmprompt test --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt "
          f"--trainer.callbacks '[{{class_path: {class_path}}}]'`, with the files written into the run folder "
          "(or --out_dir) and no new run folder. --out_dir (alias --output_dir): the folder for the files.\n")
    print(f"{callback.__name__}: {inspect.getdoc(callback)}")


def analysis_main(alias: str, argv: list[str]) -> AnalysisCLI | None:
    """``mmprompt interventions|prompt-analysis ...``: the alias's `mmprompt test` (see `alias_test_args`)."""
    if any(arg in ("-h", "--help") for arg in argv):
        print_alias_help(alias)
        return None
    args, output_dir, trainer_options = alias_test_args(ALIASES[alias][0], with_shipped_configs(argv))
    return AnalysisCLI(PromptCLIPModule, FewShotDataModule, output_dir=output_dir, trainer_options=trainer_options,
                       args=with_checkpoint_config(args), seed_everything_default=1,
                       save_config_callback=None, auto_configure_optimizers=False)


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


def cli_main(args: list[str] | None = None) -> MMPromptCLI:
    """Run LightningCLI (importable for tests: ``cli_main(["fit", "--config", ...])``)."""
    args = with_checkpoint_config(with_shipped_configs(list(sys.argv[1:] if args is None else args)))
    args = images_as_one_value(args)
    return MMPromptCLI(
        PromptCLIPModule,
        FewShotDataModule,
        args=args,
        seed_everything_default=1,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def run_lightning_command(argv: list[str]) -> int:
    """A Lightning stage, ``pretrain`` or an analysis alias (`mmprompt.commands.main` sends them here)."""

    def run() -> int:
        if argv[0] in ALIASES:
            analysis_main(argv[0], argv[1:])
        elif argv[0] == "pretrain":
            pretrain_main(argv[1:])
        else:
            cli_main(argv)
        return 0

    return with_user_errors(run, argv[0])


def with_user_errors(run: Callable[[], int], command: str) -> int:
    """``run()``, with the errors of jsonargparse (a mistyped option: `MMPromptCLI.init_parser`) and of
    Lightning's option checks as one-line errors, and SIGTERM as `SIGTERM_STATUS` (`mmprompt.run_folder`)."""
    from argparse import ArgumentError

    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        return run()
    except SIGTERMException:
        run_dir = os.environ.get(RUN_DIR_ENV)
        print(f"mmprompt: error: {sigterm_message(Path(run_dir) if run_dir else None)}", file=sys.stderr)
        return SIGTERM_STATUS
    except ArgumentError as error:
        raise ValueError(f"{error}; `mmprompt {command} --help` lists the options") from error
    except MisconfigurationException as error:
        if not any(sign in str(error) for sign in NO_DEVICE_MESSAGES):
            raise
        raise ValueError(f"--trainer.accelerator: {str(error).split(' The following', 1)[0]} (this machine has no "
                         "such device); use --trainer.accelerator cpu, or auto to take a GPU only where there is one"
                         ) from error


#: Lightning's messages for an accelerator this machine does not have
NO_DEVICE_MESSAGES = ("No supported gpu backend found", "can not run on your system since the accelerator is not available")


if __name__ == "__main__":
    sys.exit(main())  # the entry point, `mmprompt.commands.main`
