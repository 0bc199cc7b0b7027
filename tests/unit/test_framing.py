"""framing: RFC 7766 length-prefixed messages and the connection deadlines, with time passed
in (no sockets, no event loop)."""

from __future__ import annotations

import struct

import dns.message
import pytest

from smartdns.serve.framing import (
    FIRST_QUERY_GRACE_S,
    MAX_PENDING_PER_CONNECTION,
    Expiry,
    Framing,
    Stop,
)

TIMEOUT_S = 2.0
T0 = 1000.0


def _query(query_id: int = 1) -> bytes:
    message = dns.message.make_query("example.org", "A")
    message.id = query_id
    return bytes(message.to_wire())


def _framed(message: bytes) -> bytes:
    return struct.pack("!H", len(message)) + message


def _drain(framing: Framing, now: float = T0) -> tuple[list[bytes], Stop]:
    """Every complete message, then the Stop that ended them."""
    messages: list[bytes] = []
    for _ in range(10_000):
        result = framing.next_message(now)
        if isinstance(result, Stop):
            return messages, result
        messages.append(result)
    raise AssertionError("next_message never stopped")


def test_one_message_whole() -> None:
    framing = Framing(T0, TIMEOUT_S)
    framing.feed(_framed(_query()))
    assert _drain(framing) == ([_query()], Stop.MORE)
    assert framing.queries == 1


@pytest.mark.parametrize("split", [1, 2, 3, 14])
def test_split_anywhere_even_inside_the_length(split: int) -> None:
    framed = _framed(_query())
    framing = Framing(T0, TIMEOUT_S)
    framing.feed(framed[:split])
    assert _drain(framing) == ([], Stop.MORE)
    framing.feed(framed[split:])
    assert _drain(framing) == ([_query()], Stop.MORE)


def test_byte_by_byte() -> None:
    framed = _framed(_query())
    framing = Framing(T0, TIMEOUT_S)
    got: list[bytes] = []
    for index in range(len(framed)):
        framing.feed(framed[index : index + 1])
        got += _drain(framing)[0]
    assert got == [_query()]


def test_pipelined_messages_in_one_read_keep_their_order() -> None:
    queries = [_query(query_id) for query_id in range(1, 6)]
    framing = Framing(T0, TIMEOUT_S)
    framing.feed(b"".join(_framed(query) for query in queries) + _framed(_query(6))[:5])
    assert _drain(framing) == (queries, Stop.MORE)
    assert framing.queries == 5


@pytest.mark.parametrize("length", [0, 1, 11])
def test_a_length_below_a_header_is_bogus(length: int) -> None:
    framing = Framing(T0, TIMEOUT_S)
    framing.feed(_framed(_query(1)) + struct.pack("!H", length) + bytes(length))
    assert _drain(framing) == ([_query(1)], Stop.BOGUS)


def test_a_header_sized_message_is_framed() -> None:
    framing = Framing(T0, TIMEOUT_S)
    framing.feed(_framed(bytes(12)))  # unreadable maybe, but sound framing: the pipeline judges
    assert _drain(framing) == ([bytes(12)], Stop.MORE)


def test_a_long_length_waits_for_its_bytes() -> None:
    framing = Framing(T0, TIMEOUT_S)
    framing.feed(b"\xff\xff" + bytes(100))
    assert _drain(framing) == ([], Stop.MORE)
    framing.feed(bytes(0xFFFF - 100))
    assert _drain(framing) == ([bytes(0xFFFF)], Stop.MORE)


def test_pending_bound_pauses_and_resumes() -> None:
    framing = Framing(T0, TIMEOUT_S, max_pending=2)
    framing.feed(b"".join(_framed(_query(query_id)) for query_id in range(1, 5)))
    for query_id in (1, 2):
        assert framing.next_message(T0) == _query(query_id)
        framing.answer_pending()
    assert framing.next_message(T0) is Stop.PAUSE
    assert not framing.may_read
    framing.answer_finished()
    assert framing.may_read
    assert framing.next_message(T0) == _query(3)
    framing.answer_pending()
    assert framing.next_message(T0) is Stop.PAUSE


def test_default_pending_bound() -> None:
    framing = Framing(T0, TIMEOUT_S)
    for _ in range(MAX_PENDING_PER_CONNECTION):
        framing.answer_pending()
    framing.feed(_framed(_query()))
    assert framing.next_message(T0) is Stop.PAUSE


def test_writing_paused_pauses_reading() -> None:
    framing = Framing(T0, TIMEOUT_S)
    framing.feed(_framed(_query()))
    framing.writing_paused = True
    assert framing.next_message(T0) is Stop.PAUSE
    assert not framing.may_read
    framing.writing_paused = False
    assert _drain(framing) == ([_query()], Stop.MORE)


