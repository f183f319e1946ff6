"""Response header blocks for HTTP/2, encoded without HPACK's dynamic table or Huffman coding.

``hpack``'s encoder, in pure Python, indexes every field in the dynamic table and Huffman-codes
every value: about half of the edge's CPU per HTTP/2 request went there. A reverse proxy's
response fields are mostly different every time (Date, Content-Length, ETag, cookies), so the
table buys little. This encoder sends a dynamic table size update to 0 in its first block (the
client then keeps no table for us: RFC 7541 section 6.3) and every field as a literal without
indexing, its name by static-table index where there is one (section 6.2.2), its value as
plain octets (section 5.2, H=0). The blocks are larger than ``hpack``'s, the CPU a fraction.

It stands in for ``H2Connection.encoder``; ``h2`` calls :meth:`encode` with the fields it was
given (bytes, already lower case and checked by :mod:`edge.http2`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import hpack
from hpack.table import HeaderTable

__all__ = ["FlatEncoder"]

# The first static-table index of each name (RFC 7541 appendix A), and whole-field indexes.
_NAME_INDEX: dict[bytes, int] = {}
_FIELD_INDEX: dict[tuple[bytes, bytes], int] = {}
for _i, (_name, _value) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _NAME_INDEX.setdefault(_name, _i)
    if _value:
        _FIELD_INDEX.setdefault((_name, _value), _i)


def _integer(value: int, prefix_bits: int, flags: int) -> bytes:
    """RFC 7541 section 5.1."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((flags | value,))
    out = bytearray((flags | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


class FlatEncoder(hpack.Encoder):
    """An ``hpack.Encoder`` as ``h2`` uses it, encoding as the module docstring says."""

    def __init__(self) -> None:
        super().__init__()
        self._sized = False

    def encode(self, headers: Iterable[Any], huffman: bool = True) -> bytes:
        parts: list[bytes] = []
        if not self._sized:
            parts.append(b"\x20")  # dynamic table size update: 0
            self._sized = True
        for field in headers:
            name, value = field[0], field[1]
            whole = _FIELD_INDEX.get((name, value))
            if whole is not None:
                parts.append(_integer(whole, 7, 0x80))
                continue
            index = _NAME_INDEX.get(name)
            if index is not None:
                parts.append(_integer(index, 4, 0x00))
            else:
                parts.append(b"\x00" + _integer(len(name), 7, 0x00) + name)
            parts.append(_integer(len(value), 7, 0x00) + value)
        return b"".join(parts)
