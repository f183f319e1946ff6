"""The sealed-key envelope: the one place that knows its byte format.

A certificate's private key is sealed in the pipeline to an edge's public key and opened only
in the edge's memory. An envelope is self-describing::

    magic    3 bytes   09 e3 6f  (so every text envelope starts with "CeNv")
    version  1 byte    1
    scheme   1 byte    1 hpke-x25519, 2 hpke-xwing, 3 legacy-rsa
    key id   8 bytes   the recipient key id (16 hex characters) as raw bytes
    body     rest      scheme-specific (below)

    hpke-*       enc || AES-256-GCM ciphertext || tag   (RFC 9180 base mode, single shot)
    legacy-rsa   RSA-OAEP-SHA256(aes key) || 12-byte nonce || AES-256-GCM ciphertext || tag

Every scheme authenticates ``info`` = header || SHA-256(context), where the context is the
length-prefixed domain and binding. HPKE takes it as ``info``; legacy-rsa takes it both as the
OAEP label and as the AES-GCM associated data. So an envelope copied to another domain's row,
paired with another certificate (``binding``), or with any header byte changed fails to open.

Errors, all carrying the domain and a reason and never key material::

    EnvelopeError
    ├── MalformedEnvelope   not an envelope we can parse (truncated, bad magic/version/scheme/text)
    ├── UnknownKey          sealed to a key id the keyring does not hold
    └── EnvelopeTampered    authentication failed (modified, copied, wrong binding)

This module imports only the standard library and ``cryptography``: the edge imports it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# Re-exported: the envelope's scheme is part of its format (``envelope.Scheme``).
from pipeline.crypto.schemes import Scheme

if TYPE_CHECKING:
    from pipeline.crypto.keys import Keyring, PrivateKey, PublicKey

__all__ = [
    "FORMAT_VERSION",
    "EnvelopeError",
    "EnvelopeHeader",
    "EnvelopeTampered",
    "MalformedEnvelope",
    "Scheme",
    "UnknownKey",
    "from_text",
    "normalize_domain",
    "open_envelope",
    "read_header",
    "seal",
    "spki_fingerprint",
    "to_text",
]


class EnvelopeError(Exception):
    """An envelope could not be opened or parsed; names the domain and why."""

    def __init__(self, domain: str, reason: str) -> None:
        # Both go to args so that the exception survives pickling (Celery results, logs).
        super().__init__(domain, reason)
        self.domain = domain
        self.reason = reason

    def __str__(self) -> str:
        return f"envelope for {self.domain}: {self.reason}"


class MalformedEnvelope(EnvelopeError):
    """Truncated, bad magic, unsupported version, unknown scheme or bad text encoding."""


class UnknownKey(EnvelopeError):
    """Sealed to a key id that the keyring does not hold."""


class EnvelopeTampered(EnvelopeError):
    """Decryption or authentication failed: modified, or opened with another domain/binding."""


@dataclass(frozen=True)
class EnvelopeHeader:
    """The clear, authenticated prefix of an envelope."""

    version: int
    scheme: Scheme
    key_id: str


FORMAT_VERSION = 1
_MAGIC = b"\x09\xe3\x6f"
_KEY_ID_BYTES = 8
_HEADER = struct.Struct(f"!3sBB{_KEY_ID_BYTES}s")
HEADER_LENGTH = _HEADER.size

_SCHEME_CODES: dict[Scheme, int] = {
    Scheme.HPKE_X25519: 1,
    Scheme.HPKE_XWING: 2,
    Scheme.LEGACY_RSA: 3,
}
_SCHEMES_BY_CODE = {code: scheme for scheme, code in _SCHEME_CODES.items()}

_HPKE_SUITES: dict[Scheme, hpke.Suite] = {
    Scheme.HPKE_X25519: hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    Scheme.HPKE_XWING: hpke.Suite(
        hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM
    ),
}
_HPKE_ENC_LENGTHS: dict[Scheme, int] = {
    Scheme.HPKE_X25519: hpke.KEM.X25519.enc_length(),
    Scheme.HPKE_XWING: hpke.KEM.MLKEM768_X25519.enc_length(),
}
_GCM_TAG = 16
_GCM_NONCE = 12
_CONTEXT_LABEL = b"certman envelope context v1\x00"
_TEXT_ALPHABET = re.compile(r"[A-Za-z0-9_-]*")


def seal(plaintext: bytes, recipient: PublicKey, *, domain: str, binding: bytes) -> bytes:
    """Encrypt ``plaintext`` to ``recipient`` so that it opens only for this domain and binding.

    ``binding`` is normally :func:`spki_fingerprint` of the certificate whose private key is
    being sealed, so that a key cannot be paired with another certificate of the same domain.
    """
    code = _SCHEME_CODES[recipient.scheme]
    header = _HEADER.pack(_MAGIC, FORMAT_VERSION, code, bytes.fromhex(recipient.key_id))
    info = _info(header, domain, binding)
    key = recipient.key_object
    if isinstance(key, rsa.RSAPublicKey):
        return header + _legacy_seal(plaintext, key, info)
    return header + _HPKE_SUITES[recipient.scheme].encrypt(plaintext, key, info=info)


def open_envelope(envelope: bytes, keyring: Keyring, *, domain: str, binding: bytes) -> bytes:
    """Decrypt an envelope sealed by :func:`seal` with the same domain and binding.

    Raises :class:`MalformedEnvelope`, :class:`UnknownKey` or :class:`EnvelopeTampered`; no
    exception from ``cryptography`` escapes.
    """
    header = read_header(envelope, domain=domain)
    body = memoryview(envelope)[HEADER_LENGTH:]
    private_key = keyring.get(header.key_id)
    if private_key is None:
        raise UnknownKey(domain, f"sealed to key {header.key_id}, which this keyring does not hold")
    if private_key.scheme is not header.scheme:
        # Key ids are hashes of scheme-specific public keys: a mismatch means the scheme byte
        # was altered after sealing.
        raise EnvelopeTampered(
            domain,
            f"scheme {header.scheme} does not match key {header.key_id} ({private_key.scheme})",
        )
    _check_body_length(body, header.scheme, private_key, domain)
    info = _info(bytes(envelope[:HEADER_LENGTH]), domain, binding)
    try:
        return _decrypt(body, header.scheme, private_key, info)
    except (InvalidTag, ValueError):
        # cryptography reports every failure as InvalidTag or ValueError without detail; the
        # original exception adds nothing useful, so it is not chained.
        raise EnvelopeTampered(
            domain, f"authentication failed ({header.scheme}, key {header.key_id})"
        ) from None


def read_header(envelope: bytes, *, domain: str = "?") -> EnvelopeHeader:
    """Parse the clear header (format version, scheme, key id) without decrypting."""
    if len(envelope) < HEADER_LENGTH:
        raise MalformedEnvelope(
            domain, f"truncated: {len(envelope)} bytes, the header alone is {HEADER_LENGTH}"
        )
    magic, version, code, key_id = _HEADER.unpack_from(envelope)
    if magic != _MAGIC:
        raise MalformedEnvelope(domain, "not a certman envelope (bad magic)")
    if version != FORMAT_VERSION:
        raise MalformedEnvelope(
            domain, f"unsupported format version {version} (this build reads {FORMAT_VERSION})"
        )
    scheme = _SCHEMES_BY_CODE.get(code)
    if scheme is None:
        raise MalformedEnvelope(domain, f"unknown scheme code {code}")
    return EnvelopeHeader(version=version, scheme=scheme, key_id=key_id.hex())


def to_text(envelope: bytes) -> str:
    """Compact text form for JSON and Redis: base64url without padding."""
    return base64.urlsafe_b64encode(envelope).rstrip(b"=").decode("ascii")


def from_text(text: str, *, domain: str = "?") -> bytes:
    """Inverse of :func:`to_text`; raises :class:`MalformedEnvelope` on any other input."""
    # urlsafe_b64decode silently drops characters outside the alphabet: check first.
    if not isinstance(text, str) or not _TEXT_ALPHABET.fullmatch(text) or len(text) % 4 == 1:
        raise MalformedEnvelope(domain, "text is not unpadded base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise MalformedEnvelope(domain, "text is not unpadded base64url") from None


def spki_fingerprint(public_key: CertificatePublicKeyTypes) -> bytes:
    """SHA-256 of the SubjectPublicKeyInfo DER of a certificate's public key: the ``binding``."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


