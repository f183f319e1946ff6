"""Domain names: validated and normalised in one place, for the CLI and the onboarding script.

The public suffix list comes from ``publicsuffixlist``: it ships the list inside the package (no
network at run time), is updated with each release, and knows private suffixes such as
``github.io`` as well as ICANN ones, so nobody here maintains a list by hand.
"""

from __future__ import annotations

import functools
import ipaddress
import re

import idna
from publicsuffixlist import PublicSuffixList

MAX_NAME = 253
MAX_LABEL = 63
_LDH = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$")


class InvalidName(ValueError):
    """A name we will not ask a CA for; the message says why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name!r}: {reason}")
        self.name = name
        self.reason = reason


@functools.cache
def _psl(*, accept_unknown: bool = False) -> PublicSuffixList:
    # Validation: accept_unknown=False, a TLD the list does not know is not a suffix we can
    # issue under. Counting (registered_domain): the CA's rule, an unknown TLD is a suffix.
    # Loading the list is slow (docs/architecture.md, section 5): once per flavour, on first
    # use, not at import.
    return PublicSuffixList(accept_unknown=accept_unknown)


def normalise(raw: str) -> str:
    """The A-label, lower-case form of a name, or :class:`InvalidName` with the reason."""
    name = raw.strip()
    if not name:
        raise InvalidName(raw, "empty name")
    if name.endswith("."):
        name = name[:-1]
    if "*" in name:
        raise InvalidName(raw, "wildcards are not supported (HTTP-01 cannot validate them)")
    if _is_ip_address(name):
        raise InvalidName(raw, "an IP address, not a domain name")
    if len(name) > MAX_NAME:
        raise InvalidName(raw, f"longer than {MAX_NAME} characters")
    lowered = name.lower()
    # Most dealer domains are plain LDH labels, already valid A-labels: skipping the IDNA
    # machinery for them doubles the speed of a 100,000-line onboarding.
    name = lowered if _is_plain_ascii(lowered) else _to_a_labels(raw, name)
    return _check_labels(raw, name)


def _is_plain_ascii(name: str) -> bool:
    # "xn--" labels and other "??--" labels (reserved by IDNA 2008) go the careful way.
    return name.isascii() and all(
        _LDH.match(label) and label[2:4] != "--" for label in name.split(".")
    )


def _to_a_labels(raw: str, name: str) -> str:
    try:
        # uts46 maps case and width the way browsers do before the IDNA 2008 check.
        name = idna.encode(name, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise InvalidName(raw, f"not a valid domain name ({exc})") from None
    except UnicodeError:
        raise InvalidName(raw, "not a valid domain name (a label is empty or too long)") from None
    return name.lower()


def _check_labels(raw: str, name: str) -> str:
    if len(name) > MAX_NAME:
        raise InvalidName(raw, f"longer than {MAX_NAME} characters")
    labels = name.split(".")
    for label in labels:
        if not label:
            raise InvalidName(raw, "empty label (two dots in a row)")
        if len(label) > MAX_LABEL:
            raise InvalidName(raw, f"label {label[:20]!r}... longer than {MAX_LABEL} characters")
        if label.startswith("-") or label.endswith("-"):
            raise InvalidName(raw, f"label {label!r} starts or ends with a hyphen")
        if not _LDH.match(label):
            raise InvalidName(raw, f"label {label!r} has characters other than a-z, 0-9, '-'")
    if len(labels) < 2:
        raise InvalidName(raw, "not a fully qualified name")
    psl = _psl()
    if psl.publicsuffix(name) is None:
        raise InvalidName(raw, f"'.{labels[-1]}' is not a known public suffix")
    if psl.privatesuffix(name) is None:
        raise InvalidName(raw, "a public suffix itself, which no one can own")
    return name


def comparison_form(name: str) -> str:
    """Lower-case, without a trailing dot: the form the CA compares names in (no validation,
    for names that are already stored or that come back in a CA's message)."""
    return name.strip().rstrip(".").lower()


def load_suffix_list() -> None:
    """Parse the list for :func:`registered_domain` now rather than on first use.

    A pre-forking worker calls it in its main process before the pool forks, so that the pool
    children inherit the parsed list: each of them would otherwise parse it again for its first
    order (about 0.14 s of CPU each, and again in every child the pool replaces)."""
    _psl(accept_unknown=True)


def registered_domain(name: str) -> str:
    """The registered domain (public suffix + 1 label) a name counts against at the CA:
    ``www.example.co.uk`` -> ``example.co.uk``. A name that is itself a public suffix (or is
    malformed) counts for itself; a wildcard counts for the name under it."""
    name = comparison_form(name).removeprefix("*.")
    registered: str | None = _psl(accept_unknown=True).privatesuffix(name)
    return registered or name


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True
