#!/usr/bin/env bash
# Build the HTML documentation as CI does: warnings are errors (-W), all of them reported (--keep-going).
# The tutorials are executed during the build (myst-nb, cached in docs/_build/.jupyter_cache); needs the `docs` extra:
#   pip install ".[docs]" && docs/build.sh            -> docs/_build/html/index.html
# Extra arguments go to sphinx-build (e.g. -E for a fresh environment). GDL_PLUS_DOCS_EXECUTE=force re-executes
# every notebook; =off renders them without outputs (a quick look at the pages, not for CI).
# CI: start from an empty docs/_build (`rm -rf docs/_build && docs/build.sh`): the notebook cache is keyed on the
# notebooks' code alone, so a library change does not re-execute a cached tutorial.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
python -m sphinx -W --keep-going -b html "$@" docs docs/_build/html
echo "docs built in $(( $(date +%s) - start )) s: docs/_build/html/index.html"
