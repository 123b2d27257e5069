"""One live process per run folder, and a run that ends on SIGTERM leaves a checkpoint to resume.

- `RunLock`: ``fcntl.flock`` on ``<run>/.mmprompt.lock``, taken by the process that chose the folder
  (global rank 0) and held until its command ends. The kernel drops the lock when the process dies,
  so a killed run never leaves a stale lock behind; the file itself stays and means nothing.
- `SaveOnSigterm`: Lightning stops the loops on SIGTERM by raising `SIGTERMException`, a
  ``SystemExit`` with no code, so the process used to exit 0 with no checkpoint of the last steps.
  The callback saves ``checkpoints/last.ckpt`` on every rank's ``on_exception`` (the save is a
  collective), and `mmprompt.run.cli.with_user_errors` turns the exception into status `SIGTERM_STATUS`.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..files import is_write_error, unwritable
from ..results import LAST_CKPT

LOCK_FILE = ".mmprompt.lock"
#: the status of a run stopped by SIGTERM (128 + 15, what a shell reports for a process killed by it)
SIGTERM_STATUS = 143


class RunLock:
    """An exclusive, non-blocking lock on a run folder, released by `release` or by the process's death."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.handle: TextIO | None = None

    def acquire(self) -> "RunLock":
        """Take the lock, or raise naming the process that holds it."""
        try:
            handle = open(self.path, "a+", encoding="utf-8")
        except OSError as err:
            raise (unwritable(self.path, err, "lock file") if is_write_error(err) else err) from err
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ValueError(f"run folder {self.path.parent} is in use by {holder}: two processes would write one run's "
                             "checkpoints and metrics; wait for it to end, or choose another --version") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"mmprompt process {os.getpid()}\n")
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


class SaveOnSigterm(L.Callback):
    """On SIGTERM during fit, save ``last_path`` so ``fit --ckpt_path last`` resumes where it stopped."""

    def __init__(self, last_path: Path) -> None:
        self.last_path = Path(last_path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            trainer.save_checkpoint(self.last_path)


def sigterm_message(run_dir: Path | None) -> str:
    """What a user reads after SIGTERM: where the checkpoint is and how to resume."""
    if run_dir is None:
        return "stopped by SIGTERM"
    last = run_dir / LAST_CKPT
    saved = f"saved {last}" if last.is_file() else f"no checkpoint was written ({last} does not exist)"
    return (f"stopped by SIGTERM; {saved}; resume with `mmprompt fit --config {run_dir / 'config.yaml'} "
            f"--version {run_dir.name} --ckpt_path last`")


def last_checkpoint_required(run_dir: Path, subcommand: str, ckpt_path: Any) -> None:
    """``test``/``validate``/``predict --ckpt_path last`` need a last checkpoint: without one
    Lightning evaluates the untrained adapter (with a warning) and results.json reports it."""
    if subcommand == "fit" or ckpt_path != "last" or (run_dir / LAST_CKPT).is_file():
        return
    raise FileNotFoundError(
        f"{subcommand} --ckpt_path last: {run_dir / LAST_CKPT} does not exist, so the untrained "
        f"adapter would be evaluated; give the --version of a trained run (its folder holds checkpoints/last.ckpt) "
        "or --ckpt_path RUN/checkpoints/last.ckpt"
    )
