"""Cost of opening sealed certificate keys, per scheme: the edge's cold-start budget.

For N EC P-256 certificates (self-signed, generated once and shared by every scheme), seal
each PKCS#8 private key to a fresh recipient key of each scheme, then time

(a) opening the N envelopes (best of --repeat passes), and
(b) opening them and building one ``ssl.SSLContext`` per certificate (``edge.tls.build_context``),

and print milliseconds per envelope with the ratio to legacy-rsa measured in the same run.

    .venv/bin/python benchmarks/seal.py [--n 1000 10000]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# Run as a script, the repository root is not on sys.path unless certman is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.crypto.envelope import Scheme, open_envelope, seal, spki_fingerprint
from pipeline.crypto.keys import Keyring, PrivateKey

BuildContext = Callable[[bytes, bytes], object]
BASELINE = Scheme.LEGACY_RSA


@dataclass(frozen=True)
class Site:
    """One certificate as the edge receives it: chain in clear, key to be sealed."""

    domain: str
    chain_pem: bytes
    key_pem: bytes
    binding: bytes


@dataclass(frozen=True)
class Result:
    scheme: Scheme
    n: int
    envelope_bytes: int
    seal_ms: float
    open_ms: float
    open_and_context_ms: float | None


def make_sites(n: int) -> list[Site]:
    """N distinct EC P-256 keys with self-signed certificates."""
    now = datetime.datetime.now(datetime.UTC)
    sites = []
    for index in range(n):
        domain = f"site{index}.bench.example"
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=90))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        chain_pem = certificate.public_bytes(serialization.Encoding.PEM)
        sites.append(Site(domain, chain_pem, key_pem, spki_fingerprint(key.public_key())))
    return sites


def _per_item_ms(start: float, n: int) -> float:
    return (time.perf_counter() - start) * 1000 / n


def _time_opening(envelopes: Sequence[bytes], sites: Sequence[Site], keyring: Keyring) -> float:
    """Milliseconds per envelope to open them all, checking every result afterwards."""
    gc.collect()
    start = time.perf_counter()
    opened = [
        open_envelope(e, keyring, domain=s.domain, binding=s.binding)
        for e, s in zip(envelopes, sites, strict=True)
    ]
    elapsed_ms = _per_item_ms(start, len(sites))
    if opened != [s.key_pem for s in sites]:
        raise SystemExit("an opened envelope differs from the sealed key")
    return elapsed_ms


def measure(
    scheme: Scheme, sites: Sequence[Site], build_context: BuildContext | None, repeat: int
) -> Result:
    """Seal every site's key to a new key of ``scheme``, then time opening them."""
    recipient = PrivateKey.generate(scheme)
    keyring = Keyring.of([recipient])
    public = recipient.public_key()
    n = len(sites)

    start = time.perf_counter()
    envelopes = [seal(s.key_pem, public, domain=s.domain, binding=s.binding) for s in sites]
    seal_ms = _per_item_ms(start, n)

    # Best of several passes: the machine is shared, and interference only ever adds time.
    open_ms = min(_time_opening(envelopes, sites, keyring) for _ in range(repeat))

    context_ms = None
    if build_context is not None:
        gc.collect()
        start = time.perf_counter()
        for envelope, site in zip(envelopes, sites, strict=True):
            key_pem = open_envelope(envelope, keyring, domain=site.domain, binding=site.binding)
            # Dropped at once: 10,000 live contexts would measure memory pressure, not work.
            build_context(site.chain_pem, key_pem)
        context_ms = _per_item_ms(start, n)

    size = sum(map(len, envelopes)) // n
    return Result(scheme, n, size, seal_ms, open_ms, context_ms)


def _load_build_context() -> BuildContext | None:
    try:
        from edge.tls import build_context
    except ImportError as exc:
        print(f"note: edge.tls.build_context unavailable ({exc}); skipping open + SSLContext")
        return None
    return build_context


def _ratio(value: float | None, baseline: float | None) -> str:
    if value is None or baseline is None:
        return "-"
    return f"{baseline / value:.1f}x"


def report(results: Sequence[Result]) -> None:
    """One table per N: ms per envelope, and how many times faster than legacy-rsa."""
    baseline = next(r for r in results if r.scheme is BASELINE)
    print(f"\nN = {baseline.n}")
    print(
        f"{'scheme':<12} {'bytes':>6} {'seal ms':>8} {'open ms':>8} {'vs rsa':>7}"
        f" {'open+ctx ms':>12} {'vs rsa':>7} {'open all s':>10}"
    )
    for r in results:
        context = "-" if r.open_and_context_ms is None else f"{r.open_and_context_ms:.4f}"
        print(
            f"{r.scheme:<12} {r.envelope_bytes:>6} {r.seal_ms:>8.4f} {r.open_ms:>8.4f}"
            f" {_ratio(r.open_ms, baseline.open_ms):>7} {context:>12}"
            f" {_ratio(r.open_and_context_ms, baseline.open_and_context_ms):>7}"
            f" {r.open_ms * r.n / 1000:>10.2f}"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 10000], help="certificates")
    parser.add_argument("--repeat", type=int, default=3, help="passes of (a); the best is kept")
    args = parser.parse_args(argv)
    build_context = _load_build_context()

    print(f"generating {max(args.n)} EC P-256 certificates...", flush=True)
    start = time.perf_counter()
    all_sites = make_sites(max(args.n))
    print(f"  done in {time.perf_counter() - start:.1f} s")
    for n in sorted(args.n):
        sites = all_sites[:n]
        results = [measure(scheme, sites, build_context, args.repeat) for scheme in Scheme]
        report(results)


if __name__ == "__main__":
    main()
