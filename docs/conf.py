"""Sphinx configuration of the monai_gdl_plus documentation.

Build (as CI does): ``docs/build.sh``, i.e. ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
Pages: the README (``index.md``), the API from the docstrings (autodoc + napoleon, Google style), the ``gdl-plus``
command line from its argparse parser (sphinx-argparse), and the tutorials executed at build time (myst-nb): the
notebooks are stored without outputs, so the outputs shown are the ones this build produced.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent

# The API pages describe this checkout's source (``python -m sphinx`` from the root would import it anyway). The
# tutorials run in Jupyter kernels started in docs/tutorials/, which import the *installed* package: install it first
# (``pip install ".[docs]"``), as CI does.
sys.path.insert(0, str(ROOT))
import monai_gdl_plus  # noqa: E402

project = "monai_gdl_plus"
author = "monai_gdl_plus contributors"
copyright = "monai_gdl_plus contributors, Apache-2.0"
release = version = monai_gdl_plus.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinxarg.ext",
    "myst_nb",  # also loads myst_parser: Markdown pages and the README
]

# no intersphinx: the build machines reach PyPI only, and an inventory fetch that fails is a warning (an error under -W)

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}
root_doc = "index"
smartquotes_action = "qe"  # quotes and ellipses only: "--data" must not become an en dash
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]

# -- tutorials: copied from ../tutorials (notebooks live there, beside their test), executed by myst-nb -------------

_TUTORIALS_SRC = ROOT / "tutorials"
_TUTORIALS_DST = DOCS / "tutorials"


def _copy_tutorials() -> None:
    """Copy the numbered notebooks into docs/tutorials/ (git-ignored there); unchanged files keep their mtime, so an
    incremental build re-reads only notebooks that changed."""
    _TUTORIALS_DST.mkdir(exist_ok=True)
    wanted = {p.name: p for p in sorted(_TUTORIALS_SRC.glob("[0-9][0-9]_*.ipynb"))}
    for old in _TUTORIALS_DST.glob("*.ipynb"):
        if old.name not in wanted:
            old.unlink()
    for name, src in wanted.items():
        dst = _TUTORIALS_DST / name
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            shutil.copy2(src, dst)


_copy_tutorials()

# the kernels inherit this environment: the tutorials run on CPU with small sizes (as tests/test_tutorials.py runs
# them), draw inline, and write their run folders under docs/_build/ (emptied first) rather than into the sources
_RUNS = DOCS / "_build" / "tutorial_runs"
shutil.rmtree(_RUNS, ignore_errors=True)
_RUNS.mkdir(parents=True)
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ["GDL_PLUS_TUTORIAL_OUT"] = str(_RUNS)

# "cache" (jupyter-cache): a notebook is executed again only when its code changed; a fresh checkout (CI) runs all.
# GDL_PLUS_DOCS_EXECUTE=force|off overrides it (off: render the stored, output-free notebooks, for a quick look).
nb_execution_mode = {"off": "off", "force": "force"}.get(os.environ.get("GDL_PLUS_DOCS_EXECUTE", ""), "cache")
nb_execution_cache_path = str(DOCS / "_build" / ".jupyter_cache")
nb_execution_timeout = 300  # per cell, as tests/test_tutorials.py
nb_execution_raise_on_error = True  # a failing tutorial fails the build
nb_execution_show_tb = True
nb_merge_streams = True

# -- MyST -----------------------------------------------------------------------------------------------------------

myst_enable_extensions = ["colon_fence", "dollarmath"]  # dollarmath: the formulas of tutorial 01

# -- autodoc / napoleon ---------------------------------------------------------------------------------------------

autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = ["Shapes"]  # rendered as a rubric with its text as written
napoleon_use_ivar = True  # a NamedTuple's ``Attributes:`` as fields of the class, not a second set of entries


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
    """Leave out the "Alias for field number N" entries of NamedTuple fields (their ``Attributes:`` describe them)."""
    if what == "class" and (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
        return True
    return None


# -- HTML -----------------------------------------------------------------------------------------------------------

html_theme = "furo"
html_title = f"monai_gdl_plus {release}"
html_static_path: list[str] = []


def setup(app):
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
