"""Signed distribution: an edge serves only what the pipeline signed.

Write access to Redis is not the pipeline's authority: whoever can write Redis could otherwise
point a customer's name at another upstream, serve a certificate of their own CA (sealed to the
edge's *public* key, which HPKE's base mode does not tell from the pipeline's), or answer
HTTP-01 challenges of their own ACME account. So the pipeline signs, with an Ed25519 key only
it holds, everything an edge acts on, and an edge verifies it against the public halves it
trusts (several at once, so the key can be rotated).

What is signed (:class:`SignedSite`): the domain, its names, the upstream, the SHA-256 of the
chain and envelope (so the blob an edge fetches later is bound to this statement), not_after,
the serial, and a version that only grows for the domain; or, for a removal, a tombstone with
the domain and a version. And (:class:`SignedChallenge`) each HTTP-01 answer, with its expiry.

The message is a canonical JSON array behind a domain-separation prefix, so no signature of
one kind can be replayed as another.

Standard library and ``cryptography`` only: the edge imports this module.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from pipeline.crypto.keys import KeyFileError, create_key_file, key_id_of, read_key_file

__all__ = [
    "BadSignature",
    "SignedChallenge",
    "SignedSite",
    "SigningKey",
    "TrustedSigners",
    "content_digest",
    "next_version",
]

_PREFIX = b"certman signed distribution v1\n"


class BadSignature(ValueError):
    """A statement that is unsigned, signed by a key not trusted, altered, or malformed.

    ``kind`` (for metrics): "unsigned", "untrusted_signer", "bad_signature", "expired" or
    "malformed".
    """

    def __init__(self, message: str, kind: str = "malformed") -> None:
        super().__init__(message)
        self.kind = kind


def content_digest(chain_pem: str | None, envelope: str | None) -> str | None:
    """SHA-256 (hex) of what a site's blob carries; None when it has no certificate."""
    if not (chain_pem and envelope):
        return None
    return hashlib.sha256(f"{chain_pem}\x00{envelope}".encode()).hexdigest()


def next_version(current: int | None) -> int:
    """A version above ``current`` for the same domain: microseconds since the epoch, so it
    also grows across a Redis that was flushed or restored from an older backup."""
    now = time.time_ns() // 1000
    return max(now, (current or 0) + 1)


