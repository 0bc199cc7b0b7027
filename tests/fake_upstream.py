"""A real fake upstream DNS server for tests: UDP and TCP on 127.0.0.1, answering from a table.

Runs its own asyncio event loop in a background thread, so sync tests, async tests and a
server subprocess can all talk to it. Not part of the package; uses dnslib freely.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

from dnslib import (
    EDNS0,
    QTYPE,
    RCODE,
    RR,
    A,
    DNSBuffer,
    DNSHeader,
    DNSQuestion,
    DNSRecord,
)

SOA_TEXT = "test. 300 IN SOA ns.test. h.test. 1 3600 600 86400 300"
SPOOF_ADDRESS = "203.0.113.66"  # what spoofed replies claim; a test asserts it is never used
OUR_UDP_SIZE = 1232  # advertised in our OPT when `respond_opt` is on
TCP_IDLE_TIMEOUT_S = 30.0
START_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class ReceivedQuery:
    """One query as the fake upstream saw it."""

    transport: str  # "udp" | "tcp"
    source: tuple[str, int]
    raw: bytes
    qname: str  # lower-case, no trailing dot ("" for the root)
    qtype: str  # "A", "AAAA", ... or the number as text
    id: int
    edns_options: list[tuple[int, bytes]]
    has_opt: bool
    udp_size: int = 0  # the OPT's advertised payload size, 0 without OPT
    dnssec_ok: bool = False
    flags: int = 0  # the 16-bit header flags word


def _key(name: str) -> str:
    return name.lower().rstrip(".")


class FakeUpstream:
    """Serves UDP and TCP on one ephemeral port of 127.0.0.1 from a table; records every query.

    Knobs are plain attributes (assignment is atomic under the GIL) read per query:
    `delay_s` (answer late), `drop` (never answer), `truncate_udp` (UDP answers have TC set and
    no records), `spoof_first` (UDP: at once, a reply with the wrong ID and one with the right
    ID but another question, both claiming SPOOF_ADDRESS; the real answer follows after
    `delay_s`), `garbage` (right ID and question, then bytes no parser accepts), `respond_opt`
    (an OPT in answers to queries that had one; default True), `crafted` (right ID and
    question, then one of CRAFTED: "many_records" — 3000 A records in one datagram,
    "compression_loop" — an answer whose owner points at itself, "opt_in_answer" — an OPT
    record in the answer section, "forward_pointer" — a CNAME whose target points ahead).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._requested_port = port
        self.port = 0
        # knobs
        self.delay_s: float = 0.0
        self.drop: bool = False
        self.truncate_udp: bool = False
        self.spoof_first: bool = False
        self.garbage: bool = False
        self.respond_opt: bool = True
        self.crafted: str | None = None
        # state shared with the server thread
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # queries or connections changed
        self._records: dict[tuple[str, str], list[Any]] = {}
        self._names: set[str] = set()
        self._rcodes: dict[str, int] = {}
        self._queries: list[ReceivedQuery] = []
        self._junk = 0
        self._open_connections = 0
        # thread and loop
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    # ---- table -------------------------------------------------------------------------------

    def add(self, name: str, qtype: str, records: list[str]) -> None:
        """Answer `name`/`qtype` with these zone-file RRs (appends to what is there)."""
        parsed: list[Any] = []
        for text in records:
            parsed.extend(RR.fromZone(text))
        key = _key(name)
        with self._lock:
            self._names.add(key)
            self._records.setdefault((key, qtype.upper()), []).extend(parsed)

    def set_rcode(self, name: str, rcode: int | str) -> None:
        """Answer every query for `name` with `rcode` (an int or "SERVFAIL"), no records."""
        value = int(getattr(RCODE, rcode.upper())) if isinstance(rcode, str) else rcode
        key = _key(name)
        with self._lock:
            self._names.add(key)
            self._rcodes[key] = value

    def replace(self, name: str, qtype: str, records: list[str]) -> None:
        """Answer `name`/`qtype` with these records instead of what was there."""
        with self._lock:
            self._records.pop((_key(name), qtype.upper()), None)
        self.add(name, qtype, records)

    def clear_rcode(self, name: str) -> None:
        """Stop answering `name` with a fixed rcode (see `set_rcode`)."""
        with self._lock:
            self._rcodes.pop(_key(name), None)

    def large_answer(self, name: str, count: int) -> None:
        """Add `count` A records for `name` (10.x.y.z), enough to overflow a UDP reply."""
        owner = name if name.endswith(".") else name + "."
        self.add(
            name,
            "A",
            [f"{owner} 300 IN A 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(count)],
        )

    # ---- observations ------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def queries(self) -> list[ReceivedQuery]:
        """A snapshot copy of the queries received so far, oldest first."""
        with self._lock:
            return list(self._queries)

    @property
    def junk_received(self) -> int:
        """Messages that could not be parsed as a DNS query (ignored)."""
        with self._lock:
            return self._junk

    def count(self, name: str | None = None, qtype: str | None = None) -> int:
        key = None if name is None else _key(name)
        wanted = None if qtype is None else qtype.upper()
        with self._lock:
            return sum(
                1
                for q in self._queries
                if (key is None or q.qname == key) and (wanted is None or q.qtype == wanted)
            )

    def clear(self) -> None:
        with self._lock:
            self._queries.clear()
            self._junk = 0

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Block until no TCP connection is open (their sockets closed); False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._open_connections == 0, timeout)

    def wait_for_queries(self, count: int, timeout: float = 5.0) -> bool:
        """Block until at least `count` queries have been received; False on timeout.

        From async code: `await asyncio.to_thread(up.wait_for_queries, n)`.
        """
        with self._changed:
            return self._changed.wait_for(lambda: len(self._queries) >= count, timeout)

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeUpstream:
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._run, name="fake-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise RuntimeError("fake upstream did not start")
        if self._start_error is not None:
            self._thread.join(START_TIMEOUT_S)
            raise RuntimeError("fake upstream failed to start") from self._start_error
        return self

    def stop(self) -> None:
        loop, stopping, thread = self._loop, self._stopping, self._thread
        if thread is None:
            return
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stopping.set)
        thread.join(START_TIMEOUT_S)
        self._thread = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- server thread -----------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start()
            self._start_error = exc
        finally:
            self._ready.set()
            loop.close()

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        """UDP and TCP sockets on the same port; with port 0, retry until both fit."""
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                udp.bind((self.host, self._requested_port))
                port = udp.getsockname()[1]
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((self.host, port))
                tcp.listen(128)
            except OSError:
                udp.close()
                tcp.close()
                if self._requested_port:
                    raise
                continue
            self.port = port
            udp.setblocking(False)
            tcp.setblocking(False)
            return udp, tcp
        raise OSError("no free port for both UDP and TCP")

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()
        udp_sock, tcp_sock = self._bind()
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _UdpProtocol(self, tasks), sock=udp_sock
        )
        server = await asyncio.start_server(
            lambda r, w: self._handle_tcp(r, w, tasks), sock=tcp_sock
        )
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            transport.close()
            for task in list(tasks):
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=START_TIMEOUT_S)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), START_TIMEOUT_S)

    async def _handle_tcp(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tasks: set[Any]
    ) -> None:
        me = asyncio.current_task()
        assert me is not None
        tasks.add(me)
        pending: set[asyncio.Task[None]] = set()
        with self._lock:
            self._open_connections += 1
        source = writer.get_extra_info("peername") or ("", 0)
        try:
            while True:
                try:
                    header = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT_S)
                    (length,) = struct.unpack("!H", header)
                    body = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE_TIMEOUT_S)
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    break
                replies = self._respond(body, "tcp", (source[0], source[1]))
                if replies is None:
                    continue
                # One task per query: pipelined queries are answered independently.
                task = asyncio.create_task(self._send_tcp(writer, replies))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:  # the client half-closed: finish what it asked for
                await asyncio.wait(pending, timeout=TCP_IDLE_TIMEOUT_S)
        finally:
            for task in pending:
                task.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            tasks.discard(me)
            with self._changed:
                self._open_connections -= 1
                self._changed.notify_all()

    async def _send_tcp(self, writer: asyncio.StreamWriter, replies: list[bytes]) -> None:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        with contextlib.suppress(Exception):
            for data in replies:
                writer.write(struct.pack("!H", len(data)) + data)
            await writer.drain()

    # ---- answering ---------------------------------------------------------------------------

    def _respond(self, raw: bytes, transport: str, source: tuple[str, int]) -> list[bytes] | None:
        """The messages to send back for `raw`, in order, or None to stay silent."""
        try:
            request = DNSRecord.parse(raw)
            if request.header.qr or len(request.questions) != 1:
                raise ValueError("not a query")
        except Exception:
            with self._lock:
                self._junk += 1
            return None
        question = request.q
        name = _key(str(question.qname))
        qtype = QTYPE.get(question.qtype, str(question.qtype))
        opt = next((rr for rr in request.ar if rr.rtype == QTYPE.OPT), None)
        options = [(int(o.code), bytes(o.data)) for o in opt.rdata] if opt is not None else []
        received = ReceivedQuery(
            transport=transport,
            source=source,
            raw=bytes(raw),
            qname=name,
            qtype=qtype,
            id=request.header.id,
            edns_options=options,
            has_opt=opt is not None,
            udp_size=int(opt.rclass) if opt is not None else 0,
            dnssec_ok=bool(opt is not None and opt.ttl & 0x8000),
            flags=struct.unpack_from("!H", raw, 2)[0],
        )
        with self._changed:
            self._queries.append(received)
            self._changed.notify_all()
            rcode = self._rcodes.get(name)
            records = list(self._records.get((name, qtype), []))
            known = name in self._names
        if self.drop:
            return None
        if self.garbage:
            return [self._crafted_garbage(raw)]
        if self.crafted is not None:
            return [_crafted(raw, self.crafted)]

        reply = request.reply(ra=1, aa=1)
        if rcode is not None:
            reply.header.rcode = rcode
        elif records:
            for rr in records:
                reply.add_answer(rr)
        else:
            reply.header.rcode = RCODE.NOERROR if known else RCODE.NXDOMAIN
            reply.add_auth(*RR.fromZone(SOA_TEXT))
        with_opt = opt is not None and self.respond_opt
        if with_opt:
            reply.add_ar(EDNS0(udp_len=OUR_UDP_SIZE, flags="do" if received.dnssec_ok else ""))
        data = bytes(reply.pack())

        if transport == "udp":
            limit = max(512, received.udp_size) if opt is not None else 512
            if self.truncate_udp or len(data) > limit:
                data = self._truncated(request, rcode, with_opt, received.dnssec_ok)
        return [data]

    @staticmethod
    def _truncated(request: Any, rcode: int | None, with_opt: bool, dnssec_ok: bool) -> bytes:
        reply = request.reply(ra=1, aa=1)
        reply.header.tc = 1
        if rcode is not None:
            reply.header.rcode = rcode
        if with_opt:
            reply.add_ar(EDNS0(udp_len=OUR_UDP_SIZE, flags="do" if dnssec_ok else ""))
        return bytes(reply.pack())

    @staticmethod
    def _spoofs(raw: bytes) -> list[bytes]:
        """A reply with the wrong ID, then one with the right ID but another question."""
        request = DNSRecord.parse(raw)  # parsed before: cannot fail here
        question = request.q
        wrong_id = request.reply(ra=1, aa=1)
        wrong_id.header.id = (request.header.id + 1) & 0xFFFF
        wrong_id.add_answer(RR(question.qname, QTYPE.A, rdata=_spoof_a(), ttl=300))
        other = DNSRecord(
            DNSHeader(id=request.header.id, qr=1, ra=1, aa=1, rd=request.header.rd),
            q=DNSQuestion("spoof.invalid.", question.qtype),
        )
        other.add_answer(RR(question.qname, QTYPE.A, rdata=_spoof_a(), ttl=300))
        return [bytes(wrong_id.pack()), bytes(other.pack())]

    @staticmethod
    def _crafted_garbage(raw: bytes) -> bytes:
        """Right ID, QR set, the question echoed, then an answer that cannot be parsed."""
        qid = raw[:2] if len(raw) >= 2 else b"\x00\x00"
        buffer = DNSBuffer()
        DNSRecord.parse(raw).q.pack(buffer)  # `raw` parsed before: cannot fail here
        question = bytes(buffer.data)
        header = qid + struct.pack("!HHHHH", 0x8180, 1, 3, 0, 0)
        return header + bytes(question) + b"\xc0\xff\x00\x01\x00\x01\xde\xad"


