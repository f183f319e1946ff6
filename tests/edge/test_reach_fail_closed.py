"""The edge's own-address check fails closed: out of file descriptors, an address it cannot
probe counts as its own (refused), never as someone else's."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edge.reach import SelfReach
from pipeline.outbound import RefusedAddress

# Run apart: the descriptor limit is lowered for the whole process.
_EXHAUSTED = """
import resource, socket, sys
from edge.reach import SelfReach
from pipeline.outbound import RefusedAddress

reach = SelfReach(True, {("0.0.0.0", 8080)})
reach.check("192.0.2.1", 8080)  # not local, descriptors to spare: allowed
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
held = []
try:
    while True:
        held.append(socket.socket())
except OSError:
    pass
try:
    reach.check("192.0.2.1", 8080)
except RefusedAddress as exc:
    print("refused:", exc)
    sys.exit(0)
print("allowed")
sys.exit(1)
"""


def test_own_address_check_refuses_when_out_of_descriptors() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _EXHAUSTED], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "refused:" in result.stdout


def test_own_address_check_still_tells_local_from_remote() -> None:
    reach = SelfReach(True, {("0.0.0.0", 8080)})
    reach.check("192.0.2.1", 8080)  # EADDRNOTAVAIL: not this host's
    reach.check("127.0.0.1", 8081)  # another port
    with pytest.raises(RefusedAddress):
        reach.check("127.0.0.1", 8080)
