"""The layout rules that CONTRIBUTING's "Where things live" states, read from the source with
``ast`` (nothing is imported): no import cycles among the modules of reidbench/, attacks/ and
defenses/; the engine reaches the catalogs only through the registry; no oversized module."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("reidbench", "attacks", "defenses")
MAX_LINES = 520

# Deferred (function-level) imports that close a cycle, each with the reason it is deferred.
# A module-level cycle is never allowed; a deferred one only when listed here.
DEFERRED_CYCLE_EDGES: dict[tuple[str, str], str] = {}

# The layers that drive a run; a plugin builds on the engine's base modules, never on these.
DRIVING_MODULES = ("reidbench.api", "reidbench.cli", "reidbench.executors", "reidbench.grid", "reidbench.hub", "reidbench.leaderboard",
                   "reidbench.runner", "reidbench.sweep", "reidbench.validate")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _ancestors(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _with_packages(module: str, target: str) -> set[str]:
    """``target`` and the packages above it whose ``__init__`` importing it runs; the importer's
    own ancestors are initialised before it, so importing them adds nothing."""
    parts = target.split(".")
    chain = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return {m for m in chain if m in MODULES} - _ancestors(module)


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    if isinstance(node, ast.Import):
        return set().union(*(_with_packages(module, alias.name) for alias in node.names))
    if node.level:
        base = module.split(".")[: len(module.split(".")) - (0 if _is_package(module) else 1)]
        base = base[: len(base) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source.split(".")[0] not in PACKAGES:
        return set()
    targets = set()
    for alias in node.names:
        submodule = f"{source}.{alias.name}"
        if submodule in MODULES:
            targets |= _with_packages(module, submodule)
        else:
            # a name defined by ``source`` itself: its body must have run, even for an ancestor
            targets |= _with_packages(module, source) | {source}
    return targets


def _import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level imports, deferred imports) of every module, as module names."""
    top: dict[str, set[str]] = {m: set() for m in MODULES}
    deferred: dict[str, set[str]] = {m: set() for m in MODULES}

    def visit(module: str, node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (deferred if in_function else top)[module].update(_targets(module, child) - {module})
            visit(module, child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    for module, path in MODULES.items():
        visit(module, ast.parse(path.read_text(), str(path)), False)
    return top, deferred


TOP, DEFERRED = _import_graph()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_graph_sees_the_imports_it_must():
    """Guards the parser itself: a graph that missed imports would pass every rule below."""
    assert "reidbench.zoo.schema" in TOP["reidbench.zoo.training"]
    assert "reidbench.data.synthetic" in TOP["reidbench.data.synthetic_vi"]
    assert "reidbench.data" not in TOP["reidbench.data.synthetic_vi"]  # `from . import synthetic` is the submodule
    assert "reidbench.version" in TOP["reidbench.runner"]
    # a name of the package, not a submodule, means the package's body ran, even for an ancestor
    assert "reidbench" in _targets("reidbench.runner", ast.parse("from . import __version__").body[0])
    assert "reidbench.api" in DEFERRED["reidbench"]


def test_no_module_level_import_cycle():
    assert _cycles(TOP) == []


def test_deferred_imports_close_no_cycle_but_the_listed_ones():
    graph = {m: TOP[m] | {t for t in DEFERRED[m] if (m, t) not in DEFERRED_CYCLE_EDGES} for m in MODULES}
    assert _cycles(graph) == []
    stale = [edge for edge in DEFERRED_CYCLE_EDGES if edge[1] not in DEFERRED[edge[0]]]
    assert stale == [], "listed deferred imports that no longer exist; remove them from DEFERRED_CYCLE_EDGES"
    needed = [edge for edge in DEFERRED_CYCLE_EDGES
              if not _cycles({**graph, edge[0]: graph[edge[0]] | {edge[1]}})]
    assert needed == [], "listed deferred imports that close no cycle any more; remove them from DEFERRED_CYCLE_EDGES"


def test_the_engine_reaches_attacks_and_defenses_only_through_the_registry():
    imports = {m: TOP[m] | DEFERRED[m] for m in MODULES}
    engine = [(m, t) for m, ts in imports.items() if m.startswith("reidbench") for t in ts
              if t.split(".")[0] in ("attacks", "defenses")]
    assert engine == []
    attacks_on_defenses = [(m, t) for m, ts in imports.items() if m.split(".")[0] == "attacks" for t in ts
                           if t.split(".")[0] == "defenses"]
    assert attacks_on_defenses == []


def test_plugins_build_on_the_engine_not_on_what_drives_a_run():
    imports = {m: TOP[m] | DEFERRED[m] for m in MODULES}
    wrong = [(m, t) for m, ts in imports.items() if m.split(".")[0] in ("attacks", "defenses") for t in ts
             if any(t == d or t.startswith(d + ".") for d in DRIVING_MODULES)]
    assert wrong == []


def test_no_module_is_oversized():
    """A module past the limit holds more than one concept: split it along its seams."""
    sizes = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}
