"""The package as a whole (monai_gdl_plus/__init__.py): what ``import monai_gdl_plus`` loads and exports, and the
line between the library and the application (monai_gdl_plus.app)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import monai_gdl_plus

PACKAGE = Path(monai_gdl_plus.__file__).resolve().parent
LIBRARY_MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
# library modules loaded on first use of an optional path, with the package each needs
ON_DEMAND = {"_triton_kernels": "triton"}
# the application's modules below monai_gdl_plus.app, subpackages included ("bench", "bench.registry", ...)
APP_MODULES = sorted(
    ".".join(p.relative_to(PACKAGE / "app").with_suffix("").parts).removesuffix(".__init__")
    for p in (PACKAGE / "app").rglob("*.py")
    if p.name != "__init__.py" or p.parent != PACKAGE / "app"
)


def _loaded_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``statement``."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_import_loads_the_library_only():
    """No application module, plotting or TensorBoard, and not MONAI either (``import monai`` loads all of its
    submodules, matplotlib and TensorBoard among them): the library reaches MONAI when a loss is built."""
    loaded = _loaded_after("import monai_gdl_plus")
    assert {f"monai_gdl_plus.{m}" for m in LIBRARY_MODULES if m not in ON_DEMAND} <= loaded
    unwanted = {"matplotlib", "tensorboard", "monai", "triton"}  # triton: imported when the Triton path runs
    assert not sorted(m for m in loaded if m.split(".")[0] in unwanted)
    assert not sorted(m for m in loaded if m.startswith(("monai_gdl_plus.app", "torch.utils.tensorboard")))
    assert not {f"monai_gdl_plus.{m}" for m in ON_DEMAND} & loaded


def test_no_library_module_imports_the_application():
    """The application imports the library, never the reverse (checked in the source, imports inside functions
    included, so that a lazy import cannot hide the dependency)."""
    for name in LIBRARY_MODULES + ["__init__"]:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                targets = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            assert not [t for t in targets if t.startswith("monai_gdl_plus.app")], f"{name}.py imports the application"


@pytest.mark.parametrize("name", ["monai_gdl_plus"] + [f"monai_gdl_plus.{m}" for m in LIBRARY_MODULES + ["app"]]
                         + [f"monai_gdl_plus.app.{m}" for m in APP_MODULES])
def test_all_lists_exactly_the_public_names(name):
    """``__all__`` is true: every name in it exists, and every public function or class defined in the module is
    in it (private helpers carry a leading underscore)."""
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", [])
    assert not [n for n in exported if not hasattr(module, n)]
    tree = ast.parse(Path(module.__file__).read_text())
    defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name[0] != "_"]
    assert not [n for n in defined if n not in exported]


ALL_FILES = sorted([*PACKAGE.glob("*.py"), *(PACKAGE / "app").rglob("*.py")])
# the package's modules by dotted name below monai_gdl_plus ("_ops", "app.bench.registry", ...)
MODULE_NAMES = {".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__") for p in ALL_FILES}


def _private_names_from_other_modules(path: Path) -> list[str]:
    """What ``path`` takes from another module of the package under a private name: ``from monai_gdl_plus.x import
    _y`` and ``x._y`` on a name bound to a module of the package. A private *module* (``_ops``, ``_fused``) is not a
    private name: importing it, and its public names, is how the library reaches its internals."""
    tree = ast.parse(path.read_text())
    found, module_aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("monai_gdl_plus"):
            here = node.module.removeprefix("monai_gdl_plus").removeprefix(".")
            for alias in node.names:
                target = f"{here}.{alias.name}".lstrip(".")
                if target in MODULE_NAMES:
                    module_aliases.add(alias.asname or alias.name)
                elif alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            module_aliases.update(a.asname for a in node.names if a.asname and a.name.startswith("monai_gdl_plus"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in module_aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):  # fmt: skip
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_private_internals_are_not_exported():
    """No module of the package (library or application) exports a private name in ``__all__``, and the
    application reaches the library through its public modules only (never ``_ops`` or ``_fused``)."""
    for path in ALL_FILES:
        if path.stem in ON_DEMAND and importlib.util.find_spec(ON_DEMAND[path.stem]) is None:
            continue
        module = importlib.import_module(".".join(["monai_gdl_plus", *path.relative_to(PACKAGE).with_suffix("").parts])
                                         .removesuffix(".__init__"))  # fmt: skip
        assert not [n for n in getattr(module, "__all__", []) if n.startswith("_") and n != "__version__"], path
    library_private = {m for m in MODULE_NAMES if m.startswith("_")}
    for path in (PACKAGE / "app").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("monai_gdl_plus"):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            used = {t.removeprefix("monai_gdl_plus.") for t in targets} & library_private
            assert not used, f"{path.relative_to(PACKAGE)} line {node.lineno} imports the library's private {used}"


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_name_is_imported_across_modules(path):
    """A private name (a leading underscore) is used only in the module that defines it, in the library and in the
    application alike: a helper two modules need is public in one of them (and in its ``__all__``)."""
    assert not _private_names_from_other_modules(path)


def test_the_private_name_check_sees_both_forms(tmp_path):
    """The check above finds both ways of reaching a private name (a check that finds nothing would pass anyway)."""
    source = tmp_path / "example.py"
    source.write_text("from monai_gdl_plus.app.bench import registry\nfrom monai_gdl_plus.functional import _x\n"
                      "from monai_gdl_plus import _ops\nregistry._softmax_dim1\n_ops.HOST_DEVICES\n")  # fmt: skip
    assert _private_names_from_other_modules(source) == [
        "line 2: from monai_gdl_plus.functional import _x", "line 4: registry._softmax_dim1",
    ]


def test_version_is_single_sourced():
    """pyproject reads the version from the package (``dynamic``), and the installed metadata agrees."""
    import importlib.metadata

    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert importlib.metadata.version("monai-gdl-plus") == monai_gdl_plus.__version__
