"""The installation's ACME account: registered once, its key sealed to the pipeline's own key."""

from __future__ import annotations

import hashlib
from typing import Any

import redis
from acme import messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwk import JWKEC
from sqlalchemy import select

from pipeline import envelope
from pipeline.acme_client import AcmeClient
from pipeline.db import SessionScope
from pipeline.errors import RateLimited
from pipeline.keys import Keyring, PrivateKey, load_or_create_pipeline_key
from pipeline.models import Account
from pipeline.ratelimit import RateLimiter
from pipeline.settings import Settings

ACCOUNT_DOMAIN = "acme-account"


def build_client(
    settings: Settings,
    session_scope: SessionScope,
    redis_client: redis.Redis[Any],
    limiter: RateLimiter,
) -> AcmeClient:
    """An ACME client for the stored account, registering it first if there is none.

    Many workers may start at once: a Redis lock makes exactly one of them register.
    """
    directory = settings.acme_directory
    pipeline_key = load_or_create_pipeline_key(settings.effective_pipeline_key)
    keyring = Keyring.of([pipeline_key])
    binding = directory.encode()
    ca_bundle = str(settings.acme_ca_bundle) if settings.acme_ca_bundle else None

    account = _load(session_scope, directory)
    if account is None:
        lock_name = (
            f"{settings.redis_prefix}:lock:account:{hashlib.sha256(binding).hexdigest()[:16]}"
        )
        with redis_client.lock(lock_name, timeout=120, blocking_timeout=130):
            account = _load(session_scope, directory) or _register(
                settings, session_scope, limiter, pipeline_key, ca_bundle
            )
    key_pem = envelope.open_envelope(
        envelope.from_text(account.key_envelope), keyring, domain=ACCOUNT_DOMAIN, binding=binding
    )
    jwk = JWKEC.load(key_pem)
    del key_pem
    registration = messages.RegistrationResource.json_loads(account.registration_json)
    return AcmeClient(
        directory, jwk, registration=registration, ca_bundle=ca_bundle, limiter=limiter
    )


def _load(session_scope: SessionScope, directory: str) -> Account | None:
    with session_scope() as session:
        return session.scalar(select(Account).where(Account.directory_url == directory))


def _register(
    settings: Settings,
    session_scope: SessionScope,
    limiter: RateLimiter,
    pipeline_key: PrivateKey,
    ca_bundle: str | None,
) -> Account:
    directory = settings.acme_directory
    decision = limiter.reserve_new_account(pacing=False)
    if not decision.allowed:
        raise RateLimited("new-account limit", decision.retry_after)
    private_key = ec.generate_private_key(ec.SECP256R1())
    jwk = JWKEC(key=private_key)
    acme = AcmeClient(directory, jwk, ca_bundle=ca_bundle, limiter=limiter)
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
