"""Name keys of the data package; the class-set contract itself lives in `mmprompt.classes`.

``ClassSet`` and ``ProvidesClassSets`` are re-exported here so code written against
``mmprompt.data.protocol`` keeps working.
"""

from __future__ import annotations

from ..classes import ClassSet, ProvidesClassSets

__all__ = ["ClassSet", "ProvidesClassSets", "normalise_name"]


def normalise_name(name: str) -> str:
    """Dataset/method name key: case-insensitive, ignoring "-", "_" and spaces (``OxfordPets`` = ``oxford_pets``)."""
    return "".join(c for c in name.lower() if c.isalnum())
