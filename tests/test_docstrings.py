"""Docstring examples: every ``>>>`` example in the package runs and prints what it says (doctest), and the public
objects a user meets first keep at least one example.

Run here rather than through ``pytest --doctest-modules``: CI installs the wheel, and collecting the source tree's
modules as doctests would import them a second time from the checkout beside the installed package. Examples of the
library modules run in empty globals, so they import what they use, as a reader copying them would; those of the
application modules run in their module's globals (doctest's default).
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

import monai_gdl_plus

PACKAGE = Path(monai_gdl_plus.__file__).resolve().parent
LIBRARY_MODULES = ["monai_gdl_plus"] + sorted(
    f"monai_gdl_plus.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")
)
APP_MODULES = ["monai_gdl_plus.app"] + sorted(  # subpackages included (monai_gdl_plus.app.bench.registry, ...)
    "monai_gdl_plus.app." + ".".join(p.relative_to(PACKAGE / "app").with_suffix("").parts).removesuffix(".__init__")
    for p in (PACKAGE / "app").rglob("*.py")
    if p.name != "__init__.py" or p.parent != PACKAGE / "app"
)
OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# the objects whose docstrings must show at least one example (an emptied or example-less docstring fails)
MUST_HAVE_EXAMPLES = [
    "monai_gdl_plus.DicePlusLoss",
    "monai_gdl_plus.DiceCEPlusLoss",
    "monai_gdl_plus.DiceFocalPlusLoss",
    "monai_gdl_plus.TverskyPlusLoss",
    "monai_gdl_plus.MaskedDicePlusLoss",
    "monai_gdl_plus.GeneralizedDicePlusLoss",
    "monai_gdl_plus.GeneralizedDiceFocalPlusLoss",
    "monai_gdl_plus.GeneralizedWassersteinDicePlusLoss",
    "monai_gdl_plus.PerClassDice",
    "monai_gdl_plus.PerClassDiceLogger",
    "monai_gdl_plus.functional.dice_plus_loss",
    "monai_gdl_plus.functional.generalized_dice_plus_loss",
    "monai_gdl_plus.functional.generalized_wasserstein_dice_plus_loss",
    "monai_gdl_plus.functional.wasserstein_terms",
    "monai_gdl_plus.functional.per_class_terms",
    "monai_gdl_plus.functional.soft_terms",
    "monai_gdl_plus.functional.prepare",
    "monai_gdl_plus.functional.label_terms",
    "monai_gdl_plus.options.DiceOptions",
    "monai_gdl_plus.options.GeneralizedDiceOptions",
    "monai_gdl_plus.options.WassersteinDiceOptions",
]


def _resolve(dotted: str) -> object:
    module_name, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def test_modules_found():
    """The module lists hold the known modules (a glob that matched nothing would silently test nothing)."""
    for name in ("monai_gdl_plus.losses", "monai_gdl_plus.functional", "monai_gdl_plus.options",
                 "monai_gdl_plus.metrics", "monai_gdl_plus.handlers"):  # fmt: skip
        assert name in LIBRARY_MODULES
    for name in ("monai_gdl_plus.app.cli", "monai_gdl_plus.app.bench", "monai_gdl_plus.app.bench.registry"):
        assert name in APP_MODULES


@pytest.mark.parametrize("name", LIBRARY_MODULES + APP_MODULES)
def test_docstring_examples_run(name: str, capsys: pytest.CaptureFixture[str]):
    """``doctest.testmod`` over the module: every example's output matches (``...`` and whitespace relaxed)."""
    if name == "monai_gdl_plus._triton_kernels":  # loaded on demand, needs triton
        pytest.importorskip("triton")
    module = importlib.import_module(name)
    globs = {} if name in LIBRARY_MODULES else None
    result = doctest.testmod(module, globs=globs, optionflags=OPTIONFLAGS, report=False)
    report = capsys.readouterr().out
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}:\n{report}"


@pytest.mark.parametrize("dotted", MUST_HAVE_EXAMPLES)
def test_public_object_has_an_example(dotted: str):
    """The object's own docstring (not an inherited one) has an ``Examples:`` section with ``>>>`` examples."""
    obj = _resolve(dotted)
    doc = vars(obj).get("__doc__") if isinstance(obj, type) else obj.__doc__
    assert doc, f"{dotted} has no docstring of its own"
    examples = doctest.DocTestParser().get_examples(doc)
    assert examples, f"{dotted}'s docstring has no >>> example"
    assert "Examples:" in doc, f"{dotted}'s examples are not under an 'Examples:' heading (Google style)"
