"""The pipeline's signing key: made on first use, 0600, one key however many processes race."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import stat
import tempfile
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from pipeline.crypto.keys import KeyFileError
from pipeline.crypto.signing import SigningKey, TrustedSigners
from pipeline.crypto.signing_key_file import (
    load_or_create_signing_key,
    peek_signing_key,
    public_path,
)


def test_created_0600_with_its_public_half_then_reused(tmp_path: Path) -> None:
    path = tmp_path / "data" / "signing.key"
    assert peek_signing_key(path) is None
    assert not path.exists()  # peeking never creates it
    created = load_or_create_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_path(path) == tmp_path / "data" / "signing.pub"
    assert TrustedSigners.load(public_path(path)).key_ids == {created.key_id}
    assert load_or_create_signing_key(path).key_id == created.key_id
    peeked = peek_signing_key(path)
    assert peeked is not None and peeked.key_id == created.key_id


def test_a_generated_key_is_used_as_it_is(tmp_path: Path) -> None:
    key_id = SigningKey.generate().write(tmp_path)
    assert load_or_create_signing_key(tmp_path / f"{key_id}.key").key_id == key_id


def test_a_missing_public_half_is_written_again(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    key = load_or_create_signing_key(path)
    public_path(path).unlink()
    load_or_create_signing_key(path)
    assert TrustedSigners.load(public_path(path)).key_ids == {key.key_id}


def test_a_public_half_of_another_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    load_or_create_signing_key(path)
    other = SigningKey.generate().write(tmp_path / "other")
    public_path(path).write_bytes((tmp_path / "other" / f"{other}.pub").read_bytes())
    with pytest.raises(KeyFileError, match="is not the public half of signing key"):
        load_or_create_signing_key(path)


def test_a_key_open_to_others_or_not_ed25519_is_refused(tmp_path: Path) -> None:
    from pipeline.crypto.keys import load_or_create_pipeline_key

    path = tmp_path / "signing.key"
    load_or_create_signing_key(path)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_or_create_signing_key(path)
    envelope_key = tmp_path / "pipeline.key"
    load_or_create_pipeline_key(envelope_key)
    with pytest.raises(KeyFileError, match="not an Ed25519 signing key"):
        load_or_create_signing_key(envelope_key)


def test_the_private_key_is_never_in_its_repr(tmp_path: Path) -> None:
    key = load_or_create_signing_key(tmp_path / "signing.key")
    secret = (tmp_path / "signing.key").read_text().splitlines()[1]
    assert secret not in repr(key) and key.key_id in repr(key)


def _race(path: Path, start: Barrier, results: Queue[str]) -> None:
    start.wait()
    results.put(load_or_create_signing_key(path).key_id)


@pytest.mark.parametrize("attempt", range(3))
def test_created_concurrently_is_one_key(tmp_path: Path, attempt: int) -> None:
    path = tmp_path / "signing.key"
    racers = 6
    context = multiprocessing.get_context("fork")
    start = context.Barrier(racers)
    results: Queue[str] = context.Queue()
    processes = [context.Process(target=_race, args=(path, start, results)) for _ in range(racers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    ids = {results.get(timeout=5) for _ in range(racers)}
    assert len(ids) == 1
    assert TrustedSigners.load(public_path(path)).key_ids == ids


def _load_as(path: Path, uid: int, results: Queue[str]) -> None:
    if os.geteuid() != uid:
        os.setgid(uid)
        os.setuid(uid)
    results.put(load_or_create_signing_key(path).key_id)


def test_a_key_installed_alone_in_a_directory_not_writable_is_used(tmp_path: Path) -> None:
    # As on a worker host: the key installed without its .pub in /etc/certman, which systemd's
    # ProtectSystem=strict makes read-only. Root writes anywhere, so as root the loading
    # process runs as another user, owning the key but not the directory.
    key_id = SigningKey.generate().write(tmp_path / "made")
    # Not under tmp_path: pytest's base directory is closed to other users.
    base = Path(tempfile.mkdtemp(prefix="certman-signer-"))
    base.chmod(0o755)
    directory = base / "etc"
    directory.mkdir()
    installed = directory / "signing.key"
    installed.write_bytes((tmp_path / "made" / f"{key_id}.key").read_bytes())
    installed.chmod(0o600)
    uid = 65534 if os.geteuid() == 0 else os.geteuid()
    os.chown(installed, uid, uid)
    directory.chmod(0o555)
    context = multiprocessing.get_context("fork")
    results: Queue[str] = context.Queue()
    loader = context.Process(target=_load_as, args=(installed, uid, results))
    try:
        loader.start()
        loader.join(timeout=30)
        assert loader.exitcode == 0
        assert results.get(timeout=5) == key_id
        assert not public_path(installed).exists()
    finally:
        directory.chmod(0o700)
        shutil.rmtree(base)
