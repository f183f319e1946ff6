"""Key files: generating, loading and holding the keys that envelopes are sealed to.

Files live in a key directory as ``<key id>.key`` (private, mode 0600) and ``<key id>.pub``.
The key id is the first 16 hex characters of SHA-256 over the scheme's public key bytes: the
raw 32 bytes for hpke-x25519, ML-KEM-768 public key || X25519 public key (the X-Wing encoding)
for hpke-xwing, and the SubjectPublicKeyInfo DER for legacy-rsa.

File formats (PEM, so an operator can tell them apart at a glance):

- hpke-x25519, legacy-rsa: standard PKCS#8 ``PRIVATE KEY`` / SPKI ``PUBLIC KEY`` (OpenSSL reads
  them; the key type tells the scheme).
- hpke-xwing: cryptography cannot serialize the hybrid key, so ``CERTMAN HPKE-XWING PRIVATE
  KEY`` holds version byte 1 || ML-KEM-768 seed (64 bytes) || X25519 private key (32 bytes), and
  ``CERTMAN HPKE-XWING PUBLIC KEY`` holds version byte 1 || ML-KEM-768 public key || X25519
  public key.

Files are written to a temporary name and hard-linked into place, which is atomic and never
replaces an existing file: a reader never sees a half-written key, and of several processes
creating the same key exactly one wins. Messages never contain key material.

Imports only the standard library and ``cryptography``: the edge imports this module.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets
import shlex
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import mlkem, rsa, x25519

from pipeline.crypto.schemes import Scheme

__all__ = [
    "KeyFileError",
    "Keyring",
    "PrivateKey",
    "PublicKey",
    "create_key_file",
    "generate_keypair",
    "key_id_of",
    "load_or_create_pipeline_key",
    "read_key_file",
    "write_keypair",
]

PublicKeyObject = x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey | rsa.RSAPublicKey
PrivateKeyObject = x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey | rsa.RSAPrivateKey

RSA_KEY_SIZE = 2048
_RSA_PUBLIC_EXPONENT = 65537
_XWING_PRIVATE_LABEL = "CERTMAN HPKE-XWING PRIVATE KEY"
_XWING_PUBLIC_LABEL = "CERTMAN HPKE-XWING PUBLIC KEY"
_XWING_FILE_VERSION = 1
_MLKEM_SEED = 64
_MLKEM768_PUBLIC = 1184
_X25519_RAW = 32
_MAX_KEY_FILE = 64 * 1024
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_PEM_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 -]+)-----")
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 -]+)-----([A-Za-z0-9+/=\s]*)-----END \1-----")


class KeyFileError(Exception):
    """A key file or directory cannot be used; the message is one line naming it and the fix."""

    def __init__(self, path: Path | str, problem: str, fix: str) -> None:
        super().__init__(str(path), problem, fix)
        self.path = str(path)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}; {self.fix}"


class _FormatError(Exception):
    """Internal: key bytes that do not decode; turned into KeyFileError with the path."""


def key_id_of(public_bytes: bytes) -> str:
    """The key id of a public key: first 16 hex characters of SHA-256 of its bytes."""
    return hashlib.sha256(public_bytes).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKey:
    """A recipient key envelopes are sealed to (an edge's public key, or the pipeline's)."""

    key_id: str
    scheme: Scheme
    public_bytes: bytes = field(repr=False)
    key_object: PublicKeyObject = field(repr=False, compare=False)

    @classmethod
    def load(cls, path: Path) -> PublicKey:
        """Load a ``.pub`` file; if its name is a key id, it must be this key's id."""
        data = _read_file(path, private=False)
        try:
            key = cls.from_pem(data)
        except _FormatError as exc:
            _corrupt(path, str(exc))
        _check_name(path, key.key_id, ".pub")
        return key

    @classmethod
    def from_pem(cls, data: bytes) -> PublicKey:
        """Decode a public key in this module's file format (e.g. from settings)."""
        label = _pem_label(data)
        if label == _XWING_PUBLIC_LABEL:
            return _xwing_public_from_payload(_unarmor(data, label))
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError):
            raise _FormatError("not a readable PEM public key") from None
        if isinstance(key, x25519.X25519PublicKey):
            return _x25519_public(key)
        if isinstance(key, rsa.RSAPublicKey):
            return _rsa_public(key)
        raise _FormatError(f"unsupported public key type {type(key).__name__}")

    def to_pem(self) -> bytes:
        """Encode in the ``.pub`` file format."""
        key = self.key_object
        if isinstance(key, hpke.MLKEM768X25519PublicKey):
            payload = bytes([_XWING_FILE_VERSION]) + self.public_bytes
            return _armor(_XWING_PUBLIC_LABEL, payload)
        return key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


