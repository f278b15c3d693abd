"""The import graph of ``src/attnkit`` follows the layering, with no cycle.

Layers, lowest first (a module may import its own layer and the layers below it)::

    core  <-  masks, positions, inputs  <-  kernels  <-  attention  <-  models, data, metrics
          <-  train, generate  <-  compress, hf  <-  arena, cli, attnkit (the package facade)

Two more rules: a registered mechanism's module (``@register`` in ``attention/``) imports no
other mechanism's module (what they share lives in ``attention/pattern.py``, ``dense.py`` and
``reference.py``), and there is no import cycle between modules.

The graph is built statically with ``ast`` from every ``import`` and ``from ... import``: at
the top of a module, under ``if TYPE_CHECKING:`` and inside functions (a lazy import is still a
dependency). The only exceptions are the edges in :data:`ALLOWED`, each with its reason.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "attnkit"

#: Top-level parts of ``attnkit``, lowest layer first; parts on one row share a layer.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("core",),
    ("masks", "positions", "inputs"),
    ("kernels",),
    ("attention",),
    ("models", "data", "metrics"),
    ("train", "generate"),
    ("compress", "hf"),
    # "": the package itself (attnkit/__init__.py), the facade over every layer that the
    # applications (arena, cli) and users call; it imports nothing at run time.
    ("arena", "cli", ""),
)

#: ``(importer, imported) -> reason`` for the edges allowed against the rules, by design.
ALLOWED: dict[tuple[str, str], str] = {
    ("attnkit.core.registry", "attnkit.attention"): (
        "the registry imports the built-in mechanisms (by package, no name) on the first look-up, "
        "so list_attention() is complete however attnkit was imported"
    ),
    ("attnkit.models.generation", "attnkit.generate.api"): (
        "model.generate()/beam_search() are thin hand-overs to the generate layer, imported when "
        "called: importing a model never imports generate"
    ),
    ("attnkit.models.pretrained", "attnkit"): (
        "save_pretrained records attnkit.__version__; the facade imports nothing at run time"
    ),
    ("attnkit.models.pretrained", "attnkit.compress.saving"): (
        "from_pretrained hands a compressed checkpoint (its compression file present) to the "
        "compress layer that wrote it, imported only then"
    ),
}


@dataclass(frozen=True)
class Edge:
    """``importer`` imports ``imported`` at ``line`` (``lazy``: inside a function)."""

    importer: str
    imported: str
    line: int
    lazy: bool

    def __str__(self) -> str:
        where = "inside a function" if self.lazy else "at module level"
        return f"{self.importer} -> {self.imported} (line {self.line}, {where})"


def modules() -> dict[str, Path]:
    """Every module of the package, dotted name -> file (a package is its ``__init__.py``)."""
    found = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The module ``name`` lands in: itself, else its closest known parent (``pkg.module.attr``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the module's package, up ``level - 1`` packages
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, base] if base else package)
        # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    resolved = [_resolve(n, known) for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")]
    return sorted({r for r in resolved if r is not None and r != module})


def import_graph() -> list[Edge]:
    """Every import between the package's modules, at any depth of the source."""
    known = modules()
    edges = []
    for module, path in known.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, lazy in _walk(tree, lazy=False):
            edges += [Edge(module, t, node.lineno, lazy) for t in _targets(node, module, is_package, known)]
    return edges


def _walk(node: ast.AST, *, lazy: bool) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []
    for child in ast.iter_child_nodes(node):
        inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            found.append((child, lazy))
        found += _walk(child, lazy=inner)
    return found


def layer_of(module: str) -> int:
    """Index into :data:`LAYERS` of the top-level part ``module`` belongs to."""
    part = module.split(".")[1] if "." in module else ""
    for index, parts in enumerate(LAYERS):
        if part in parts:
            return index
    raise AssertionError(f"{module}: its part {part!r} is in no layer; add it to LAYERS in {__file__}")


def mechanism_modules(known: dict[str, Path]) -> set[str]:
    """Modules of ``attention/`` that register a mechanism (``@register(...)`` on a class)."""
    found = set()
    for module, path in known.items():
        if not module.startswith(f"{PACKAGE}.attention."):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any(_is_register(d) for d in node.decorator_list):
                found.add(module)
    return found


