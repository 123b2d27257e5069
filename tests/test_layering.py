"""The package's layering, checked on every test run (import-linter's forbidden contracts, by `ast`).

import-linter is not installed (and there is no network for it), so this file does its job: it
parses every import statement of ``mmprompt/`` (function-level imports too; ``if TYPE_CHECKING``
blocks excepted), follows imports transitively (a chain through a third module is a violation as
well, and importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__``), and fails naming the
``file:line`` of the import that starts each forbidden chain. Fix a violation by moving the shared
piece into a neutral module (``classes``, ``results``, ``tables``, ``methods``, ``files``); only where
that is impossible in scope add an ``allowed`` entry with its reason, in the table below.

The folders are the layers, bottom up: ``data``; ``model`` with ``adapters``; ``analysis``; ``run``
and ``tools`` on top. Every module lives in one of them except TOP_LEVEL, each folder has one
contract, and each folder's ``__init__`` docstring says the same: "May import: ..." names every
package it imports, "Never imports: ..." is its contract's forbidden list.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from textwrap import dedent

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "mmprompt"

#: third-party packages that take seconds to import
HEAVY = ("torch", "torchvision", "torchmetrics", "lightning", "pytorch_lightning", "open_clip")


@dataclass(frozen=True)
class Contract:
    """Modules under ``importers`` must not import (directly or through others) modules under
    ``forbidden``; ``allowed`` maps (importer, imported) to the reason an exception stands (importing
    ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``: the exception covers those too)."""

    name: str
    importers: tuple[str, ...]
    forbidden: tuple[str, ...]
    exempt: tuple[str, ...] = ()  # importers the contract does not apply to (e.g. the entry point)
    allowed: dict[tuple[str, str], str] = field(default_factory=dict)


#: the modules that stay directly in ``mmprompt/``: the package, its ``python -m`` entry and the neutral,
#: torch-free contracts every layer may share; every other module lives in one of FOLDERS
TOP_LEVEL = ("mmprompt", "mmprompt.__main__", "mmprompt.classes", "mmprompt.results", "mmprompt.tables",
             "mmprompt.methods", "mmprompt.files")
#: the sub-packages; each has the one contract below whose importers are the folder itself, and its
#: ``__init__`` docstring says the same in two sentences, "May import: ..." and "Never imports: ..."
FOLDERS = ("mmprompt.model", "mmprompt.adapters", "mmprompt.data", "mmprompt.analysis", "mmprompt.tools",
           "mmprompt.run")
NEUTRAL = ("mmprompt.classes", "mmprompt.results", "mmprompt.tables", "mmprompt.methods", "mmprompt.files")

CONTRACTS: tuple[Contract, ...] = (
    # -- one per folder, from the bottom up
    Contract("the data package knows nothing of the model side, the analyses, the runs or the tools",
             ("mmprompt.data",),
             ("mmprompt.model", "mmprompt.adapters", "mmprompt.analysis", "mmprompt.run", "mmprompt.tools")),
    Contract("adapters know the seam only: no data, analysis, run, tool or LightningModule",
             ("mmprompt.adapters",),
             ("mmprompt.data", "mmprompt.analysis", "mmprompt.run", "mmprompt.tools", "mmprompt.model.module",
              "mmprompt.model.pretrain")),
    Contract("the model side never imports data, analyses, runs or tools", ("mmprompt.model",),
             ("mmprompt.data", "mmprompt.analysis", "mmprompt.run", "mmprompt.tools"),
             allowed={
                 ("mmprompt.model.pretrain", "mmprompt.data.world"):
                     "pretrain.py holds the pretraining LightningModule with its WorldDataModule, which draws "
                     "the captioned scenes from data/world.py; a pure move kept the two together",
             }),
    Contract("the analyses never import the runs or the tools", ("mmprompt.analysis",),
             ("mmprompt.run", "mmprompt.tools")),
    Contract("the tools never import the command line (the entry point runs them by module name)",
             ("mmprompt.tools",), ("mmprompt.run.cli", "mmprompt.run.commands")),
    Contract("the run side never imports the tools (commands.TOOLS names them, importlib loads them)",
             ("mmprompt.run",), ("mmprompt.tools",)),
    # -- finer rules inside and across the folders
    Contract("the seam and the backbone know no adapter, data, Lightning or analysis module",
             ("mmprompt.model.encoders", "mmprompt.model.attention", "mmprompt.model.backbone"),
             ("mmprompt.adapters", "mmprompt.data", "mmprompt.model.module", "mmprompt.model.pretrain",
              "mmprompt.analysis", "mmprompt.run", "mmprompt.tools", "lightning", "pytorch_lightning")),
    Contract("nothing imports the CLI but the entry point", ("mmprompt",), ("mmprompt.run.cli",),
             exempt=("mmprompt.run.cli", "mmprompt.run.commands", "mmprompt.__main__")),
    Contract("the neutral contracts import no layer of the package", NEUTRAL, FOLDERS),
)

#: modules that must import no HEAVY package at import time: the instant tools and what they read
TORCH_FREE: tuple[str, ...] = (
    "mmprompt", "mmprompt.run", "mmprompt.run.commands", "mmprompt.tools", "mmprompt.tools.report",
    "mmprompt.tools.sweep", "mmprompt.tools.methods_table", "mmprompt.tools.report_stats",
    "mmprompt.tools.report_claims", "mmprompt.tools.report_figures", "mmprompt.tools.sweep_preset",
    "mmprompt.methods", "mmprompt.tables", "mmprompt.results", "mmprompt.classes", "mmprompt.files",
    "mmprompt.data.registry", "mmprompt.data.protocol",
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
                eager_only: bool = False, exact: bool = False) -> list[str] | None:
    """The shortest chain of modules from ``start`` to a forbidden one that passes through no
    ``checked`` module (those are reported at their own imports, so each problem is named once; with
    ``exact``, a checked package does not stand for its modules).

    The package's own function-level imports are not followed through it: ``from mmprompt import
    __version__`` does not run ``mmprompt.load``, whose import of the run side happens when a user calls it.
    """
    queue, seen = deque([[start.target]]), {start.target}
    while queue:
        chain = queue.popleft()
        if under(chain[-1], forbidden):
            return chain
        if chain[-1] in checked if exact else under(chain[-1], checked):
            continue
        for edge in graph.get(chain[-1], []):
            if chain[-1] == PACKAGE and not edge.eager:
                continue
            if edge.target not in seen and (edge.eager or not eager_only):
                seen.add(edge.target)
                queue.append(chain + [edge.target])
    return None


def describe(edge: Edge, importer: str, chain: list[str], root: Path, rule: str) -> str:
    via = f" (via {' -> '.join(chain)})" if len(chain) > 1 else ""
    return f"{edge.path.relative_to(root)}:{edge.line}: {importer} imports {chain[-1]}{via}: {rule}"


def is_allowed(contract: Contract, importer: str, imported: str) -> bool:
    """Whether ``contract.allowed`` excepts ``importer`` importing ``imported``, or a package whose
    ``__init__`` an excepted import runs (``mmprompt.run`` for ``mmprompt.run.config``)."""
    return any(importer == allowed_importer and (imported == target or target.startswith(imported + "."))
               for allowed_importer, target in contract.allowed)


def contract_violations(graph: dict[str, list[Edge]], contract: Contract, root: Path) -> list[str]:
    """One message per import statement that starts a forbidden chain (naming the module it imports
    rather than the package whose ``__init__`` that runs: ``mmprompt.tools.report``, not ``mmprompt.tools``)."""
    problems: dict[tuple[Path, int], tuple[str, str]] = {}
    for importer, edges in graph.items():
        if not under(importer, contract.importers) or under(importer, contract.exempt):
            continue
        checked = tuple(m for m in graph if under(m, contract.importers) and not under(m, contract.exempt))
        for edge in edges:
            chain = first_chain(graph, edge, contract.forbidden, checked)
            if chain and not is_allowed(contract, importer, chain[-1]):
                known = problems.get((edge.path, edge.line))
                if known is None or chain[-1].startswith(known[0] + "."):
                    problems[edge.path, edge.line] = chain[-1], describe(edge, importer, chain, root, contract.name)
    return [message for _, message in problems.values()]


def heavy_imports(graph: dict[str, list[Edge]], module: str, root: Path) -> list[str]:
    """The import-time chains from ``module`` to a HEAVY package (function-level imports are fine)."""
    problems: dict[tuple[Path, int], str] = {}
    for edge in graph.get(module, []):
        chain = first_chain(graph, edge, HEAVY, TORCH_FREE, eager_only=True, exact=True) if edge.eager else None
        if chain:
            rule = f"{module} must import without {chain[-1]}"
            problems.setdefault((edge.path, edge.line), describe(edge, module, chain, root, rule))
    return list(problems.values())


def violations(root: Path = REPO) -> list[str]:
    graph = import_graph(root)
    problems = [p for contract in CONTRACTS for p in contract_violations(graph, contract, root)]
    return problems + [p for module in TORCH_FREE for p in heavy_imports(graph, module, root)]


# ---------------------------------------------------------------------- the folders

def folder_contract(folder: str) -> Contract | None:
    return next((contract for contract in CONTRACTS if contract.importers == (folder,)), None)


def stray_modules(root: Path = REPO) -> list[str]:
    """Modules directly in ``mmprompt/`` that are not TOP_LEVEL, and sub-packages not in FOLDERS."""
    problems = []
    for name, path in module_names(root, PACKAGE).items():
        parts = name.split(".")
        relative = path.relative_to(root)
        if len(parts) == 2 and path.name != "__init__.py" and name not in TOP_LEVEL:
            problems.append(f"{relative}: a module outside the folders; move it into one of "
                            f"{', '.join(f.split('.')[-1] for f in FOLDERS)} (or, if it is a neutral contract, "
                            "add it to TOP_LEVEL)")
        if len(parts) == 2 and path.name == "__init__.py" and name not in FOLDERS:
            problems.append(f"{relative}: a folder tests/test_layering.py does not know; add it to FOLDERS "
                            "with its contract")
    return problems


def sentence(doc: str, lead: str) -> str | None:
    """The sentence of ``doc`` that starts with ``lead``, without it (up to a full stop before white space)."""
    match = re.search(re.escape(lead) + r"(.*?)\.(?:\s|$)", doc, re.S)
    return match.group(1) if match else None


def named(text: str) -> list[str]:
    """The modules a docstring sentence names in single backticks (`data`, `run.config`), as dotted names."""
    return [name if name in HEAVY else f"{PACKAGE}.{name}" for name in re.findall(r"(?<!`)`([\w.]+)`(?!`)", text)]


def folder_problems(root: Path = REPO) -> list[str]:
    """Each folder's ``__init__`` docstring says what the folder may import ("May import: ...") and what
    it never imports ("Never imports: ..."): the second must be its contract's ``forbidden``, and every
    import of the folder's modules must be named by the first (or be an exception of the contract)."""
    modules, graph = module_names(root, PACKAGE), import_graph(root)
    problems = []
    for folder in FOLDERS:
        if folder not in modules:
            continue  # test_every_contract_names_modules_that_exist names a missing folder
        init = modules[folder].relative_to(root)
        contract = folder_contract(folder)
        doc = ast.get_docstring(ast.parse(modules[folder].read_text(encoding="utf-8")))
        may, never = (sentence(doc or "", lead) for lead in ("May import:", "Never imports:"))
        if contract is None:
            problems.append(f"{init}: {folder} has no contract whose importers are the folder itself")
            continue
        if may is None or never is None:
            problems.append(f"{init}: the docstring must say what {folder} may import (\"May import: `a`, `b`.\") "
                            "and what it never imports (\"Never imports: `c`.\")")
            continue
        if sorted(named(never)) != sorted(contract.forbidden):
            problems.append(f"{init}: the docstring says it never imports {', '.join(named(never))}; its contract "
                            f"({contract.name!r}) forbids {', '.join(contract.forbidden)}")
        for name in named(may):
            if name not in modules:
                problems.append(f"{init}: the docstring says it may import {name}, which does not exist")
            elif under(name, contract.forbidden):
                problems.append(f"{init}: the docstring says it may import {name}, which its contract forbids")
        permitted = tuple(named(may)) + (folder,)
        for importer, edges in graph.items():
            if not under(importer, (folder,)):
                continue
            for edge in edges:
                inside = edge.target == PACKAGE or under(edge.target, permitted) or any(
                    name.startswith(edge.target + ".") for name in permitted)  # a parent package's __init__
                if edge.target.split(".")[0] == PACKAGE and not inside and \
                        not is_allowed(contract, importer, edge.target):
                    problems.append(f"{edge.path.relative_to(root)}:{edge.line}: {importer} imports "
                                    f"{edge.target}, which {init}'s \"May import\" does not name")
    return list(dict.fromkeys(problems))


