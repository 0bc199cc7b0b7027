"""RFC 7766 framing and deadlines of one DNS stream connection, sans I/O: bytes in, complete
messages out, and what the connection must do when its timer fires.

Pure: no asyncio, no sockets, no clock (`now` is passed in). `serve.tcp` drives it; a future
DNS-over-TLS stream frames the same way.
"""

from __future__ import annotations

import enum
from typing import Final

from smartdns.core.wire import HEADER_SIZE

MAX_PENDING_PER_CONNECTION: Final = 100  # pipelined queries in progress; reading pauses beyond
# A new connection cannot be shed for room before its first query or this long: otherwise
# each newcomer sheds the one before it before its query has even been read, and none is served
FIRST_QUERY_GRACE_S: Final = 1.0
_LENGTH: Final = 2  # the length prefix (RFC 1035 §4.2.2)
_NONE: Final = -1.0  # no incomplete message in the buffer


class Stop(enum.Enum):
    """Why `Framing.next_message` gives no message."""

    MORE = "more"  # no complete message buffered: read on
    PAUSE = "pause"  # too many answers in progress, or the client does not read: stop reading
    BOGUS = "bogus"  # a length below a header's size: the stream cannot be trusted; abort


class Expiry(enum.Enum):
    """What a connection's timer decided, when it is not a later time to look again."""

    ABORT = "abort"  # a message never completed (slowloris), or idle with answers unread
    CLOSE = "close"  # idle: nothing asked or answered for the timeout


class Framing:
    """One connection's input buffer, counts and deadlines (RFC 7766 §6.2.3, RFC 9210 §4).

    Closed after `timeout_s` without a query or an answer; a started message must complete
    within the same time from its first byte, however slowly it trickles; at most
    `max_pending` answers in progress (reading pauses beyond). No cap on the queries of a
    connection: closing after N would lose what the client pipelined behind the Nth (a DoT
    client keeps one connection for hours); the idle timeout, `max_pending` and the worker's
    connection cap bound what a connection holds. `writing_paused` is the transport's flow
    control: while the client does not read its answers, its queries are not read either.
    """

    __slots__ = (
        "_buffer",
        "_grace_s",
        "_last_activity",
        "_max_pending",
        "_message_started",
        "_opened",
        "_timeout_s",
        "pending",
        "queries",
        "writing_paused",
    )

    def __init__(
        self,
        now: float,
        timeout_s: float,
        *,
        max_pending: int = MAX_PENDING_PER_CONNECTION,
        grace_s: float = FIRST_QUERY_GRACE_S,
    ) -> None:
        self._timeout_s = timeout_s
        self._max_pending = max_pending
        self._grace_s = grace_s
        self._buffer = bytearray()
        self._opened = self._last_activity = now
        self._message_started = _NONE  # when the incomplete message in the buffer began
        self.pending = 0  # answers in progress
        self.queries = 0  # messages read
        self.writing_paused = False

    @property
    def may_read(self) -> bool:
        """Reading may resume: no bound reached and the client reads its answers."""
        return not self.writing_paused and self.pending < self._max_pending

    def feed(self, data: bytes) -> None:
        """Bytes from the stream, however they were split."""
        self._buffer += data

    def next_message(self, now: float) -> bytes | Stop:
        """The next complete message (its length prefix removed), or why there is none.

        Call until a Stop; each message counts as activity at `now`, and bytes left over
        start the next message's deadline."""
        buffer = self._buffer
        if len(buffer) >= _LENGTH:
            if self.pending >= self._max_pending or self.writing_paused:
                return self._stop(Stop.PAUSE, now)
            end = _LENGTH + (buffer[0] << 8 | buffer[1])
            if end < _LENGTH + HEADER_SIZE:
                return Stop.BOGUS
            if len(buffer) >= end:
                message = bytes(buffer[_LENGTH:end])
                del buffer[:end]
                self.queries += 1
                self._last_activity = now
                self._message_started = _NONE
                return message
        return self._stop(Stop.MORE, now)

    def _stop(self, stop: Stop, now: float) -> Stop:
        if self._buffer and self._message_started == _NONE:
            self._message_started = now
        return stop

    def answer_pending(self) -> None:
        """A query's answer is on its way (forwarding): counts against `max_pending`."""
        self.pending += 1

    def answer_finished(self) -> None:
        """A pending answer completed, sent or not."""
        self.pending -= 1

    def answer_sent(self, now: float) -> None:
        """An answer was written: activity, so the idle timeout counts from now."""
        self._last_activity = now

    def is_idle(self, now: float) -> bool:
        """Nothing in progress on the input side (no answer pending, no partial message), and
        past its first query or the grace period; the caller adds "nothing unsent"."""
        return (
            (self.queries > 0 or now - self._opened >= self._grace_s)
            and not self.pending
            and not self._buffer
        )

    def expire(self, now: float, unsent: bool) -> float | Expiry:
        """The timer fired at `now`: the time to look again, or what to do.

        One lazily re-armed timer serves both limits, so traffic costs no timer churn: the
        message deadline (from a message's first byte) and the idle timeout (from the last
        query or answer; an answer still on its way keeps the connection open). `unsent`:
        answers are written but not yet read by the client."""
        timeout_s = self._timeout_s
        if self._message_started != _NONE:  # a message under way: its own deadline governs
            deadline = self._message_started + timeout_s
            return Expiry.ABORT if now >= deadline else deadline
        if self.pending:  # idle counts from when the answer is sent
            return now + timeout_s
        deadline = self._last_activity + timeout_s
        if now < deadline:
            return deadline
        return Expiry.ABORT if unsent else Expiry.CLOSE