class PrivateKey:
    """A private key held in memory: an edge's key, or the pipeline's own.

    Not picklable and never printed, so that it cannot end up in a Celery message or a log.
    """

    __slots__ = ("_encode", "_public", "key_object")

    def __init__(
        self, key_object: PrivateKeyObject, public: PublicKey, encode: Callable[[], bytes]
    ) -> None:
        self.key_object = key_object
        self._public = public
        self._encode = encode

    @property
    def key_id(self) -> str:
        return self._public.key_id

    @property
    def scheme(self) -> Scheme:
        return self._public.scheme

    def public_key(self) -> PublicKey:
        return self._public

    @classmethod
    def generate(cls, scheme: Scheme = Scheme.HPKE_X25519) -> PrivateKey:
        """A fresh key of ``scheme`` (RSA keys are 2048-bit)."""
        if scheme is Scheme.HPKE_X25519:
            return _x25519_private(x25519.X25519PrivateKey.generate())
        if scheme is Scheme.HPKE_XWING:
            return _xwing_private(
                mlkem.MLKEM768PrivateKey.generate(), x25519.X25519PrivateKey.generate()
            )
        return _rsa_private(
            rsa.generate_private_key(public_exponent=_RSA_PUBLIC_EXPONENT, key_size=RSA_KEY_SIZE)
        )

    @classmethod
    def load(cls, path: Path) -> PrivateKey:
        """Load a ``.key`` file, refusing one that group or others may read."""
        data = _read_file(path, private=True)
        try:
            key = _private_from_pem(data)
        except _FormatError as exc:
            _corrupt(path, str(exc))
        _check_name(path, key.key_id, ".key")
        return key

    def private_pem(self) -> bytes:
        """The ``.key`` file contents. Handle with care: this is the secret."""
        return self._encode()

    def __repr__(self) -> str:
        return f"PrivateKey(key_id={self.key_id!r}, scheme={str(self.scheme)!r})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("PrivateKey is not picklable: key material must not leave the process")


class Keyring:
    """The private keys an edge can open envelopes with, by key id (several during rotation)."""

    def __init__(self, keys: Mapping[str, PrivateKey]) -> None:
        self._keys = dict(keys)

    @classmethod
    def of(cls, keys: Iterable[PrivateKey]) -> Keyring:
        return cls({key.key_id: key for key in keys})

    @classmethod
    def load_dir(cls, directory: Path) -> Keyring:
        """Load every ``*.key`` file in ``directory``; an absent or empty directory is an error."""
        if not directory.is_dir():
            problem = "not a directory" if directory.exists() else "no such key directory"
            raise KeyFileError(
                directory, problem, "create it (mode 700) and put the edge's .key files in it"
            )
        paths = sorted(p for p in directory.glob("*.key") if not p.name.startswith("."))
        if not paths:
            raise KeyFileError(
                directory,
                "no *.key files",
                "generate a key pair (pipeline.crypto.keys.generate_keypair) or copy the edge's "
                "keys here",
            )
        return cls.of(PrivateKey.load(path) for path in paths)

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def get(self, key_id: str) -> PrivateKey | None:
        return self._keys.get(key_id)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __iter__(self) -> Iterator[PrivateKey]:
        return iter(self._keys.values())

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"Keyring(key_ids={sorted(self._keys)!r})"


def generate_keypair(directory: Path, scheme: Scheme = Scheme.HPKE_X25519) -> str:
    """Create ``DIR/<key id>.key`` (0600) and ``DIR/<key id>.pub``; return the key id."""
    return write_keypair(directory, PrivateKey.generate(scheme))