def _is_register(decorator: ast.expr) -> bool:
    call = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (isinstance(call, ast.Name) and call.id == "register") or (
        isinstance(call, ast.Attribute) and call.attr == "register"
    )


def violations(edges: list[Edge], mechanisms: set[str]) -> list[str]:
    """Each edge against the layering or the mechanism rule, with why."""
    found = []
    for edge in edges:
        if (edge.importer, edge.imported) in ALLOWED:
            continue
        low, high = layer_of(edge.importer), layer_of(edge.imported)
        if high > low:
            found.append(
                f"{edge}: layer {LAYERS[low]} imports the higher layer {LAYERS[high]}; move the shared "
                "piece down, or invert the dependency"
            )
        elif edge.importer in mechanisms and edge.imported in mechanisms:
            found.append(f"{edge}: a mechanism imports another mechanism; move what they share to a support module")
    return found


def cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), allowed edges left out."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        if (edge.importer, edge.imported) not in ALLOWED:
            graph.setdefault(edge.importer, set()).add(edge.imported)
            graph.setdefault(edge.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_is_in_a_layer() -> None:
    known = modules()
    assert len(known) > 100  # the walk found the package
    for module in known:
        assert 0 <= layer_of(module) < len(LAYERS)  # layer_of raises, naming the module, when none fits


def test_no_import_goes_up_a_layer_or_across_mechanisms() -> None:
    known = modules()
    problems = violations(import_graph(), mechanism_modules(known))
    assert not problems, "import-layer violations:\n" + "\n".join(problems)


def test_no_import_cycle() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_allowed_edges_exist() -> None:
    """A stale allow-list entry would hide a future back-edge of the same pair: keep it exact."""
    present = {(e.importer, e.imported) for e in import_graph()}
    stale = sorted(set(ALLOWED) - present)
    assert not stale, f"ALLOWED names edges that no longer exist; delete them: {stale}"


# --- the checker itself, on small made-up graphs -------------------------------------------


def test_checker_flags_a_back_edge_and_a_mechanism_edge() -> None:
    edges = [
        Edge("attnkit.core.base", "attnkit.masks.functions", 3, lazy=False),
        Edge("attnkit.models.transformer", "attnkit.generate.api", 9, lazy=True),
        Edge("attnkit.attention.topk", "attnkit.attention.full", 5, lazy=False),
        Edge("attnkit.attention.topk", "attnkit.attention.dense", 6, lazy=False),
        Edge("attnkit.generate.api", "attnkit.models.transformer", 7, lazy=False),
    ]
    problems = violations(edges, {"attnkit.attention.topk", "attnkit.attention.full"})
    assert len(problems) == 3
    assert problems[0].startswith("attnkit.core.base -> attnkit.masks.functions (line 3, at module level)")
    assert problems[1].startswith("attnkit.models.transformer -> attnkit.generate.api (line 9, inside a function)")
    assert "a mechanism imports another mechanism" in problems[2]


def test_checker_finds_a_cycle_through_lazy_imports() -> None:
    edges = [
        Edge("attnkit.models.a", "attnkit.models.b", 1, lazy=False),
        Edge("attnkit.models.b", "attnkit.models.c", 1, lazy=True),
        Edge("attnkit.models.c", "attnkit.models.a", 1, lazy=False),
        Edge("attnkit.models.c", "attnkit.core.types", 1, lazy=False),
    ]
    assert cycles(edges) == [["attnkit.models.a", "attnkit.models.b", "attnkit.models.c"]]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import attnkit.masks.functions\n", ["attnkit.masks.functions"]),
        ("from attnkit.attention import full\n", ["attnkit.attention.full"]),
        ("from attnkit.core.base import KVState\n", ["attnkit.core.base"]),
        ("from ..masks import Mask\n", ["attnkit.masks"]),
        ("def f():\n    from attnkit.generate.api import check_search\n", ["attnkit.generate.api"]),
        ("if TYPE_CHECKING:\n    from attnkit.models import LanguageModel\n", ["attnkit.models"]),
        ("import torch\nfrom typing import Any\n", []),
    ],
)
def test_checker_reads_every_form_of_import(source: str, expected: list[str]) -> None:
    known = modules()
    tree = ast.parse(source)
    found = [t for node, _ in _walk(tree, lazy=False) for t in _targets(node, "attnkit.models.layers", False, known)]
    assert found == expected
