"""The wheel, built from this checkout and installed in a virtualenv of its own.

Built once per test session (``python -m build``: an sdist, then the wheel from the sdist, as a
release is built) and installed with pip into a new virtualenv outside the checkout, the way
an operator installs certman. pip may fetch the dependencies from PyPI; its cache makes reruns
quick.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"


def _run(*command: str, timeout: float) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    _run(sys.executable, "-m", "build", "--outdir", str(root / "dist"), str(REPO), timeout=600)
    (wheel,) = (root / "dist").glob("certman-*.whl")
    venv = root / "venv"
    # No pip inside (the test's pip installs into it) and no access to this venv's packages.
    _run(sys.executable, "-m", "venv", "--without-pip", str(venv), timeout=120)
    _run(
        sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
        "--quiet", "--no-compile", str(wheel),
        timeout=900,
    )  # fmt: skip
    return Installed(wheel=wheel, venv=venv)
