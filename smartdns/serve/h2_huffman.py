"""HPACK's Huffman code (RFC 7541 §5.2, Appendix B), decoding only, for serve.h2_hpack.
Pure; no I/O.

`hpack`'s decoder walks the code a nibble at a time: 9 us for a 65-character DoH `:path` on
the benchmark machine, as much as the rest of a request. This one reads 14 bits at a time
and takes every complete code within them from one table lookup (4 us): the table, built on
first use from `hpack`'s code list, has 16,384 slots sharing 5,149 distinct entries, about
0.6 MB per process.
"""

from __future__ import annotations

from typing import Final

from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

WINDOW_BITS: Final = 14
_WINDOW_MASK: Final = (1 << WINDOW_BITS) - 1
_EOS: Final = 256  # RFC 7541 §5.2: never inside a string
_MAX_PADDING_BITS: Final = 7
_SHORTEST_CODE_BITS: Final = min(REQUEST_CODES_LENGTH)
_LONGEST_CODE_BITS: Final = max(REQUEST_CODES_LENGTH)


class HuffmanError(Exception):
    """Not a Huffman-coded string: a code cut off, EOS, or padding other than 1 to 7 one
    bits (RFC 7541 §5.2)."""


# (symbol, (code, bits)) for the 256 octets and EOS
_CODES: Final = tuple(enumerate(zip(REQUEST_CODES, REQUEST_CODES_LENGTH, strict=True)))
# (bits, code) -> symbol, for codes longer than the window
_LONG: Final = {(length, code): symbol for symbol, (code, length) in _CODES if length > WINDOW_BITS}
_window_table: list[tuple[bytes, int]] = []


def decode(raw: bytes) -> bytes:
    """The octets `raw` encodes. Raises HuffmanError."""
    table = _window_table or _build_table()
    value = int.from_bytes(raw, "big")
    bits = len(raw) * 8  # not yet decoded, at the low end of `value`
    pieces: list[bytes] = []
    while bits >= WINDOW_BITS:
        piece, used = table[(value >> (bits - WINDOW_BITS)) & _WINDOW_MASK]
        if not used:  # a code longer than the window starts here
            piece, used = _long_code(value, bits)
        pieces.append(piece)
        bits -= used
    while bits:  # the tail, filled to a window with one bits as padding would be
        padding = WINDOW_BITS - bits
        piece, used = table[((value << padding) | ((1 << padding) - 1)) & _WINDOW_MASK]
        if not used or used > bits:
            break  # padding (checked below), or codes running into it (an error there)
        pieces.append(piece)
        bits -= used
    if bits > _MAX_PADDING_BITS or value & ((1 << bits) - 1) != (1 << bits) - 1:
        raise HuffmanError
    return b"".join(pieces)


def _long_code(value: int, bits: int) -> tuple[bytes, int]:
    for length in range(WINDOW_BITS + 1, min(bits, _LONGEST_CODE_BITS) + 1):
        symbol = _LONG.get((length, (value >> (bits - length)) & ((1 << length) - 1)))
        if symbol is not None:
            if symbol == _EOS:
                raise HuffmanError
            return bytes((symbol,)), length
    raise HuffmanError  # cut off


def _build_table() -> list[tuple[bytes, int]]:
    """For every window of WINDOW_BITS bits: the symbols of the complete codes it starts
    with, and their bits (0 when the first code is longer than the window)."""
    short = {
        (length, code): symbol
        for symbol, (code, length) in _CODES
        if length <= WINDOW_BITS and symbol != _EOS
    }
    entries: dict[tuple[bytes, int], tuple[bytes, int]] = {}
    table: list[tuple[bytes, int]] = []
    for window in range(1 << WINDOW_BITS):
        symbols = bytearray()
        used = 0
        length = _SHORTEST_CODE_BITS
        while used + length <= WINDOW_BITS:
            code = (window >> (WINDOW_BITS - used - length)) & ((1 << length) - 1)
            symbol = short.get((length, code))
            if symbol is None:
                length += 1
                continue
            symbols.append(symbol)
            used += length
            length = _SHORTEST_CODE_BITS
        entry = (bytes(symbols), used)
        table.append(entries.setdefault(entry, entry))  # equal entries shared
    _window_table[:] = table
    return _window_table
