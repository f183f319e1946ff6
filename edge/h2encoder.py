"""HPACK for the edge's HTTP/2: response blocks encoded flat, repeated request blocks decoded once.

Response header blocks are encoded without HPACK's dynamic table or Huffman coding.

``hpack``'s encoder, in pure Python, indexes every field in the dynamic table and Huffman-codes
every value: about half of the edge's CPU per HTTP/2 request went there. A reverse proxy's
response fields are mostly different every time (Date, Content-Length, ETag, cookies), so the
table buys little. This encoder sends a dynamic table size update to 0 in its first block (the
client then keeps no table for us: RFC 7541 section 6.3) and every field as a literal without
indexing, its name by static-table index where there is one (section 6.2.2), its value as
plain octets (section 5.2, H=0). The blocks are larger than ``hpack``'s, the CPU a fraction.

It stands in for ``H2Connection.encoder``; ``h2`` calls :meth:`encode` with the fields it was
given (bytes, already lower case and checked by :mod:`edge.http2`). Each field's encoding is
kept (a bounded map shared by every connection): a proxy sends the same few fields again and
again (``content-type``, ``server``, this second's ``date``).

:class:`RepeatDecoder` stands in for ``H2Connection.decoder``. A client sends much the same
request again and again on a connection, and after the first one every field of it is an
index into the HPACK tables (browsers, curl, h2load all index what they repeat): such a block
changes nothing in the decoder's state, so the same bytes decode to the same list until a block
that does change the table. ``hpack``'s decoder, pure Python, cost as much per request as the
rest of ``h2``'s receiving together.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import hpack
from hpack.struct import HeaderTuple
from hpack.table import HeaderTable, table_entry_size

__all__ = ["FlatEncoder", "RepeatDecoder"]

# Fields whose encoding is kept, and the longest kept; past that many the map starts again (a
# response field that is new every time, an ETag say, must not grow it without bound).
_KEPT_FIELDS = 2048
_KEPT_FIELD_LENGTH = 256
# Request blocks kept per connection, and the longest kept: a block of indexed fields is a
# byte or two per field, and the list it decodes to is bounded by the block's length.
_KEPT_BLOCKS = 64
_KEPT_BLOCK_BYTES = 128
# Every field an index into the tables (RFC 7541 section 6.1) that fits in one byte: 1..126.
_INDEXED_ONLY = re.compile(rb"[\x81-\xfe]+")

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


def _field(name: bytes, value: bytes) -> bytes:
    whole = _FIELD_INDEX.get((name, value))
    if whole is not None:
        return _integer(whole, 7, 0x80)
    index = _NAME_INDEX.get(name)
    if index is not None:
        head = _integer(index, 4, 0x00)
    else:
        head = b"\x00" + _integer(len(name), 7, 0x00) + name
    return head + _integer(len(value), 7, 0x00) + value


_encoded: dict[tuple[bytes, bytes], bytes] = {}


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
        kept = _encoded
        for field in headers:
            key = (field[0], field[1])
            encoded = kept.get(key)
            if encoded is None:
                encoded = _field(*key)
                if len(encoded) <= _KEPT_FIELD_LENGTH:
                    if len(kept) >= _KEPT_FIELDS:
                        kept.clear()
                    kept[key] = encoded
            parts.append(encoded)
        return b"".join(parts)


class RepeatDecoder(hpack.Decoder):
    """An ``hpack.Decoder`` as ``h2`` uses it (``raw``: bytes), decoding a block of indexed
    fields it has decoded before from what it kept (see the module docstring). The limits hold
    as in ``hpack``: a kept list over ``max_header_list_size`` goes through ``hpack`` again,
    which refuses it."""

    def __init__(self, max_header_list_size: int = hpack.hpack.DEFAULT_MAX_HEADER_LIST_SIZE):
        super().__init__(max_header_list_size)
        self._kept: dict[bytes, tuple[list[HeaderTuple], int]] = {}

    def decode(self, data: bytes, raw: bool = False) -> Iterable[HeaderTuple]:
        kept = self._kept
        indexed = (
            raw
            and type(data) is bytes
            and len(data) <= _KEPT_BLOCK_BYTES
            and _INDEXED_ONLY.fullmatch(data) is not None
        )
        if not indexed:
            kept.clear()  # the block may add to the dynamic table, or resize it
            return super().decode(data, raw)
        hit = kept.get(data)
        if hit is not None and hit[1] <= self.max_header_list_size:
            self._assert_valid_table_size()
            return list(hit[0])
        # Nothing in this block changes the tables: the same bytes decode the same way until
        # a block that does.
        headers = list(super().decode(data, raw))
        if len(kept) >= _KEPT_BLOCKS:
            kept.clear()
        kept[data] = (headers, sum(table_entry_size(n, v) for n, v in headers))
        return list(headers)
