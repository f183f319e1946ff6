"""The pipeline's distribution signing key (:mod:`pipeline.crypto.signing`): found, or made
on first use.

``CERTMAN_SIGNING_KEY`` (default ``<data dir>/signing.key``) names the private key, 0600; its
public half sits beside it with the suffix ``.pub``, which is the file edges are given
(``CERTMAN_EDGE_TRUSTED_SIGNERS``). Several workers starting at once on a fresh data directory
end up with one key: the key file appears atomically and only one creator wins.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from pipeline.crypto.keys import KeyFileError, create_key_file, read_key_file
from pipeline.crypto.signing import SigningKey

__all__ = [
    "load_or_create_signing_key",
    "peek_signing_key",
    "public_path",
]


def public_path(path: Path) -> Path:
    """Where the public half of the key at ``path`` lives: ``signing.key`` -> ``signing.pub``."""
    return path.with_suffix(".pub")


def _public_pem(key: SigningKey) -> bytes:
    public = ed25519.Ed25519PublicKey.from_public_bytes(key.public_bytes)
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _private_pem(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _ensure_public(path: Path, key: SigningKey) -> None:
    """Write the .pub beside the key if it is missing; refuse one that holds another key, which
    copied to the edges would have them refuse everything this key signs."""
    pub = public_path(path)
    expected = _public_pem(key)
    try:
        create_key_file(pub, expected, mode=0o644)
        return
    except FileExistsError:
        pass
    except OSError:
        # A key installed without its .pub in a directory the process may not write (systemd's
        # ProtectSystem=strict makes /etc read-only): the .pub is only a convenience here.
        return
    found = read_key_file(pub, private=False)
    try:
        loaded = serialization.load_pem_public_key(found)
    except ValueError:
        loaded = None
    same = isinstance(loaded, ed25519.Ed25519PublicKey) and (
        loaded.public_bytes_raw() == key.public_bytes
    )
    if not same:
        raise KeyFileError(
            pub,
            f"is not the public half of signing key {key.key_id}",
            "move it away; it is written again from the key on the next start",
        )


def load_or_create_signing_key(path: Path) -> SigningKey:
    """The signing key at ``path``, created (0600, with its .pub) when there is none.

    As :func:`pipeline.crypto.keys.load_or_create_pipeline_key`: of several processes creating it at
    once one wins and the others load the winner's key.
    """
    if not os.path.lexists(path):
        private = ed25519.Ed25519PrivateKey.generate()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Another process may have created it first: then use theirs, below.
        with contextlib.suppress(FileExistsError):
            create_key_file(path, _private_pem(private), mode=0o600)
    key = SigningKey.load(path)
    _ensure_public(path, key)
    return key


def peek_signing_key(path: Path) -> SigningKey | None:
    """The signing key at ``path`` if there is one; never creates it (for reports)."""
    if not os.path.lexists(path):
        return None
    return SigningKey.load(path)
