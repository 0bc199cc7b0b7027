"""HTTP/2 frames a DoH server sends (RFC 9113 §4, §6), the codes they carry, and response
header blocks from cached HPACK fields (RFC 7541). Pure; no I/O, no state: serve.doh_h2
owns the connection. What never changes is built once at import.
"""

from __future__ import annotations

import enum
import functools
import struct
from typing import Final

import hpack

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 §3.4, the client's first octets
FRAME_HEADER_BYTES: Final = 9
MAX_FRAME_BYTES: Final = 16_384  # our SETTINGS_MAX_FRAME_SIZE: the default, never raised
MAX_WINDOW: Final = 2**31 - 1  # RFC 9113 §6.9.1
DEFAULT_WINDOW: Final = 65_535  # RFC 9113 §6.9.2: every window starts here
# The frame header as struct reads it: the 24-bit length as its high octet and low 16 bits.
FRAME_HEADER: Final = struct.Struct(">BHBBL")


class FrameType(enum.IntEnum):
    DATA = 0x0
    HEADERS = 0x1
    PRIORITY = 0x2
    RST_STREAM = 0x3
    SETTINGS = 0x4
    PUSH_PROMISE = 0x5
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8
    CONTINUATION = 0x9


class Flag(enum.IntFlag):
    ACK = 0x1  # SETTINGS, PING
    END_STREAM = 0x1  # DATA, HEADERS
    END_HEADERS = 0x4
    PADDED = 0x8
    PRIORITY = 0x20


class ErrorCode(enum.IntEnum):
    """RFC 9113 §7."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    FLOW_CONTROL_ERROR = 0x3
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    ENHANCE_YOUR_CALM = 0xB


class Setting(enum.IntEnum):
    """RFC 9113 §6.5.2; others are ignored (§6.5.3)."""

    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6


_HEADER_FIELDS_CACHED: Final = 4096  # distinct (name, value) pairs: statuses, sizes, max-ages
_HEADER_BLOCKS_CACHED: Final = 4096  # distinct (status, length, headers, flags): the same
# RFC 7541 §6.3: a dynamic table size update to 0, sent before the first response block and
# after every change the client makes to SETTINGS_HEADER_TABLE_SIZE: responses use no table.
TABLE_SIZE_ZERO: Final = b"\x20"


def frame(kind: FrameType, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One frame: the 9-octet header (RFC 9113 §4.1), then the payload."""
    size = len(payload)
    return FRAME_HEADER.pack(size >> 16, size & 0xFFFF, kind, flags, stream_id) + payload


def frame_header(kind: FrameType, flags: int, stream_id: int, size: int) -> bytes:
    return FRAME_HEADER.pack(size >> 16, size & 0xFFFF, kind, flags, stream_id)


def settings(values: dict[Setting, int]) -> bytes:
    return frame(
        FrameType.SETTINGS, 0, 0, b"".join(struct.pack(">HL", k, v) for k, v in values.items())
    )


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(FrameType.WINDOW_UPDATE, 0, stream_id, increment.to_bytes(4, "big"))


def rst_stream(stream_id: int, code: ErrorCode) -> bytes:
    return frame(FrameType.RST_STREAM, 0, stream_id, code.to_bytes(4, "big"))


def goaway(last_stream_id: int, code: ErrorCode) -> bytes:
    return frame(FrameType.GOAWAY, 0, 0, struct.pack(">LL", last_stream_id, code))


SETTINGS_ACK: Final = frame(FrameType.SETTINGS, Flag.ACK, 0)
PING_ACK_HEADER: Final = frame_header(FrameType.PING, Flag.ACK, 0, 8)


@functools.lru_cache(maxsize=_HEADER_BLOCKS_CACHED)
def response_head(
    status: int,
    length: int,
    headers: tuple[tuple[bytes, bytes], ...],
    end_stream: bool,
    table_size_update: bool,
) -> tuple[bytes, bytes]:
    """A response's HEADERS frame around the stream ID: the frame header's first five
    octets (length, type, flags) and the HPACK block (`:status`, `content-length`, then
    `headers`; after TABLE_SIZE_ZERO when `table_size_update`).

    No field enters the dynamic table (every literal is "never indexed"), so a field's
    encoding does not depend on what went before and a block is the concatenation of its
    fields' encodings; the price is a few dozen octets per response that the table would
    have saved."""
    fields = ((b":status", b"%d" % status), (b"content-length", b"%d" % length), *headers)
    block = b"".join([_encode_field(name, value) for name, value in fields])
    if table_size_update:
        block = TABLE_SIZE_ZERO + block
    flags = Flag.END_HEADERS | Flag.END_STREAM if end_stream else Flag.END_HEADERS
    return frame_header(FrameType.HEADERS, flags, 0, len(block))[:5], block


_FIELD_ENCODER: Final = hpack.Encoder()  # its dynamic table stays empty: nothing is indexed


@functools.lru_cache(maxsize=_HEADER_FIELDS_CACHED)
def _encode_field(name: bytes, value: bytes) -> bytes:
    return _FIELD_ENCODER.add((name, value), sensitive=True, huffman=True)
