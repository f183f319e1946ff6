"""``certman-edge`` refuses to start, in one line naming the path (and the user, for what it
cannot read or write), when its key directory, trusted signers or state directory are writable
by others or out of its user's reach: run as a subprocess, as root and as an unprivileged user
the way a systemd ``User=`` runs it."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.crypto.keys import generate_keypair
from pipeline.crypto.signing import SigningKey

from .conftest import edge_command

REPO = Path(__file__).resolve().parents[2]
USER, GROUP = "nobody", "nogroup"


@dataclass
class Layout:
    """The edge's files as docs/production.md lays them out: keys, signers, state."""

    root: Path
    keys: Path
    signers: Path
    state: Path

    def args(self) -> list[str]:
        return ["--key-dir", str(self.keys), "--trusted-signers", str(self.signers),
                "--state-dir", str(self.state), "--http-port", "0", "--https-port", "0",
                "--metrics-port", "0"]  # fmt: skip

    def chown(self, uid: int, gid: int) -> None:
        for path in (self.root, self.keys, *self.keys.iterdir(), self.signers):
            os.chown(path, uid, gid)


@pytest.fixture
def layout() -> Iterator[Layout]:
    root = Path(tempfile.mkdtemp(prefix="certman-edge-files-"))
    os.chmod(root, 0o755)
    keys = root / "edge-keys"
    keys.mkdir(mode=0o700)
    generate_keypair(keys)
    signer_dir = root / "signing"
    SigningKey.generate().write(signer_dir)
    signers = root / "signer.pub"
    shutil.copy(next(signer_dir.glob("*.pub")), signers)
    shutil.rmtree(signer_dir)
    yield Layout(root, keys, signers, root / "state")
    shutil.rmtree(root, ignore_errors=True)


def _run(command: list[str]) -> tuple[int, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent",
           "CERTMAN_REDIS_URL": "redis://127.0.0.1:1/0"}  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, cwd="/")
    return proc.returncode, proc.stderr


def _one_line_refusal(rc: int, stderr: str, *needles: str) -> str:
    lines = stderr.strip().splitlines()
    assert rc != 0, stderr
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ---- as root: what others could write ------------------------------------------------------


@pytest.mark.parametrize("target", ["key directory", "key file", "trusted signers", "state"])
def test_group_or_world_writable_paths_are_refused(layout: Layout, target: str) -> None:
    layout.state.mkdir(mode=0o700)
    path = {
        "key directory": layout.keys,
        "key file": next(layout.keys.glob("*.key")),
        "trusted signers": layout.signers,
        "state": layout.state,
    }[target]
    os.chmod(path, 0o777 if path.is_dir() else 0o666)
    rc, stderr = _run(edge_command(*layout.args()))
    line = _one_line_refusal(rc, stderr, str(path), "group- or world-writable", "chmod go-w")
    assert line.startswith("certman-edge: ")
    os.chmod(path, 0o770 if path.is_dir() else 0o620)  # group-writable only: refused too
    _one_line_refusal(*_run(edge_command(*layout.args())), str(path), "group- or world-writable")


# ---- as an unprivileged user ----------------------------------------------------------------


# Empty once the command's mount namespace is gone; removed after each test.
_mount_points: list[str] = []


def _as_user(*args: str) -> list[str]:
    """``certman-edge ARGS`` as USER, the way ``setpriv`` runs a unit's ``User=``.

    This interpreter may live where USER cannot reach (pyenv under /root): it is bind-mounted
    onto a directory USER can, in a mount namespace of the command's own, and run with this
    checkout and its virtualenv's packages on the path (nothing of the host changes)."""
    base = Path(sys.base_prefix)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = sysconfig.get_paths()["purelib"]
    code = (
        "import site, sys; site.addsitedir(sys.argv.pop(1)); sys.path.insert(0, sys.argv.pop(1)); "
        "from edge.cli import main; main()"
    )
    script = (
        'm=$0 b=$1 u=$2 g=$3 v=$4 c=$5 s=$6 r=$7; shift 7; mount --bind "$b" "$m" && '
        'LD_LIBRARY_PATH="$m/lib" exec setpriv --reuid "$u" --regid "$g" --init-groups '
        '"$m/bin/$v" -I -S -c "$c" "$s" "$r" "$@"'
    )
    mount_point = tempfile.mkdtemp(prefix="certman-python-")
    os.chmod(mount_point, 0o755)
    _mount_points.append(mount_point)
    return ["unshare", "-m", "sh", "-c", script, mount_point, str(base), USER, GROUP, version,
            code, site, str(REPO), *args]  # fmt: skip


