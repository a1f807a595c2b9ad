"""The packages' front doors: each `__init__.py` names its public symbols in `__all__`, every
one of them resolves, and the lazy ones load nothing until a name is used.

ps, worker and tinyps load their names on first use (PEP 562) from a table, `_WHERE`; the
`if TYPE_CHECKING:` imports beside it say the same for readers and for test_layering.py, so
this file checks that `__all__`, the table and those imports agree. kernels imports eagerly:
every kernel module needs Numba, which is most of the cost.
"""

import ast
import importlib
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAZY = ["ps", "worker", "tinyps"]
PACKAGES = ["kernels", *LAZY]


def _init(package: str) -> ast.Module:
    return ast.parse((ROOT / package / "__init__.py").read_text())


def _assigned(tree: ast.Module, name: str):
    """The literal value of a top-level `name = ...` (ast.literal_eval: no code runs)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == [name]:
            return ast.literal_eval(node.value)
    raise AssertionError(f"no literal {name} = ... at the top level")


def _type_checking_imports(tree: ast.Module) -> dict[str, str]:
    """name -> module for each `from M import name` under `if TYPE_CHECKING:`."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for imp in node.body:
                for alias in imp.names:
                    submodule = f"{imp.module}.{alias.name}"
                    is_module = (ROOT / Path(*submodule.split("."))).with_suffix(".py").is_file()
                    found[alias.name] = submodule if is_module else imp.module
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_all_is_a_literal_list_of_names_that_resolve(package):
    names = _assigned(_init(package), "__all__")
    assert isinstance(names, list) and len(set(names)) == len(names)
    module = importlib.import_module(package)
    assert module.__all__ == names
    for name in names:
        assert getattr(module, name) is not None, name
        assert name in dir(module), name


@pytest.mark.parametrize("package", LAZY)
def test_the_lazy_table_and_the_type_checking_imports_agree_with_all(package):
    tree = _init(package)
    names = set(_assigned(tree, "__all__"))
    where = _assigned(tree, "_WHERE")
    assert set(where) == names, f"_WHERE and __all__ differ: {sorted(set(where) ^ names)}"
    assert _type_checking_imports(tree) == where
    module = importlib.import_module(package)
    for name, source in where.items():
        defined = importlib.import_module(source)
        expected = defined if defined.__name__.endswith(f".{name}") else getattr(defined, name)
        assert getattr(module, name) is expected, f"{package}.{name} is not {source}'s"


@pytest.mark.parametrize("package", LAZY)
def test_an_unknown_name_is_an_attribute_error_that_names_it(package):
    with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'nope'"):
        importlib.import_module(package).nope  # noqa: B018 (the lookup is the test)


def _loaded_by(*args: str) -> set[str]:
    """The modules a fresh interpreter imports to run `python -X importtime ARGS`."""
    run = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("import time:")]
    return {line.rsplit("|", 1)[1].strip() for line in lines}


HEAVY = {"grpc", "numba", "matplotlib", "sklearn", "tinyps.launcher", "tinyps.api", "ps.client"}
# The flags are made from the settings' fields, which live beside the parts that use them
# (the server's config in ps.server, the precision's beside its kernels): the command loads
# those, but not what only running a cluster or drawing a report needs.
RUN_ONLY = {"matplotlib", "sklearn", "tinyps.launcher", "tinyps.api", "tinyps.supervisor",
            "tinyps.cli.cluster", "tinyps.cli.process"}


def test_the_packages_and_the_command_start_without_loading_what_they_do_not_use():
    names = _loaded_by("-c", "import ps, worker, tinyps, ps.keys")
    assert {"ps", "worker", "tinyps", "ps.keys"} <= names
    assert not names & HEAVY, sorted(names & HEAVY)
    help_loads = _loaded_by("-m", "tinyps", "--help")
    assert not help_loads & RUN_ONLY, sorted(help_loads & RUN_ONLY)


def test_no_star_imports():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    assert all(a.name != "*" for a in node.names), f"{path}: import *"


@pytest.mark.parametrize("package", PACKAGES)
def test_no_public_name_is_also_the_name_of_a_submodule(package):
    """Importing the submodule would set the package's attribute to the module, so that
    `from worker import partition` gave the module instead of the function."""
    folder = ROOT / package
    submodules = {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir()
                                                         if (p / "__init__.py").exists()}
    module = importlib.import_module(package)
    clashes = [n for n in set(module.__all__) & submodules
               if not isinstance(getattr(module, n), types.ModuleType)]
    assert not clashes, f"{package}: {clashes} name both a public symbol and a module"