def test_no_cap_on_the_queries_of_a_connection() -> None:
    """A long-lived connection (a DoT client's) is never cut off after N queries: that would
    drop what the client pipelined behind the Nth."""
    framing = Framing(T0, TIMEOUT_S)
    count = 5_000
    framing.feed(_framed(_query()) * count)
    messages, stop = _drain(framing)
    assert (len(messages), stop) == (count, Stop.MORE)
    assert framing.may_read


# ---- deadlines, with the clock injected -----------------------------------------------------


def test_idle_closes_after_the_timeout_from_the_last_activity() -> None:
    framing = Framing(T0, TIMEOUT_S)
    assert framing.expire(T0 + 1.0, unsent=False) == T0 + TIMEOUT_S
    framing.feed(_framed(_query()))
    framing.next_message(T0 + 1.5)  # a query is activity
    assert framing.expire(T0 + TIMEOUT_S, unsent=False) == T0 + 1.5 + TIMEOUT_S
    framing.answer_sent(T0 + 3.0)  # so is an answer
    assert framing.expire(T0 + 3.5, unsent=False) == T0 + 3.0 + TIMEOUT_S
    assert framing.expire(T0 + 5.0, unsent=False) is Expiry.CLOSE


def test_idle_with_unread_answers_aborts() -> None:
    framing = Framing(T0, TIMEOUT_S)
    assert framing.expire(T0 + TIMEOUT_S, unsent=True) is Expiry.ABORT


def test_a_pending_answer_keeps_the_connection_open() -> None:
    framing = Framing(T0, TIMEOUT_S)
    framing.answer_pending()
    assert framing.expire(T0 + 10.0, unsent=False) == T0 + 10.0 + TIMEOUT_S
    framing.answer_finished()
    assert framing.expire(T0 + 10.0, unsent=False) is Expiry.CLOSE


def test_message_deadline_counts_from_its_first_byte_however_slow() -> None:
    framed = _framed(_query())
    framing = Framing(T0, TIMEOUT_S)
    framing.feed(framed[:1])
    framing.next_message(T0 + 0.5)  # the message starts here
    for step in range(1, 4):  # trickling bytes do not move the deadline
        framing.feed(framed[step : step + 1])
        framing.next_message(T0 + 0.5 + step * 0.5)
        assert framing.expire(T0 + 0.5 + step * 0.5, unsent=False) == T0 + 0.5 + TIMEOUT_S
    assert framing.expire(T0 + 0.5 + TIMEOUT_S, unsent=False) is Expiry.ABORT


def test_message_deadline_overrides_a_pending_answer() -> None:
    framing = Framing(T0, TIMEOUT_S)
    framing.answer_pending()
    framing.feed(b"\x00")
    framing.next_message(T0)
    assert framing.expire(T0 + TIMEOUT_S, unsent=False) is Expiry.ABORT


def test_a_completed_message_ends_its_deadline_and_leftovers_start_the_next() -> None:
    framing = Framing(T0, TIMEOUT_S)
    framing.feed(_framed(_query())[:4])
    framing.next_message(T0)
    framing.feed(_framed(_query())[4:] + b"\x00")  # completes, and one byte of the next
    assert _drain(framing, T0 + 1.5) == ([_query()], Stop.MORE)
    assert framing.expire(T0 + TIMEOUT_S, unsent=False) == T0 + 1.5 + TIMEOUT_S
    framing.feed(_framed(_query())[1:])
    assert _drain(framing, T0 + 2.5) == ([_query()], Stop.MORE)
    assert framing.expire(T0 + 3.5, unsent=False) == T0 + 2.5 + TIMEOUT_S  # now idle timing


# ---- idle for shedding, and the first-query grace -------------------------------------------


def test_new_connection_is_spared_until_its_first_query_or_the_grace() -> None:
    framing = Framing(T0, TIMEOUT_S)
    assert not framing.is_idle(T0)
    assert not framing.is_idle(T0 + FIRST_QUERY_GRACE_S - 0.01)
    assert framing.is_idle(T0 + FIRST_QUERY_GRACE_S)


def test_answered_connection_is_idle_at_once() -> None:
    framing = Framing(T0, TIMEOUT_S)
    framing.feed(_framed(_query()))
    framing.next_message(T0)
    assert framing.is_idle(T0)


def test_busy_connection_is_not_idle() -> None:
    framing = Framing(T0, TIMEOUT_S, grace_s=0.0)
    assert framing.is_idle(T0)
    framing.feed(b"\x00\x20")  # a message under way
    assert not framing.is_idle(T0)
    framing = Framing(T0, TIMEOUT_S, grace_s=0.0)
    framing.answer_pending()  # an answer on its way
    assert not framing.is_idle(T0)
