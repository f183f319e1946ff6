"""Key files: generation, permissions, loading errors, keyrings and the pipeline's own key."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import stat
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from pipeline.crypto.envelope import Scheme, open_envelope, seal
from pipeline.crypto.keys import (
    KeyFileError,
    Keyring,
    PrivateKey,
    PublicKey,
    generate_keypair,
    load_or_create_pipeline_key,
    write_keypair,
)

SCHEMES = list(Scheme)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _one_line(error: KeyFileError, path: Path) -> str:
    message = str(error)
    assert "\n" not in message
    assert str(path) in message
    return message


@pytest.mark.parametrize("scheme", SCHEMES)
def test_generate_writes_a_private_0600_and_a_public_file(tmp_path: Path, scheme: Scheme) -> None:
    directory = tmp_path / "keys"
    key_id = generate_keypair(directory, scheme)
    assert _mode(directory) == 0o700
    assert _mode(directory / f"{key_id}.key") == 0o600
    private = PrivateKey.load(directory / f"{key_id}.key")
    public = PublicKey.load(directory / f"{key_id}.pub")
    assert (private.key_id, private.scheme) == (key_id, scheme)
    assert public == private.public_key()
    assert public.key_id == hashlib.sha256(public.public_bytes).hexdigest()[:16]
    assert sorted(p.name for p in directory.iterdir()) == [f"{key_id}.key", f"{key_id}.pub"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_loaded_key_opens_what_its_public_file_sealed(tmp_path: Path, scheme: Scheme) -> None:
    key_id = generate_keypair(tmp_path, scheme)
    envelope = seal(b"k", PublicKey.load(tmp_path / f"{key_id}.pub"), domain="a.test", binding=b"")
    keyring = Keyring.load_dir(tmp_path)
    assert open_envelope(envelope, keyring, domain="a.test", binding=b"") == b"k"


def test_x25519_key_id_is_the_hash_of_the_raw_public_key() -> None:
    key = PrivateKey.generate(Scheme.HPKE_X25519)
    public = key.public_key().key_object
    assert isinstance(public, x25519.X25519PublicKey)
    raw = public.public_bytes_raw()
    assert key.key_id == hashlib.sha256(raw).hexdigest()[:16]


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    key = PrivateKey.generate()
    write_keypair(tmp_path, key)
    before = (tmp_path / f"{key.key_id}.key").read_bytes()
    with pytest.raises(KeyFileError, match="already exists") as caught:
        write_keypair(tmp_path, key)
    _one_line(caught.value, tmp_path / f"{key.key_id}.key")
    assert (tmp_path / f"{key.key_id}.key").read_bytes() == before


def test_refuses_when_only_the_public_file_exists(tmp_path: Path) -> None:
    key = PrivateKey.generate()
    (tmp_path / f"{key.key_id}.pub").write_bytes(b"someone else's")
    with pytest.raises(KeyFileError, match="already exists"):
        write_keypair(tmp_path, key)
    assert not (tmp_path / f"{key.key_id}.key").exists()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o620])
def test_private_key_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    key_id = generate_keypair(tmp_path)
    path = tmp_path / f"{key_id}.key"
    path.chmod(mode)
    with pytest.raises(KeyFileError) as caught:
        PrivateKey.load(path)
    assert f"chmod 600 {path}" in _one_line(caught.value, path)
    with pytest.raises(KeyFileError, match="chmod 600"):
        Keyring.load_dir(tmp_path)


def test_owner_only_read_is_accepted(tmp_path: Path) -> None:
    key_id = generate_keypair(tmp_path)
    (tmp_path / f"{key_id}.key").chmod(0o400)
    assert PrivateKey.load(tmp_path / f"{key_id}.key").key_id == key_id


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="no such key directory") as caught:
        Keyring.load_dir(tmp_path / "absent")
    _one_line(caught.value, tmp_path / "absent")


def test_directory_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(KeyFileError, match="not a directory"):
        Keyring.load_dir(tmp_path / "file")


def test_empty_directory_and_public_files_only(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"no \*\.key files") as caught:
        Keyring.load_dir(tmp_path)
    _one_line(caught.value, tmp_path)
    key_id = generate_keypair(tmp_path)
    (tmp_path / f"{key_id}.key").unlink()
    with pytest.raises(KeyFileError, match=r"no \*\.key files"):
        Keyring.load_dir(tmp_path)


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="no such key file"):
        PrivateKey.load(tmp_path / "absent.key")
    with pytest.raises(KeyFileError, match="no such key file"):
        PublicKey.load(tmp_path / "absent.pub")


def _corruptions(text: bytes) -> list[bytes]:
    middle = len(text) // 2
    return [
        b"",
        b"garbage\n",
        text[:middle],
        text[:middle] + b"!" + text[middle + 1 :],
        text.replace(b"PRIVATE KEY", b"PUBLIC KEY").replace(b"PUBLIC KEY", b"PRIVATE KEY", 1),
        b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        b"\xff\xfe" * 40,
    ]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_corrupt_private_key_file(tmp_path: Path, scheme: Scheme) -> None:
    key = PrivateKey.generate(scheme)
    secret = key.private_pem()
    for number, content in enumerate(_corruptions(secret)):
        path = tmp_path / f"broken{number}.key"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, content)
        os.close(fd)
        with pytest.raises(KeyFileError, match="not a usable key file") as caught:
            PrivateKey.load(path)
        message = _one_line(caught.value, path)
        assert secret[40:80].decode() not in message


def test_xwing_file_of_wrong_length_is_corrupt(tmp_path: Path) -> None:
    lines = PrivateKey.generate(Scheme.HPKE_XWING).private_pem().splitlines()
    path = tmp_path / "short.key"
    path.write_bytes(b"\n".join([lines[0], *lines[2:]]))
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="wrong length"):
        PrivateKey.load(path)


def test_corrupt_key_in_directory_names_the_file(tmp_path: Path) -> None:
    generate_keypair(tmp_path)
    bad = tmp_path / "0123456789abcdef.key"
    bad.write_bytes(b"not a key")
    bad.chmod(0o600)
    with pytest.raises(KeyFileError, match="not a usable key file") as caught:
        Keyring.load_dir(tmp_path)
    _one_line(caught.value, bad)


@pytest.mark.parametrize("suffix", [".pub", ".key"])
def test_file_whose_name_is_another_key_id_is_refused(tmp_path: Path, suffix: str) -> None:
    key_id = generate_keypair(tmp_path)
    wrong = tmp_path / f"{'0' * 16}{suffix}"
    os.link(tmp_path / f"{key_id}{suffix}", wrong)
    loader = PublicKey.load if suffix == ".pub" else PrivateKey.load
    with pytest.raises(KeyFileError, match=f"rename it to {key_id}{suffix}") as caught:
        loader(wrong)
    _one_line(caught.value, wrong)


def test_descriptive_names_are_allowed(tmp_path: Path) -> None:
    key_id = generate_keypair(tmp_path)
    (tmp_path / "edge-eu.pub").write_bytes((tmp_path / f"{key_id}.pub").read_bytes())
    assert PublicKey.load(tmp_path / "edge-eu.pub").key_id == key_id


def test_public_key_pem_round_trip() -> None:
    for scheme in SCHEMES:
        public = PrivateKey.generate(scheme).public_key()
        assert PublicKey.from_pem(public.to_pem()) == public


def test_keyring_loads_every_key_for_rotation(tmp_path: Path) -> None:
    ids = {generate_keypair(tmp_path), generate_keypair(tmp_path, Scheme.HPKE_XWING)}
    keyring = Keyring.load_dir(tmp_path)
    assert keyring.key_ids == frozenset(ids)
    assert all(keyring.get(key_id) is not None for key_id in ids)
    assert keyring.get("0" * 16) is None
    assert len(keyring) == 2


def test_private_key_is_never_printed_or_pickled() -> None:
    key = PrivateKey.generate()
    assert repr(key) == f"PrivateKey(key_id={key.key_id!r}, scheme='hpke-x25519')"
    assert "PRIVATE" not in repr(Keyring.of([key]))
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(key)


def test_pipeline_key_is_created_0600_then_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "pipeline.key"
    created = load_or_create_pipeline_key(path)
    assert created.scheme is Scheme.HPKE_X25519
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert load_or_create_pipeline_key(path).key_id == created.key_id
    assert os.listdir(path.parent) == ["pipeline.key"]


def test_pipeline_key_open_to_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.key"
    load_or_create_pipeline_key(path)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match=f"chmod 600 {path}"):
        load_or_create_pipeline_key(path)


def _race_for_pipeline_key(path: Path, start: Barrier, results: Queue[str]) -> None:
    start.wait()
    results.put(load_or_create_pipeline_key(path).key_id)


@pytest.mark.parametrize("attempt", range(3))
def test_pipeline_key_created_concurrently_is_one_key(tmp_path: Path, attempt: int) -> None:
    context = multiprocessing.get_context("fork")
    racers = 8
    path = tmp_path / "pipeline.key"
    start = context.Barrier(racers)
    results: Queue[str] = context.Queue()
    processes = [
        context.Process(target=_race_for_pipeline_key, args=(path, start, results))
        for _ in range(racers)
    ]
    for process in processes:
        process.start()
    key_ids = [results.get(timeout=30) for _ in processes]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    results.close()
    results.join_thread()
    assert len(set(key_ids)) == 1
    assert PrivateKey.load(path).key_id == key_ids[0]
    assert _mode(path) == 0o600
    assert os.listdir(tmp_path) == ["pipeline.key"]