CRAFTED = ("many_records", "compression_loop", "opt_in_answer", "forward_pointer")


def _crafted(raw: bytes, kind: str) -> bytes:
    """A reply with the right ID and question whose records are crafted to hurt a parser."""
    buffer = DNSBuffer()
    DNSRecord.parse(raw).q.pack(buffer)  # `raw` parsed before: cannot fail here
    question = bytes(buffer.data)
    a_fixed = struct.pack("!HHIH", 1, 1, 300, 4)
    if kind == "many_records":
        count = 3000
        records = b"".join(b"\xc0\x0c" + a_fixed + i.to_bytes(4, "big") for i in range(count))
    elif kind == "compression_loop":
        count = 1
        here = 12 + len(question)
        records = bytes([0xC0 | here >> 8, here & 0xFF]) + a_fixed + b"\x0a\x00\x00\x01"
    elif kind == "opt_in_answer":
        count = 2
        opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)
        records = opt + b"\xc0\x0c" + a_fixed + b"\x0a\x00\x00\x01"
    elif kind == "forward_pointer":
        count = 1
        ahead = 12 + len(question) + 12 + 2
        target = bytes([0xC0 | ahead >> 8, ahead & 0xFF])
        records = b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 300, 2) + target
    else:
        raise ValueError(f"unknown crafted reply {kind!r}")
    header = raw[:2] + struct.pack("!HHHHH", 0x8180, 1, count, 0, 0)
    return header + question + records


def _spoof_a() -> Any:
    return A(SPOOF_ADDRESS)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, upstream: FakeUpstream, tasks: set[Any]) -> None:
        self._upstream = upstream
        self._tasks = tasks
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        source = (str(addr[0]), int(addr[1]))
        replies = self._upstream._respond(data, "udp", source)
        if not replies:
            return
        if self._upstream.spoof_first:  # a spoofer races the real answer: send before delay_s
            self._send(self._upstream._spoofs(data), source)
        delay = self._upstream.delay_s
        if not delay:
            self._send(replies, source)
            return
        task = asyncio.create_task(self._later(delay, replies, source))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _later(self, delay: float, replies: list[bytes], source: tuple[str, int]) -> None:
        await asyncio.sleep(delay)
        self._send(replies, source)

    def _send(self, replies: list[bytes], source: tuple[str, int]) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        for data in replies:
            self._transport.sendto(data, source)

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP port unreachable: ignore
        pass
