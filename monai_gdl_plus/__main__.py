"""``python -m monai_gdl_plus``: the ``gdl-plus`` command line (see :mod:`monai_gdl_plus.app.cli`)."""

from __future__ import annotations

import sys

from monai_gdl_plus.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