# ---------------------------------------------------------------------- the tests

def test_the_package_keeps_its_layering():
    problems = violations()
    assert not problems, "layering violations (see tests/test_layering.py for the contracts):\n  " + "\n  ".join(problems)


def test_every_module_lives_in_a_folder_but_the_neutral_contracts():
    problems = stray_modules()
    assert not problems, "\n  ".join(["modules outside the folders:", *problems])


def test_every_folder_says_what_it_may_import():
    problems = folder_problems()
    assert not problems, "\n  ".join(["folder docstrings that disagree with the contracts:", *problems])


def test_every_contract_names_modules_that_exist():
    """A renamed module must not make a contract pass vacuously."""
    modules = module_names(REPO, PACKAGE)
    for contract in CONTRACTS:
        for prefix in contract.importers + contract.exempt:
            assert any(under(name, (prefix,)) for name in modules), (contract.name, prefix)
        for prefix in contract.forbidden:
            assert prefix in HEAVY or any(under(name, (prefix,)) for name in modules), (contract.name, prefix)
        for importer, imported in contract.allowed:
            assert importer in modules and imported in modules, (contract.name, importer, imported)
    assert all(name in modules for name in TORCH_FREE + TOP_LEVEL + FOLDERS)
    assert all(folder_contract(folder) is not None for folder in FOLDERS)


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
        "mmprompt/adapters/__init__.py": '"""May import: `classes`, `data`.\n\nNever imports: `data`, `analysis`, '
                                         '`run`, `tools`, `model.module`, `model.pretrain`.\n"""\n',
        "mmprompt/adapters/good.py": "from ..classes import ClassSet\n",
        "mmprompt/adapters/bad.py": '"""A new method."""\n\nfrom ..data.datamodule import FewShotDataModule\n',
        "mmprompt/adapters/sneaky.py": "def build():\n    from ..helpers import thing\n",
        "mmprompt/adapters/uses_bad.py": "from .bad import FewShotDataModule\n",
        "mmprompt/helpers.py": "from .data import datamodule\n",
        "mmprompt/classes.py": "",
        "mmprompt/data/__init__.py": "",
        "mmprompt/data/datamodule.py": "import lightning\n",
        "mmprompt/data/registry.py":
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..model.module import M\n",
        "mmprompt/model/__init__.py": '"""May import: `adapters`, `classes`. Never imports: `data`, `run`."""\n',
        "mmprompt/model/module.py": "from ..tools.report import harmonic_mean\n",
        "mmprompt/tools/__init__.py": '"""May import: `data`, `tables`. Never imports: `run.cli`, `run.commands`."""\n',
        "mmprompt/tools/report.py": "from ..tables import write_csv\n",
        "mmprompt/tables.py": "import csv\n\ndef plot():\n    import torch\n",
        "mmprompt/tools/sweep.py": "from . import report\nfrom ..data import datamodule\n",
        "mmprompt/run/__init__.py": '"""May import: `nowhere`. Never imports: `tools`."""\n',
        "mmprompt/run/cli.py": "",
        "mmprompt/run/commands.py": "def main():\n    from .cli import main\n",
        "mmprompt/tools/export.py": "from ..run.cli import main\n",
        "mmprompt/extras/__init__.py": '"""A folder nobody told the layering about."""\n',
    })


