"""The installation's ACME accounts, one per issuer: registered once (with External Account
Binding where the issuer requires it), the account key sealed to the pipeline's own key, and so
is the EAB HMAC key the account was bound with (never in clear at rest or in a log line)."""

from __future__ import annotations

import hashlib
from typing import Any

import redis
from acme import messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwk import JWKEC
from sqlalchemy import select

from pipeline.acme.client import AcmeClient
from pipeline.acme.ratelimit import RateLimiter
from pipeline.crypto import envelope
from pipeline.crypto.keys import Keyring, PrivateKey, load_or_create_pipeline_key
from pipeline.db import SessionScope
from pipeline.errors import RateLimited
from pipeline.models import Account
from pipeline.settings import Issuer, Settings

ACCOUNT_DOMAIN = "acme-account"
EAB_DOMAIN = "acme-eab-hmac"


def build_client(
    settings: Settings,
    session_scope: SessionScope,
    redis_client: redis.Redis[Any],
    limiter: RateLimiter,
    issuer: Issuer | None = None,
) -> AcmeClient:
    """An ACME client for ``issuer``'s stored account (default: the first issuer's),
    registering it first if there is none.

    Many workers may start at once: a Redis lock makes exactly one of them register.
    """
    issuer = issuer or settings.issuer_list[0]
    directory = issuer.directory
    pipeline_key = load_or_create_pipeline_key(settings.effective_pipeline_key)
    keyring = Keyring.of([pipeline_key])
    binding = directory.encode()
    ca_bundle = str(issuer.ca_bundle) if issuer.ca_bundle else None

    account = _load(session_scope, directory)
    if account is None:
        lock_name = (
            f"{settings.redis_prefix}:lock:account:{hashlib.sha256(binding).hexdigest()[:16]}"
        )
        with redis_client.lock(lock_name, timeout=120, blocking_timeout=130):
            account = _load(session_scope, directory) or _register(
                issuer, session_scope, limiter, pipeline_key, ca_bundle
            )
    key_pem = envelope.open_envelope(
        envelope.from_text(account.key_envelope), keyring, domain=ACCOUNT_DOMAIN, binding=binding
    )
    jwk = JWKEC.load(key_pem)
    del key_pem
    registration = messages.RegistrationResource.json_loads(account.registration_json)
    return AcmeClient(
        directory,
        jwk,
        registration=registration,
        ca_bundle=ca_bundle,
        limiter=limiter,
        issuer=issuer.name,
    )


def _load(session_scope: SessionScope, directory: str) -> Account | None:
    with session_scope() as session:
        return session.scalar(select(Account).where(Account.directory_url == directory))


def _register(
    issuer: Issuer,
    session_scope: SessionScope,
    limiter: RateLimiter,
    pipeline_key: PrivateKey,
    ca_bundle: str | None,
) -> Account:
    directory = issuer.directory
    decision = limiter.reserve_new_account(pacing=False)
    if not decision.allowed:
        raise RateLimited("new-account limit", decision.retry_after, bucket=decision.bucket or None)
    private_key = ec.generate_private_key(ec.SECP256R1())
    jwk = JWKEC(key=private_key)
    acme = AcmeClient(directory, jwk, ca_bundle=ca_bundle, limiter=limiter, issuer=issuer.name)
    eab = None
    eab_envelope = None
    if issuer.eab_kid is not None and issuer.eab_hmac_key is not None:
        eab = (issuer.eab_kid, issuer.eab_hmac_key)
        # Kept with the account it bound, sealed like the account key.
        eab_envelope = envelope.to_text(
            envelope.seal(
                issuer.eab_hmac_key.get_secret_value().encode("ascii"),
                pipeline_key.public_key(),
                domain=EAB_DOMAIN,
                binding=directory.encode(),
            )
        )
    registration = acme.register(issuer.contact_email, eab=eab)
    # The binding (a JWS over the account key) served its purpose: not stored with the account.
    registration = registration.update(body=registration.body.update(external_account_binding=None))
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
        issuer=issuer.name,
        eab_kid=issuer.eab_kid,
        eab_hmac_envelope=eab_envelope,
        key_envelope=envelope.to_text(sealed),
        registration_json=registration.json_dumps(),
    )
    with session_scope() as session:
        session.add(account)
    return account
