"""The package's layering, checked on every test run (import-linter's forbidden contracts, by `ast`).

import-linter is not installed (and there is no network for it), so this file does its job: it
parses every import statement of ``mmprompt/`` (function-level imports too; ``if TYPE_CHECKING``
blocks excepted), follows imports transitively (a chain through a third module is a violation as
well, and importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__``), and fails naming the
``file:line`` of the import that starts each forbidden chain. Fix a violation by moving the shared
piece into a neutral module (``classes``, ``results``, ``tables``, ``methods``); only where that is
impossible in scope add an ``allowed`` entry with its reason, in the table below.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from textwrap import dedent

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "mmprompt"

#: the model side: the seam, the backbone, the adapters and the LightningModule
MODEL_SIDE = ("mmprompt.model.encoders", "mmprompt.model.attention", "mmprompt.model.backbone", "mmprompt.adapters", "mmprompt.model.module")
#: third-party packages that take seconds to import
HEAVY = ("torch", "torchvision", "torchmetrics", "lightning", "pytorch_lightning", "open_clip")


@dataclass(frozen=True)
class Contract:
    """Modules under ``importers`` must not import (directly or through others) modules under
    ``forbidden``; ``allowed`` maps (importer, imported) to the reason an exception stands."""

    name: str
    importers: tuple[str, ...]
    forbidden: tuple[str, ...]
    exempt: tuple[str, ...] = ()  # importers the contract does not apply to (e.g. the entry point)
    allowed: dict[tuple[str, str], str] = field(default_factory=dict)


CONTRACTS: tuple[Contract, ...] = (
    Contract("the seam knows no adapter, data, Lightning or analysis module",
             ("mmprompt.model.encoders", "mmprompt.model.attention"),
             ("mmprompt.adapters", "mmprompt.data", "mmprompt.model.module", "mmprompt.model.pretrain", "mmprompt.run.cli",
              "mmprompt.analysis", "lightning", "pytorch_lightning")),
    Contract("adapters know neither the data package nor the command line",
             ("mmprompt.adapters",), ("mmprompt.data", "mmprompt.run.cli", "mmprompt.run.commands")),
    Contract("the data package knows nothing of the model side", ("mmprompt.data",), MODEL_SIDE),
    Contract("the model side never imports the report tools", MODEL_SIDE, ("mmprompt.tools.report", "mmprompt.tools.sweep")),
    Contract("nothing imports the CLI but the entry point", ("mmprompt",), ("mmprompt.run.cli",),
             exempt=("mmprompt.run.cli", "mmprompt.run.commands", "mmprompt.__main__")),
    Contract("the neutral contracts import no layer of the package",
             ("mmprompt.classes", "mmprompt.results", "mmprompt.tables", "mmprompt.methods", "mmprompt.files"),
             ("mmprompt.model.encoders", "mmprompt.model.attention", "mmprompt.model.backbone", "mmprompt.adapters", "mmprompt.model.module",
              "mmprompt.data", "mmprompt.analysis", "mmprompt.run.cli", "mmprompt.tools.report", "mmprompt.tools.sweep")),
)

#: modules that must import no HEAVY package at import time: the instant tools and what they read
TORCH_FREE: tuple[str, ...] = (
    "mmprompt.run.commands", "mmprompt.tools.report", "mmprompt.tools.sweep", "mmprompt.methods", "mmprompt.tools.methods_table",
    "mmprompt.tools.report_stats", "mmprompt.tools.report_claims", "mmprompt.tools.report_figures", "mmprompt.tools.sweep_preset",
    "mmprompt.tables",
    "mmprompt.results", "mmprompt.classes", "mmprompt.data.registry", "mmprompt.data.protocol",
)


# ---------------------------------------------------------------------- the import graph

@dataclass(frozen=True)
class Edge:
    target: str  # a module of the package, or a top-level third-party name
    path: Path
    line: int
    eager: bool  # executed at import time (module level), not inside a function


def module_names(root: Path, package: str) -> dict[str, Path]:
    """``mmprompt.data.registry`` -> its file, for every module of the package under ``root``."""
    names = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def import_nodes(tree: ast.AST) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement with whether it runs at import time; ``if TYPE_CHECKING`` is skipped."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, eager: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if is_type_checking(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, eager))
            lazy = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, eager and not lazy)

    visit(tree, True)
    return found


def with_parents(module: str, importer: str, modules: dict[str, Path]) -> list[str]:
    """``a.b.c`` and the packages whose ``__init__`` importing it runs (``a``, ``a.b``), except the
    importer's own packages (their ``__init__`` is already running)."""
    parts = module.split(".")
    names = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return [name for name in names if name in modules and (name == module or not under(importer, (name,)))]