def test_a_deliberately_bad_package_is_caught_with_file_and_line(bad_package):
    graph = import_graph(bad_package)
    by_folder = {folder: contract_violations(graph, folder_contract(folder), bad_package) for folder in FOLDERS}
    adapters = by_folder["mmprompt.adapters"]
    assert "mmprompt/adapters/bad.py:3: mmprompt.adapters.bad imports mmprompt.data" in adapters[0]
    assert any(p.startswith("mmprompt/adapters/sneaky.py:2:") and "via mmprompt.helpers -> mmprompt.data" in p
               for p in adapters), adapters  # indirect, through a function-level import
    assert len(adapters) == 2  # good.py is fine; uses_bad.py's chain is bad.py's problem, named once
    model = folder_contract("mmprompt.model")
    assert by_folder["mmprompt.model"] == [
        f"mmprompt/model/module.py:1: mmprompt.model.module imports mmprompt.tools.report: {model.name}"]
    tools = folder_contract("mmprompt.tools")
    assert by_folder["mmprompt.tools"] == [
        f"mmprompt/tools/export.py:1: mmprompt.tools.export imports mmprompt.run.cli: {tools.name}"]
    entry_point = next(c for c in CONTRACTS if c.name == "nothing imports the CLI but the entry point")
    assert contract_violations(graph, entry_point, bad_package) == [
        "mmprompt/tools/export.py:1: mmprompt.tools.export imports mmprompt.run.cli: nothing imports the CLI but the "
        "entry point"]
    assert by_folder["mmprompt.data"] == []  # TYPE_CHECKING only
    # an import-time chain to a heavy package is caught, a function-level one is not
    assert heavy_imports(graph, "mmprompt.tools.report", bad_package) == []
    sweep = heavy_imports(graph, "mmprompt.tools.sweep", bad_package)
    assert sweep == ["mmprompt/tools/sweep.py:2: mmprompt.tools.sweep imports lightning (via "
                     "mmprompt.data.datamodule -> lightning): mmprompt.tools.sweep must import without lightning"]


