"""A thin ACME client over certbot's ``acme`` library, one per worker process (the runtime's).

What it adds to ``acme`` (docs/architecture.md, "acme"): the ``replaces`` field on new orders,
``badNonce`` retried more than once, the Retry-After of an error response kept, request pacing
through the global rate limiter, and every call a single request so that no task ever sleeps
in a poll loop.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import requests
from acme import challenges, client, errors, messages
from cryptography import x509
from josepy.b64 import b64encode
from josepy.errors import DeserializationError
from josepy.json_util import field
from josepy.jwa import ES256, RS256
from josepy.jwk import JWK, JWKEC

from pipeline import worker_metrics
from pipeline.acme.ratelimit import RateLimiter
from pipeline.errors import (
    AccountRefused,
    AttemptFailed,
    IssuanceProblem,
    NameRefused,
    Outcome,
    RateLimited,
    RetryLater,
    meaning,
)

if TYPE_CHECKING:
    from pydantic import SecretStr

T = TypeVar("T")

USER_AGENT = "certman/0.1 (+acme-python)"
BAD_NONCE_TRIES = 5
# A pacing wait shorter than this is slept inside the request (it is pacing, tens of
# milliseconds); a longer one goes back to Celery as a countdown.
MAX_INLINE_PACING_WAIT = 1.0
NOT_FOUND = "notFound"  # ours, not RFC 8555's: a 404 without a problem document


class NewOrderWithReplaces(messages.NewOrder):
    """RFC 9773 (ARI) ``replaces``: Let's Encrypt exempts such renewals from its limits."""

    replaces: str | None = field("replaces", omitempty=True)


