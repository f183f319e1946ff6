"""The envelope schemes, which are also the kinds of key file: a leaf, so that the envelope
format (:mod:`pipeline.crypto.envelope`) and the key files (:mod:`pipeline.crypto.keys`) both
build on it without importing each other."""

from __future__ import annotations

import enum


class Scheme(enum.StrEnum):
    """How an envelope's body is encrypted; also the kind of a key file."""

    HPKE_X25519 = "hpke-x25519"
    HPKE_XWING = "hpke-xwing"
    LEGACY_RSA = "legacy-rsa"
