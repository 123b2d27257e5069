"""Folder listings of class-per-folder trees, cached beside the few-shot cache.

A full ImageNet tree is 2000 folders and 1.33M files; listing it is most of the time a run spends
before its first step (docs/datasets.md has the numbers). ``<dataset>/split_fewshot/listing.json``
keeps each folder's file names with the folder's modification time (nanoseconds): adding, removing
or renaming a file changes its folder's mtime, so that one folder is listed again and the others are
read from the cache. Under DDP, Lightning runs ``prepare_data`` on local rank 0 (which lists and
writes the cache) and holds every rank at a barrier until it is done; the other ranks then only stat
the folders and read the JSON.
"""

from __future__ import annotations

import gc
import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .catalog import list_files, write_json_atomic

LISTING_FILE = "listing.json"
LISTING_VERSION = 1
#: folder (relative to the cache's dataset folder) -> [mtime_ns, sorted file names]
Entries = dict[str, list]


def read_entries(cache: Path | None, suffixes: tuple[str, ...]) -> Entries:
    """The cached listings, or none when the file is absent, corrupt, of another version or kept other
    suffixes (then every folder is listed again)."""
    if cache is None or not cache.is_file():
        return {}
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
        current = data.get("version") == LISTING_VERSION and data.get("suffixes") == list(suffixes)
        return data["folders"] if current else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: building ImageNet's 1.33M items (tuples, no cycles) under it
    spends half its time in collections that free nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class FolderListing:
    """File names per folder of one tree (those ending in ``suffixes``, any case), reused from
    ``cache`` while the folder's mtime is unchanged.

    Args:
        base: the folder the listed folders are named relative to (the dataset folder).
        cache: the JSON file; ``None`` lists every time.
        suffixes: the file name endings kept (lower case), e.g. the image extensions.
    """

    def __init__(self, base: Path, cache: Path | None, suffixes: tuple[str, ...]) -> None:
        self.base, self.cache, self.suffixes = Path(base), cache, tuple(suffixes)
        self.entries = read_entries(cache, self.suffixes)
        self.visited: set[str] = set()
        self.changed = False

    def files(self, relative: str) -> list[str]:
        """The sorted kept file names of ``base/relative`` (listed only when its mtime changed)."""
        self.visited.add(relative)
        mtime = (self.base / relative).stat().st_mtime_ns
        entry = self.entries.get(relative)
        if entry is not None and entry[0] == mtime:
            return entry[1]
        names = [name for name in list_files(self.base / relative) if name.lower().endswith(self.suffixes)]
        self.entries[relative], self.changed = [mtime, names], True
        return names

    def save(self) -> None:
        """Write the cache (the folders of this listing only) if one was listed again or is gone; an
        unwritable folder only warns (the cache is a convenience)."""
        if self.cache is None or not (self.changed or set(self.entries) - self.visited):
            return
        folders = {relative: self.entries[relative] for relative in sorted(self.visited)}
        try:
            write_json_atomic(self.cache, {"version": LISTING_VERSION, "suffixes": list(self.suffixes),
                                           "folders": folders})
            self.changed = False
        except OSError as err:
            warnings.warn(f"cannot write the folder listing cache {self.cache} ({err}); the tree is listed each run")
