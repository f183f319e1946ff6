"""Signatures verified ahead of the handshakes that need them, on a thread of their own.

An edge believes only what the pipeline signed (:mod:`pipeline.crypto.signing`), and verifying one
statement costs about 0.1-0.25 ms: inside a first handshake that is more than signed
distribution may add. So after every snapshot the statements not yet verified are handed to
this thread, and a handshake finds its statement already verified and only parses it.
OpenSSL's Ed25519 verification releases the GIL (two threads verifying on this machine's two
cores took 0.45 s for what one took 0.84 s), so the event loop keeps serving meanwhile; only
the JSON parsing holds it, some tens of microseconds at a time.

What is found good is remembered (in memory, and in the local mirror with its signer, so a
restart does not verify it again); what is found bad is left for the first use to refuse,
which logs and counts it as it always did.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CollectorRegistry, Counter, Gauge

from pipeline.crypto.signing import SignedSite, TrustedSigners

__all__ = ["Verifier", "raw_digest"]

# Verified per trip to the thread: ~30 ms of its work, so a newer snapshot stops it soon.
BATCH = 256

# (domain, digest of the raw statement, signer's key id)
Verified = tuple[str, bytes, str]


def raw_digest(raw: bytes) -> bytes:
    """What a raw statement is known by: the same bytes need no second verification."""
    return hashlib.blake2b(raw, digest_size=16).digest()


class Verifier:
    def __init__(self, signers: TrustedSigners, registry: CollectorRegistry) -> None:
        self._signers = signers
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="certman-verify")
        self.pending = Gauge(
            "certman_edge_signatures_pending",
            "Statements of the current snapshot not yet verified ahead of their first use.",
            registry=registry,
        )
        self.verified = Counter(
            "certman_edge_signatures_verified_ahead_total",
            "Statements verified ahead of their first use: on the verifier thread, or on the "
            "mirror's writer thread for a snapshot's changes.",
            registry=registry,
        )
        self.verified_on_loop = Counter(
            "certman_edge_signatures_verified_on_loop_total",
            "Signatures verified on the event loop: events, and first uses the verifier's "
            "thread had not reached.",
            registry=registry,
        )

    async def verify(
        self, batch: list[tuple[str, bytes]], known: Callable[[str], bytes | None]
    ) -> list[Verified]:
        """Those statements of ``batch`` (domain, raw) that are filed under their own domain
        and carry a good signature of a trusted signer (removals included), leaving out the
        rest and those whose digest ``known`` (called on the thread) gives for the domain."""
        loop = asyncio.get_running_loop()
        good = await loop.run_in_executor(self._thread, self._verify, batch, known)
        self.verified.inc(len(good))
        return good

    def _verify(
        self, batch: list[tuple[str, bytes]], known: Callable[[str], bytes | None]
    ) -> list[Verified]:
        good: list[Verified] = []
        for domain, raw in batch:
            digest = raw_digest(raw)
            if digest == known(domain):
                continue
            try:
                statement = SignedSite.from_json(raw)
                if statement.domain != domain:
                    continue
                self._signers.verify_site(statement)
            except (ValueError, TypeError, KeyError):  # BadSignature, and junk that is not JSON
                continue
            good.append((domain, digest, statement.signer))
        return good

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