def _encode(fields: list[Any]) -> bytes:
    return _PREFIX + json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class SignedSite:
    """Everything an edge acts on for one domain at one version; ``removed`` is a tombstone."""

    domain: str
    version: int
    names: tuple[str, ...] = ()
    upstream: str | None = None
    digest: str | None = None
    not_after: int | None = None
    serial: str | None = None
    removed: bool = False
    signer: str = ""
    signature: str = ""

    def message(self) -> bytes:
        kind = "tombstone" if self.removed else "site"
        return _encode(
            [kind, self.domain, self.version, list(self.names), self.upstream, self.digest,
             self.not_after, self.serial]
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "version": self.version,
            "names": list(self.names),
            "upstream": self.upstream,
            "digest": self.digest,
            "not_after": self.not_after,
            "serial": self.serial,
            "removed": self.removed,
            "signer": self.signer,
            "signature": self.signature,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SignedSite:
        """Parse without trusting anything; raises BadSignature for a malformed statement."""
        try:
            names = tuple(str(n) for n in data.get("names") or ())
            site = cls(
                domain=_str(data["domain"]),
                version=_int(data["version"]),
                names=names,
                upstream=_opt_str(data.get("upstream")),
                digest=_opt_str(data.get("digest")),
                not_after=_opt_int(data.get("not_after")),
                serial=_opt_str(data.get("serial")),
                removed=data.get("removed") is True,
                signer=_str(data.get("signer", "")),
                signature=_str(data.get("signature", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadSignature(f"malformed signed statement: {exc}") from None
        return site

    @classmethod
    def from_json(cls, raw: str | bytes) -> SignedSite:
        try:
            data = json.loads(raw)
        except ValueError:
            raise BadSignature("signed statement is not JSON") from None
        if not isinstance(data, dict):
            raise BadSignature("signed statement is not a JSON object")
        return cls.from_dict(data)


@dataclass(frozen=True)
class SignedChallenge:
    """An HTTP-01 answer the pipeline published: token, key authorization, and until when.

    Signed one by one rather than checked against a list of account thumbprints: the
    self-check's probe is not an ACME key authorization at all, a list would have to be kept
    in step with every account (one per issuer), and an expiry inside the signature means a
    copy replayed later is refused.
    """

    token: str
    key_authorization: str
    expires: int  # epoch seconds
    signer: str = ""
    signature: str = ""

    def message(self) -> bytes:
        return _encode(["challenge", self.token, self.key_authorization, self.expires])

    def to_json(self) -> str:
        return json.dumps(
            {"token": self.token, "key_authorization": self.key_authorization,
             "expires": self.expires, "signer": self.signer, "signature": self.signature},
            separators=(",", ":"),
        )  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SignedChallenge:
        try:
            return cls(
                token=_str(data["token"]),
                key_authorization=_str(data["key_authorization"]),
                expires=_int(data["expires"]),
                signer=_str(data.get("signer", "")),
                signature=_str(data.get("signature", "")),
            )
        except (KeyError, TypeError) as exc:
            raise BadSignature(f"malformed signed challenge: {exc}") from None

    @classmethod
    def from_json(cls, raw: str | bytes) -> SignedChallenge:
        try:
            data = json.loads(raw)
        except ValueError:
            raise BadSignature("signed challenge is not JSON") from None
        if not isinstance(data, dict):
            raise BadSignature("signed challenge is not a JSON object")
        return cls.from_dict(data)


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _opt_str(value: object) -> str | None:
    return None if value is None else _str(value)


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError("expected an integer")
    return value


def _opt_int(value: object) -> int | None:
    return None if value is None else _int(value)


class SigningKey:
    """The pipeline's distribution signing key (Ed25519). Never on an edge."""

    def __init__(self, key: ed25519.Ed25519PrivateKey) -> None:
        self._key = key
        self.public_bytes = key.public_key().public_bytes_raw()
        self.key_id = key_id_of(self.public_bytes)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        data = read_key_file(path, private=True)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except ValueError:
            raise KeyFileError(
                path, "not a PEM private key", "restore it or generate a signing key"
            ) from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise KeyFileError(
                path, "not an Ed25519 signing key", "certman keys generate --purpose signing"
            )
        return cls(key)

    def write(self, directory: Path) -> str:
        """``DIR/<key id>.key`` (0600) and ``DIR/<key id>.pub``; refuses to overwrite."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        private = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        public = self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        for name, data, mode in ((".key", private, 0o600), (".pub", public, 0o644)):
            path = directory / f"{self.key_id}{name}"
            try:
                create_key_file(path, data, mode=mode)
            except FileExistsError:
                raise KeyFileError(
                    path, "already exists", "refusing to overwrite a key file; move it away first"
                ) from None
        return self.key_id

    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self._key.public_key()

    def sign_site(self, site: SignedSite) -> SignedSite:
        return _replace_signature(site, self.key_id, self._sign(site.message()))

    def sign_challenge(self, challenge: SignedChallenge) -> SignedChallenge:
        signature = self._sign(challenge.message())
        return SignedChallenge(
            challenge.token, challenge.key_authorization, challenge.expires, self.key_id, signature
        )

    def _sign(self, message: bytes) -> str:
        return base64.urlsafe_b64encode(self._key.sign(message)).decode().rstrip("=")

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r})"


def _replace_signature(site: SignedSite, signer: str, signature: str) -> SignedSite:
    data = site.to_dict()
    data.update(signer=signer, signature=signature)
    return SignedSite.from_dict(data)


class TrustedSigners:
    """The public halves an edge accepts (``CERTMAN_EDGE_TRUSTED_SIGNERS``): a ``.pub`` file,
    a file of several PEM public keys, or a directory of ``.pub`` files."""

    def __init__(self, keys: Mapping[str, ed25519.Ed25519PublicKey]) -> None:
        self._keys = dict(keys)

    @classmethod
    def of(cls, public_keys: Iterable[ed25519.Ed25519PublicKey]) -> TrustedSigners:
        return cls({key_id_of(k.public_bytes_raw()): k for k in public_keys})

    @classmethod
    def load(cls, path: Path) -> TrustedSigners:
        files = sorted(path.glob("*.pub")) if path.is_dir() else [path]
        keys: dict[str, ed25519.Ed25519PublicKey] = {}
        for file in files:
            for key in _public_keys(file):
                keys[key_id_of(key.public_bytes_raw())] = key
        if not keys:
            raise KeyFileError(
                path,
                "holds no Ed25519 public key",
                "copy the pipeline's signing .pub file here (certman keys generate --purpose "
                "signing)",
            )
        return cls(keys)

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def verify_site(self, site: SignedSite) -> None:
        self._verify(site.signer, site.signature, site.message(), f"record of {site.domain}")

    def verify_challenge(self, challenge: SignedChallenge, now: float) -> None:
        what = f"challenge {challenge.token[:12]}"
        self._verify(challenge.signer, challenge.signature, challenge.message(), what)
        if challenge.expires < now:
            raise BadSignature(f"{what} expired", "expired")

    def _verify(self, signer: str, signature: str, message: bytes, what: str) -> None:
        if not signer or not signature:
            raise BadSignature(f"{what} is unsigned", "unsigned")
        key = self._keys.get(signer)
        if key is None:
            raise BadSignature(
                f"{what} is signed by key {signer[:16]!r}, which is not trusted", "untrusted_signer"
            )
        try:
            raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
            key.verify(raw, message)
        except (InvalidSignature, binascii.Error, ValueError):
            raise BadSignature(f"{what}: signature does not verify", "bad_signature") from None

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._keys))


def _public_keys(path: Path) -> list[ed25519.Ed25519PublicKey]:
    data = read_key_file(path, private=False)
    found = []
    for block in data.split(b"-----END PUBLIC KEY-----"):
        start = block.find(b"-----BEGIN PUBLIC KEY-----")
        if start < 0:
            continue
        pem = block[start:] + b"-----END PUBLIC KEY-----\n"
        try:
            key = serialization.load_pem_public_key(pem)
        except ValueError:
            raise KeyFileError(path, "holds a PEM block that does not load", "fix it") from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise KeyFileError(
                path, "holds a public key that is not Ed25519", "use the signing key's .pub"
            )
        found.append(key)
    return found
