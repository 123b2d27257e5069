"""The method registry: each adapter registers its method once, on its class (timm's
``@register_model``, PEFT's method registry)::

    @register_method("maple", order=60)
    class MaPLe(TextPromptAdapter): ...

A registration gives the method's **name** (``maple``: the ``mmprompt sweep --methods`` value), its
**label** (the adapter class name ``MaPLe``: results.json's ``method``, run folders
``<label>-<dataset>``, report rows), its **default config** (``configs/methods/<name>.yaml`` unless
given) and its **order** in report and docs tables (lower first, ties by name). Report labels, sweep
names, the docs tables and the tests that loop over methods all read it, so a new method is one
file in ``mmprompt/adapters/`` plus its config, and nothing else.

Reading the registry must not import torch (``mmprompt report`` and ``mmprompt sweep`` start
instantly), so `methods` reads the decorator lines of ``mmprompt/adapters/*.py`` with `ast`;
importing the adapters fills the same table through the decorator (`registered`), and the tests
check the two agree. Decorator arguments are therefore literals.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, TypeVar

ADAPTERS_PACKAGE = "mmprompt.adapters"
ADAPTERS_DIR = Path(__file__).resolve().parent / "adapters"
DEFAULT_ORDER = 100  # after the shipped methods

T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class MethodInfo:
    """One registered method (see the module docstring for what each field is used for)."""

    name: str
    label: str
    class_path: str  # module path of the class: ``mmprompt.adapters.maple.MaPLe``
    config: str  # relative to the configs folder: ``methods/maple.yaml``
    order: int = DEFAULT_ORDER

    @property
    def sort_key(self) -> tuple[int, str]:
        return self.order, self.name


class RegistryError(ValueError):
    """A registration that can't stand: a bad or duplicate name, or arguments that aren't literals."""


_REGISTERED: dict[str, MethodInfo] = {}


def method_info(name: str, label: str, module: str, config: str | None, order: int) -> MethodInfo:
    """The entry both readers build, so the decorator and the `ast` reader can't drift apart."""
    if not name.isidentifier() or name != name.lower():
        raise RegistryError(f"method name {name!r} should be a lower-case identifier such as 'maple'")
    if not isinstance(order, int):
        raise RegistryError(f"method {name!r}: order={order!r} should be an int")
    return MethodInfo(name, label, f"{module}.{label}", config or f"methods/{name}.yaml", order)


def register_method(name: str, *, config: str | None = None, order: int = DEFAULT_ORDER) -> Callable[[T], T]:
    """Class decorator: register an `Adapter` subclass as the method ``name`` (see the module docstring)."""

    def register(cls: T) -> T:
        info = method_info(name, cls.__name__, cls.__module__, config, order)
        known = _REGISTERED.get(name)
        if known is not None and known.class_path != info.class_path:
            raise RegistryError(f"method {name!r} is registered twice: {known.class_path} and {info.class_path}")
        _REGISTERED[name] = info
        return cls

    return register


def registered() -> tuple[MethodInfo, ...]:
    """The methods registered by the decorator so far (import `mmprompt.adapters` first), in table order."""
    return tuple(sorted(_REGISTERED.values(), key=lambda info: info.sort_key))


def _decorator_call(node: ast.expr) -> ast.Call | None:
    """``@register_method(...)`` or ``@methods.register_method(...)``, else None."""
    if isinstance(node, ast.Call):
        func = node.func
        if (isinstance(func, ast.Name) and func.id == "register_method") or (
                isinstance(func, ast.Attribute) and func.attr == "register_method"):
            return node
    return None


def _literal(node: ast.expr, where: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError as err:
        raise RegistryError(f"{where}: register_method takes literal arguments (they are read without "
                            f"importing the adapter), got {ast.unparse(node)!r}") from err


def scan_file(path: Path, package: str = ADAPTERS_PACKAGE) -> list[MethodInfo]:
    """The registrations in one adapter file, read with `ast` (no import)."""
    found = []
    for node in ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for decorator in node.decorator_list:
            call = _decorator_call(decorator)
            if call is None:
                continue
            where = f"{path}:{call.lineno}"
            args = [_literal(arg, where) for arg in call.args]
            kwargs = {kw.arg: _literal(kw.value, where) for kw in call.keywords}
            if len(args) != 1 or not isinstance(args[0], str) or set(kwargs) - {"config", "order"}:
                raise RegistryError(f"{where}: expected register_method('<name>', config=..., order=...)")
            found.append(method_info(args[0], node.name, f"{package}.{path.stem}", kwargs.get("config"),
                                     kwargs.get("order", DEFAULT_ORDER)))
    return found


def scan_methods(folder: Path = ADAPTERS_DIR, package: str = ADAPTERS_PACKAGE) -> tuple[MethodInfo, ...]:
    """Every registration under ``folder``, in table order; a name registered twice is an error."""
    infos: dict[str, MethodInfo] = {}
    for path in sorted(folder.glob("*.py")):
        for info in scan_file(path, package):
            if info.name in infos:
                raise RegistryError(f"method {info.name!r} is registered twice: "
                                    f"{infos[info.name].class_path} and {info.class_path}")
            infos[info.name] = info
    return tuple(sorted(infos.values(), key=lambda info: info.sort_key))


@lru_cache(maxsize=1)
def methods() -> tuple[MethodInfo, ...]:
    """Every method shipped in ``mmprompt/adapters/``, in table order, read without importing torch."""
    return scan_methods()


def method_names() -> list[str]:
    """The registered names in table order (the ``--methods`` values of the shipped configs)."""
    return [info.name for info in methods()]


def label_of(name: str) -> str:
    """The label (adapter class name) of a registered method, ``name`` itself for any other config."""
    return next((info.label for info in methods() if info.name == name), name)
