"""The import direction that DESIGN.md fixes: kernels <- ps <- worker <- tinyps.

Parses every module's imports (no importing), so a forbidden import fails here even when it
sits in a function body that no test happens to run.
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


def _imported_tops(path: Path) -> set[str]:
    tops = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            tops.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops


def _modules(package: str):
    return sorted((ROOT / package).rglob("*.py"))


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
