"""HPACK decoding (RFC 7541) for serve.doh_h2: one connection's dynamic table, header list
and table size bounds, and a process-wide bounded cache of Huffman-decoded strings (the
code itself is serve.h2_huffman's). Pure; no I/O, nothing logged (the `hpack` library's
decoder logs every field at debug level and cost 40% of a DoH request; its static table is
used here, its encoder by h2_frames).

The cache holds decoded strings keyed by their exact Huffman octets, like a packet cache:
a DoH GET's `:path` is a literal never indexed by clients (it differs per query), so the
same query asked again arrives as the same octets. It lives only in memory (SPEC 7).
"""

from __future__ import annotations

from collections import deque
from typing import Final

from hpack.table import HeaderTable

from smartdns.serve import h2_huffman

DEFAULT_TABLE_BYTES: Final = 4096  # SETTINGS_HEADER_TABLE_SIZE, never changed by us
_ENTRY_OVERHEAD: Final = 32  # RFC 7541 §4.1, also counted in header list sizes
_STATIC: Final[tuple[tuple[bytes, bytes], ...]] = (
    (b"", b""),  # index 0 is no field (RFC 7541 §2.3.3)
    *HeaderTable.STATIC_TABLE,
)
_STATIC_COUNT: Final = len(_STATIC) - 1
_STATIC_SIZES: Final = tuple(len(name) + len(value) + _ENTRY_OVERHEAD for name, value in _STATIC)
_MAX_INTEGER_SHIFT: Final = 28  # integers beyond 2^28 are no length or index we accept
_HUFFMAN_CACHED: Final = 4096  # strings kept
_HUFFMAN_CACHED_OCTETS: Final = 256  # longer encodings are decoded every time
_huffman_cache: dict[bytes, bytes] = {}


class HpackError(Exception):
    """An undecodable header block: COMPRESSION_ERROR (RFC 9113 §4.3)."""


class HeaderListTooLarge(HpackError):
    """The decoded header list is over the bound (RFC 9113 §6.5.2 MAX_HEADER_LIST_SIZE)."""


class HpackDecoder:
    """One connection's decoding context. `decode` takes a complete header block and returns
    its fields as (name, value) octets, raising HpackError (or HeaderListTooLarge, once the
    list passes `max_list_bytes` counted as RFC 7541 §4.1 counts entries)."""

    def __init__(self, max_list_bytes: int) -> None:
        self._max_list_bytes = max_list_bytes
        self._table: deque[tuple[tuple[bytes, bytes], int]] = deque()  # (field, size), newest first
        self._table_bytes = 0
        self._table_limit = DEFAULT_TABLE_BYTES  # the encoder's, at most ours (§4.2)

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        fields: list[tuple[bytes, bytes]] = []
        list_bytes = 0
        position = 0
        end = len(block)
        static = _STATIC
        while position < end:
            first = block[position]
            if first & 0x80:  # §6.1 indexed field, its index in one octet as a rule
                if first != 0xFF:
                    index = first & 0x7F
                    position += 1
                else:
                    index, position = _integer(block, position, 0x7F)
                if 0 < index <= _STATIC_COUNT:
                    field = static[index]
                    size = _STATIC_SIZES[index]
                elif index and index - _STATIC_COUNT <= len(self._table):
                    field, size = self._table[index - _STATIC_COUNT - 1]
                else:
                    raise HpackError
            elif first & 0x60 == 0x20:  # §6.3 dynamic table size update: before any field
                if fields:
                    raise HpackError
                limit, position = _integer(block, position, 0x1F)
                if limit > DEFAULT_TABLE_BYTES:
                    raise HpackError
                self._table_limit = limit
                self._evict()
                continue
            else:  # §6.2 literals: with incremental indexing, without, never indexed
                mask = 0x3F if first & 0x40 else 0x0F
                index = first & mask
                if index != mask:
                    position += 1
                else:
                    index, position = _integer(block, position, mask)
                if not index:
                    name, position = _string(block, position)
                elif index <= _STATIC_COUNT:
                    name = static[index][0]
                else:
                    name = self._entry(index)[0][0]
                value, position = _string(block, position)
                field = (name, value)
                size = len(name) + len(value) + _ENTRY_OVERHEAD
                if first & 0x40:
                    self._insert(field, size)
            list_bytes += size
            if list_bytes > self._max_list_bytes:
                raise HeaderListTooLarge
            fields.append(field)
        return fields

    def _entry(self, index: int) -> tuple[tuple[bytes, bytes], int]:
        """The field at `index` and its size (§2.3.3: static, then dynamic, newest first)."""
        if 0 < index <= _STATIC_COUNT:
            return _STATIC[index], _STATIC_SIZES[index]
        dynamic = index - _STATIC_COUNT - 1
        if index == 0 or dynamic >= len(self._table):
            raise HpackError
        return self._table[dynamic]

    def _insert(self, field: tuple[bytes, bytes], size: int) -> None:
        """RFC 7541 §4.4: evict from the oldest until the entry fits; an entry larger than
        the whole table empties it and is not kept."""
        self._table.appendleft((field, size))
        self._table_bytes += size
        self._evict()

    def _evict(self) -> None:
        table = self._table
        while self._table_bytes > self._table_limit:
            self._table_bytes -= table.pop()[1]


def _integer(block: bytes, position: int, mask: int) -> tuple[int, int]:
    """RFC 7541 §5.1: the integer whose prefix is `mask` of the octet at `position`, and the
    position after it."""
    value = block[position] & mask
    position += 1
    if value < mask:
        return value, position
    shift = 0
    while True:
        if position >= len(block) or shift > _MAX_INTEGER_SHIFT:
            raise HpackError
        octet = block[position]
        position += 1
        value += (octet & 0x7F) << shift
        shift += 7
        if not octet & 0x80:
            return value, position


def _string(block: bytes, position: int) -> tuple[bytes, int]:
    """RFC 7541 §5.2: a string literal, Huffman-decoded when its H bit says so."""
    if position >= len(block):
        raise HpackError
    first = block[position]
    if first & 0x7F != 0x7F:
        length = first & 0x7F
        position += 1
    else:
        length, position = _integer(block, position, 0x7F)
    end = position + length
    if end > len(block):
        raise HpackError
    raw = block[position:end]
    if not first & 0x80:
        return raw, end
    decoded = _huffman_cache.get(raw)
    if decoded is None:
        try:
            decoded = h2_huffman.decode(raw)
        except h2_huffman.HuffmanError:
            raise HpackError from None
        if length <= _HUFFMAN_CACHED_OCTETS:
            if len(_huffman_cache) >= _HUFFMAN_CACHED:
                _huffman_cache.clear()  # see serve.doh_request._reply_headers
            _huffman_cache[raw] = decoded
    return decoded, end
