"""Checkpoints written atomically: a killed job never leaves a half-written ``last.ckpt``.

Lightning's own save goes through a temporary file from ``tempfile.mkstemp()`` (usually /tmp) and
``shutil.move``, which degrades to a plain, interruptible copy when /tmp is another filesystem.
Writing next to the target and ``os.replace``-ing it is atomic on every POSIX filesystem.
Loading turns a zero-byte, truncated or foreign file into one error naming it (`read_checkpoint`).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..files import UnreadableFile, unwritable


def checked_checkpoint(loaded: Any, path: str | os.PathLike) -> dict[str, Any]:
    """``loaded`` if it is a Lightning checkpoint (a dict with a ``state_dict``), else an error."""
    if not isinstance(loaded, dict) or "state_dict" not in loaded:
        raise UnreadableFile(
            f"--ckpt_path {path} is not a Lightning checkpoint: it holds a {type(loaded).__name__}"
            + (f" with keys {sorted(map(str, loaded))[:8]}" if isinstance(loaded, dict) else "")
            + "; expected a .ckpt file written by mmprompt fit (e.g. <run>/checkpoints/last.ckpt)"
        )
    return loaded


def unreadable_checkpoint(path: str | os.PathLike, err: Exception) -> UnreadableFile:
    """The error for a checkpoint file torch cannot load: empty, truncated (a copy still running,
    a full disk) or not a torch file at all."""
    size = Path(path).stat().st_size if Path(path).is_file() else None
    what = "is empty (0 bytes)" if size == 0 else "cannot be read as a checkpoint (truncated or not a torch file)"
    first_sentence = str(err).strip().split("\n")[0].split(". ")[0][:160]
    detail = f"{type(err).__name__}: {first_sentence}" if first_sentence else type(err).__name__
    return UnreadableFile(f"--ckpt_path {path} {what}: {detail}; point --ckpt_path at a complete .ckpt file "
                          "written by mmprompt fit (e.g. <run>/checkpoints/last.ckpt)")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file on the CPU (tensors and plain types only), or raise one clear error."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as err:  # torch raises EOFError, RuntimeError, UnpicklingError, KeyError, ...
        raise unreadable_checkpoint(path, err) from err
    return checked_checkpoint(loaded, path)


def errno_of_failed_write(path: Path) -> int:
    """torch's writer does not say why a write failed; a disk without free space is the usual cause."""
    try:
        return errno.ENOSPC if shutil.disk_usage(path.parent).free < 1 << 20 else errno.EIO
    except OSError:
        return errno.EIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose saves are atomic on local filesystems."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote: fsspec's transaction
        path = Path(path)
        partial = path.with_name(f".{path.name}.partial")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
        except OSError as err:
            raise unwritable(path, err, "checkpoint") from err
        except RuntimeError as err:  # torch's zip writer reports a failed write as a RuntimeError
            if "write" not in str(err):
                raise
            raise unwritable(path, OSError(errno_of_failed_write(path), "write failed"), "checkpoint") from err
        finally:
            partial.unlink(missing_ok=True)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's load (``--ckpt_path last`` and explicit paths), with one clear error for a bad file."""
        try:
            loaded = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (FileNotFoundError, IsADirectoryError):
            raise
        except Exception as err:
            raise unreadable_checkpoint(path, err) from err
        return checked_checkpoint(loaded, path)
