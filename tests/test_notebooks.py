"""The notebooks as committed: outputs cleared, learning goals first, exercises with checking
cells, and the public API only. (`make test` also runs each of them top to bottom.)"""

import ast
import importlib
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_the_seven_labs():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_notebook_is_committed_clean_and_shaped_for_class(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "clear the outputs"
    opening = "".join(c.source for c in nb.cells[:3] if c.cell_type == "markdown")
    assert "Learning goals" in opening
    source = "\n".join(c.source for c in code)
    answers = re.findall(r"^(answer_\d+) = None\b", source, re.M)
    assert len(answers) >= 2, "two or three exercises, each answered in a variable"
    for answer in answers:  # each has a checking cell that handles the unanswered case
        assert re.search(rf"if {answer} is None:", source), answer
    # The public API only: no private names imported or reached into.
    assert not re.search(r"import\s+_|import .*\b_[a-z]\w*|\._[a-z]\w*", source)


# ---------------------------------------------------------------------------- public names
# A notebook imports our packages whole (`import tinyps`) or names from them (`from worker
# import partition`), and every name it takes, or reaches with `tinyps.launch`, is in that
# package's __all__. A submodule (`from ps.client import PSError`) is not the public API: it
# moves when the code is reorganised. Third-party modules are free.
PACKAGES = ("tinyps", "ps", "worker", "kernels")


def _code(source: str) -> str:
    """A cell's Python: IPython magics and shell lines (`%matplotlib`, `!ls`) blanked."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line
                     for line in source.splitlines())


def private_imports(source: str, public: dict[str, set[str]]) -> list[str]:
    """What a cell's source imports or uses of ours that is not public, one line each."""
    tree = ast.parse(_code(source))
    bad, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top in public and alias.name != top:
                    bad.append(f"import {alias.name}: import {top} and use {top}.__all__")
                elif top in public:
                    aliases[alias.asname or top] = top
        elif isinstance(node, ast.ImportFrom) and node.module:
            top = node.module.split(".")[0]
            if top not in public:
                continue
            names = ", ".join(alias.name for alias in node.names)
            if node.module != top:
                bad.append(f"from {node.module} import {names}: import it from {top}")
            bad += [f"from {top} import {alias.name}: not in {top}.__all__"
                    for alias in node.names if alias.name not in public[top]]
        elif isinstance(node, ast.ImportFrom):  # `from . import x`: no package to be public of
            bad.append(f"relative import in a notebook: {ast.unparse(node)}")
    for node in ast.walk(tree):  # `tinyps.launch`, `kernels.round_to_fp16`
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and node.attr not in public[aliases[node.value.id]]):
            bad.append(f"{node.value.id}.{node.attr}: not in {aliases[node.value.id]}.__all__")
    return bad


@pytest.fixture(scope="module")
def public() -> dict[str, set[str]]:
    return {name: set(importlib.import_module(name).__all__) for name in PACKAGES}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_notebook_imports_only_public_names(path, public):
    nb = nbformat.read(path, as_version=4)
    for number, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            bad = private_imports(cell.source, public)
            assert not bad, f"{path.name}, cell {number}: " + "; ".join(bad)


def test_the_import_check_sees_private_names():
    public = {"tinyps": {"launch"}, "ps": {"PSError"}, "worker": set(), "kernels": set()}
    cell = ("%matplotlib inline\n!ls\nimport grpc\nimport numpy as np\nimport tinyps as tp\n"
            "from ps import PSError\nfrom ps.client import PSError\nimport ps.client\n"
            "from worker import _secret\ntp.launch()\ntp.cli.main()\n"
            "def f():\n    from kernels.dense import relu_backward\n")
    assert private_imports(cell, public) == [
        "from ps.client import PSError: import it from ps",
        "import ps.client: import ps and use ps.__all__",
        "from worker import _secret: not in worker.__all__",
        "from kernels.dense import relu_backward: import it from kernels",
        "from kernels import relu_backward: not in kernels.__all__",
        "tp.cli: not in tinyps.__all__",
    ]
