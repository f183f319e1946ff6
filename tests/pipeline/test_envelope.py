"""Envelopes: round trips, and every way a stored envelope can be wrong failing by name."""

from __future__ import annotations

import datetime
import hashlib
import pickle

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline.crypto.envelope import (
    HEADER_LENGTH,
    EnvelopeError,
    EnvelopeHeader,
    EnvelopeTampered,
    MalformedEnvelope,
    Scheme,
    UnknownKey,
    from_text,
    normalize_domain,
    open_envelope,
    read_header,
    seal,
    spki_fingerprint,
    to_text,
)
from pipeline.crypto.keys import Keyring, PrivateKey

DOMAIN = "shop.example.com"
BINDING = hashlib.sha256(b"certificate public key").digest()
PAYLOAD = b"-----BEGIN PRIVATE KEY-----\nnot really\n"
SCHEMES = list(Scheme)
MAGIC = slice(0, 3)
VERSION = 3
SCHEME_BYTE = 4
KEY_ID = slice(5, HEADER_LENGTH)

# Generating RSA keys is slow: one key per scheme for the whole module.
_KEYS = {scheme: PrivateKey.generate(scheme) for scheme in Scheme}
_KEYRING = Keyring.of(_KEYS.values())
_SMALL = {
    scheme: seal(PAYLOAD, key.public_key(), domain=DOMAIN, binding=BINDING)
    for scheme, key in _KEYS.items()
}


def _open(envelope: bytes, *, domain: str = DOMAIN, binding: bytes = BINDING) -> bytes:
    return open_envelope(envelope, _KEYRING, domain=domain, binding=binding)


def _flip(envelope: bytes, index: int, mask: int = 0x01) -> bytes:
    changed = bytearray(envelope)
    changed[index] ^= mask
    return bytes(changed)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("payload", [b"", b"x", PAYLOAD, bytes(range(256)) * 400])
def test_round_trip(scheme: Scheme, payload: bytes) -> None:
    envelope = seal(payload, _KEYS[scheme].public_key(), domain=DOMAIN, binding=BINDING)
    assert _open(envelope) == payload
    assert _open(from_text(to_text(envelope))) == payload


@pytest.mark.parametrize("scheme", SCHEMES)
def test_header_names_version_scheme_and_key(scheme: Scheme) -> None:
    assert read_header(_SMALL[scheme]) == EnvelopeHeader(1, scheme, _KEYS[scheme].key_id)


def test_sealing_twice_gives_different_envelopes() -> None:
    public = _KEYS[Scheme.HPKE_X25519].public_key()
    first = seal(PAYLOAD, public, domain=DOMAIN, binding=BINDING)
    assert first != seal(PAYLOAD, public, domain=DOMAIN, binding=BINDING)


def test_hpke_envelope_is_compact() -> None:
    # header 13 + X25519 enc 32 + GCM tag 16
    assert len(_SMALL[Scheme.HPKE_X25519]) == len(PAYLOAD) + 13 + 32 + 16
    assert to_text(_SMALL[Scheme.HPKE_X25519]).startswith("CeNv")


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("mask", [0x01, 0x80])
def test_every_flipped_byte_fails_with_the_error_of_its_region(scheme: Scheme, mask: int) -> None:
    envelope = _SMALL[scheme]
    for index in range(len(envelope)):
        with pytest.raises(EnvelopeError) as caught:
            _open(_flip(envelope, index, mask))
        error = caught.value
        assert error.domain == DOMAIN
        if index < SCHEME_BYTE:
            assert type(error) is MalformedEnvelope, index
        elif index == SCHEME_BYTE:
            # Another valid scheme code no longer matches the key; others are unknown.
            assert type(error) in (MalformedEnvelope, EnvelopeTampered), index
        elif index < HEADER_LENGTH:
            assert type(error) is UnknownKey, index
        else:
            assert type(error) is EnvelopeTampered, index


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_truncation_fails(scheme: Scheme) -> None:
    envelope = _SMALL[scheme]
    for length in range(len(envelope)):
        with pytest.raises((MalformedEnvelope, EnvelopeTampered)) as caught:
            _open(envelope[:length])
        if length < HEADER_LENGTH + 16:
            assert type(caught.value) is MalformedEnvelope
            assert "truncated" in caught.value.reason


@pytest.mark.parametrize("scheme", SCHEMES)
def test_appended_bytes_fail(scheme: Scheme) -> None:
    with pytest.raises(EnvelopeTampered):
        _open(_SMALL[scheme] + b"\x00")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_copied_to_another_domain_fails(scheme: Scheme) -> None:
    with pytest.raises(EnvelopeTampered) as caught:
        _open(_SMALL[scheme], domain="other.example.com")
    assert str(caught.value).startswith("envelope for other.example.com: authentication failed")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_paired_with_another_binding_fails(scheme: Scheme) -> None:
    with pytest.raises(EnvelopeTampered):
        _open(_SMALL[scheme], binding=hashlib.sha256(b"another certificate").digest())
    with pytest.raises(EnvelopeTampered):
        _open(_SMALL[scheme], binding=b"")


def test_domain_spelling_is_normalized() -> None:
    assert _open(_SMALL[Scheme.HPKE_X25519], domain="Shop.Example.COM.") == PAYLOAD
    assert normalize_domain("Shop.Example.COM.") == DOMAIN


def test_unknown_version_is_malformed() -> None:
    changed = bytearray(_SMALL[Scheme.HPKE_X25519])
    changed[VERSION] = 2
    with pytest.raises(MalformedEnvelope, match="unsupported format version 2"):
        _open(bytes(changed))


