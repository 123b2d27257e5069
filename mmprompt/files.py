"""Files the package writes: atomic replacement that still honours the user's umask.

``tempfile.mkstemp``/``mkdtemp`` create 0600 files and 0700 folders on purpose (they are private
temporaries); once renamed into place those modes would stick, and colleagues sharing a cluster
folder could not read results, caches, split files or generated data. Every atomic writer goes
through here, so the final files get the modes a plain ``open()``/``mkdir()`` would give them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class UnreadableFile(OSError):
    """A file that exists but cannot be read as what it should be (a truncated image, a damaged
    checkpoint): the CLI shows its message without a traceback."""


def current_umask() -> int:
    """The process umask (``os.umask`` can only be read by setting it, so set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file next to ``path`` and ``os.replace`` it, so concurrent
    readers (other ranks, other jobs) see the old file or the whole new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A fresh folder in ``parent`` to build a tree in before renaming it into place, with the
    mode ``mkdir`` would give it (``mkdtemp`` makes it 0700)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(folder, 0o777 & ~current_umask())
    return folder