def test_an_allowed_exception_needs_its_reason_in_the_table(bad_package):
    graph = import_graph(bad_package)
    contract = Contract("the model side never imports the tools", ("mmprompt.model",), ("mmprompt.tools",),
                        allowed={("mmprompt.model.module", "mmprompt.tools.report"): "shown here only as an example"})
    assert contract_violations(graph, contract, bad_package) == []  # the excepted import and its package's __init__


def test_the_package_may_be_imported_for_its_version_without_running_load(tmp_path):
    """``from .. import __version__`` runs ``mmprompt/__init__``, not the imports inside its ``load``."""
    root = write_package(tmp_path, {
        "mmprompt/__init__.py": "__version__ = '0'\n\ndef load():\n    from .run.inference import load\n",
        "mmprompt/run/__init__.py": "", "mmprompt/run/inference.py": "",
        "mmprompt/model/__init__.py": "", "mmprompt/model/module.py": "from .. import __version__\n",
        "mmprompt/model/eager.py": "from ..run import inference\n",
    })
    problems = contract_violations(import_graph(root), folder_contract("mmprompt.model"), root)
    assert [p.split(":")[0] for p in problems] == ["mmprompt/model/eager.py"]


def test_a_module_outside_the_folders_and_an_unknown_folder_are_named(bad_package):
    assert stray_modules(bad_package) == [
        "mmprompt/extras/__init__.py: a folder tests/test_layering.py does not know; add it to FOLDERS with its "
        "contract",
        "mmprompt/helpers.py: a module outside the folders; move it into one of model, adapters, data, analysis, "
        "tools, run (or, if it is a neutral contract, add it to TOP_LEVEL)",
    ]


