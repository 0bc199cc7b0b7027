"""The soak's traffic (bench/soak.py): dnsperf query streams run one minute at a time, the paced
sender of malformed packets, and the portal's sync API writes. Loopback only; every sender is
bounded by a deadline or a stop event, every process is started through the caller's Children.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import random
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import dns.message
import dns.rcode

from bench.tools import Children, PerfResult, parse_dnsperf

DNSPERF_TIMEOUT_S: Final = 2.0  # dnsperf -t: an answer later than this is a lost query
DNSPERF_CLIENTS: Final = 4  # dnsperf -c: sockets (UDP) or connections (TCP)
DNSPERF_OUTSTANDING: Final = 500  # dnsperf -q
HTTP_TIMEOUT_S: Final = 10.0
WRITE_CONNECTIONS: Final = 4
FIRST_ACCOUNT_ADDRESS: Final = int(ipaddress.IPv4Address("127.0.1.1"))


def account_address(index: int) -> str:
    """Account `a<index>`'s imported /32; indexes past the accounts are the writes' new ones."""
    return str(ipaddress.IPv4Address(FIRST_ACCOUNT_ADDRESS + index))


# ---- query streams ---------------------------------------------------------------------------


@dataclass
class QueryStream:
    """One dnsperf stream (`-m transport`, `-a source`, `-Q qps`) and its totals so far."""

    name: str
    transport: str  # dnsperf -m: udp or tcp
    source: str
    qps: float
    query_file: Path
    sent: int = 0
    completed: int = 0
    lost: int = 0
    reconnections: int = 0  # TCP: connections dnsperf had to open again
    rcodes: dict[str, int] = field(default_factory=dict)

    def add(self, result: PerfResult) -> None:
        self.sent += result.sent
        self.completed += result.completed
        self.lost += result.lost
        self.reconnections += reconnections(result)
        for rcode, count in result.rcodes.items():
            self.rcodes[rcode] = self.rcodes.get(rcode, 0) + count


def reconnections(result: PerfResult) -> int:
    """dnsperf's "Reconnections" (TCP): each is a connection the server closed."""
    match = re.search(r"Reconnections:\s+(\d+)", result.output)
    return int(match.group(1)) if match else 0


def run_segment(
    streams: list[QueryStream], port: int, seconds: int, children: Children, logs: Path
) -> list[PerfResult]:
    """Every stream's dnsperf for `seconds`, at once; their results in stream order.

    A segment per minute gives each minute's sent/completed/lost exactly from dnsperf's own
    summary; dnsperf waits up to `-t` for the replies still due when its time is up."""
    processes = []
    for stream in streams:
        command = ["dnsperf", "-m", stream.transport, "-s", "127.0.0.1", "-p", str(port)]
        command += ["-a", stream.source, "-d", str(stream.query_file), "-l", str(seconds)]
        command += ["-Q", str(max(1, round(stream.qps))), "-c", str(DNSPERF_CLIENTS)]
        command += ["-q", str(DNSPERF_OUTSTANDING), "-t", str(DNSPERF_TIMEOUT_S)]
        output = logs / f"{stream.name}.dnsperf.log"
        output.unlink(missing_ok=True)
        processes.append((children.start(command, output), output))
    results = []
    for process, output in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(seconds + DNSPERF_TIMEOUT_S + 60)
        children.stop(process)  # stops one that hangs; forgets one that exited
        results.append(parse_dnsperf(output.read_text(errors="replace")))
    return results


# ---- malformed packets -----------------------------------------------------------------------


def malformed_packets() -> list[bytes]:
    base = dns.message.make_query("www.netflix.com", "A", id=0x5A5A).to_wire()
    edns = dns.message.make_query("example.org", "A", id=0x5B5B, use_edns=0).to_wire()
    return [
        base[:4] + b"\x00\x02" + base[6:],  # QDCOUNT 2: FORMERR
        base[:12] + b"\xc0\x0c\x00\x01\x00\x01",  # pointer loop in the question: FORMERR
        base[:-3],  # truncated question: FORMERR
        base[:2] + b"\x28\x00" + base[4:],  # opcode UPDATE: NOTIMP
        edns[:10] + b"\x00\x02" + edns[12:] + edns[-11:],  # two OPT records: FORMERR
        dns.message.make_query("netflix.com", "A", id=0x5C5C, use_edns=1).to_wire(),  # BADVERS
        base[:7],  # runt: dropped
        base[:2] + b"\x81\x80" + base[4:],  # a response: dropped
        bytes(random.Random(7).randbytes(40)),  # garbage
    ]


