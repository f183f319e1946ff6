"""What the edge checks of its files before it serves: that its user can read its keys and
trusted signers and write its state, and that nobody else can change them.

Each problem is one line naming the path, what it is, the user the edge runs as and the fix:
an operator reading ``journalctl`` must see at once that ``/etc/certman`` is 0750 root:certman
and the edge's user is not in that group, not a ``PermissionError`` traceback from somewhere
inside the key loader.

Writable by group or others is refused for all three: whoever can write the trusted-signers
file can make the edge believe statements of their own key; the key directory, swap the key
envelopes are opened with; the state directory, put a mirror of their making in front of the
edge at its next start. Readable by others is not checked here: the key files' own mode is
(:mod:`pipeline.crypto.keys`).
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from pathlib import Path

__all__ = ["StartupProblem", "check_paths", "running_user"]


class StartupProblem(Exception):
    """One line: the path, the problem, the user, the fix."""


def running_user() -> str:
    """``name (uid N)`` of the effective user."""
    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def check_paths(key_dir: Path, signers: Path, state_dir: Path) -> None:
    """Raise StartupProblem for the first problem found with the edge's files."""
    _check_readable(key_dir, "key directory", ".key", directory=True)
    _check_readable(signers, "trusted signers", ".pub", directory=None)
    _check_state_dir(state_dir)


def _problem(path: Path, what: str, problem: str, fix: str) -> StartupProblem:
    return StartupProblem(f"{path} ({what}): {problem} as user {running_user()}; {fix}")


def _stat(path: Path, what: str) -> os.stat_result:
    try:
        return path.stat()
    except PermissionError:
        parent = _unenterable_parent(path)
        raise _problem(
            path,
            what,
            f"cannot enter {parent}" if parent else "permission denied",
            "give this user search (x) permission on every directory above it (docs/production.md)",
        ) from None
    except FileNotFoundError:
        raise _problem(path, what, "does not exist", "create it (docs/production.md)") from None
    except OSError as exc:
        raise _problem(path, what, exc.strerror or str(exc), "check the path") from None


def _unenterable_parent(path: Path) -> Path | None:
    """The first directory above ``path`` this user cannot enter (None: it can enter every
    one that exists)."""
    for parent in reversed(path.absolute().parents):
        if not os.access(parent, os.X_OK):
            return parent if os.path.lexists(parent) else None
    return None


def _check_not_writable(path: Path, what: str, st: os.stat_result) -> None:
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StartupProblem(
            f"{path} ({what}) is group- or world-writable (mode {mode:04o}): whoever can write "
            f"it can change what this edge trusts; chmod go-w {path}"
        )


def _check_readable(path: Path, what: str, suffix: str, *, directory: bool | None) -> None:
    """``path`` (a directory if ``directory``, either if None) readable by this user, and it
    and, in a directory, the files the edge loads from it (``*suffix``) not writable by group
    or others."""
    st = _stat(path, what)
    is_dir = stat.S_ISDIR(st.st_mode)
    if directory is True and not is_dir:
        raise _problem(path, what, "not a directory", "point the setting at the directory")
    _check_not_writable(path, what, st)
    if not is_dir:
        _check_file(path, what)
        return
    try:
        names = sorted(os.listdir(path))
    except PermissionError:
        raise _problem(
            path, what, "cannot list the directory", f"chown it to this user or chmod u+rx {path}"
        ) from None
    if not os.access(path, os.X_OK):
        raise _problem(path, what, "cannot enter the directory", f"chmod u+x {path}")
    for name in names:
        if name.startswith(".") or not name.endswith(suffix):
            continue
        file = path / name
        _check_not_writable(file, what, _stat(file, what))
        _check_file(file, what)


def _check_file(path: Path, what: str) -> None:
    try:
        with path.open("rb"):
            pass
    except PermissionError:
        raise _problem(
            path, what, "cannot read it", f"chown it to this user (mode 0600) or chmod u+r {path}"
        ) from None
    except OSError as exc:
        raise _problem(path, what, exc.strerror or str(exc), "check the file") from None


def _check_state_dir(path: Path) -> None:
    what = "state directory"
    if not path.exists():
        parent = _unenterable_parent(path)
        if parent is not None:
            raise _problem(
                path, what, f"cannot enter {parent}", "give this user search (x) permission on it"
            )
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise _problem(path, what, exc.strerror or str(exc), "check the path") from None
            raise _problem(
                path,
                what,
                f"cannot create it ({exc.strerror})",
                "create it owned by this user, mode 0700 (docs/production.md)",
            ) from None
    st = _stat(path, what)
    if not stat.S_ISDIR(st.st_mode):
        raise _problem(path, what, "not a directory", "point --state-dir at a directory")
    _check_not_writable(path, what, st)
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise _problem(
            path,
            what,
            "cannot write into it",
            f"chown it to this user, mode 0700 (chown USER {path}; chmod 0700 {path})",
        )
    for name in sorted(os.listdir(path)):
        file = path / name
        if name.startswith("mirror-") and not os.access(file, os.R_OK | os.W_OK):
            raise _problem(
                file, "local mirror", "cannot read and write it", f"chown it to this user ({file})"
            )
