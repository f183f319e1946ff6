"""The installation's ACME account: registered once, its key sealed to the pipeline's own key."""

from __future__ import annotations

import hashlib

from acme import messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwk import JWKEC
from sqlalchemy import select

from pipeline import envelope
from pipeline.acme_client import AcmeClient
from pipeline.connections import get_limiter, get_redis
from pipeline.db import session_scope
from pipeline.errors import RateLimited
from pipeline.keys import Keyring, load_or_create_pipeline_key
from pipeline.models import Account
from pipeline.settings import get_settings

ACCOUNT_DOMAIN = "acme-account"


def build_client() -> AcmeClient:
    """An ACME client for the stored account, registering it first if there is none.

    Many workers may start at once: a Redis lock makes exactly one of them register.
    """
    settings = get_settings()
    directory = settings.acme_directory
    pipeline_key = load_or_create_pipeline_key(settings.effective_pipeline_key)
    keyring = Keyring.of([pipeline_key])
    binding = directory.encode()
    ca_bundle = str(settings.acme_ca_bundle) if settings.acme_ca_bundle else None

    account = _load(directory)
    if account is None:
        lock_name = (
            f"{settings.redis_prefix}:lock:account:{hashlib.sha256(binding).hexdigest()[:16]}"
        )
        with get_redis().lock(lock_name, timeout=120, blocking_timeout=130):
            account = _load(directory) or _register(directory, pipeline_key, ca_bundle)
    key_pem = envelope.open_envelope(
        envelope.from_text(account.key_envelope), keyring, domain=ACCOUNT_DOMAIN, binding=binding
    )
    jwk = JWKEC.load(key_pem)
    del key_pem
    registration = messages.RegistrationResource.json_loads(account.registration_json)
    return AcmeClient(
        directory, jwk, registration=registration, ca_bundle=ca_bundle, limiter=get_limiter()
    )


def _load(directory: str) -> Account | None:
    with session_scope() as session:
        return session.scalar(select(Account).where(Account.directory_url == directory))


def _register(directory: str, pipeline_key: object, ca_bundle: str | None) -> Account:
    from pipeline.keys import PrivateKey

    assert isinstance(pipeline_key, PrivateKey)
    settings = get_settings()
    decision = get_limiter().reserve_new_account(pacing=False)
    if not decision.allowed:
        raise RateLimited("new-account limit", decision.retry_after)
    private_key = ec.generate_private_key(ec.SECP256R1())
    jwk = JWKEC(key=private_key)
    acme = AcmeClient(directory, jwk, ca_bundle=ca_bundle, limiter=get_limiter())
    registration = acme.register(settings.acme_contact_email)
    key_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    sealed = envelope.seal(
        key_pem, pipeline_key.public_key(), domain=ACCOUNT_DOMAIN, binding=directory.encode()
    )
    del key_pem, private_key, jwk
    account = Account(
        directory_url=directory,
        key_envelope=envelope.to_text(sealed),
        registration_json=registration.json_dumps(),
    )
    with session_scope() as session:
        session.add(account)
    return account