class PacedSender(threading.Thread):
    """`qps` packets a second over UDP from `source`, cycling through `packets`, until `stop`;
    a receiver counts replies by rcode. Some packets are dropped by design (runt, response,
    garbage), so a missing reply here is no lost query."""

    def __init__(
        self, source: str, qps: float, packets: list[bytes], port: int, stop: threading.Event
    ) -> None:
        super().__init__(name="sender-malformed", daemon=True)
        self.qps = qps
        self.sent = 0
        self.answered = 0
        self.rcodes: dict[str, int] = {}
        self._packets = packets
        self._port = port
        self._halt = stop
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((source, 0))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._receiving = threading.Event()

    def run(self) -> None:
        self._receiving.set()
        receiver = threading.Thread(target=self._receive, daemon=True)
        receiver.start()
        start = time.monotonic()
        interval = 1.0 / self.qps
        while not self._halt.wait(min(interval, 0.01)):
            due = int((time.monotonic() - start) / interval) + 1
            while self.sent < due:
                packet = self._packets[self.sent % len(self._packets)]
                self._sock.sendto(packet, ("127.0.0.1", self._port))
                self.sent += 1
        time.sleep(1.0)  # late replies
        self._receiving.clear()
        receiver.join(5)
        self._sock.close()

    def _receive(self) -> None:
        self._sock.settimeout(0.2)
        while self._receiving.is_set():
            try:
                data = self._sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            # The header's rcode only (parsing every reply would cost this process more than
            # it sends): BADVERS, an extended rcode, has the lower bits of NOERROR there, and
            # no malformed packet is answered with NOERROR itself.
            rcode = (
                dns.rcode.to_text(dns.rcode.Rcode(data[3] & 0x0F)) if len(data) >= 12 else "runt"
            )
            rcode = "BADVERS" if rcode == "NOERROR" else rcode
            self.rcodes[rcode] = self.rcodes.get(rcode, 0) + 1
            self.answered += 1


# ---- sync API writes -------------------------------------------------------------------------


class SyncWriter:
    """The portal: `PUT /v1/accounts/a<i>` at `rate` a second, open loop (write n is due at
    n / rate whatever the others did), from `connections` keep-alive connections taking due
    writes in turn, until `stop`. Each write moves an imported account to an address never
    used before, at a version above every earlier one (consecutive writes go to different
    accounts, so concurrent ones never race for one); a write is ok only on a 200, anything
    else (or no answer) is a failure."""

    def __init__(
        self,
        sync_port: int,
        token: str,
        rate: float,
        accounts: int,
        first_version: int,
        stop: threading.Event,
        connections: int = WRITE_CONNECTIONS,
    ) -> None:
        self.ok = 0
        self.failed = 0
        self.statuses: dict[str, int] = {}
        self.latencies_s: list[float] = []
        self._port = sync_port
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._rate = rate
        self._accounts = accounts
        self._first_version = first_version
        self._halt = stop
        self._lock = threading.Lock()
        self._next = 0
        self._start = 0.0
        self._threads = [
            threading.Thread(target=self._write, name=f"sync-writer-{i}", daemon=True)
            for i in range(connections)
        ]

    def start(self) -> None:
        self._start = time.monotonic()
        for thread in self._threads:
            thread.start()

    def join(self, timeout_s: float) -> None:
        for thread in self._threads:
            thread.join(timeout_s)

    def _due(self) -> int | None:
        """The next write's number once it is due; None once stopped."""
        with self._lock:
            number = self._next
            self._next += 1
        delay = self._start + number / self._rate - time.monotonic()
        return None if self._halt.wait(max(0.0, delay)) else number

    def _write(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self._port, timeout=HTTP_TIMEOUT_S)
        while (number := self._due()) is not None:
            account = number * 7919 % self._accounts  # a stride coprime with most counts
            body = json.dumps(
                {
                    "version": self._first_version + number,
                    "addresses": [account_address(self._accounts + number)],
                }
            )
            started = time.perf_counter()
            try:
                connection.request("PUT", f"/v1/accounts/a{account}", body, self._headers)
                response = connection.getresponse()
                response.read()
                status = str(response.status)
            except (OSError, http.client.HTTPException) as error:
                status = type(error).__name__
                connection.close()  # reconnects on the next request
            with self._lock:
                self.latencies_s.append(time.perf_counter() - started)
                self.statuses[status] = self.statuses.get(status, 0) + 1
                if status == "200":
                    self.ok += 1
                else:
                    self.failed += 1
        connection.close()