class _Network(client.ClientNetwork):
    """Keeps each error's Retry-After and paces every request through the limiter."""

    def __init__(self, *args: Any, limiter: RateLimiter | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limiter = limiter
        self.endpoints: dict[str, str] = {}

    def _check_response(  # type: ignore[override]  # called on instances, so a method will do
        self, response: requests.Response, content_type: str | None = None
    ) -> requests.Response:
        try:
            if response.status_code == 409:
                _raise_problem(response)  # before the library turns it into a bare ConflictError
            return super()._check_response(response, content_type=content_type)
        except messages.Error as exc:
            exc.retry_after = _retry_after_seconds(response)  # the library drops the response
            raise

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        if self.limiter is not None:
            decision = self.limiter.pace(self.endpoints.get(url, "acme"))
            if not decision.allowed:
                if decision.retry_after > MAX_INLINE_PACING_WAIT:
                    raise RateLimited(f"pacing {url}", decision.retry_after, bucket=decision.bucket)
                time.sleep(decision.retry_after)
        started = time.perf_counter()
        try:
            return super()._send_request(method, url, *args, **kwargs)
        finally:
            worker_metrics.observe_acme_request(
                self.endpoints.get(url, "acme"), method, time.perf_counter() - started
            )


def _raise_problem(response: requests.Response) -> None:
    """Raise the problem document a response carries, if it carries one.

    The library answers every 409 with a ConflictError holding only the Location header (an
    ACME v1 habit), which drops the problem: RFC 9773's ``alreadyReplaced`` among them.
    """
    try:
        body = response.json()
    except ValueError:
        return
    if isinstance(body, dict) and isinstance(body.get("type"), str):
        try:
            problem = messages.Error.from_json(body)
        except DeserializationError:
            return  # malformed: the library's own handling says what it can
        raise problem


def _retry_after_seconds(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


class AcmeClient:
    """One account's view of one ACME directory (one issuer's: ``issuer`` is its name)."""

    def __init__(
        self,
        directory_url: str,
        account_key: JWK,
        *,
        registration: messages.RegistrationResource | None = None,
        ca_bundle: str | None = None,
        limiter: RateLimiter | None = None,
        issuer: str = "default",
    ) -> None:
        self.issuer = issuer
        alg = ES256 if isinstance(account_key, JWKEC) else RS256
        self.net = _Network(
            key=account_key,
            account=registration,
            alg=alg,
            verify_ssl=ca_bundle or True,
            user_agent=USER_AGENT,
            timeout=30,
            limiter=limiter,
        )
        # No proxy variables or ~/.netrc for the CA: requests would read them on every call.
        self.net.session.trust_env = False
        self.account_key = account_key
        self.directory = self._call(lambda: client.ClientV2.get_directory(directory_url, self.net))
        self.acme = client.ClientV2(self.directory, self.net)
        for directory_field, endpoint in (
            ("newNonce", "new-nonce"),
            ("newAccount", "new-account"),
            ("newOrder", "new-order"),
        ):
            url = self._directory_url(directory_field)
            if url:
                self.net.endpoints[url] = endpoint

    def _directory_url(self, field: str) -> str | None:
        # messages.Directory has no __contains__: `in` would index it with integers.
        try:
            return str(self.directory[field])
        except KeyError:
            return None

    # --- account ---------------------------------------------------------------------------
    def register(
        self, email: str | None, *, eab: tuple[str, SecretStr] | None = None
    ) -> messages.RegistrationResource:
        """Register the key (or find the account it has), with External Account Binding
        (RFC 8555 section 7.3.4) when ``eab`` (key id, base64url HMAC key) is given.

        A refusal that a retry cannot change (a wrong EAB key, one required and missing) is
        :class:`AccountRefused`, naming the issuer but never the key.
        """
        binding = None
        if eab is not None:
            kid, hmac_key = eab
            binding = messages.ExternalAccountBinding.from_data(
                account_public_key=self.account_key.public_key(),
                kid=kid,
                hmac_key=hmac_key.get_secret_value(),
                directory=self.directory,
            )
        new = messages.NewRegistration.from_data(
            email=email, terms_of_service_agreed=True, external_account_binding=binding
        )
        try:
            return self._register(new)
        except AttemptFailed as exc:
            how = f"with External Account Binding key id {eab[0]!r}" if eab else "without EAB"
            raise AccountRefused(
                f"issuer {self.issuer} refused our new account ({how}): {exc.reason}",
                error_type=exc.error_type,
            ) from exc

    def _register(self, new: messages.NewRegistration) -> messages.RegistrationResource:

        def new_account() -> messages.RegistrationResource | str:
            try:
                return self.acme.new_account(new)
            except errors.ConflictError as exc:
                # The key is registered already: the library's way to give its account's URL.
                return str(exc.location)

        created = self._call(new_account)
        if isinstance(created, str):
            regr = messages.RegistrationResource(uri=created, body=messages.Registration())
            self.net.account = regr
            created = self._call(lambda: self.acme.query_registration(regr))
        self.net.account = created
        return created

    @property
    def account_uri(self) -> str:
        account = self.net.account
        assert account is not None, "the client has no registered account"
        return str(account.uri)

    @property
    def thumbprint(self) -> str:
        return b64encode(self.account_key.thumbprint()).decode("ascii")

    @property
    def supports_ari(self) -> bool:
        return self._directory_url("renewalInfo") is not None

    @property
    def profiles(self) -> dict[str, str]:
        meta = self.directory.meta
        return dict(getattr(meta, "profiles", None) or {})

    # --- orders ----------------------------------------------------------------------------
    def new_order(
        self, names: list[str], *, profile: str | None = None, replaces: str | None = None
    ) -> tuple[str, messages.Order]:
        identifiers = [messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=n) for n in names]
        replaces = replaces if replaces and self.supports_ari else None
        body = NewOrderWithReplaces(
            identifiers=identifiers,
            profile=profile if profile and profile in self.profiles else None,
            replaces=replaces,
        )
        try:
            response = self._call(lambda: self.acme._post(self.directory["newOrder"], body))
        except (AttemptFailed, RetryLater) as exc:
            if replaces is not None and _replaces_refused(exc):
                # Whatever the CA's wording, the caller orders again without replaces.
                raise AttemptFailed(
                    f"the CA refuses replaces={replaces}: {exc.reason}",
                    error_type=getattr(exc, "error_type", None) or "serverInternal",
                    already_replaced=True,
                ) from exc
            raise
        return response.headers["Location"], messages.Order.from_json(response.json())

    def get_order(self, url: str) -> tuple[messages.Order, float | None]:
        response = self._call(lambda: self.acme._post_as_get(url))
        return messages.Order.from_json(response.json()), _retry_after_seconds(response)

    def get_authorization(self, url: str) -> messages.Authorization:
        response = self._call(lambda: self.acme._post_as_get(url))
        authz: messages.Authorization = messages.Authorization.from_json(response.json())
        return authz

    def key_authorization(self, token: str) -> str:
        return f"{token}.{self.thumbprint}"

    def answer_challenge(self, url: str) -> None:
        self._call(lambda: self.acme._post(url, challenges.HTTP01Response()))

    def finalize(self, url: str, csr_der: bytes) -> messages.Order:
        from cryptography import x509

        request = messages.CertificateRequest(csr=x509.load_der_x509_csr(csr_der))
        response = self._call(lambda: self.acme._post(url, request))
        order: messages.Order = messages.Order.from_json(response.json())
        return order

    def download(self, url: str) -> str:
        response = self._call(lambda: self.acme._post_as_get(url))
        return str(response.text)

    def revoke(self, certificate: x509.Certificate, reason: int) -> None:
        """revokeCert (RFC 8555 section 7.6), signed with the account key; an IssuanceProblem
        with the CA's error (``alreadyRevoked`` among them) if it refuses."""
        self._call(lambda: self.acme.revoke(certificate, reason))

    def renewal_window(self, cert_pem: bytes) -> tuple[dt.datetime, dt.datetime] | None:
        """The CA's ARI suggested window for a certificate, or None where there is no ARI."""
        if not self.supports_ari:
            return None
        from acme.client import _renewal_info_path_component
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(cert_pem)
        url = self.directory["renewalInfo"].rstrip("/") + "/" + _renewal_info_path_component(cert)
        response = self._call(lambda: self.net.get(url, content_type="application/json"))
        info = messages.RenewalInfo.from_json(response.json())
        window = info.suggested_window
        return window.start, window.end

    # --- error handling --------------------------------------------------------------------
    def _call(self, request: Callable[[], T]) -> T:
        """One request, with badNonce retried here and every failure classified."""
        for attempt in range(BAD_NONCE_TRIES):
            try:
                return request()
            except messages.Error as exc:
                if exc.code == "badNonce" and attempt + 1 < BAD_NONCE_TRIES:
                    continue
                raise classify(exc) from exc
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise RetryLater(f"ACME server unreachable: {exc}", 10) from exc
            except errors.ConflictError as exc:
                # A 409 without a problem document: retrying the same request cannot help.
                raise AttemptFailed(
                    f"the CA answered 409 Conflict (Location: {exc.location})",
                    error_type="conflict",
                ) from exc
            except errors.ClientError as exc:
                response = exc.args[0] if exc.args else None
                if isinstance(response, requests.Response) and response.status_code == 404:
                    # A bare 404 (Pebble's answer for an order or authorization it no longer
                    # holds) will not change on a retry: end the attempt, start afresh.
                    raise AttemptFailed(
                        f"the CA knows no {response.url} (404)", error_type=NOT_FOUND
                    ) from exc
                raise RetryLater(f"ACME client error: {exc}", 10) from exc
        raise AssertionError("unreachable")


def classify(exc: messages.Error) -> Exception:
    """Map a CA problem document to what the pipeline should do about it (the table:
    :data:`pipeline.errors.ACME_ERRORS`)."""
    # The library knows only the codes of its day (not RFC 9773's alreadyReplaced, say) and
    # gives None for the rest: read any ACME error type's code from the type itself.
    typ = exc.typ or ""
    code = exc.code or (typ.rsplit(":", 1)[-1] if typ.startswith(messages.ERROR_PREFIX) else "")
    detail = exc.detail or str(exc)
    retry_after = getattr(exc, "retry_after", None)
    if exc.typ is None or "serverInternal" in typ:
        outcome = Outcome.RETRY
    else:
        # A type that is not an ACME one: nothing says a retry would help.
        outcome = meaning(code).request if code else Outcome.END_ATTEMPT
    if outcome is Outcome.RATE_LIMITED:
        return RateLimited(f"rate limited by the CA: {detail}", retry_after or 3600, by_ca=True)
    if outcome is Outcome.REFUSED:
        return NameRefused(f"the CA refuses ({code}): {detail}", error_type=code)
    if outcome is Outcome.RETRY:
        return RetryLater(f"{code or 'server error'}: {detail}", retry_after or 5)
    return AttemptFailed(
        f"{code}: {detail}", error_type=code, already_replaced=_already_replaced(code, detail)
    )


def _already_replaced(code: str, detail: str) -> bool:
    # RFC 9773's alreadyReplaced; Boulder said "conflict" before it, Pebble "malformed", and
    # only their text tells: read here, once, at the boundary.
    return code == "alreadyReplaced" or (
        code in ("conflict", "malformed") and "replacement order" in detail
    )


def _replaces_refused(problem: IssuanceProblem) -> bool:
    """A newOrder refused for its ``replaces`` (draft-ietf-acme-ari: the client may then order
    without it): RFC 9773's alreadyReplaced; a malformed complaint about replaces; Pebble's
    serverInternal "could not find an order for the given certificate", which retrying the same
    request only repeats."""
    if isinstance(problem, RateLimited):
        return False
    if isinstance(problem, AttemptFailed) and problem.already_replaced:
        return True
    text = problem.reason.lower()
    about_replaces = "replace" in text or "for the given certificate" in text
    if isinstance(problem, AttemptFailed):
        return about_replaces and problem.error_type in ("malformed", "conflict", "serverInternal")
    return about_replaces and "serverinternal" in text