def targets_of(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    """The modules an import statement loads: package modules (with their parents) or third-party top names."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = importer.split(".")[: len(importer.split(".")) - node.level + (1 if is_package else 0)]
            stem = ".".join(base + ([node.module] if node.module else []))
        else:
            stem = node.module or ""
        names = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules else stem for alias in node.names]
    targets: list[str] = []
    for name in names:
        if name.split(".")[0] == PACKAGE:
            targets += with_parents(name, importer, modules) or [name]
        else:
            targets.append(name.split(".")[0])
    return list(dict.fromkeys(targets))


def import_graph(root: Path, package: str = PACKAGE) -> dict[str, list[Edge]]:
    """module -> its import edges, for every module of ``package`` under ``root``."""
    modules = module_names(root, package)
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges = []
        for node, eager in import_nodes(tree):
            for target in targets_of(node, name, path.name == "__init__.py", modules):
                if target != name:
                    edges.append(Edge(target, path, node.lineno, eager))
        graph[name] = edges
    return graph


def under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def first_chain(graph: dict[str, list[Edge]], start: Edge, forbidden: tuple[str, ...], checked: tuple[str, ...],
                eager_only: bool = False) -> list[str] | None:
    """The shortest chain of modules from ``start`` to a forbidden one that passes through no
    ``checked`` module (those are reported at their own imports, so each problem is named once)."""
    queue, seen = deque([[start.target]]), {start.target}
    while queue:
        chain = queue.popleft()
        if under(chain[-1], forbidden):
            return chain
        if under(chain[-1], checked):
            continue
        for edge in graph.get(chain[-1], []):
            if edge.target not in seen and (edge.eager or not eager_only):
                seen.add(edge.target)
                queue.append(chain + [edge.target])
    return None


def describe(edge: Edge, importer: str, chain: list[str], root: Path, rule: str) -> str:
    via = f" (via {' -> '.join(chain)})" if len(chain) > 1 else ""
    return f"{edge.path.relative_to(root)}:{edge.line}: {importer} imports {chain[-1]}{via}: {rule}"


def contract_violations(graph: dict[str, list[Edge]], contract: Contract, root: Path) -> list[str]:
    """One message per import statement that starts a forbidden chain."""
    problems: dict[tuple[Path, int], str] = {}
    for importer, edges in graph.items():
        if not under(importer, contract.importers) or under(importer, contract.exempt):
            continue
        checked = tuple(m for m in graph if under(m, contract.importers) and not under(m, contract.exempt))
        for edge in edges:
            chain = first_chain(graph, edge, contract.forbidden, checked)
            if chain and (importer, chain[-1]) not in contract.allowed:
                problems.setdefault((edge.path, edge.line), describe(edge, importer, chain, root, contract.name))
    return list(problems.values())


def heavy_imports(graph: dict[str, list[Edge]], module: str, root: Path) -> list[str]:
    """The import-time chains from ``module`` to a HEAVY package (function-level imports are fine)."""
    problems: dict[tuple[Path, int], str] = {}
    for edge in graph.get(module, []):
        chain = first_chain(graph, edge, HEAVY, TORCH_FREE, eager_only=True) if edge.eager else None
        if chain:
            rule = f"{module} must import without {chain[-1]}"
            problems.setdefault((edge.path, edge.line), describe(edge, module, chain, root, rule))
    return list(problems.values())


def violations(root: Path = REPO) -> list[str]:
    graph = import_graph(root)
    problems = [p for contract in CONTRACTS for p in contract_violations(graph, contract, root)]
    return problems + [p for module in TORCH_FREE for p in heavy_imports(graph, module, root)]


# ---------------------------------------------------------------------- the tests

def test_the_package_keeps_its_layering():
    problems = violations()
    assert not problems, "layering violations (see tests/test_layering.py for the contracts):\n  " + "\n  ".join(problems)


def test_every_contract_names_modules_that_exist():
    """A renamed module must not make a contract pass vacuously."""
    modules = module_names(REPO, PACKAGE)
    for contract in CONTRACTS:
        for prefix in contract.importers + contract.exempt:
            assert any(under(name, (prefix,)) for name in modules), (contract.name, prefix)
        for prefix in contract.forbidden:
            assert prefix in HEAVY or any(under(name, (prefix,)) for name in modules), (contract.name, prefix)
    assert all(name in modules for name in TORCH_FREE)


def write_package(root: Path, files: dict[str, str]) -> Path:
    for relative, text in {"mmprompt/__init__.py": "", **files}.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dedent(text))
    return root


@pytest.fixture
def bad_package(tmp_path) -> Path:
    """A small package shaped like mmprompt with one violation of each kind."""
    return write_package(tmp_path, {
        "mmprompt/adapters/__init__.py": "",
        "mmprompt/adapters/good.py": "from ..classes import ClassSet\n",
        "mmprompt/adapters/bad.py": '"""A new method."""\n\nfrom ..data.datamodule import FewShotDataModule\n',
        "mmprompt/adapters/sneaky.py": "def build():\n    from ..helpers import thing\n",
        "mmprompt/adapters/uses_bad.py": "from .bad import FewShotDataModule\n",
        "mmprompt/helpers.py": "from .data import datamodule\n",
        "mmprompt/classes.py": "",
        "mmprompt/data/__init__.py": "",
        "mmprompt/data/datamodule.py": "import lightning\n",
        "mmprompt/data/registry.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..model.module import M\n",
        "mmprompt/model/__init__.py": "",
        "mmprompt/model/module.py": "from ..tools.report import harmonic_mean\n",
        "mmprompt/tools/__init__.py": "",
        "mmprompt/tools/report.py": "from ..tables import write_csv\n",
        "mmprompt/tables.py": "import csv\n\ndef plot():\n    import torch\n",
        "mmprompt/tools/sweep.py": "from . import report\nfrom ..data import datamodule\n",
        "mmprompt/run/__init__.py": "",
        "mmprompt/run/cli.py": "",
        "mmprompt/run/commands.py": "def main():\n    from .cli import main\n",
        "mmprompt/tools/export.py": "from ..run.cli import main\n",
    })


def test_a_deliberately_bad_package_is_caught_with_file_and_line(bad_package):
    graph = import_graph(bad_package)
    by_contract = {c.name: contract_violations(graph, c, bad_package) for c in CONTRACTS}
    adapters = by_contract["adapters know neither the data package nor the command line"]
    assert "mmprompt/adapters/bad.py:3: mmprompt.adapters.bad imports mmprompt.data" in adapters[0]
    assert any(p.startswith("mmprompt/adapters/sneaky.py:2:") and "via mmprompt.helpers -> mmprompt.data" in p
               for p in adapters), adapters  # indirect, through a function-level import
    assert len(adapters) == 2  # good.py is fine; uses_bad.py's chain is bad.py's problem, named once
    assert by_contract["the model side never imports the report tools"] == [
        "mmprompt/model/module.py:1: mmprompt.model.module imports mmprompt.tools.report: the model side never imports the report tools"]
    assert by_contract["nothing imports the CLI but the entry point"] == [
        "mmprompt/tools/export.py:1: mmprompt.tools.export imports mmprompt.run.cli: nothing imports the CLI but the entry point"]
    assert by_contract["the data package knows nothing of the model side"] == []  # TYPE_CHECKING only
    # an import-time chain to a heavy package is caught, a function-level one is not
    assert heavy_imports(graph, "mmprompt.tools.report", bad_package) == []
    sweep = heavy_imports(graph, "mmprompt.tools.sweep", bad_package)
    assert sweep == ["mmprompt/tools/sweep.py:2: mmprompt.tools.sweep imports lightning (via mmprompt.data.datamodule -> "
                     "lightning): mmprompt.tools.sweep must import without lightning"]


def test_an_allowed_exception_needs_its_reason_in_the_table(bad_package):
    graph = import_graph(bad_package)
    contract = Contract("the model side never imports the report tools", MODEL_SIDE, ("mmprompt.tools.report",),
                        allowed={("mmprompt.model.module", "mmprompt.tools.report"): "shown here only as an example"})
    assert contract_violations(graph, contract, bad_package) == []
