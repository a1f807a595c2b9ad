"""The import direction that DESIGN.md fixes: kernels <- ps <- worker <- tinyps, and no circles.

Parses every module's imports (no importing), so a forbidden import or a circle fails here even
when it sits in a function body that no test happens to run.
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["kernels", "ps", "worker", "tinyps"]  # each may import only those to its left
# Third-party packages each layer may use besides the layers below it.
THIRD_PARTY = {
    # llvmlite is Numba's code generator: kernels that emit an instruction write LLVM IR
    "kernels": {"numpy", "numba", "llvmlite"},
    "ps": {"numpy", "numba", "grpc", "google", "grpc_health", "grpc_reflection"},
    "worker": {"numpy", "sklearn"},
    "tinyps": {"numpy", "tqdm", "matplotlib", "ray"},  # ray: the optional Ray backend only
}
# Import circles that are known and being removed, each as the set of modules in it. An entry
# excuses exactly that circle: one more module in it, or any other circle, still fails.
ALLOWED_CIRCLES: list[set[str]] = []  # none; an entry here must name a circle that exists


def _imported_tops(path: Path) -> set[str]:
    tops = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            tops.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops


def _modules(package: str, root: Path = ROOT):
    return sorted((root / package).rglob("*.py"))


@pytest.mark.parametrize("package", LAYERS)
def test_each_package_imports_only_what_lies_below_it(package):
    below = set(LAYERS[: LAYERS.index(package) + 1])
    above = set(LAYERS) - below
    allowed = below | THIRD_PARTY[package] | set(sys.stdlib_module_names)
    assert _modules(package), f"{package}/ has no modules"
    for path in _modules(package):
        tops = _imported_tops(path)
        rel = path.relative_to(ROOT)
        assert not tops & above, f"{rel} imports {sorted(tops & above)}, a layer above it"
        assert tops <= allowed, f"{rel} imports {sorted(tops - allowed)}, not allowed here"


def test_the_checker_sees_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from worker.model import MLP\n    import tinyps.cli\n")
    assert {"worker", "tinyps"} <= _imported_tops(bad)


# -------------------------------------------------------------------------------- circles
# A module's edges go to the project modules it names: `import a.b` -> a.b; `from a import b`
# -> a.b when that is a module, else a (a name from a's __init__). Imports in functions and
# under `if TYPE_CHECKING:` count too: a circle that only a type hint needs is still a circle
# for a reader. A package's __init__ is not added for `import a.b`: Python runs it, but every
# package would then sit in a circle with its own modules.


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT, packages=LAYERS) -> dict[str, set[str]]:
    """module -> the project modules it imports, anywhere in its source."""
    paths = {_module_name(p, root): p for package in packages for p in _modules(package, root)}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:  # `import a.b.c`: the longest part that is ours
                    parts = alias.name.split(".")
                    edges.update(next(([".".join(parts[:k])] for k in range(len(parts), 0, -1)
                                       if ".".join(parts[:k]) in paths), []))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: `from . import x` / `from ..a import x`
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                for alias in node.names:
                    if f"{base}.{alias.name}" in paths:
                        edges.add(f"{base}.{alias.name}")
                    elif base in paths:
                        edges.add(base)
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components that hold a circle (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:  # v is the root of a component: pop it
            component = set()
            while not component or v not in component:
                component.add(stack.pop())
            if len(component) > 1 or v in graph[v]:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def a_circle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One closed path through the component, e.g. [a, b, a], for the failure message."""
    path = [min(component)]
    while path.count(path[-1]) < 2:
        path.append(min(graph[path[-1]] & component))
    return path[path.index(path[-1]):]


def unexcused(graph: dict[str, set[str]], allowed: list[set[str]]) -> list[str]:
    return [" -> ".join(a_circle(graph, c)) for c in circles(graph) if c not in allowed]


def test_no_module_imports_itself_back_through_others():
    graph = import_graph()
    assert len(graph) > 50, "the graph missed the project's modules"
    bad = unexcused(graph, ALLOWED_CIRCLES)
    fix = "break each, e.g. move what both need into a module of its own"
    assert not bad, f"import circles ({fix}):\n" + "\n".join(bad)


def test_every_allowed_circle_still_exists():
    """An excuse outlives its circle only to hide the next one: delete it with the circle."""
    found = circles(import_graph())
    gone = [sorted(c) for c in ALLOWED_CIRCLES if c not in found]
    assert not gone, f"no longer a circle, delete it from ALLOWED_CIRCLES: {gone}"


def test_the_checker_sees_a_circle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    for name in ["__init__.py", "sub/__init__.py", "leaf.py"]:
        (pkg / name).write_text("import os\n")
    # a -> b at the top, b -> c in a function, c -> a through `from pkg import a`
    (pkg / "a.py").write_text("from pkg.b import f\nimport pkg.leaf\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.sub import c\n    return c\n")
    (pkg / "sub" / "c.py").write_text("from .. import a\n")
    (pkg / "d.py").write_text("import pkg.d\n")  # a module that imports itself
    graph = import_graph(tmp_path, ["pkg"])
    assert graph["pkg.a"] == {"pkg.b", "pkg.leaf"}
    assert circles(graph) == [{"pkg.a", "pkg.b", "pkg.sub.c"}, {"pkg.d"}]
    assert unexcused(graph, []) == ["pkg.a -> pkg.b -> pkg.sub.c -> pkg.a", "pkg.d -> pkg.d"]
    # an allowed entry excuses its own circle and nothing else, and not a bigger circle
    assert unexcused(graph, [{"pkg.d"}]) == ["pkg.a -> pkg.b -> pkg.sub.c -> pkg.a"]
    assert len(unexcused(graph, [{"pkg.a", "pkg.b"}])) == 2


# What changes a whole process (its signal handlers, its malloc, its death with a parent) is
# set where a process starts, never by a library call that a notebook could make.
PROCESS_WIDE = {"keep_freed_buffers", "die_with_parent", "signal"}
PROCESS_EDGES = {"tinyps/cli/__init__.py", "tinyps/cli/process.py", "tinyps/cli/cluster.py",
                 "tinyps/ray_actors.py"}  # the command's processes, and Ray's actors


def _process_wide_calls(path: Path) -> list[str]:
    calls = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            owner = fn.value.id if isinstance(fn, ast.Attribute) and isinstance(
                fn.value, ast.Name) else ""
            if name in PROCESS_WIDE or (owner, name) == ("signal", "signal"):
                calls.append(f"{owner + '.' if owner else ''}{name} at line {node.lineno}")
    return calls


def test_process_wide_settings_are_set_only_at_process_edges():
    for package in LAYERS:
        for path in _modules(package):
            rel = path.relative_to(ROOT).as_posix()
            if rel in PROCESS_EDGES or rel in ("ps/memory.py", "tinyps/processes.py"):
                continue  # where they are defined
            assert not _process_wide_calls(path), f"{rel}: {_process_wide_calls(path)}"


def test_the_edge_checker_sees_a_process_wide_call(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import signal\ndef f():\n    signal.signal(2, None)\n"
                   "    keep_freed_buffers()\n")
    assert _process_wide_calls(bad) == ["signal.signal at line 3",
                                        "keep_freed_buffers at line 4"]
