"""Standard Webhooks signatures, and subscription secrets kept sealed.

Signing is the ``standardwebhooks`` package's: written by the specification's authors, ~150
lines with no dependencies, typed, and what receivers verify with, so that certman's
signatures are the reference implementation's rather than a reading of the spec. What it does
is ``v1,`` + base64(HMAC-SHA256(secret, "{id}.{timestamp}.{body}")).

A subscription's secret must stay usable (HMAC needs the secret itself, a hash would not do)
and must not be stored in clear: it is sealed, with the receiver's URL (which often carries a
token too), to the pipeline's own key, as ACME account keys are (:mod:`pipeline.crypto.envelope`),
bound to the subscription's id so that a sealed value copied to another row does not open.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from dataclasses import dataclass
from datetime import datetime

from standardwebhooks.webhooks import Webhook

from pipeline.crypto import envelope
from pipeline.crypto.keys import Keyring, PublicKey

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # the spec allows 24 to 64
SEAL_DOMAIN = "webhook-subscription"


def new_secret() -> str:
    """A fresh secret in the spec's form: ``whsec_`` + base64 of random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def check_secret(secret: str) -> bytes:
    """The secret's key bytes; ValueError saying what is wrong with it."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret starts with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except binascii.Error:
        raise ValueError("a webhook secret is whsec_ followed by base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError("a webhook secret holds 24 to 64 bytes")
    return key


def headers(secret: str, message_id: str, timestamp: datetime, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers of one attempt."""
    signature = Webhook(secret).sign(message_id, timestamp, body)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": signature,
    }


@dataclass(frozen=True)
class Receiver:
    """What a subscription's sealed column holds."""

    url: str
    secret: str

    def __repr__(self) -> str:  # never the secret, never the URL's path
        return "Receiver(…)"


def _binding(subscription_id: int) -> bytes:
    return f"subscription:{subscription_id}".encode()


def seal(receiver: Receiver, pipeline_key: PublicKey, subscription_id: int) -> str:
    plaintext = json.dumps({"url": receiver.url, "secret": receiver.secret}).encode()
    sealed = envelope.seal(
        plaintext, pipeline_key, domain=SEAL_DOMAIN, binding=_binding(subscription_id)
    )
    return envelope.to_text(sealed)


def open_sealed(text: str, keyring: Keyring, subscription_id: int) -> Receiver:
    plaintext = envelope.open_envelope(
        envelope.from_text(text, domain=SEAL_DOMAIN),
        keyring,
        domain=SEAL_DOMAIN,
        binding=_binding(subscription_id),
    )
    value = json.loads(plaintext)
    return Receiver(url=str(value["url"]), secret=str(value["secret"]))
