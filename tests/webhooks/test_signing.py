"""Standard Webhooks signatures (against the specification's published example) and the
subscription's sealed URL and secret."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime

import pytest

from pipeline.crypto.envelope import EnvelopeTampered
from pipeline.crypto.keys import Keyring, PrivateKey
from pipeline.webhooks import signing

# The example of the Standard Webhooks specification (and every reference library's test).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_the_specifications_example_signs_to_its_published_signature() -> None:
    when = datetime.fromtimestamp(SPEC_TIMESTAMP, UTC)
    headers = signing.headers(SPEC_SECRET, SPEC_ID, when, SPEC_BODY)
    assert headers == {
        "webhook-id": SPEC_ID,
        "webhook-timestamp": str(SPEC_TIMESTAMP),
        "webhook-signature": SPEC_SIGNATURE,
    }


def test_the_signature_is_the_hmac_the_specification_describes() -> None:
    # Computed here from the spec's words, not by the library: "{id}.{timestamp}.{body}".
    secret = signing.new_secret()
    when = datetime(2026, 12, 5, 12, 0, 0, tzinfo=UTC)
    body = b'{"type":"site.active"}'
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"msg_x.{int(when.timestamp())}.".encode() + body, hashlib.sha256)
    expected = "v1," + base64.b64encode(digest.digest()).decode()
    assert signing.headers(secret, "msg_x", when, body)["webhook-signature"] == expected


def test_a_new_secret_is_whsec_and_32_random_bytes() -> None:
    first, second = signing.new_secret(), signing.new_secret()
    assert first.startswith("whsec_") and first != second
    assert len(signing.check_secret(first)) == 32


@pytest.mark.parametrize(
    ("secret", "words"),
    [
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "starts with 'whsec_'"),
        ("whsec_not base64!", "followed by base64"),
        ("whsec_" + base64.b64encode(b"x" * 8).decode(), "24 to 64 bytes"),
    ],
)
def test_a_bad_secret_is_named(secret: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        signing.check_secret(secret)


def test_the_url_and_secret_are_sealed_bound_to_their_subscription() -> None:
    key = PrivateKey.generate()
    receiver = signing.Receiver("https://platform.example.com/hooks/t0k3n", signing.new_secret())
    sealed = signing.seal(receiver, key.public_key(), 7)
    assert receiver.secret not in sealed and "t0k3n" not in sealed
    assert receiver.secret.removeprefix("whsec_") not in sealed
    assert signing.open_sealed(sealed, Keyring.of([key]), 7) == receiver
    with pytest.raises(EnvelopeTampered):
        signing.open_sealed(sealed, Keyring.of([key]), 8)  # copied to another subscription
    assert "t0k3n" not in repr(receiver) and receiver.secret not in repr(receiver)
