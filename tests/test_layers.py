"""The package's import structure, read from the source with ``ast`` (nothing is imported): no module of
``rslad_fast`` imports, directly or through others, a module that imports it back.

Every import between our own modules counts, at module level or inside a function: a function-local import
still ties the two files together, and it is the usual way a circle is hidden. Not counted: imports of other
packages, imports under ``if TYPE_CHECKING:``, and imports guarded by ``try: ... except ImportError`` (an
optional dependency). The implicit import of a module's parent package is not an edge either: otherwise every
``__init__`` that re-exports its submodules would close a circle with each of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "rslad_fast"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# The layers below the engine and the command lines, checked strictly for circles.
LOWER = ("attacks", "data", "ops", "models", "methods", "evaluation", "atomic", "errors")

# PEP 562 ``__getattr__`` re-exports kept while code elsewhere still imports a moved name from its old module;
# each is a circle back to the module the name moved to. Delete an entry with its shim.
COMPAT_SHIMS: dict = {}

_OPTIONAL = {"ImportError", "ModuleNotFoundError"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _guards_optional(node: ast.Try) -> bool:
    for handler in node.handlers:
        names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        if any(isinstance(n, ast.Name) and n.id in _OPTIONAL for n in names):
            return True
    return False


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """The Import / ImportFrom nodes that run when their code runs (not type-checking, not optional)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Try) and _guards_optional(node):
            stack.extend([*node.handlers, *node.orelse, *node.finalbody])  # only the try body is optional
            continue
        stack.extend(ast.iter_child_nodes(node))


def _edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of the package that ``name`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from P import x`` imports the submodule P.x when there is one, else reads x from P
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            while target and target not in modules:  # ``import a.b.c`` of a name inside a module
                target = target.rpartition(".")[0]
            if target and target != name and target.split(".")[0] == PACKAGE:
                out.add(target)
    return out


def import_graph(*, shims: bool = False) -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _edges(name, path, modules) for name, path in modules.items()}
    if not shims:
        for a, b in COMPAT_SHIMS:
            graph.get(a, set()).discard(b)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as one circle through all of
    its members where the first found path allows, else its sorted members."""
    index, low, on_stack, stack, comps, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        # iterative: the package has no deep chains, but recursion limits are not this test's business
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(comps)


def _describe(comps: list[list[str]], graph: dict[str, set[str]]) -> str:
    lines = []
    for comp in comps:
        members = set(comp)
        arrows = sorted(f"{a} -> {b}" for a in comp for b in graph[a] if b in members)
        lines.append(f"{{{', '.join(comp)}}}: " + "; ".join(arrows))
    return "\n".join(lines)


def _is_lower(module: str) -> bool:
    parts = module.split(".")
    return len(parts) > 1 and parts[1] in LOWER


def test_the_graph_sees_the_imports_it_should():
    """The parser itself: relative, absolute and function-local imports are edges; the optional
    dependencies and the parent-package imports are not."""
    graph = import_graph(shims=True)
    assert "rslad_fast.attacks.graphed" in graph["rslad_fast.attacks.kl_pgd"]  # relative, module level
    assert "rslad_fast.ops" in graph["rslad_fast.attacks.pgd"]  # ``from .. import ops``
    assert "rslad_fast.attacks.registry" in graph["rslad_fast.engine.estimate"]  # absolute, from below
    assert "rslad_fast.errors" in graph["rslad_fast.data.cifar"]  # absolute
    assert not any(m.startswith("nvidia") or m.startswith("pyautoattack") for m in graph["rslad_fast.data.dali"])
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(toy) == [["a", "b", "c"]]


def test_compat_shims_still_exist():
    """An entry of COMPAT_SHIMS whose re-export is gone must go too, or it would hide a new circle."""
    graph = import_graph(shims=True)
    stale = [f"{a} -> {b}" for a, b in COMPAT_SHIMS if b not in graph.get(a, set())]
    assert not stale, f"COMPAT_SHIMS lists re-exports that no longer exist: {stale}"


def test_no_import_circle_below_the_engine():
    """attacks/, data/, ops/, models/, methods/, evaluation/, atomic, errors: each factory or registry sits
    above the modules it chooses between (attacks/registry.py, attacks/kl_pgd.py, data/factory.py), never a
    base module importing its own specialization."""
    graph = import_graph()
    found = [c for c in circles(graph) if any(_is_lower(m) for m in c)]
    assert not found, "import circles:\n" + _describe(found, graph)


def test_no_import_circle_anywhere():
    graph = import_graph()
    found = circles(graph)
    assert not found, "import circles:\n" + _describe(found, graph)


# CONTRIBUTING.md's layers, bottom up: a module imports only from its own layer or the layers below it
LAYERS = [
    ("rslad_fast.errors", "rslad_fast.atomic", "rslad_fast.ops"),
    ("rslad_fast.attacks", "rslad_fast.models", "rslad_fast.data"),
    ("rslad_fast.methods",),
    ("rslad_fast.engine",),
    ("rslad_fast.evaluation",),
    ("rslad_fast.cli", "rslad_fast.run_flags"),
    ("rslad_fast.train", "rslad_fast.evaluate", "rslad_fast.reproduce", "rslad_fast.export"),
]


def _layer(module: str):
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None  # the package's __init__ (it re-exports from below)


def test_no_upward_import():
    """Evaluation may read run directories and use the engine's process group, device checks and TF32 policy
    (it sits above the engine); the engine never imports evaluation, and nothing below the command lines
    imports them."""
    graph = import_graph()
    upward = sorted(
        f"{m} -> {t}"
        for m, targets in graph.items()
        for t in targets
        if _layer(m) is not None and _layer(t) is not None and _layer(t) > _layer(m)
    )
    assert not upward, f"imports that go up a layer: {upward}"
