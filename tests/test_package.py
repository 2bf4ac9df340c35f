"""The package as a whole (monai_gdl_plus/__init__.py): what ``import monai_gdl_plus`` loads and exports, and the
line between the library and the application (monai_gdl_plus.app)."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import monai_gdl_plus

PACKAGE = Path(monai_gdl_plus.__file__).resolve().parent
LIBRARY_MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
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
    assert {f"monai_gdl_plus.{m}" for m in LIBRARY_MODULES} <= loaded
    unwanted = {"matplotlib", "tensorboard", "monai"}
    assert not sorted(m for m in loaded if m.split(".")[0] in unwanted)
    assert not sorted(m for m in loaded if m.startswith(("monai_gdl_plus.app", "torch.utils.tensorboard")))


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


def test_the_private_fused_internals_are_not_exported():
    assert not [n for n in monai_gdl_plus.__all__ if n.startswith("_") and n != "__version__"]
    assert "_fused" not in dir(monai_gdl_plus) or "_fused" not in monai_gdl_plus.__all__


def test_version_is_single_sourced():
    """pyproject reads the version from the package (``dynamic``), and the installed metadata agrees."""
    import importlib.metadata

    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert importlib.metadata.version("monai-gdl-plus") == monai_gdl_plus.__version__
