"""Certificate keys, CSRs and chains: the cryptography the issuance steps need."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from acme.client import _renewal_info_path_component
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from pipeline.crypto import envelope
from pipeline.crypto.keys import PublicKey
from pipeline.settings import KeyType


@dataclass(frozen=True)
class SealedRequest:
    """A new certificate key, already sealed to the edge, and the CSR for it."""

    key_envelope: str
    scheme: str
    key_id: str
    csr_pem: str


def new_sealed_request(
    names: list[str], key_type: KeyType, edge_key: PublicKey, *, domain: str
) -> SealedRequest:
    """Generate a key, make its CSR, and seal the key before this function returns.

    The clear key exists only in this frame: it is never returned, stored or logged.
    """
    private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if key_type is KeyType.RSA_2048:
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        private_key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .sign(private_key, hashes.SHA256())
    )
    key_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    sealed = envelope.seal(
        key_pem,
        edge_key,
        domain=domain,
        binding=envelope.spki_fingerprint(private_key.public_key()),
    )
    del key_pem, private_key
    return SealedRequest(
        key_envelope=envelope.to_text(sealed),
        scheme=str(edge_key.scheme),
        key_id=edge_key.key_id,
        csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode("ascii"),
    )


@dataclass(frozen=True)
class ChainInfo:
    serial: str
    not_before: datetime
    not_after: datetime
    ari_id: str | None
    names: list[str]


class ChainMismatch(ValueError):
    pass


def inspect_chain(chain_pem: str, csr_pem: str) -> ChainInfo:
    """Check that the CA's leaf is for our key and names, and read what the store keeps."""
    certs = x509.load_pem_x509_certificates(chain_pem.encode("ascii"))
    leaf = certs[0]
    csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
    if envelope.spki_fingerprint(leaf.public_key()) != envelope.spki_fingerprint(csr.public_key()):
        raise ChainMismatch("the issued certificate is not for the key we generated")
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    try:
        ari_id: str | None = _renewal_info_path_component(leaf)
    except x509.ExtensionNotFound:
        ari_id = None
    return ChainInfo(
        serial=format(leaf.serial_number, "x"),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        ari_id=ari_id,
        names=names,
    )