def test_unknown_scheme_is_malformed() -> None:
    changed = bytearray(_SMALL[Scheme.HPKE_X25519])
    changed[SCHEME_BYTE] = 9
    with pytest.raises(MalformedEnvelope, match="unknown scheme code 9"):
        _open(bytes(changed))


def test_bad_magic_is_malformed() -> None:
    with pytest.raises(MalformedEnvelope, match="bad magic"):
        _open(b"\x00" * 100)
    with pytest.raises(MalformedEnvelope, match="bad magic"):
        read_header(PAYLOAD)


def test_scheme_swapped_to_a_held_key_of_another_scheme_is_tampered() -> None:
    changed = bytearray(_SMALL[Scheme.HPKE_X25519])
    changed[SCHEME_BYTE] = 2  # hpke-xwing, with the X25519 key's id
    with pytest.raises(EnvelopeTampered, match="does not match key"):
        _open(bytes(changed))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_key_not_held_is_unknown_and_named(scheme: Scheme) -> None:
    others = Keyring.of(key for other, key in _KEYS.items() if other is not scheme)
    with pytest.raises(UnknownKey) as caught:
        open_envelope(_SMALL[scheme], others, domain=DOMAIN, binding=BINDING)
    assert _KEYS[scheme].key_id in caught.value.reason
    assert str(caught.value).startswith(f"envelope for {DOMAIN}: sealed to key ")


def test_rotation_opens_envelopes_sealed_to_either_key() -> None:
    old, new = PrivateKey.generate(), PrivateKey.generate()
    sealed_old = seal(b"old", old.public_key(), domain=DOMAIN, binding=BINDING)
    sealed_new = seal(b"new", new.public_key(), domain=DOMAIN, binding=BINDING)
    both = Keyring.of([old, new])
    assert open_envelope(sealed_old, both, domain=DOMAIN, binding=BINDING) == b"old"
    assert open_envelope(sealed_new, both, domain=DOMAIN, binding=BINDING) == b"new"
    with pytest.raises(UnknownKey, match=old.key_id):
        open_envelope(sealed_old, Keyring.of([new]), domain=DOMAIN, binding=BINDING)


def test_error_is_one_readable_line_and_survives_pickling() -> None:
    error = EnvelopeTampered(DOMAIN, "authentication failed")
    assert str(error) == f"envelope for {DOMAIN}: authentication failed"
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.domain, copy.reason) == (EnvelopeTampered, DOMAIN, error.reason)


@pytest.mark.parametrize("text", ["A", "AAAAA", "ab=c", "abc!", "abc+", "abc/", "é", "ab c"])
def test_bad_text_is_malformed(text: str) -> None:
    with pytest.raises(MalformedEnvelope, match="base64url") as caught:
        from_text(text, domain=DOMAIN)
    assert caught.value.domain == DOMAIN


def test_text_is_unpadded_base64url() -> None:
    text = to_text(b"\xfb\xff")
    assert text == "-_8"
    assert from_text(text) == b"\xfb\xff"


def _self_signed(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DOMAIN)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


@pytest.mark.parametrize(
    "certificate_key",
    [ec.generate_private_key(ec.SECP256R1()), rsa.generate_private_key(65537, 2048)],
    ids=["ec-p256", "rsa-2048"],
)
def test_spki_fingerprint_binds_the_certificate(
    certificate_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
) -> None:
    certificate = _self_signed(certificate_key)
    der = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    binding = spki_fingerprint(certificate.public_key())
    assert binding == hashlib.sha256(der).digest()
    assert binding == spki_fingerprint(certificate_key.public_key())
    key_pem = certificate_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    envelope = seal(key_pem, _KEYS[Scheme.HPKE_X25519].public_key(), domain=DOMAIN, binding=binding)
    assert _open(envelope, binding=binding) == key_pem
    other = spki_fingerprint(ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(EnvelopeTampered):
        _open(envelope, binding=other)


_domains = st.from_regex(r"[a-z0-9-]{1,20}(\.[a-z0-9-]{1,20}){0,3}", fullmatch=True)
_fast = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_fast
@given(
    payload=st.binary(max_size=4096),
    domain=_domains,
    other_domain=_domains,
    binding=st.binary(max_size=64),
    scheme=st.sampled_from([Scheme.HPKE_X25519, Scheme.HPKE_XWING]),
)
def test_property_round_trip_and_domain_binding(
    payload: bytes, domain: str, other_domain: str, binding: bytes, scheme: Scheme
) -> None:
    envelope = seal(payload, _KEYS[scheme].public_key(), domain=domain, binding=binding)
    assert open_envelope(envelope, _KEYRING, domain=domain, binding=binding) == payload
    assert read_header(envelope).key_id == _KEYS[scheme].key_id
    assume(normalize_domain(other_domain) != normalize_domain(domain))
    with pytest.raises(EnvelopeTampered):
        open_envelope(envelope, _KEYRING, domain=other_domain, binding=binding)


@_fast
@given(
    scheme=st.sampled_from(SCHEMES),
    edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1),
)
def test_property_any_corruption_raises_only_envelope_errors(
    scheme: Scheme, edits: list[tuple[int, int]]
) -> None:
    changed = bytearray(_SMALL[scheme])
    for position, value in edits:
        changed[position % len(changed)] = value
    assume(bytes(changed) != _SMALL[scheme])
    with pytest.raises(EnvelopeError):
        _open(bytes(changed))


@_fast
@given(blob=st.binary(max_size=2000))
def test_property_random_bytes_raise_only_envelope_errors(blob: bytes) -> None:
    with pytest.raises(EnvelopeError):
        _open(blob)
    with pytest.raises(EnvelopeError):
        _open(_SMALL[Scheme.HPKE_X25519][:HEADER_LENGTH] + blob)