def write_keypair(directory: Path, key: PrivateKey) -> str:
    """Write ``key`` as ``DIR/<key id>.key`` and ``.pub``, refusing to overwrite either.

    Creates ``directory`` (mode 0700) if missing. The private file is created 0600 from the
    start (``O_EXCL``), so it is never readable by others, even briefly.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_path = directory / f"{key.key_id}.key"
    public_path = directory / f"{key.key_id}.pub"
    for path in (private_path, public_path):
        if os.path.lexists(path):
            _refuse_overwrite(path)
    try:
        _write_new_file(private_path, key.private_pem(), mode=0o600)
        _write_new_file(public_path, key.public_key().to_pem(), mode=0o644)
    except FileExistsError as exc:
        _refuse_overwrite(Path(exc.filename or private_path))
    return key.key_id


def load_or_create_pipeline_key(path: Path) -> PrivateKey:
    """The pipeline's own key (hpke-x25519), created 0600 on first use.

    Safe when several processes start at once: the file appears atomically, one creator wins
    and every other process loads the winner's key.
    """
    if not os.path.lexists(path):
        key = PrivateKey.generate(Scheme.HPKE_X25519)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            _write_new_file(path, key.private_pem(), mode=0o600)
        except FileExistsError:
            pass  # another process created it first: use theirs, below
        else:
            return key
    return PrivateKey.load(path)


# --- scheme-specific construction -------------------------------------------------------------


def _x25519_public(key: x25519.X25519PublicKey) -> PublicKey:
    raw = key.public_bytes_raw()
    return PublicKey(key_id_of(raw), Scheme.HPKE_X25519, raw, key)


def _xwing_public_from_payload(payload: bytes) -> PublicKey:
    if len(payload) != 1 + _MLKEM768_PUBLIC + _X25519_RAW or payload[0] != _XWING_FILE_VERSION:
        raise _FormatError("hpke-xwing public key has the wrong length or version")
    raw = payload[1:]
    try:
        mlkem_key = mlkem.MLKEM768PublicKey.from_public_bytes(raw[:_MLKEM768_PUBLIC])
        x_key = x25519.X25519PublicKey.from_public_bytes(raw[_MLKEM768_PUBLIC:])
    except ValueError:
        raise _FormatError("hpke-xwing public key is invalid") from None
    return PublicKey(
        key_id_of(raw), Scheme.HPKE_XWING, raw, hpke.MLKEM768X25519PublicKey(mlkem_key, x_key)
    )


def _rsa_public(key: rsa.RSAPublicKey) -> PublicKey:
    if key.key_size < RSA_KEY_SIZE:
        raise _FormatError(f"RSA key of {key.key_size} bits is below {RSA_KEY_SIZE}")
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return PublicKey(key_id_of(der), Scheme.LEGACY_RSA, der, key)


def _pkcs8(key: x25519.X25519PrivateKey | rsa.RSAPrivateKey) -> Callable[[], bytes]:
    def encode() -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    return encode


def _x25519_private(key: x25519.X25519PrivateKey) -> PrivateKey:
    return PrivateKey(key, _x25519_public(key.public_key()), _pkcs8(key))


def _xwing_private(
    mlkem_key: mlkem.MLKEM768PrivateKey, x_key: x25519.X25519PrivateKey
) -> PrivateKey:
    raw = mlkem_key.public_key().public_bytes_raw() + x_key.public_key().public_bytes_raw()
    public = _xwing_public_from_payload(bytes([_XWING_FILE_VERSION]) + raw)

    def encode() -> bytes:
        secret = mlkem_key.private_bytes_raw() + x_key.private_bytes_raw()
        return _armor(_XWING_PRIVATE_LABEL, bytes([_XWING_FILE_VERSION]) + secret)

    return PrivateKey(hpke.MLKEM768X25519PrivateKey(mlkem_key, x_key), public, encode)


def _rsa_private(key: rsa.RSAPrivateKey) -> PrivateKey:
    return PrivateKey(key, _rsa_public(key.public_key()), _pkcs8(key))


def _private_from_pem(data: bytes) -> PrivateKey:
    label = _pem_label(data)
    if label == _XWING_PRIVATE_LABEL:
        return _xwing_private_from_payload(_unarmor(data, label))
    if label == "ENCRYPTED PRIVATE KEY":
        raise _FormatError("encrypted key files are not supported")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise _FormatError("not a readable PEM private key") from None
    if isinstance(key, x25519.X25519PrivateKey):
        return _x25519_private(key)
    if isinstance(key, rsa.RSAPrivateKey):
        return _rsa_private(key)
    raise _FormatError(f"unsupported private key type {type(key).__name__}")


def _xwing_private_from_payload(payload: bytes) -> PrivateKey:
    if len(payload) != 1 + _MLKEM_SEED + _X25519_RAW or payload[0] != _XWING_FILE_VERSION:
        raise _FormatError("hpke-xwing private key has the wrong length or version")
    try:
        mlkem_key = mlkem.MLKEM768PrivateKey.from_seed_bytes(payload[1 : 1 + _MLKEM_SEED])
        x_key = x25519.X25519PrivateKey.from_private_bytes(payload[1 + _MLKEM_SEED :])
    except ValueError:
        raise _FormatError("hpke-xwing private key is invalid") from None
    return _xwing_private(mlkem_key, x_key)


# --- PEM armor for the formats cryptography cannot write --------------------------------------


def _armor(label: str, payload: bytes) -> bytes:
    body = base64.b64encode(payload)
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"\n".join(
        [f"-----BEGIN {label}-----".encode(), *lines, f"-----END {label}-----".encode(), b""]
    )


def _pem_label(data: bytes) -> str:
    match = _PEM_BEGIN.search(data)
    if match is None:
        raise _FormatError("no PEM block")
    return match.group(1).decode("ascii")


def _unarmor(data: bytes, label: str) -> bytes:
    match = _PEM_BLOCK.search(data)
    if match is None or match.group(1).decode("ascii") != label:
        raise _FormatError(f"damaged {label} block")
    try:
        return base64.b64decode(b"".join(match.group(2).split()), validate=True)
    except binascii.Error:
        raise _FormatError(f"damaged {label} block") from None


# --- files ----------------------------------------------------------------------------------------


def read_key_file(path: Path, *, private: bool) -> bytes:
    """A key file's bytes, checked as this module checks its own (other key kinds use it)."""
    return _read_file(path, private=private)


