"""Name keys of the data package (the class-set contract lives in `mmprompt.classes`)."""

from __future__ import annotations


def normalise_name(name: str) -> str:
    """Dataset/method name key: case-insensitive, ignoring "-", "_" and spaces (``OxfordPets`` = ``oxford_pets``)."""
    return "".join(c for c in name.lower() if c.isalnum())
