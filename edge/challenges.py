"""HTTP-01 key authorizations: from memory (filled by events), else one Redis read.

A token Redis did not answer for is remembered as a miss for a short while (bounded in
number), so that asking for the same unknown tokens over and over costs no Redis round trip
each. The pipeline publishes a challenge's event before it asks the CA to validate it, and that
event replaces the miss, so a challenge published after a miss is answered at once.

Only answers the pipeline signed are served (:class:`~pipeline.crypto.signing.SignedChallenge`):
whoever can write Redis could otherwise have every edge answer the challenges of their own
ACME account, and so obtain a trusted certificate for any customer's name.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio
import tornado.web

from pipeline.crypto.signing import BadSignature, SignedChallenge, TrustedSigners
from pipeline.distribution.layout import EDGE_HEADER, challenge_key, signed_challenge_key

__all__ = ["MISS_LIMIT", "MISS_TTL", "ChallengeHandler", "ChallengeStore", "valid_token"]

# RFC 8555 tokens are base64url without padding; anything else is not ours and never reaches Redis.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")

# How long a token Redis had no (good) answer for is answered 404 without asking again. Short:
# an event lost on a reconnect is followed by a snapshot re-read, which clears these too, but a
# miss must never outlive the time a CA takes to come back for a challenge.
MISS_TTL = 2.0
# Misses remembered at most (the oldest go first): about 200 bytes each.
MISS_LIMIT = 10_000


def valid_token(token: str) -> bool:
    return _TOKEN.fullmatch(token) is not None


class ChallengeStore:
    def __init__(
        self,
        client: redis.asyncio.Redis[Any],
        prefix: str,
        signers: TrustedSigners,
        on_refused: Callable[[str], None] = lambda kind: None,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._signers = signers
        self._on_refused = on_refused
        # token -> (key authorization, monotonic expiry)
        self._memory: dict[str, tuple[str, float]] = {}
        # token -> monotonic expiry of a miss, oldest first
        self._misses: OrderedDict[str, float] = OrderedDict()

    def put_signed(self, challenge: SignedChallenge, ttl: float) -> None:
        """Keep ``challenge`` in memory if it verifies (until it expires); else count it."""
        self._misses.pop(challenge.token, None)  # published: ask again, whatever it holds
        now = time.time()
        try:
            self._signers.verify_challenge(challenge, now)
        except BadSignature as exc:
            self.refused(exc.kind)
            return
        lifetime = min(ttl, challenge.expires - now)
        self._memory[challenge.token] = (challenge.key_authorization, time.monotonic() + lifetime)

    def refused(self, kind: str) -> None:
        self._on_refused(kind)

    def discard(self, token: str) -> None:
        self._memory.pop(token, None)

    def clear(self) -> None:
        """After a lost connection removals (and publications) may have been missed: trust
        Redis again."""
        self._memory.clear()
        self._misses.clear()

    def _missed(self, token: str) -> None:
        self._misses[token] = time.monotonic() + MISS_TTL
        self._misses.move_to_end(token)
        while len(self._misses) > MISS_LIMIT:
            self._misses.popitem(last=False)

    async def get(self, token: str) -> str | None:
        if not valid_token(token):
            return None
        entry = self._memory.get(token)
        if entry is not None:
            if entry[1] > time.monotonic():
                return entry[0]
            del self._memory[token]
        missed = self._misses.get(token)
        if missed is not None:
            if missed > time.monotonic():
                return None
            del self._misses[token]
        try:
            value, raw_signed = await self._client.mget(
                challenge_key(self._prefix, token), signed_challenge_key(self._prefix, token)
            )
        except (redis.ConnectionError, redis.TimeoutError):
            return None  # not a miss: Redis did not say
        text = self._check(token, value, raw_signed)
        if text is None:
            self._missed(token)
        return text

    def _check(self, token: str, value: object, raw_signed: object) -> str | None:
        """The key authorization Redis holds for ``token`` if the pipeline signed it."""
        if value is None:
            return None
        if not isinstance(raw_signed, (bytes, str)):
            self.refused("unsigned")
            return None
        try:
            challenge = SignedChallenge.from_json(raw_signed)
            self._signers.verify_challenge(challenge, time.time())
        except BadSignature as exc:
            self.refused(exc.kind)
            return None
        text = value.decode() if isinstance(value, bytes) else str(value)
        if challenge.token != token or challenge.key_authorization != text:
            self.refused("mismatch")
            return None
        return text


class ChallengeHandler(tornado.web.RequestHandler):
    """``GET /.well-known/acme-challenge/<token>`` on port 80 (RFC 8555 section 8.3).

    The body is exactly the key authorization (no newline), as in the RFC's example exchange.
    """

    def initialize(self, challenges: ChallengeStore) -> None:
        self._challenges = challenges

    def compute_etag(self) -> str | None:
        return None

    async def get(self, token: str) -> None:
        key_authorization = await self._challenges.get(token)
        self.set_header(EDGE_HEADER, "1")
        self.set_header("Content-Type", "application/octet-stream")
        self.set_header("Cache-Control", "no-store")
        if key_authorization is None:
            self.set_status(404)
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish("unknown challenge token\n")
            return
        self.finish(key_authorization.encode())

    head = get
