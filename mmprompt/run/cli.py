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
from pathlib import Path
from typing import Any, Callable

import yaml
from jsonargparse import Namespace

from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from ..data.datamodule import FewShotDataModule
from ..files import UnreadableFile, is_write_error, unwritable
from ..model.backbone import BUNDLED_PRETRAINED
from ..model.checkpoint_io import AtomicCheckpointIO
from ..model.module import PromptCLIPModule
from ..results import LAST_CKPT, RESULTS_FILE
from ..tables import write_json_atomic
from .argv import (asks_for_help, ckpt_path_argument, config_paths, is_config_file, one_batch_limits, parsed_config,
                   prepared_args, with_first_config)
from .commands import ALIASES, main  # noqa: F401 (main: the one entry point, importable from here too)
from .config import PRETRAINED_WEIGHTS_FILE, absolute_path_options, check_ckpt_path, config_from_checkpoint
from .folder import SIGTERM_STATUS, RunLock, SaveOnSigterm, last_checkpoint_required, sigterm_message
from .guards import (checkpoint_model_options, error_text, init_defaults, is_global_rank_zero, outside_tiny_world,
                     plain_option, refuse_reused_run_dir)
from .inference import add_image_options, checked_image_paths, predict_images
from .launch import agree_with_rank_zero, launched_by_torchrun, slurm_version
from .logs import KeepEarlierRowsCSVLogger
from .predictions import PredictionWriter
from .shipped import resolve_config

log = logging.getLogger(__name__)
RUN_DIR_ENV = "MMPROMPT_RUN_DIR"  # rank 0 picks the run folder; DDP workers it launches inherit it
# the command line always reaches LightningCLI as ``args`` (`mmprompt.run.argv.prepared_args`): Lightning's warning is noise
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")


def image_size_of(model_name: str) -> int:
    """The input size of an open_clip architecture, so data.image_size always matches the model."""
    import open_clip

    from ..model.backbone import register_bundled_configs

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


def add_run_folder_arguments(parser: LightningArgumentParser, default_name: str,
                             out_dir_help: str = "Parent folder of all runs.") -> None:
    """--out_dir/--name/--version: where a run's folder goes (shared by every LightningCLI here)."""
    parser.add_argument("--out_dir", type=str, default="runs", help=out_dir_help)
    parser.add_argument("--name", type=str | None, default=None, help=f"Run group; default {default_name}.")
    parser.add_argument("--version", type=str | None, default=None,
                        help="Run folder inside the group; default the next free 'version_N'.")