def normalize_domain(domain: str) -> str:
    """The form of ``domain`` that is bound into envelopes: lower case, no trailing dot.

    DNS names are case-insensitive and SNI may arrive in any case, so sealing and opening must
    agree regardless of the caller's spelling.
    """
    return domain.rstrip(".").lower()


def _info(header: bytes, domain: str, binding: bytes) -> bytes:
    """The context every scheme authenticates: the header and a digest of domain and binding.

    Hashing keeps ``info`` at a fixed 45 bytes whatever the binding's length, small enough for
    any HPKE implementation another edge might be written with.
    """
    name = normalize_domain(domain).encode("utf-8")
    context = hashlib.sha256(_CONTEXT_LABEL)
    context.update(struct.pack("!H", len(name)) + name)
    context.update(struct.pack("!I", len(binding)) + bytes(binding))
    return header + context.digest()


def _check_body_length(
    body: memoryview, scheme: Scheme, private_key: PrivateKey, domain: str
) -> None:
    """Reject a body too short to hold even an empty plaintext, before any decryption."""
    key = private_key.key_object
    if isinstance(key, rsa.RSAPrivateKey):
        minimum = key.key_size // 8 + _GCM_NONCE + _GCM_TAG
    else:
        minimum = _HPKE_ENC_LENGTHS[scheme] + _GCM_TAG
    if len(body) < minimum:
        raise MalformedEnvelope(
            domain, f"truncated: {scheme} body is {len(body)} bytes, at least {minimum} needed"
        )


def _decrypt(body: memoryview, scheme: Scheme, private_key: PrivateKey, info: bytes) -> bytes:
    key = private_key.key_object
    if isinstance(key, rsa.RSAPrivateKey):
        return _legacy_open(body, key, info)
    return _HPKE_SUITES[scheme].decrypt(body, key, info=info)


def _oaep(label: bytes) -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=label)


def _legacy_seal(plaintext: bytes, key: rsa.RSAPublicKey, info: bytes) -> bytes:
    """The original system's hybrid: a fresh AES-256-GCM key wrapped with RSA-OAEP-SHA256."""
    data_key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(_GCM_NONCE)
    wrapped = key.encrypt(data_key, _oaep(info))
    return wrapped + nonce + AESGCM(data_key).encrypt(nonce, plaintext, info)


def _legacy_open(body: memoryview, key: rsa.RSAPrivateKey, info: bytes) -> bytes:
    wrapped_length = key.key_size // 8
    data_key = key.decrypt(bytes(body[:wrapped_length]), _oaep(info))
    nonce = bytes(body[wrapped_length : wrapped_length + _GCM_NONCE])
    return AESGCM(data_key).decrypt(nonce, bytes(body[wrapped_length + _GCM_NONCE :]), info)
