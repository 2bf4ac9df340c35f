"""``python -m monai_gdl_plus.app.bench``: the benchmark's command line, and the entry point of its child processes."""

from __future__ import annotations

import sys

from monai_gdl_plus.app.bench.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
