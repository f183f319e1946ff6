"""certman's version, from one place: the installed distribution's metadata.

``certman --version``, ``certman-edge --version`` and ``certman-onboard --version`` all print
this, so that the version an operator sees is the one pip installed (pyproject.toml's).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def certman_version() -> str:
    try:
        return version("certman")
    except PackageNotFoundError:
        # A source checkout run without installing (PYTHONPATH=.): no metadata to read.
        return "0+unknown"
