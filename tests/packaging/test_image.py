"""The image builds and its edge answers /healthz and /metrics from outside its namespace.

scripts/check-image does it (a locally made base, ``podman build --isolation=chroot``, the
image's CMD run by chroot in a network namespace): minutes, root, and apt packages, so only when
asked for with CERTMAN_TEST_IMAGE=1.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# scripts/check-image is given 1800 s.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(2000)]


@pytest.mark.skipif(
    os.environ.get("CERTMAN_TEST_IMAGE") != "1",
    reason="builds an image (minutes, root, apt packages): set CERTMAN_TEST_IMAGE=1",
)
def test_the_image_builds_and_its_edge_answers() -> None:
    result = subprocess.run(
        [str(REPO / "scripts" / "check-image")], capture_output=True, text=True, timeout=1800
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check-image: ok" in result.stdout
