"""The package-level import graph is acyclic and every import points down the stage order.

Built from the source with ``ast`` (every ``import`` statement, including the ones inside
functions, which is where the lazy imports hide), so a cycle cannot hide behind a deferred import.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import ertacache

ROOT = Path(ertacache.__file__).parent

#: the stage order, lowest first: a package may import only packages in earlier entries.
#: Same-line packages are peers and must not import each other. Foundation modules first,
#: then the stages as the data flows (README, "Layout").
STAGES = [
    ("errors",),
    ("<root>", "io", "limits", "metrics", "timing", "memory"),
    ("video",),
    ("models",),
    ("contract",),
    ("sampling",),
    ("profile",),
    ("generation",),
    ("testbed",),
    ("eval",),
    ("engines",),
    ("export",),
    ("runtime",),
    ("serving",),
    ("integrations",),
    ("cli",),
]
RANK = {name: rank for rank, names in enumerate(STAGES) for name in names}


def _unit(module: str) -> str:
    """'ertacache.models.family' -> 'models'; 'ertacache' -> '<root>'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def _module(path: Path) -> tuple[str, bool]:
    """A source file's dotted module name, and whether it is a package's __init__."""
    rel = path.relative_to(ROOT.parent).with_suffix("").parts
    is_pkg = rel[-1] == "__init__"
    return ".".join(rel[:-1] if is_pkg else rel), is_pkg


def import_graph() -> dict[tuple[str, str], set[str]]:
    """(importer unit, imported unit) -> the files with such an import."""
    edges: dict[tuple[str, str], set[str]] = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        module, is_pkg = _module(path)
        src = _unit(module)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                    base = pkg[: len(pkg) - node.level + 1]
                    targets = [".".join(base + ([node.module] if node.module else []))]
                else:
                    targets = [node.module or ""]
            else:
                continue
            for target in targets:
                if target == "ertacache" or target.startswith("ertacache."):
                    dst = _unit(target)
                    if dst != src:
                        edges[(src, dst)].add(str(path.relative_to(ROOT.parent)))
    return edges


def find_cycle(edges) -> list[str] | None:
    graph = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_every_package_has_a_stage():
    units = {_unit(_module(p)[0]) for p in ROOT.rglob("*.py")}
    missing = sorted(units - set(RANK))
    assert not missing, f"add {missing} to STAGES in {__file__} (where it sits in the data flow)"


def test_package_import_graph_is_acyclic():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle)


def test_imports_point_down_the_stage_order():
    upward = {f"{a} -> {b}": sorted(files) for (a, b), files in import_graph().items()
              if a in RANK and b in RANK and RANK[b] >= RANK[a]}
    assert not upward, f"imports against the stage order {STAGES}: {upward}"


def test_the_checker_sees_a_cycle():
    assert find_cycle({("a", "b"): set(), ("b", "c"): set(), ("c", "a"): set()}) == ["a", "b", "c", "a"]
    assert find_cycle({("a", "b"): set(), ("a", "c"): set(), ("b", "c"): set()}) is None


def test_models_imports_neither_the_testbed_nor_torch_to_read_a_recipe_and_finds_the_testbed_on_demand():
    import subprocess
    import sys

    code = ("import sys\n"
            "from ertacache.models.recipes import load_recipe\n"
            "from ertacache.models.family import known_families\n"
            "r = load_recipe('wan2.1-tiny'); assert 'testbed' in known_families()\n"
            "assert not [m for m in sys.modules if m.startswith('ertacache.testbed') or m == 'torch'], 'eager import'\n"
            "from ertacache.models.family import family_named\n"
            "assert family_named(r.family).variant_of == 'wan'\n"
            "assert 'ertacache.testbed.family' in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