@pytest.fixture
def unprivileged(layout: Layout) -> Iterator[tuple[int, int]]:
    """USER's uid and gid, after checking USER can run the edge at all here."""
    if shutil.which("setpriv") is None or shutil.which("unshare") is None:
        pytest.skip("setpriv and unshare (util-linux) are needed to run the edge as another user")
    if os.geteuid() != 0:
        pytest.skip("running the edge as another user needs root")
    rc, stderr = _run(_as_user("--version"))
    if rc != 0:
        pytest.skip(f"cannot run the edge as {USER} here: {stderr.strip().splitlines()[-1:]}")
    import pwd

    entry = pwd.getpwnam(USER)
    layout.chown(entry.pw_uid, entry.pw_gid)
    yield entry.pw_uid, entry.pw_gid
    while _mount_points:
        os.rmdir(_mount_points.pop())


def test_a_key_directory_the_user_cannot_read_is_one_line(
    layout: Layout, unprivileged: tuple[int, int]
) -> None:
    os.chown(layout.keys, 0, 0)  # root's, 0700: listed by nobody else
    rc, stderr = _run(_as_user(*layout.args()))
    _one_line_refusal(rc, stderr, str(layout.keys), f"user {USER} (uid {unprivileged[0]})")


def test_a_directory_the_user_cannot_enter_is_one_line(
    layout: Layout, unprivileged: tuple[int, int]
) -> None:
    # As docs/production.md once had it: /etc/certman 0750 root, the edge's user not in the group.
    os.chown(layout.root, 0, 0)
    os.chmod(layout.root, 0o750)
    rc, stderr = _run(_as_user(*layout.args()))
    _one_line_refusal(rc, stderr, str(layout.keys), f"cannot enter {layout.root}", f"user {USER}")


def test_a_key_file_the_user_cannot_read_is_one_line(
    layout: Layout, unprivileged: tuple[int, int]
) -> None:
    key = next(layout.keys.glob("*.key"))
    os.chown(key, 0, 0)
    rc, stderr = _run(_as_user(*layout.args()))
    _one_line_refusal(rc, stderr, str(key), "cannot read", f"user {USER}")


def test_trusted_signers_the_user_cannot_read_are_one_line(
    layout: Layout, unprivileged: tuple[int, int]
) -> None:
    os.chown(layout.signers, 0, 0)
    os.chmod(layout.signers, 0o600)
    rc, stderr = _run(_as_user(*layout.args()))
    _one_line_refusal(rc, stderr, str(layout.signers), "cannot read", f"user {USER}")


def test_a_state_directory_the_user_cannot_write_is_one_line(
    layout: Layout, unprivileged: tuple[int, int]
) -> None:
    layout.state.mkdir(mode=0o755)  # root's
    rc, stderr = _run(_as_user(*layout.args()))
    _one_line_refusal(rc, stderr, str(layout.state), "cannot write into it", f"user {USER}")
    os.rmdir(layout.state)
    os.chown(layout.root, 0, 0)  # nor create it
    rc, stderr = _run(_as_user(*layout.args()))
    _one_line_refusal(rc, stderr, str(layout.state), "cannot create it", f"user {USER}")


def test_a_state_directory_under_directories_not_there_yet_is_created(layout: Layout) -> None:
    """Its parents too (CERTMAN_DATA_DIR/edge on a fresh host), and the edge goes on."""
    state = layout.root / "data" / "edge"
    layout.state = state
    rc, stderr = _run(edge_command(*layout.args(), "--max-header-size", "10"))
    # Past every check of its files: what stops it is the next thing it checks.
    _one_line_refusal(rc, stderr, "--max-header-size must be at least 1024")
    assert state.is_dir() and stat.S_IMODE(state.stat().st_mode) == 0o700
