"""DoH over HTTP/2, sans I/O: the server side of RFC 9113 as far as DoH needs it, with this
server's bounds (CVE-2023-44487 "rapid reset"; slow requests; header and body sizes). Bytes
in, complete requests out, responses in, bytes out; the asyncio protocol (serve.doh) moves
the bytes and owns the timer. HPACK is serve.h2_hpack's (decoding) and serve.h2_frames'.

One pass over each read: frame headers read in place (struct), payloads sliced out (they
are small: a slice costs less than a memoryview), a stream is an entry in a few dicts, all
output of a read goes out as one write. Nothing here logs; errors end the connection with a
GOAWAY whose code is all the client learns (SPEC 7).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, TypeAlias

from smartdns.core.wire import new_tuple
from smartdns.serve.doh_request import (
    MAX_BODY_BYTES,
    PAYLOAD_TOO_LARGE,
    HttpRequest,
    HttpResponse,
)
from smartdns.serve.h2_frames import (
    DEFAULT_WINDOW,
    FRAME_HEADER,
    FRAME_HEADER_BYTES,
    MAX_FRAME_BYTES,
    MAX_WINDOW,
    PING_ACK_HEADER,
    PREFACE,
    SETTINGS_ACK,
    ErrorCode,
    Flag,
    FrameType,
    Setting,
    frame_header,
    goaway,
    response_head,
    rst_stream,
    settings,
    window_update,
)
from smartdns.serve.h2_hpack import HeaderListTooLarge, HpackDecoder, HpackError
from smartdns.serve.tcp import MAX_UNSENT_BYTES  # also for answers the client's windows hold

MAX_STREAMS: Final = 100  # SETTINGS_MAX_CONCURRENT_STREAMS (SPEC 2a)
MAX_HEADER_LIST_BYTES: Final = 8192  # SETTINGS_MAX_HEADER_LIST_SIZE: a DoH request needs < 1 KiB
# Client resets beyond the streams it let finish: one window of streams may be abandoned at
# once (a closed browser tab); more than that is the rapid reset attack.
RESET_ALLOWANCE: Final = MAX_STREAMS
# Flow control bounds what request bodies a connection holds: its window (and each stream's)
# is one octet more than the largest body, so a body over it still shows (413), and it opens
# again only as bodies are consumed (a request complete, cut short or reset).
BODY_WINDOW_BYTES: Final = MAX_BODY_BYTES + 1
# Consumed window is given back in one WINDOW_UPDATE once this much has gathered (or at once
# while a body is still being read, so it cannot wait for window that others hold).
_WINDOW_REFILL_BYTES: Final = BODY_WINDOW_BYTES // 4
_SERVER_PREFACE: Final = settings(
    {
        Setting.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
        Setting.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_BYTES,
        Setting.INITIAL_WINDOW_SIZE: BODY_WINDOW_BYTES,
    }
) + window_update(0, BODY_WINDOW_BYTES - DEFAULT_WINDOW)
_METHOD, _SCHEME, _AUTHORITY, _PATH = 1, 2, 4, 8  # the request pseudo-headers, as bits
_PSEUDO_HEADER_BITS: Final = {
    b":method": _METHOD,
    b":scheme": _SCHEME,
    b":authority": _AUTHORITY,
    b":path": _PATH,
}
_REQUIRED_PSEUDO_HEADERS: Final = _METHOD | _SCHEME | _PATH
_CONNECTION_HEADERS: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_PADDED: Final = int(Flag.PADDED)
_END_STREAM: Final = int(Flag.END_STREAM)
_END_HEADERS: Final = int(Flag.END_HEADERS)
_PRIORITY: Final = int(Flag.PRIORITY)
_ACK: Final = int(Flag.ACK)
_HEADERS_FRAME: Final = int(FrameType.HEADERS)
_DATA_FRAME: Final = int(FrameType.DATA)
_WINDOW_UPDATE_FRAME: Final = int(FrameType.WINDOW_UPDATE)
_DATA_END_STREAM: Final = bytes((FrameType.DATA, Flag.END_STREAM))  # type and flags octets


_Requests: TypeAlias = list[tuple[int, HttpRequest]]  # (stream ID, request) completed


class _ConnectionError(Exception):
    """The connection ends with a GOAWAY carrying `code` (RFC 9113 §5.4.1)."""

    def __init__(self, code: ErrorCode) -> None:
        super().__init__(code.name)
        self.code = code


class _Malformed(Exception):
    """A request header block RFC 9113 §8.1.1 calls malformed: a stream error."""


@dataclass(slots=True)
class _Incoming:
    """A request whose headers arrived and whose body is still coming."""

    method: bytes
    target: bytes
    content_type: bytes | None
    started: float
    body: bytearray = field(default_factory=bytearray)
    received: int = 0  # flow-controlled octets of this stream, window not yet given back


class H2Session:
    """One HTTP/2 connection's DoH state. `receive` returns (stream ID, request) for each
    request completed; `respond` answers one (None resets the stream: a query the policy
    dropped); `data_to_send` is what goes on the wire; `expire` applies the deadlines.
    `closed` once a GOAWAY went out, the client's came, or the connection failed: send what
    is left, then close.

    Bounds: the client preface checked and its first frame a SETTINGS; frames over 16 KiB
    refused (FRAME_SIZE_ERROR); at most MAX_STREAMS requests open or being answered (over
    that a new stream is refused with REFUSED_STREAM, whatever the client has acknowledged of
    our settings); a header block (HEADERS and its CONTINUATIONs, as received) or header list
    over MAX_HEADER_LIST_BYTES ends the connection; a body over MAX_BODY_BYTES gets 413 and
    the stream reset; a request not complete within `deadline_s` of its headers is reset; no
    request answered (nor window opened) for `deadline_s` while none waits for its answer
    ends the connection (GOAWAY), and so do more than MAX_UNSENT_BYTES of answers held back
    by the client's windows or of PING answers in one read; client resets beyond
    RESET_ALLOWANCE more than the streams answered end it with ENHANCE_YOUR_CALM.

    A stream is an entry in `_windows` (its send window) from its HEADERS until the answer
    is out or it is reset; while its body comes it is in `_incoming` too, and while its
    answer waits for window, in `_unsent`. Frames on a stream no longer held (answered or
    reset: RFC 9113 §5.1 "closed") are ignored; their DATA's window is given back."""

    def __init__(self, now: float, deadline_s: float) -> None:
        self._deadline_s = deadline_s
        self._out = bytearray(_SERVER_PREFACE)
        self._partial = bytearray()  # an incomplete frame (or preface) from the last read
        self._needed = len(PREFACE)  # the octets `_partial` must reach to be worth reading
        self._preface_done = False
        self._settings_seen = False  # RFC 9113 §3.4: the client's first frame is SETTINGS
        self._decoder = HpackDecoder(MAX_HEADER_LIST_BYTES)
        self._continuing: tuple[int, int, bytearray] | None = None  # stream, flags, block
        self._highest = 0  # the highest stream ID the client opened
        self._windows: dict[int, int] = {}  # open streams: send window
        self._incoming: dict[int, _Incoming] = {}
        self._unsent: dict[int, bytes] = {}  # response bodies waiting for flow-control window
        self._cut: set[int] = set()  # answered before their request body ended (413)
        self._send_window = DEFAULT_WINDOW  # the connection's, for our DATA
        self._receive_window = BODY_WINDOW_BYTES  # the connection's, for the client's DATA
        self._unreturned = 0  # consumed octets not yet given back to the client's window
        self._initial_window = DEFAULT_WINDOW  # the client's SETTINGS_INITIAL_WINDOW_SIZE
        self._max_frame = MAX_FRAME_BYTES  # the client's SETTINGS_MAX_FRAME_SIZE
        self._table_size_due = True  # TABLE_SIZE_ZERO goes first in the next response block
        self._peer_done = False  # the client sent GOAWAY: finish what is open, then close
        self._resets = 0
        self._answered = 0
        self._last_active = now
        self.closed = False

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def is_idle(self) -> bool:
        """No request open, being answered or being sent."""
        return not self._windows

    @property
    def may_read(self) -> bool:
        """Streams, not reading, bound the work in progress (MAX_STREAMS)."""
        return not self.closed

    def resume(self, now: float) -> list[tuple[int, HttpRequest]]:
        """Nothing waits behind an answer in HTTP/2: streams are independent."""
        return []

    # ---- receiving ---------------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> list[tuple[int, HttpRequest]]:
        if self.closed or not data:
            return []
        partial = self._partial
        if partial:
            partial += data
            if len(partial) < self._needed:
                return []  # a frame trickling in is not copied again for each piece
            data = bytes(partial)
            partial.clear()
        requests: list[tuple[int, HttpRequest]] = []
        try:
            if not self._preface_done:
                data = self._preface(data)
            used = self._frames(data, now, requests)
        except _ConnectionError as error:
            self._goaway(error.code)
            return requests
        if used < len(data):
            partial += data[used:]
            self._needed = FRAME_HEADER_BYTES
            if len(partial) >= FRAME_HEADER_BYTES:
                self._needed += int.from_bytes(partial[:3], "big")
        if self._unreturned and (self._unreturned >= _WINDOW_REFILL_BYTES or self._incoming):
            self._give_back()
        if self._peer_done and not self._windows:
            self.closed = True
        return requests

    def _preface(self, data: bytes) -> bytes:
        """The rest of `data` after the client preface, b"" while it is incomplete."""
        if len(data) < len(PREFACE):
            if not PREFACE.startswith(data):
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR)
            self._partial += data
            return b""
        if not data.startswith(PREFACE):
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR)
        self._preface_done = True
        return data[len(PREFACE) :]

    def _frames(self, data: bytes, now: float, out: _Requests) -> int:
        """Handle every complete frame in `data`; returns the octets used."""
        size = len(data)
        position = 0
        while size - position >= FRAME_HEADER_BYTES and not self.closed:
            high, low, kind, flags, stream_id = FRAME_HEADER.unpack_from(data, position)
            length = high << 16 | low
            if length > MAX_FRAME_BYTES:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR)
            start = position + FRAME_HEADER_BYTES
            end = start + length
            if end > size:
                break
            position = end
            stream_id &= 0x7FFFFFFF
            if self._continuing is not None:
                self._continuation(kind, flags, stream_id, data[start:end], now, out)
            elif not self._settings_seen and (kind != FrameType.SETTINGS or flags & _ACK):
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR)
            elif kind == _HEADERS_FRAME:
                self._headers(flags, stream_id, data[start:end], now, out)
            elif kind == _DATA_FRAME:
                self._data(flags, stream_id, data[start:end], now, out)
            elif kind == _WINDOW_UPDATE_FRAME:
                self._window_update(stream_id, data[start:end], now)
            else:
                self._control(kind, flags, stream_id, data[start:end])
        return position

    def _control(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        """The frames that carry no request: SETTINGS, PING, RST_STREAM, GOAWAY, PRIORITY,
        the ones a server never receives, and unknown types (ignored, RFC 9113 §5.5)."""
        if kind == FrameType.SETTINGS:
            self._settings(flags, stream_id, payload)
        elif kind == FrameType.PING:
            if stream_id:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR)
            if len(payload) != 8:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR)
            if not flags & _ACK:
                self._out += PING_ACK_HEADER
                self._out += payload
                if len(self._out) > MAX_UNSENT_BYTES:  # a PING flood
                    raise _ConnectionError(ErrorCode.ENHANCE_YOUR_CALM)
        elif kind == FrameType.RST_STREAM:
            if len(payload) != 4:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR)
            self._check_not_idle(stream_id)
            self._reset_by_client(stream_id)
        elif kind == FrameType.PRIORITY:  # RFC 9113 §5.3.2: deprecated, ignored
            if not stream_id:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR)
            if len(payload) != 5:
                self._out += rst_stream(stream_id, ErrorCode.FRAME_SIZE_ERROR)
                self._forget(stream_id)
        elif kind == FrameType.GOAWAY:
            if stream_id:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR)
            self._peer_done = True  # no new streams; the open ones are still answered
        elif kind in (FrameType.PUSH_PROMISE, FrameType.CONTINUATION):
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR)  # never from a client / unasked

    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        """Apply the client's SETTINGS (RFC 9113 §6.5) and acknowledge them."""
        if stream_id:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR)
        if flags & _ACK:
            if payload:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR)
            return  # ours are in force from the first frame anyway
        if len(payload) % 6:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR)
        self._settings_seen = True
        for offset in range(0, len(payload), 6):
            code = int.from_bytes(payload[offset : offset + 2], "big")
            value = int.from_bytes(payload[offset + 2 : offset + 6], "big")
            if code == Setting.INITIAL_WINDOW_SIZE:
                self._set_initial_window(value)
            elif code == Setting.MAX_FRAME_SIZE:
                if not MAX_FRAME_BYTES <= value <= 2**24 - 1:
                    raise _ConnectionError(ErrorCode.PROTOCOL_ERROR)
                self._max_frame = value
            elif code == Setting.ENABLE_PUSH:
                if value > 1:
                    raise _ConnectionError(ErrorCode.PROTOCOL_ERROR)
            elif code == Setting.HEADER_TABLE_SIZE:
                self._table_size_due = True
        self._out += SETTINGS_ACK

    def _set_initial_window(self, value: int) -> None:
        """RFC 9113 §6.9.2: a new initial window moves every open stream's window by the
        difference (possibly below zero)."""
        if value > MAX_WINDOW:
            raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR)
        delta = value - self._initial_window
        self._initial_window = value
        if not delta:
            return
        windows = self._windows
        for stream_id, window in windows.items():
            if window + delta > MAX_WINDOW:
                raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR)
            windows[stream_id] = window + delta
        if delta > 0:
            self._flush()

    def _window_update(self, stream_id: int, payload: bytes, now: float) -> None:
        if len(payload) != 4:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR)
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if not stream_id:
            if not increment:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR)
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR)
        else:
            self._check_not_idle(stream_id)
            window = self._windows.get(stream_id)
            if window is None:
                return  # a closed stream: RFC 9113 §6.9 allows this
            if not increment or window + increment > MAX_WINDOW:
                code = ErrorCode.PROTOCOL_ERROR if not increment else ErrorCode.FLOW_CONTROL_ERROR
                self._out += rst_stream(stream_id, code)
                self._forget(stream_id)
                return
            self._windows[stream_id] = window + increment
        self._last_active = now  # the client reads: progress
        if self._unsent:
            self._flush()

    def _check_not_idle(self, stream_id: int) -> None:
        """RFC 9113 §5.1: RST_STREAM or WINDOW_UPDATE on a stream never opened."""
        if not stream_id or stream_id > self._highest:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR)

    @staticmethod
    def _unpad(payload: bytes) -> bytes:
        """The payload of a PADDED frame without its padding (RFC 9113 §6.1, §6.2)."""
        if not payload or payload[0] >= len(payload):
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR)
        return payload[1 : len(payload) - payload[0]]

    # ---- requests ----------------------------------------------------------------------

    def _headers(
        self,
        flags: int,
        stream_id: int,
        payload: bytes,
        now: float,
        out: _Requests,
    ) -> None:
        if not stream_id & 1:  # zero or even: not a stream a client may open
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR)
        fragment = self._unpad(payload) if flags & _PADDED else payload
        if flags & _PRIORITY:
            if len(fragment) < 5:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR)
            fragment = fragment[5:]
        if len(fragment) > MAX_HEADER_LIST_BYTES:
            raise _ConnectionError(ErrorCode.ENHANCE_YOUR_CALM)
        if flags & _END_HEADERS:
            self._header_block(flags, stream_id, fragment, now, out)
        else:
            self._continuing = (stream_id, flags, bytearray(fragment))

    def _continuation(
        self,
        kind: int,
        flags: int,
        stream_id: int,
        payload: bytes,
        now: float,
        out: _Requests,
    ) -> None:
        """RFC 9113 §6.10: nothing but CONTINUATION of the same stream until END_HEADERS;
        the block, as received, no larger than MAX_HEADER_LIST_BYTES."""
        assert self._continuing is not None
        first, first_flags, block = self._continuing
        if kind != FrameType.CONTINUATION or stream_id != first:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR)
        block += payload
        if len(block) > MAX_HEADER_LIST_BYTES:
            raise _ConnectionError(ErrorCode.ENHANCE_YOUR_CALM)
        if flags & _END_HEADERS:
            self._continuing = None
            self._header_block(first_flags, stream_id, bytes(block), now, out)

    def _header_block(
        self,
        flags: int,
        stream_id: int,
        block: bytes,
        now: float,
        out: _Requests,
    ) -> None:
        """A complete header block: a new request, a request's trailers, or a block on a
        stream no longer open. Every block is decoded, whatever becomes of its stream: the
        HPACK table is the connection's (RFC 9113 §4.3)."""
        try:
            headers = self._decoder.decode(block)
        except HeaderListTooLarge:
            raise _ConnectionError(ErrorCode.ENHANCE_YOUR_CALM) from None
        except HpackError:
            raise _ConnectionError(ErrorCode.COMPRESSION_ERROR) from None
        if stream_id <= self._highest:
            self._trailers(flags, stream_id, now, out)
            return
        self._highest = stream_id
        if self._peer_done:
            return  # RFC 9113 §6.8: no new streams after the client's GOAWAY
        if len(self._windows) >= MAX_STREAMS:
            self._out += rst_stream(stream_id, ErrorCode.REFUSED_STREAM)
            return
        try:
            method, target, content_type, too_large = _read_headers(headers)
        except _Malformed:
            self._out += rst_stream(stream_id, ErrorCode.PROTOCOL_ERROR)
            return
        self._windows[stream_id] = self._initial_window
        if flags & _END_STREAM:
            self._last_active = now
            request = new_tuple(HttpRequest, (method, target, content_type, b"", 0))
            out.append((stream_id, request))
            return
        incoming = _Incoming(method, target, content_type, now)
        self._incoming[stream_id] = incoming
        if too_large:
            self._too_large(stream_id, incoming, out)

    def _trailers(self, flags: int, stream_id: int, now: float, out: _Requests) -> None:
        """A header block on a stream ID not above the highest: trailers end a request
        whose body was coming (they must end the stream, RFC 9113 §8.1); on a stream half
        closed by the client it is a stream error (§5.1), on one being cut short (413)
        ignored; on a closed stream it is a new stream whose ID does not increase (§5.1.1)."""
        if stream_id in self._incoming:
            if not flags & _END_STREAM:
                self._out += rst_stream(stream_id, ErrorCode.PROTOCOL_ERROR)
                self._forget(stream_id)
                return
            self._ended(stream_id, now, out)
        elif stream_id not in self._windows:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR)
        elif stream_id not in self._cut:
            self._out += rst_stream(stream_id, ErrorCode.STREAM_CLOSED)
            self._forget(stream_id)

    def _data(
        self,
        flags: int,
        stream_id: int,
        payload: bytes,
        now: float,
        out: _Requests,
    ) -> None:
        if not stream_id or stream_id > self._highest:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR)  # stream 0 or never opened
        size = len(payload)  # RFC 9113 §6.9.1: padding is flow controlled too
        if size > self._receive_window:
            raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR)
        self._receive_window -= size
        incoming = self._incoming.get(stream_id)
        if incoming is None:  # answered, cut short or closed: nothing is kept
            self._unreturned += size
            if stream_id in self._windows and stream_id not in self._cut:
                self._out += rst_stream(stream_id, ErrorCode.STREAM_CLOSED)  # §5.1
                self._forget(stream_id)
            return
        incoming.received += size
        if incoming.received > BODY_WINDOW_BYTES:  # over the window our SETTINGS gave it
            raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR)
        incoming.body += self._unpad(payload) if flags & _PADDED else payload
        if len(incoming.body) > MAX_BODY_BYTES:
            self._too_large(stream_id, incoming, out)
        elif flags & _END_STREAM:
            self._ended(stream_id, now, out)

    def _too_large(self, stream_id: int, incoming: _Incoming, out: _Requests) -> None:
        """413 through the usual path, then the stream is reset (`respond` sees it is cut):
        the rest of the body is never read."""
        self._release(stream_id)
        self._cut.add(stream_id)
        request = HttpRequest(
            incoming.method, incoming.target, incoming.content_type, b"", PAYLOAD_TOO_LARGE
        )
        out.append((stream_id, request))

    def _ended(self, stream_id: int, now: float, out: _Requests) -> None:
        incoming = self._release(stream_id)
        if incoming is None:
            return
        self._last_active = now
        request = HttpRequest(
            incoming.method, incoming.target, incoming.content_type, bytes(incoming.body)
        )
        out.append((stream_id, request))

    def _reset_by_client(self, stream_id: int) -> None:
        """The client abandoned a stream: forget it (its query, if forwarded, still finishes
        and fills the cache; its answer goes nowhere), and count it against the allowance.
        A reset of a stream already answered (the answer crossed the reset: the work was
        done all the same) also takes back the credit that answer earned."""
        if stream_id in self._windows:
            self._forget(stream_id)
        elif self._answered:
            self._answered -= 1
        self._resets += 1
        if self._resets > self._answered + RESET_ALLOWANCE:
            raise _ConnectionError(ErrorCode.ENHANCE_YOUR_CALM)

    def _release(self, stream_id: int) -> _Incoming | None:
        """Stop reading a request (complete, cut short or abandoned); the window its body
        took goes back to the client."""
        incoming = self._incoming.pop(stream_id, None)
        if incoming is not None:
            self._unreturned += incoming.received
        return incoming

    def _forget(self, stream_id: int) -> None:
        """The stream is closed: nothing of it is kept."""
        self._release(stream_id)
        self._windows.pop(stream_id, None)
        self._unsent.pop(stream_id, None)
        self._cut.discard(stream_id)

    def _give_back(self) -> None:
        self._out += window_update(0, self._unreturned)
        self._receive_window += self._unreturned
        self._unreturned = 0

    # ---- answering ---------------------------------------------------------------------

    def respond(self, stream_id: int, response: HttpResponse | None, now: float) -> None:
        """Send the response on `stream_id` (nothing when the client reset it meanwhile);
        None resets the stream instead (CANCEL)."""
        if (
            self.closed
            or stream_id not in self._windows
            or stream_id in self._incoming
            or stream_id in self._unsent
        ):
            return
        self._last_active = now
        out = self._out
        if response is None:
            out += rst_stream(stream_id, ErrorCode.CANCEL)
            self._forget(stream_id)
        else:
            self._answered += 1
            self._send(stream_id, response)
        if self._peer_done and not self._windows:
            self.closed = True

    def _send(self, stream_id: int, response: HttpResponse) -> None:
        out = self._out
        body = response.body
        size = len(body)
        window = min(self._windows[stream_id], self._send_window)
        # the usual answer: HEADERS and DATA ending the stream, in this call
        whole = 0 < size <= window and size <= self._max_frame and stream_id not in self._cut
        # the block is a few dozen octets: always one HEADERS frame
        prefix, block = response_head(
            response.status, size, response.headers, not body, self._table_size_due
        )
        self._table_size_due = False
        sid = stream_id.to_bytes(4, "big")
        out += prefix
        out += sid
        out += block
        if whole:
            out += size.to_bytes(3, "big")
            out += _DATA_END_STREAM
            out += sid
            out += body
            self._send_window -= size
            del self._windows[stream_id]
            return
        if stream_id in self._cut:
            # RFC 9113 §8.1: a complete response before the request's end, then a reset
            # with NO_ERROR asks the client to stop sending (error responses are empty)
            out += rst_stream(stream_id, ErrorCode.NO_ERROR)
            self._forget(stream_id)
            return
        if not body:
            del self._windows[stream_id]
            return
        self._unsent[stream_id] = body
        self._flush()
        if sum(map(len, self._unsent.values())) > MAX_UNSENT_BYTES:
            self._goaway(ErrorCode.ENHANCE_YOUR_CALM)  # a client that won't read

    def _flush(self) -> None:
        """Send what the flow-control windows allow of the waiting bodies (RFC 9113 §6.9),
        in frames no larger than the client allows."""
        out = self._out
        windows = self._windows
        for stream_id, body in list(self._unsent.items()):
            while body:
                size = min(len(body), windows[stream_id], self._send_window, self._max_frame)
                if size <= 0:
                    break
                end = size == len(body)
                out += frame_header(FrameType.DATA, _END_STREAM if end else 0, stream_id, size)
                out += body[:size]
                body = body[size:]
                windows[stream_id] -= size
                self._send_window -= size
            if body:
                self._unsent[stream_id] = body
            else:
                del self._unsent[stream_id]
                del windows[stream_id]

    # ---- time --------------------------------------------------------------------------

    def expire(self, now: float) -> float | None:
        """Reset requests older than the deadline; end an idle connection. Returns when to
        call again (None once closed)."""
        if self.closed:
            return None
        deadline = self._deadline_s
        for stream_id, incoming in list(self._incoming.items()):
            if now - incoming.started >= deadline:
                self._out += rst_stream(stream_id, ErrorCode.CANCEL)
                self._forget(stream_id)
        if self._unreturned:
            self._give_back()
        # Waiting on upstream keeps a connection; waiting on the client's flow-control window
        # does not: a client that never opens it is cut off like an idle one.
        busy = len(self._windows) > len(self._incoming) + len(self._unsent)
        if not busy and now - self._last_active >= deadline:
            self._goaway(ErrorCode.NO_ERROR)
            return None
        checks = [now if busy else self._last_active]
        checks += (incoming.started for incoming in self._incoming.values())
        return min(checks) + deadline

    def _goaway(self, code: ErrorCode) -> None:
        self._out += goaway(self._highest, code)
        self.closed = True


def _read_headers(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes, bytes | None, bool]:
    """Method, target, content type, and whether the declared length is over MAX_BODY_BYTES.
    Raises _Malformed for what RFC 9113 calls a malformed request: pseudo-headers unknown,
    repeated, missing or after a regular field (§8.3), connection-specific fields (§8.2.2)."""
    method = target = b""
    content_type: bytes | None = None
    too_large = False
    seen = 0
    regular = False
    for name, value in headers:
        bit = _PSEUDO_HEADER_BITS.get(name)
        if bit is not None:
            if regular or seen & bit:
                raise _Malformed
            seen |= bit
            if bit == _METHOD:
                method = value
            elif bit == _PATH:
                target = value
            continue
        if name[:1] == b":":
            raise _Malformed  # a response's or an unknown pseudo-header
        regular = True
        if name == b"content-type":
            content_type = value
        elif name == b"content-length":
            too_large = not value.isdigit() or int(value) > MAX_BODY_BYTES
        elif name in _CONNECTION_HEADERS or (name == b"te" and value != b"trailers"):
            raise _Malformed
    if seen & _REQUIRED_PSEUDO_HEADERS != _REQUIRED_PSEUDO_HEADERS:
        raise _Malformed
    return method, target, content_type, too_large