def test_folder_docstrings_that_disagree_with_the_contracts_are_named(bad_package):
    problems = folder_problems(bad_package)
    expected = [
        "mmprompt/model/__init__.py: the docstring says it never imports mmprompt.data, mmprompt.run; its contract",
        "mmprompt/model/module.py:1: mmprompt.model.module imports mmprompt.tools",
        "mmprompt/adapters/__init__.py: the docstring says it may import mmprompt.data, which its contract forbids",
        "mmprompt/adapters/sneaky.py:2: mmprompt.adapters.sneaky imports mmprompt.helpers, which",
        "mmprompt/data/__init__.py: the docstring must say what mmprompt.data may import",
        "mmprompt/tools/export.py:1: mmprompt.tools.export imports mmprompt.run, which",
        "mmprompt/run/__init__.py: the docstring says it may import mmprompt.nowhere, which does not exist",
    ]
    for start in expected:
        assert any(problem.startswith(start) for problem in problems), (start, problems)
    assert not any(problem.startswith("mmprompt/tools/sweep.py") for problem in problems)  # data is named
    assert not any(problem.startswith("mmprompt/adapters/good.py") for problem in problems)


def test_a_fast_test_that_starts_python_or_ddp_workers_fails_naming_the_mark():
    """The fast loop stays fast: outside ``@pytest.mark.slow`` a Python process or ``ddp_spawn`` is refused
    (tests/conftest.py), while other programs run."""
    import torch.multiprocessing

    from run_helpers import ProcessInFastTest

    with pytest.raises(ProcessInFastTest, match="starts a process: mark it @pytest.mark.slow"):
        subprocess.run([sys.executable, "-c", "pass"])
    with pytest.raises(ProcessInFastTest, match="mark it @pytest.mark.slow"):
        torch.multiprocessing.start_processes(print, nprocs=2)
    assert subprocess.run(["true"]).returncode == 0
