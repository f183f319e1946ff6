"""A CA that speaks RFC 8555's states, in memory, behind the client interface the steps use.

Like certbot's own tests of ``acme``, the order state machine is tested against objects, not a
server: :class:`FakeCA` keeps orders, authorizations and challenges, moves them through the
states of RFC 8555 section 7.1.6 (pending → processing → valid/invalid for a challenge;
pending → ready → processing → valid, or invalid, for an order), answers with the library's
own message classes (``acme.messages``, parsed from the JSON a CA would send), and refuses what
a CA refuses with the problem types the real client raises (through
:func:`pipeline.acme.client.classify`). Pebble stays for the integration tier.

:class:`Crashes` counts the points where a worker may die (before and after every request to
the CA, every commit and every publish) and makes one of them raise :class:`Crash`, a
``BaseException`` that nothing in a step catches, as SIGKILL would not be caught.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from acme import messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy.orm import Session

from pipeline.acme.client import NOT_FOUND, classify
from pipeline.acme.ratelimit import ALLOWED, Decision
from pipeline.distribution import layout as distribution
from pipeline.errors import AttemptFailed, RetryLater

BASE = "https://ca.test/acme"
THUMBPRINT = "fake-thumbprint"


class Crash(BaseException):
    """The worker died here (SIGKILL, OOM, a lost node): nothing in a step catches it."""


@dataclass
class Crashes:
    """Counts crash points; raises :class:`Crash` at the ``at``-th one (0: never), or at the
    first one labelled ``on``."""

    at: int = 0
    on: str | None = None
    seen: int = 0
    labels: list[str] = field(default_factory=list)
    crashed: str | None = None

    def point(self, label: str) -> None:
        self.seen += 1
        self.labels.append(label)
        if self.seen == self.at or (self.on is not None and label == self.on):
            self.on = None
            self.crashed = label
            raise Crash(label)


def _problem(code: str, detail: str) -> Exception:
    return classify(messages.Error(typ=messages.ERROR_PREFIX + code, detail=detail))


@dataclass
class _Challenge:
    url: str
    token: str
    status: str = "pending"
    polls_left: int = 0
    error: dict[str, Any] | None = None


@dataclass
class _Authz:
    url: str
    name: str
    challenge: _Challenge
    status: str = "pending"


@dataclass
class _Order:
    url: str
    names: list[str]
    authzs: list[_Authz]
    replaces: str | None
    status: str = "pending"
    certificate: str | None = None
    csr: x509.CertificateSigningRequest | None = None
    issue_polls_left: int = 0
    error: dict[str, Any] | None = None


class FakeCA:
    """The client the steps talk to (``pipeline.acme.client.AcmeClient``'s interface), with the
    CA's state behind it.

    - ``validation_polls``: polls of the order that still see the challenge processing.
    - ``issue_polls``: polls after finalisation that still see the order processing.
    - ``fails``: name → ACME error type its validation ends with (``unauthorized``, ``caa``).
    - ``refuses``: name → ACME error type a new order for it is refused with.
    - ``outage``: every request fails on the CA's side: ``"connection"`` (unreachable),
      ``"5xx"`` (serverInternal) or ``"rateLimited"`` (with ``retry_after`` seconds).
    - ``issuer``: the issuer name this CA is configured as.
    """

    supports_ari = True
    profiles: dict[str, str] = {}
    account_uri = f"{BASE}/acct/1"
    thumbprint = THUMBPRINT

    def __init__(
        self,
        crashes: Crashes | None = None,
        *,
        validation_polls: int = 1,
        issue_polls: int = 1,
        fails: dict[str, str] | None = None,
        refuses: dict[str, str] | None = None,
        outage: str | None = None,
        retry_after: float = 3600,
        issuer: str = "default",
    ) -> None:
        self.outage = outage
        self.retry_after = retry_after
        self.issuer = issuer
        self.requests = 0
        self.crashes = crashes or Crashes()
        self.validation_polls = validation_polls
        self.issue_polls = issue_polls
        self.fails = fails or {}
        self.refuses = refuses or {}
        self.orders: dict[str, _Order] = {}
        self.authzs: dict[str, _Authz] = {}
        self.challenges: dict[str, _Challenge] = {}
        self.certificates: dict[str, str] = {}
        self.issued: list[x509.Certificate] = []
        self._ids = itertools.count(1)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._root = self._make_root()

    # --- requests ----------------------------------------------------------------------------
    @contextmanager
    def _request(self, what: str) -> Iterator[None]:
        self.crashes.point(f"before CA {what}")  # the request never reached the CA
        self.requests += 1
        if self.outage == "connection":
            raise RetryLater("ACME server unreachable: connection refused", 10)
        if self.outage == "5xx":
            raise _problem("serverInternal", "the CA is having a bad day")
        if self.outage == "rateLimited":
            error = messages.Error(
                typ=messages.ERROR_PREFIX + "rateLimited", detail="too many new orders recently"
            )
            error.retry_after = self.retry_after  # type: ignore[attr-defined]
            raise classify(error)
        yield
        self.crashes.point(f"after CA {what}")  # the CA acted; the answer was lost

    def key_authorization(self, token: str) -> str:
        return f"{token}.{THUMBPRINT}"

    def new_order(
        self, names: list[str], *, profile: str | None = None, replaces: str | None = None
    ) -> tuple[str, messages.Order]:
        with self._request("new-order"):
            for name in names:
                if name in self.refuses:
                    raise _problem(self.refuses[name], f"{name} refused by policy")
            n = next(self._ids)
            authzs = []
            for name in names:
                challenge = _Challenge(f"{BASE}/chall/{n}/{name}", f"token-{n}-{name}")
                authz = _Authz(f"{BASE}/authz/{n}/{name}", name, challenge)
                self.authzs[authz.url] = authz
                self.challenges[challenge.url] = challenge
                authzs.append(authz)
            order = _Order(f"{BASE}/order/{n}", list(names), authzs, replaces)
            self.orders[order.url] = order
            body = self._order_json(order)
        return order.url, messages.Order.from_json(body)

    def get_order(self, url: str) -> tuple[messages.Order, float | None]:
        with self._request("get-order"):
            order = self._find(self.orders, url)
            self._advance(order)
            body = self._order_json(order)
        return messages.Order.from_json(body), None

    def get_authorization(self, url: str) -> messages.Authorization:
        with self._request("get-authz"):
            authz = self._find(self.authzs, url)
            body = self._authz_json(authz)
        return messages.Authorization.from_json(body)

    def answer_challenge(self, url: str) -> None:
        with self._request("answer"):
            challenge = self._find(self.challenges, url)
            if challenge.status != "pending":
                # Pebble's answer to a second response to a challenge.
                raise _problem("malformed", "Cannot update challenge with status != pending")
            challenge.status = "processing"
            challenge.polls_left = self.validation_polls

    def finalize(self, url: str, csr_der: bytes) -> messages.Order:
        with self._request("finalize"):
            order = next((o for o in self.orders.values() if f"{o.url}/finalize" == url), None)
            if order is None:
                raise AttemptFailed(f"the CA knows no {url} (404)", error_type=NOT_FOUND)
            self._advance(order)
            if order.status != "ready":
                raise _problem("orderNotReady", f"order is {order.status}, not ready")
            order.csr = x509.load_der_x509_csr(csr_der)
            order.status = "processing"
            order.issue_polls_left = self.issue_polls
            self._advance(order)
            body = self._order_json(order)
        return messages.Order.from_json(body)

    def download(self, url: str) -> str:
        with self._request("download"):
            return self._find(self.certificates, url)

    def renewal_window(self, cert_pem: bytes) -> tuple[dt.datetime, dt.datetime] | None:
        return None

    # --- the CA's side of the state machine -------------------------------------------------
    def expire(self, url: str) -> None:
        """An order the CA gave up on (its authorizations expired): RFC 8555's ``invalid``."""
        self.orders[url].status = "invalid"

    def forget(self, url: str) -> None:
        """An order the CA no longer holds (a restart, a clean-up): a bare 404 from now on."""
        del self.orders[url]

    def _advance(self, order: _Order) -> None:
        for authz in order.authzs:
            challenge = authz.challenge
            if challenge.status == "processing":
                if challenge.polls_left > 0:
                    challenge.polls_left -= 1
                    continue
                code = self.fails.get(authz.name)
                if code is None:
                    challenge.status = authz.status = "valid"
                else:
                    challenge.status = authz.status = "invalid"
                    challenge.error = {
                        "type": messages.ERROR_PREFIX + code,
                        "detail": f"validation of {authz.name} failed",
                    }
        if order.status == "pending":
            if any(a.status == "invalid" for a in order.authzs):
                order.status = "invalid"
            elif all(a.status == "valid" for a in order.authzs):
                order.status = "ready"
        elif order.status == "processing":
            if order.issue_polls_left > 0:
                order.issue_polls_left -= 1
                return
            assert order.csr is not None
            cert = self._issue(order.csr)
            order.certificate = f"{order.url}/cert"
            self.certificates[order.certificate] = self._chain(cert)
            order.status = "valid"

    @staticmethod
    def _find(table: dict[str, Any], url: str) -> Any:
        try:
            return table[url]
        except KeyError:
            raise AttemptFailed(f"the CA knows no {url} (404)", error_type=NOT_FOUND) from None

    def _order_json(self, order: _Order) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": order.status,
            "identifiers": [{"type": "dns", "value": name} for name in order.names],
            "authorizations": [a.url for a in order.authzs],
            "finalize": f"{order.url}/finalize",
        }
        if order.certificate:
            body["certificate"] = order.certificate
        if order.error:
            body["error"] = order.error
        return body

    def _authz_json(self, authz: _Authz) -> dict[str, Any]:
        challenge = authz.challenge
        chall: dict[str, Any] = {
            "type": "http-01",
            "url": challenge.url,
            "status": challenge.status,
            "token": challenge.token,
        }
        if challenge.error:
            chall["error"] = challenge.error
        return {
            "identifier": {"type": "dns", "value": authz.name},
            "status": authz.status,
            "challenges": [chall],
        }

    # --- issuing ----------------------------------------------------------------------------
    def _make_root(self) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Fake CA")])
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )

    def _issue(self, csr: x509.CertificateSigningRequest) -> x509.Certificate:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._root.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=90))
            .add_extension(san, critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.issued.append(cert)
        return cert

    def _chain(self, cert: x509.Certificate) -> str:
        from cryptography.hazmat.primitives.serialization import Encoding

        return (cert.public_bytes(Encoding.PEM) + self._root.public_bytes(Encoding.PEM)).decode()


class FakeLimiter:
    """Never refuses; remembers the authorization failures it is told of."""

    def __init__(self) -> None:
        self.down: dict[str, float] = {}
        self.authz_failures: list[str] = []
        self.blocked: list[str] = []

    def reserve_new_order(self, account: str, names: Any, **_: Any) -> Decision:
        return ALLOWED

    def record_authorization_failure(self, account: str, name: str, **_: Any) -> None:
        self.authz_failures.append(name)

    def block_for_problem(self, reason: str, seconds: float, **_: Any) -> None:
        self.blocked.append(reason)

    def mark_issuer_down(self, seconds: float, reason: str) -> None:
        self.down[reason] = seconds

    def issuer_down(self) -> tuple[str, float] | None:
        return next(iter(self.down.items()), None)

    def clear_issuer_down(self) -> None:
        self.down.clear()

    def pace(self, endpoint: str, **_: Any) -> Decision:
        return ALLOWED


class RecordingPublisher:
    """What the edges would see: challenge answers and site records, with crash points."""

    def __init__(self, crashes: Crashes | None = None) -> None:
        self.crashes = crashes or Crashes()
        self.challenges: dict[str, str] = {}
        self.sites: dict[str, distribution.SiteRecord] = {}

    @contextmanager
    def _write(self, what: str) -> Iterator[None]:
        self.crashes.point(f"before publishing {what}")
        yield
        self.crashes.point(f"after publishing {what}")

    def set_challenge(self, token: str, key_authorization: str, ttl: int) -> None:
        with self._write("a challenge"):
            self.challenges[token] = key_authorization

    def remove_challenge(self, token: str) -> None:
        with self._write("a challenge's removal"):
            self.challenges.pop(token, None)

    def publish(self, record: distribution.SiteRecord) -> None:
        with self._write("a site"):
            self.sites[record.domain] = record


def crashing_sessions(sessions: Callable[[], Any], crashes: Crashes) -> Callable[[], Any]:
    """The store's sessions, with a crash point before and after every commit."""

    @contextmanager
    def scope() -> Iterator[Session]:
        with sessions() as session:
            yield session
            crashes.point("before a commit")  # rolled back, as a dead worker's would be
        crashes.point("after a commit")

    return scope