def create_key_file(path: Path, data: bytes, *, mode: int) -> None:
    """Create a key file atomically, never replacing one (FileExistsError if it exists)."""
    _write_new_file(path, data, mode=mode)


def _read_file(path: Path, *, private: bool) -> bytes:
    """Read a key file; a private one must be a regular file closed to group and others.

    The mode is checked on the open descriptor, so the file checked is the file read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyFileError(
            path, "no such key file", "check the path or generate a key pair"
        ) from None
    except IsADirectoryError:
        raise KeyFileError(path, "is a directory, not a key file", "remove or rename it") from None
    except PermissionError:
        raise KeyFileError(
            path, "permission denied", "run as the key's owner or fix the file's owner"
        ) from None
    with os.fdopen(fd, "rb") as file:
        status = os.fstat(file.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise KeyFileError(path, "not a regular file", "replace it with the key file")
        if private and status.st_mode & 0o077:
            mode = stat.S_IMODE(status.st_mode)
            raise KeyFileError(
                path,
                f"private key is accessible to group or others (mode {mode:04o})",
                f"run: chmod 600 {shlex.quote(str(path))}",
            )
        data = file.read(_MAX_KEY_FILE + 1)
    if len(data) > _MAX_KEY_FILE:
        _corrupt(path, "far too large for a key file")
    return data


def _write_new_file(path: Path, data: bytes, *, mode: int) -> None:
    """Create ``path`` with ``data``, atomically, never replacing an existing file.

    Raises FileExistsError if it exists. The content is written and synced under a temporary
    name created with ``mode`` (so a private file is 0600 from its first byte), then hard-linked
    into place: ``link`` fails rather than overwrite, and the name appears only when complete.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(temporary, path)
    finally:
        os.unlink(temporary)
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # Without this, a crash right after creation can lose the new name (and with the pipeline
    # key, every secret sealed to it).
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_name(path: Path, key_id: str, suffix: str) -> None:
    """A file named like a key id must hold that key; other names (``edge-eu.pub``) are free."""
    if _KEY_ID.fullmatch(path.stem) and path.stem != key_id:
        raise KeyFileError(
            path,
            f"holds key {key_id}, not the key its name says",
            f"rename it to {key_id}{suffix} or restore the right file",
        )


def _corrupt(path: Path, reason: str) -> NoReturn:
    raise KeyFileError(
        path,
        f"not a usable key file ({reason})",
        "restore it from backup or generate a new key pair",
    )


def _refuse_overwrite(path: Path) -> NoReturn:
    raise KeyFileError(
        path, "already exists", "refusing to overwrite a key file; move it away first"
    )
