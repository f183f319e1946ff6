"""Onboard dealer sites in bulk from a CSV: ``python scripts/bulk_onboard.py FILE.csv``.

The same command as the installed ``certman-onboard`` (:mod:`pipeline.cli.onboard` has the
code, the options and the exit statuses); this wrapper keeps the path operators' scripts and
runbooks already use working from a checkout.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run from a checkout as well as from an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli.onboard import main

if __name__ == "__main__":
    sys.exit(main(prog="bulk_onboard"))