class StageParser(LightningArgumentParser):
    """The parser of one LightningCLI subcommand, told which one (``stage``) through LightningCLI's public
    ``parser_class`` and per-subcommand ``parser_kwargs``, so `MMPromptCLI.add_arguments_to_parser` can
    give ``predict`` alone its image options."""

    def __init__(self, *args: Any, stage: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stage = stage


class MMPromptCLI(LightningCLI):
    """LightningCLI with run folders, adapter-only checkpoints, test-after-fit and results.json.

    Only public LightningCLI hooks, except `_parse_ckpt_path` (docs/protocols.md, "Private Lightning
    hooks we rely on").
    """

    run_lock: RunLock | None = None
    #: whether ``--ckpt_path``'s checkpoint supplies the model and data options (an adapter checkpoint)
    reads_checkpoint_options = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """The run folder's lock (`instantiate_trainer`) is held while the command runs, here."""
        kwargs.setdefault("parser_class", StageParser)
        kwargs.setdefault("parser_kwargs", {stage: {"stage": stage} for stage in self.subcommands()})
        # hyper-parameters as __init__ receives them (the adapter as its config: `PromptCLIPModule.on_save_checkpoint`),
        # so a checkpoint loads with `load_from_checkpoint` and holds no Lightning-internal `_instantiator` key
        kwargs.setdefault("load_from_checkpoint_support", False)
        try:
            super().__init__(*args, **kwargs)
        finally:
            if self.run_lock is not None:
                self.run_lock.release()

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Option errors raise (`mmprompt.run.commands.main` prints one line) instead of a usage dump; --help keeps it."""
        return super().init_parser(**{"exit_on_error": False, **kwargs})

    #: the help of ``--out_dir``
    out_dir_help = "Parent folder of all runs."

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_run_folder_arguments(parser, "'<Adapter>-<dataset>'", self.out_dir_help)
        parser.add_argument("--protocol", type=str, default="custom",
                            help="Label stored in results.json (base2new, fewshot, cross_dataset, ...).")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit, test the final model and write results.json.")
        parser.add_argument("--compare_zero_shot", type=bool, default=False,
                            help="After fit, also test zero-shot CLIP (same backbone and classes) and print both.")
        parser.link_arguments("model.model_name", "data.image_size", compute_fn=image_size_of)
        if getattr(parser, "stage", None) == "predict":
            add_image_options(parser)  # --images, --classes, --top_k, --overlay

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any],
                     subparser_kwargs: dict[str, Any]) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:  # validate/test print our summary, naming base/new; Lightning's table can't
            self.parser.set_defaults({f"{stage}.verbose": False for stage in ("validate", "test")
                                      if stage in self.subcommands()})  # (``--verbose true``: both)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse the command line made ready by `mmprompt.run.argv.prepared_args`, with ``--ckpt_path``'s
        checkpoint options as its first ``--config``: they are applied once, here, below everything the
        command line gives; then a backbone that contradicts the checkpoint is refused."""
        self.one_batch_limits: list[str] = []
        self.checkpoint: tuple[str, dict[str, Any]] | None = None
        if isinstance(args, (dict, Namespace)):  # already parsed (from Python)
            return super().parse_arguments(parser, args)
        args = self.run_arguments(prepared_args(sys.argv[1:] if args is None else args))
        self.one_batch_limits = one_batch_limits(args)
        args = self.with_checkpoint_options(args)
        super().parse_arguments(parser, args)
        self.check_checkpoint_options()

    def run_arguments(self, args: list[str]) -> list[str]:
        """The command line to parse (`AnalysisCLI` adds its run's checkpoint)."""
        return args

    def with_checkpoint_options(self, args: list[str]) -> list[str]:
        """``args`` with the model and data options saved in ``--ckpt_path``'s checkpoint as the first
        ``--config`` (`mmprompt.run.config.config_from_checkpoint`), so that a checkpoint alone is enough."""
        ckpt_path = ckpt_path_argument(args)
        if ckpt_path is None or not self.reads_checkpoint_options:
            return args
        check_ckpt_path(ckpt_path)  # a folder or a missing file, named (jsonargparse: "model.adapter is required")
        if not Path(ckpt_path).is_file():
            return args  # last, best, a remote path: Lightning resolves it
        config = config_from_checkpoint(ckpt_path)
        if not config:
            return args
        self.checkpoint = (ckpt_path, config["model"])
        return with_first_config(args, config)

    def check_checkpoint_options(self) -> None:
        """The parsed model options against the checkpoint's (`mmprompt.run.guards.checkpoint_model_options`):
        a backbone that contradicts it is refused, naming both; another option given after it keeps its
        value, logged; one a later config merely restates at the class default (the protocols'
        ``model_name: ViT-B-16-quickgelu``) stays the checkpoint's."""
        if self.checkpoint is None:
            return
        ckpt_path, saved = self.checkpoint
        subcommand = self.config.subcommand
        model = self.config[subcommand].model
        given = {key: plain_option(model.get(key)) for key in saved if key in model}
        kept = checkpoint_model_options(given, saved, init_defaults(self.model_class), ckpt_path)
        restated = {key: value for key, value in kept.items() if given.get(key) != value}
        if restated:
            self.config = self.parser.parse_object({subcommand: {"model": restated}}, self.config)

    def _parse_ckpt_path(self) -> None:
        """Does nothing: `parse_arguments` has applied the checkpoint's options already.

        Private LightningCLI method, overridden on purpose (docs/protocols.md, "Private Lightning hooks
        we rely on"): LightningCLI calls it from ``__init__`` right after `parse_arguments`, with no
        public switch, and there replaces every model option with the checkpoint's, the ones given
        explicitly too (``--model.speed.attention explicit``), without a word.
        """

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
        """The Trainer, in the run folder (`claim_run_folder`), with `run_trainer_options`."""
        self.run_dir = self.claim_run_folder()
        kwargs.setdefault("default_root_dir", str(self.run_dir))
        kwargs.update({name: 1 for name in self.one_batch_limits})  # one batch, not 1.0 = every batch
        kwargs.update(self.run_trainer_options(self._get(self.config_init, "trainer", default={})))
        return super().instantiate_trainer(**kwargs)

    def claim_run_folder(self) -> Path:
        """A new (or, with ``--ckpt_path last``, the resumed) run folder, locked while the command runs."""
        config = self._run_config()
        run_dir = claim_run_dir(config.out_dir, config.name or self._default_name(), config.version)
        if is_global_rank_zero():
            self.run_lock = RunLock(run_dir).acquire()
            if config.version is not None:
                refuse_reused_run_dir(run_dir, self.subcommand, config.get("ckpt_path"))
        last_checkpoint_required(run_dir, self.subcommand, config.get("ckpt_path"))
        return run_dir

    def run_trainer_options(self, trainer_config: dict[str, Any]) -> dict[str, Any]:
        """Loggers, callbacks and the checkpoint writer of a run: CSV and TensorBoard in the run folder
        (and the user's), the run's last.ckpt, SIGTERM handling, predictions, atomic checkpoints."""
        kwargs: dict[str, Any] = {}
        out_dir, name, version = str(self.run_dir.parent.parent), self.run_dir.parent.name, self.run_dir.name
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
        return kwargs

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

        from ..adapters import ZeroShot

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
        """The dataset's test split, or with ``--images`` the user's own images (`mmprompt.run.inference`)."""
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

    reads_checkpoint_options = False  # a whole CLIP's checkpoint: ``--ckpt_path`` only resumes it

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
    from ..model.pretrain import PretrainCLIP, WorldDataModule

    return PretrainCLI(PretrainCLIP, WorldDataModule, args=["fit", *argv], seed_everything_default=0,
                       save_config_kwargs={"overwrite": True})


# ---------------------------------------------------------------------- the analysis aliases


def import_object(class_path: str) -> Any:
    module_name, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def list_element(annotation: Any) -> Any:
    """``X`` for ``list[X]`` and ``list[X] | None``, else None: such an option takes several values
    (``--modes full bias_only``, jsonargparse's ``nargs="+"``)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [member for member in typing.get_args(annotation) if member is not type(None)]
        return list_element(members[0]) if len(members) == 1 else None
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is list else None


def analysis_preset(preset: str) -> tuple[type[Callback], dict[str, Any]]:
    """The callback class of a shipped analysis preset (``analysis/interventions``) and its init_args."""
    config = yaml.safe_load(Path(resolve_config(preset)).read_text(encoding="utf-8"))
    (callback,) = config["trainer"]["callbacks"]
    return import_object(callback["class_path"]), dict(callback.get("init_args") or {})


def add_callback_options(parser: LightningArgumentParser, callback: type, defaults: dict[str, Any]) -> list[str]:
    """The callback's init arguments (but ``output_dir``) as options of ``parser``, defaults ``defaults``
    (the preset's) else the callback's own; returns their names."""
    hints = typing.get_type_hints(callback.__init__)
    names = []
    for name, parameter in inspect.signature(callback).parameters.items():
        if name == "output_dir":
            continue
        default = defaults.get(name, parameter.default)
        element = list_element(hints.get(name, Any))
        kind = {"type": element, "nargs": "+"} if element is not None else {"type": hints.get(name, Any)}
        parser.add_argument(f"--{name}", **kind, default=default, help=f"{callback.__name__} option.")
        names.append(name)
    return names


def run_folder_of(config: Path | None, ckpt_path: str | None) -> Path:
    """The run folder an alias analyses: the folder of its config.yaml, else of its checkpoint."""
    if config is not None:
        return config.parent
    if ckpt_path is not None and ckpt_path not in ("last", "best"):
        folder = Path(ckpt_path).parent
        return folder.parent if folder.name == LAST_CKPT.parent.name else folder
    raise ValueError("give --config RUN/config.yaml (the run's saved config) or --ckpt_path RUN/checkpoints/last.ckpt")


class AnalysisCLI(MMPromptCLI):
    """``mmprompt interventions`` / ``prompt-analysis``: ``mmprompt test --config RUN/config.yaml --config
    analysis/<preset>`` of a finished run, in place. The preset's callback replaces the run's own; its
    init arguments are the alias's options (``--modes full bias_only``, ``--k 3``), the preset's values
    their defaults. ``--ckpt_path`` defaults to the run's ``checkpoints/last.ckpt``; the files go into
    the run's folder (or ``--out_dir``): no new run folder, loggers, config.yaml or results.json."""

    out_dir_help = "Folder for the files; default: the run's folder (of --config, else of --ckpt_path)."

    def __init__(self, alias: str, *args: Any, **kwargs: Any) -> None:
        self.preset, description = ALIASES[alias]
        self.callback_class, self.preset_options = analysis_preset(self.preset)
        self.analysed_config: Path | None = None  #: the first --config file: the analysed run's config.yaml
        self.default_checkpoint: Path | None = None  #: its run's last.ckpt, when no --ckpt_path is given
        name = self.callback_class.__name__
        kwargs.setdefault("parser_kwargs", {"test": {"stage": "test", "description": (
            f"mmprompt {alias}: {description}. The same as `mmprompt test --config RUN/config.yaml --config "
            f"{self.preset}` (--ckpt_path: RUN/checkpoints/last.ckpt), written into RUN (or --out_dir) with no "
            f"new run folder. {name}'s options are options here. {name}: {inspect.getdoc(self.callback_class)}")}})
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"test": LightningCLI.subcommands()["test"]}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)  # the options a run's saved config.yaml holds
        parser.set_defaults(out_dir=None)  # the run's folder
        parser.add_argument("--allow_no_checkpoint", type=bool, default=False, nargs="?", const=True,
                            help="Without a checkpoint, analyse the untrained adapter instead of refusing.")
        self.callback_options = add_callback_options(parser, self.callback_class, self.preset_options)

    def run_arguments(self, args: list[str]) -> list[str]:
        """``args`` with ``--ckpt_path RUN/checkpoints/last.ckpt`` when none is given and it exists."""
        self.analysed_config = next((Path(c) for c in config_paths(args) if is_config_file(c)), None)
        if ckpt_path_argument(args) is not None or asks_for_help(args):
            return args
        run_folder_of(self.analysed_config, None)  # neither --config nor --ckpt_path: say what to give
        self.default_checkpoint = self.analysed_config.parent / LAST_CKPT
        return [*args, "--ckpt_path", str(self.default_checkpoint)] if self.default_checkpoint.is_file() else args

    def before_instantiate_classes(self) -> None:
        """Without a checkpoint the numbers would be the untrained adapter's: an error unless asked."""
        super().before_instantiate_classes()
        config = self._run_config()
        if config.get("ckpt_path") is not None or self.default_checkpoint is None:
            return
        if not config.allow_no_checkpoint:
            raise FileNotFoundError(
                f"no --ckpt_path given and the run of --config {self.analysed_config} has no "
                f"{self.default_checkpoint}: the results would be the untrained adapter's; pass --ckpt_path, or "
                "--allow_no_checkpoint to evaluate it untrained")
        log.warning("no --ckpt_path and no %s: evaluating the untrained adapter (--allow_no_checkpoint)",
                    self.default_checkpoint)

    def claim_run_folder(self) -> Path:
        """The analysed run's folder, or ``--out_dir``: nothing else is written there. (The ``out_dir`` of
        the run's own config.yaml is where that run was written, not an ``--out_dir`` for the files.)"""
        config = self._run_config()
        saved = parsed_config(str(self.analysed_config)) if self.analysed_config is not None else None
        given = config.out_dir is not None and config.out_dir != (saved or {}).get("out_dir")
        folder = Path(config.out_dir) if given else run_folder_of(self.analysed_config, config.get("ckpt_path"))
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def run_trainer_options(self, trainer_config: dict[str, Any]) -> dict[str, Any]:
        """No logger; the preset's callback alone (Lightning's own checkpoint callback saves nothing in a test)."""
        config = self._run_config()
        options = {name: config[name] for name in self.callback_options}
        return {"logger": False, "callbacks": [self.callback_class(**options, output_dir=str(self.run_dir))]}

    def after_test(self) -> None:
        if self.trainer.is_global_zero:
            print(f"  written to: {self.run_dir}")


def analysis_main(alias: str, argv: list[str]) -> AnalysisCLI:
    """``mmprompt interventions|prompt-analysis ARGS``: ``mmprompt test ARGS`` with its preset (`AnalysisCLI`)."""
    return AnalysisCLI(alias, PromptCLIPModule, FewShotDataModule, args=["test", *argv], seed_everything_default=1,
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
    return MMPromptCLI(
        PromptCLIPModule,
        FewShotDataModule,
        args=args,
        seed_everything_default=1,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def run_lightning_command(argv: list[str]) -> int:
    """A Lightning stage, ``pretrain`` or an analysis alias (`mmprompt.run.commands.main` sends them here)."""

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
    Lightning's option checks as one-line errors, and SIGTERM as `SIGTERM_STATUS` (`mmprompt.run.folder`)."""
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
    sys.exit(main())  # the entry point, `mmprompt.run.commands.main`
