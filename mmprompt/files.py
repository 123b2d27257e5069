"""Files the package writes: atomic replacement that still honours the user's umask.

``tempfile.mkstemp``/``mkdtemp`` create 0600 files and 0700 folders on purpose (they are private
temporaries); once renamed into place those modes would stick, and colleagues sharing a cluster
folder could not read results, caches, split files or generated data. Every atomic writer goes
through here, so the final files get the modes a plain ``open()``/``mkdir()`` would give them.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path


class UnreadableFile(OSError):
    """A file that exists but cannot be read as what it should be (a truncated image, a damaged
    checkpoint): the CLI shows its message without a traceback."""


class UnwritableFile(OSError):
    """A file or folder that cannot be written (a full disk, a read-only folder): the CLI shows its
    message, which names the path and what to do, without a traceback."""


#: errors of a write the user can fix by freeing space or choosing another folder
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST)


def existing_folder(path: Path) -> Path:
    """``path`` or its nearest existing parent."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def disk_of(path: Path) -> str:
    """The filesystem holding ``path``: its mount point and free space, e.g. ``"/data (12.0 MB free)"``."""
    folder = existing_folder(Path(path).absolute())
    mount = folder
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        free = f"{shutil.disk_usage(folder).free / 1e6:.1f} MB free"
    except OSError:
        free = "free space unknown"
    return f"{mount} ({free})"


def unwritable(path: str | os.PathLike, err: OSError, what: str = "") -> UnwritableFile:
    """The error for a failed write at ``path`` (of ``what``, e.g. "checkpoint"): the reason, the
    disk's free space when it is full, and what to do."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = (f"the disk is full ({err.strerror}; the filesystem mounted at {disk_of(Path(path).parent)} holds "
                  f"{Path(path).parent}); free space there or write to a folder on another disk")
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        reason = f"{err.strerror}: the folder is read-only here; choose a writable folder"
    elif err.errno == errno.ENOTDIR:
        reason = f"{err.strerror}: a part of the path is a file, not a folder"
    else:
        reason = err.strerror or str(err)
    return UnwritableFile(f"cannot write {what + ' ' if what else ''}{path}: {reason}")


def is_write_error(err: BaseException) -> bool:
    """True for an OSError that names a path and that freeing space or another folder fixes."""
    return isinstance(err, OSError) and err.errno in WRITE_ERRNOS and err.filename is not None


def current_umask() -> int:
    """The process umask (``os.umask`` can only be read by setting it, so set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file next to ``path`` and ``os.replace`` it, so concurrent
    readers (other ranks, other jobs) see the old file or the whole new one, never a partial one."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """`write_text_atomic` for bytes (safetensors files): atomic, with the modes of the umask."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise (unwritable(path, err) if err.errno in WRITE_ERRNOS else err) from err
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:  # a full disk names no file: name it
            raise unwritable(path, err) from err
        raise


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A fresh folder in ``parent`` to build a tree in before renaming it into place, with the
    mode ``mkdir`` would give it (``mkdtemp`` makes it 0700)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(folder, 0o777 & ~current_umask())
    return folder
