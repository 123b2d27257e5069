"""The configs shipped with mmprompt, reachable by name after ``pip install``.

In a source checkout they live in the top-level ``configs/``; a wheel carries the same files as
``mmprompt/configs/`` (setup.py copies them). ``--config demo`` or ``--config methods/maple`` name
them from any working directory; a path that exists always wins.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # mmprompt/


def shipped_configs_dir() -> Path:
    """``mmprompt/configs`` when installed from a wheel, else the checkout's ``configs/``."""
    installed = PACKAGE_DIR / "configs"
    return installed if installed.is_dir() else PACKAGE_DIR.parent / "configs"


def default_configs_dir() -> Path:
    """``./configs`` when the working directory has one (a checkout, or the user's copy), else the shipped."""
    local = Path("configs")
    return local if local.is_dir() else shipped_configs_dir()


def shipped_config_names() -> list[str]:
    """Every shipped config as the name ``--config`` accepts (``demo``, ``methods/maple``, ...)."""
    root = shipped_configs_dir()
    return sorted(str(path.relative_to(root).with_suffix("")) for path in root.rglob("*.yaml"))


def resolve_config(value: str) -> str:
    """``value`` itself when it is a file or an inline YAML string, else the shipped config it names."""
    if Path(value).exists() or "\n" in value or ":" in value or "{" in value:
        return value
    root = shipped_configs_dir()
    for candidate in (root / value, root / f"{value}.yaml", root / f"{value}.yml"):
        if candidate.is_file():
            return str(candidate)
    return value  # Lightning reports the missing file
