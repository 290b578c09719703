"""The shape of the code base: every module imports, every subpackage is packaged, and the
modules of ``izitorch.ensemble`` talk to each other through public names only.

A class's private fields (one leading underscore) are its own business: another class that reads
or writes them ties itself to how the owner is built, so a change inside one module breaks
another. The rule is checked on the sources, with :mod:`ast`, so it holds for code no test runs.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import izitorch
import izitorch.ensemble

# Private names of torch itself, which the ensemble uses where torch offers no public way:
TORCH_PRIVATES = frozenset(
    {
        "_fused_adam_",
        "_fused_sgd_",  # torch's fused optimizer kernels (torch._fused_adam_, torch._fused_sgd_)
        "_BatchNorm",  # the base class of every BatchNorm (torch.nn.modules.batchnorm._BatchNorm)
        "_parameters",
        "_buffers",  # an nn.Module's own parameters and buffers, None entries included
        "_save_to_state_dict",  # nn.Module's, compared with a module class's own (ensemble/snapshots.py)
        "_optimizer_state_dict_pre_hooks",
        "_optimizer_state_dict_post_hooks",  # a torch optimizer's state-dict hooks (ensemble/snapshots.py)
        "_optimizer_step_pre_hooks",
        "_optimizer_step_post_hooks",  # a torch optimizer's step hooks
        "_opt_called",  # what an LR scheduler reads to tell that its optimizer stepped
    }
)

# Runs the command line when imported, so it is imported by the entry point only.
NOT_IMPORTABLE = {"izitorch.__main__"}


def izitorch_modules() -> list[str]:
    names = [info.name for info in pkgutil.walk_packages(izitorch.__path__, "izitorch.")]
    return ["izitorch"] + sorted(name for name in names if name not in NOT_IMPORTABLE)


def ensemble_sources() -> dict[str, ast.Module]:
    folder = Path(izitorch.ensemble.__file__).parent
    return {path.name: ast.parse(path.read_text(), str(path)) for path in sorted(folder.glob("*.py"))}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def is_self(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id in ("self", "cls")


def test_the_package_holds_the_modules_it_is_split_into() -> None:
    assert {"izitorch.ensemble.grouping", "izitorch.ensemble.group", "izitorch.ensemble.optimizer", "izitorch.ensemble.kernels"} <= set(izitorch_modules())


@pytest.mark.parametrize("name", izitorch_modules())
def test_every_module_imports(name: str) -> None:
    assert importlib.import_module(name).__name__ == name


def test_each_ensemble_module_imports_first_in_a_fresh_process() -> None:
    """Each module of the ensemble imported before any other izitorch module: an import cycle
    between them fails in some orders only. One process, forgetting izitorch's modules between
    imports."""
    script = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    for loaded in [m for m in sys.modules if m == 'izitorch' or m.startswith('izitorch.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
        "print('imported', len(sys.argv) - 1)\n"
    )
    modules = [name for name in izitorch_modules() if name.startswith("izitorch.ensemble.")]
    done = subprocess.run([sys.executable, "-c", script, *modules], capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.strip() == f"imported {len(modules)}"


def private_uses(tree: ast.Module) -> list[tuple[int, str]]:
    """Where a module touches a private name that is not its own: an attribute of an object
    other than ``self`` / ``cls`` (also through ``getattr``/``hasattr``/``setattr``), or a private
    name imported from another izitorch module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr) and not is_self(node.value):
            if node.attr not in TORCH_PRIVATES:
                found.append((node.lineno, f"{ast.unparse(node.value)}.{node.attr}"))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            name = node.args[1].value
            if is_private(name) and not is_self(node.args[0]) and name not in TORCH_PRIVATES:
                found.append((node.lineno, f"{node.func.id}({ast.unparse(node.args[0])}, {name!r})"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("izitorch"):
            found += [(node.lineno, f"from {node.module} import {alias.name}") for alias in node.names if is_private(alias.name)]
    return found


def test_no_ensemble_module_reaches_into_private_fields() -> None:
    reaching = [f"izitorch/ensemble/{file}:{line}: {what}" for file, tree in ensemble_sources().items() for line, what in private_uses(tree)]
    assert reaching == []


def test_the_torch_exemptions_name_no_field_of_izitorch() -> None:
    """The names exempted as torch's are neither defined nor assigned by the ensemble's code,
    so the exemption cannot hide a private field of its own classes."""
    own = set()
    for tree in ensemble_sources().values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and is_self(node.value):
                own.add(node.attr)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
    assert own & TORCH_PRIVATES == set()


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("group._spans", ["group._spans"]),
        ("self.group._row(x, k, span)", ["self.group._row"]),
        ("getattr(optimizer, '_fused')", ["getattr(optimizer, '_fused')"]),
        ("from izitorch.ensemble.kernels import _inactive_rows", ["from izitorch.ensemble.kernels import _inactive_rows"]),
        ("self._fused; cls._make(); torch._fused_sgd_; x.__class__; from torch.nn.modules import _x", []),
    ],
)
def test_the_checker_sees_what_it_forbids(source: str, expected: list[str]) -> None:
    assert [what for _, what in private_uses(ast.parse(source))] == expected


def test_every_subpackage_is_packaged() -> None:
    """A wheel holds the packages ``pyproject.toml`` lists, and no other: a subpackage left out
    works from a checkout and is missing once installed."""
    root = Path(__file__).resolve().parents[1] / "izitorch"  # the source tree (tox tests an installed wheel)
    listed = tomllib.loads((root.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = {".".join(("izitorch", *init.parent.relative_to(root).parts)) for init in root.rglob("__init__.py")}
    assert found - set(listed) == set()
