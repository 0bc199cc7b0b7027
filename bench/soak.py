"""Soak: the real server under a steady mix of every verdict while registrations change; RSS
and open file descriptors sampled throughout must stay flat (issue 7, item 6). Not a test.

    python bench/soak.py --rate 4000                  # 10 minutes at 2,000 queries/s
    python bench/soak.py --rate 4000 --duration 60    # a quick proof that it works

`--rate` is the server's measured maximum; the soak sends half of it: 60% from the registered
127.0.0.1 (unblock A/AAAA/HTTPS and forwarded names), 30% from the unregistered 127.0.0.2
(REFUSED), 10% malformed packets from both. Senders are dnsperf (`apt-get install dnsperf`)
when installed, else a paced Python sender. The upstream is the project's FakeUpstream on
127.0.0.1; the database and config live in a temporary directory. Every second the CLI
(`python -m smartdns registrations add/remove`) adds or removes an address of another
account, so the server swaps its snapshot once a second. Every `--sample-every` seconds
VmRSS and the number of open fds of the server are read from /proc; the run is "flat" when
every sample after the first (warm-up) one is within 10% of it. Exit status 0 when flat and
the server stopped cleanly, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.rcode
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench import tools  # noqa: E402
from tests.e2e.harness import base_config, merge  # noqa: E402
from tests.fake_upstream import FakeUpstream  # noqa: E402

MAX_DURATION_S = 3600
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0
FLAT_TOLERANCE = 0.10
REGISTERED = "127.0.0.1"
UNREGISTERED = "127.0.0.2"
SHARE_REGISTERED, SHARE_UNREGISTERED, SHARE_MALFORMED = 0.6, 0.3, 0.1
FORWARDED_NAMES = 500  # distinct forwarded names: a mix of cache hits and misses

REGISTERED_QUERIES = [
    ("www.netflix.com", "A"),  # unblock
    ("api.netflix.com", "AAAA"),  # nodata: the us region has no IPv6
    ("www.bbc.co.uk", "AAAA"),  # unblock IPv6
    ("www.netflix.com", "HTTPS"),  # nodata
]
UNREGISTERED_QUERIES = [("www.netflix.com", "A"), ("example.org", "A"), ("example.org", "AAAA")]


def _malformed_packets() -> list[bytes]:
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


# ---- the server ------------------------------------------------------------------------------


def _config(state: Path, port: int, upstream: FakeUpstream) -> dict[str, Any]:
    """The end-to-end tests' configuration (it also writes the sync token), IPv4 only."""
    return merge(
        base_config(port, state, upstream.address),
        {
            "server": {"listen": [f"127.0.0.1:{port}"], "workers": 1},
            # Limits out of the way so every verdict keeps flowing at the soak's rate: with one
            # sender address per stream, the defaults would drop nearly all of it.
            "rate_limit": {"client_qps": 1_000_000, "refused_qps": 1_000_000},
            "logging": {"level": "info"},
        },
    )


def _env(source: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "SMARTDNS_CONFIG")}
    env["PYTHONPATH"] = str(source) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_cli(source: Path, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smartdns", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=config.parent,
        env=_env(source),
    )


@contextlib.contextmanager
def running_server(source: Path, config: Path, state: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`smartdns serve`, ready once it sent READY=1 over NOTIFY_SOCKET; SIGTERM on exit."""
    notify_path = state / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        with open(state / "server.log", "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "smartdns", "serve", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=state,
                env=_env(source, NOTIFY_SOCKET=str(notify_path)),
            )
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            received = ""
            while "READY=1" not in received:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("smartdns did not start; see " + str(state / "server.log"))
                notify.settimeout(0.5)
                with contextlib.suppress(TimeoutError):
                    received += notify.recv(4096).decode()
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# ---- load ------------------------------------------------------------------------------------


@dataclass
class Stream:
    """One traffic stream and what came of it."""

    name: str
    source: str
    qps: float
    sent: int = 0
    answered: int = 0
    rcodes: dict[str, int] = field(default_factory=dict)
    detail: str = ""


class PacedSender(threading.Thread):
    """Python sender: `qps` packets a second from `source`, cycling through `packets`, and a
    receiver counting replies by rcode. Used for malformed packets, and for everything when
    dnsperf is not installed."""

    def __init__(self, stream: Stream, packets: list[bytes], port: int, duration_s: float) -> None:
        super().__init__(name=f"sender-{stream.name}", daemon=True)
        self.stream = stream
        self._packets = packets
        self._port = port
        self._duration_s = duration_s
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((stream.source, 0))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._done = threading.Event()

    def run(self) -> None:
        receiver = threading.Thread(target=self._receive, daemon=True)
        receiver.start()
        start = time.monotonic()
        interval = 1.0 / self.stream.qps
        index = 0
        while (elapsed := time.monotonic() - start) < self._duration_s:
            due = int(elapsed / interval) + 1
            while self.stream.sent < due:
                self._sock.sendto(
                    self._packets[index % len(self._packets)], ("127.0.0.1", self._port)
                )
                self.stream.sent += 1
                index += 1
            time.sleep(min(interval, 0.01))
        time.sleep(1.0)  # late replies
        self._done.set()
        receiver.join(5)
        self._sock.close()

    def _receive(self) -> None:
        self._sock.settimeout(0.2)
        while not self._done.is_set():
            try:
                data = self._sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            try:  # dnspython, for the extended rcode (BADVERS) carried in the OPT
                rcode = dns.rcode.to_text(dns.message.from_wire(data).rcode())
            except dns.exception.DNSException:
                rcode = "unparseable"
            self.stream.rcodes[rcode] = self.stream.rcodes.get(rcode, 0) + 1
            self.stream.answered += 1


class Dnsperf:
    """dnsperf for one stream: `-Q` paces it, `-a` picks the source address."""

    def __init__(
        self, stream: Stream, lines: list[str], port: int, duration_s: float, state: Path
    ) -> None:
        self.stream = stream
        data = state / f"{stream.name}.txt"
        data.write_text("\n".join(lines) + "\n")
        self._output = state / f"{stream.name}.dnsperf.log"
        command = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-a", stream.source]
        command += ["-d", str(data), "-l", str(int(duration_s)), "-Q", str(int(stream.qps))]
        command += ["-c", "4", "-t", "2", "-q", "500"]
        with open(self._output, "wb") as output:
            self._process = subprocess.Popen(
                command,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def join(self) -> None:
        self._process.wait()
        text = self._output.read_text(errors="replace")
        self.stream.sent = _number(r"Queries sent:\s+(\d+)", text)
        self.stream.answered = _number(r"Queries completed:\s+(\d+)", text)
        codes = re.search(r"Response codes:\s+(.*)", text)
        if codes:
            for name, count in re.findall(r"([A-Z]+) (\d+)", codes.group(1)):
                self.stream.rcodes[name] = int(count)
        latency = re.search(r"Average Latency \(s\):\s+(\S+)", text)
        self.stream.detail = (
            f"avg latency {float(latency.group(1)) * 1000:.2f} ms" if latency else ""
        )


def _number(pattern: str, text: str) -> int:
    match = re.search(pattern, text)
    return int(match.group(1)) if match else 0


def _registered_lines() -> list[str]:
    lines: list[str] = []
    for index in range(FORWARDED_NAMES):  # half unblock, half forwarded
        name, qtype = REGISTERED_QUERIES[index % len(REGISTERED_QUERIES)]
        lines.append(f"{name} {qtype}")
        lines.append(f"n{index}.soak.test A" if index % 5 else "example.org A")
    return lines


def _wire(lines: list[str]) -> list[bytes]:
    packets = []
    for index, line in enumerate(lines):
        name, qtype = line.split()
        packets.append(dns.message.make_query(name, qtype, id=index & 0xFFFF).to_wire())
    return packets


# ---- churn and sampling ----------------------------------------------------------------------


class Churn(threading.Thread):
    """A registration change every second through the CLI: add, then remove, an address."""

    def __init__(self, source: Path, config: Path, duration_s: float) -> None:
        super().__init__(name="churn", daemon=True)
        self._source, self._config, self._duration_s = source, config, duration_s
        self.changes = 0
        self.failures = 0

    def run(self) -> None:
        start = time.monotonic()
        tick = 0
        while time.monotonic() - start < self._duration_s:
            address = f"10.77.{tick // 2 // 256 % 256}.{tick // 2 % 256}"
            action = ("add", "soak-churn", address) if tick % 2 == 0 else ("remove", "soak-churn")
            result = run_cli(self._source, self._config, "registrations", *action)
            if result.returncode == 0:
                self.changes += 1
            else:
                self.failures += 1
            tick += 1
            time.sleep(max(0.0, start + tick - time.monotonic()))


@dataclass
class Sample:
    elapsed_s: float
    rss_kib: int
    fds: int


def sample(pid: int, elapsed_s: float) -> Sample:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = _number(r"VmRSS:\s+(\d+) kB", status)
    return Sample(elapsed_s, rss, len(os.listdir(f"/proc/{pid}/fd")))


def is_flat(values: list[int]) -> bool:
    """Every value after the first within FLAT_TOLERANCE of the first (warm-up) one."""
    if len(values) < 2:
        return True
    base = values[0]
    return all(abs(value - base) <= FLAT_TOLERANCE * base for value in values[1:])


# ---- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rate", type=int, default=4000, help="measured maximum queries/s")
    parser.add_argument("--duration", type=int, default=600, help="seconds (at most 3600)")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds")
    parser.add_argument("--sender", choices=["auto", "dnsperf", "python"], default="auto")
    parser.add_argument("--source", type=Path, default=REPO, help="smartdns checkout to run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    duration = max(10, min(args.duration, MAX_DURATION_S))
    use_dnsperf = args.sender == "dnsperf" or (
        args.sender == "auto" and shutil.which("dnsperf") is not None
    )
    target = args.rate / 2
    state = Path(tempfile.mkdtemp(prefix="smartdns-soak-"))
    try:
        return _soak(args, state, duration, target, use_dnsperf)
    finally:
        if args.keep:
            print(f"kept {state}")
        else:
            shutil.rmtree(state, ignore_errors=True)


def _soak(
    args: argparse.Namespace, state: Path, duration: int, target: float, use_dnsperf: bool
) -> int:
    source: Path = args.source.resolve()
    with FakeUpstream() as upstream:
        upstream.add("example.org", "A", ["example.org. 300 IN A 192.0.2.1"])
        for index in range(0, FORWARDED_NAMES, 2):  # the others get NXDOMAIN
            upstream.add(f"n{index}.soak.test", "A", [f"n{index}.soak.test. 30 IN A 192.0.2.2"])
        port = tools.free_port()
        config = state / "smartdns.yaml"
        config.write_text(yaml.safe_dump(_config(state, port, upstream)))
        added = run_cli(source, config, "registrations", "add", "soak-main", f"{REGISTERED}/32")
        if added.returncode:
            print(added.stderr, file=sys.stderr)
            return 1
        with running_server(source, config, state) as server:
            print(
                f"soak: pid {server.pid}, {duration} s at {target:.0f} q/s "
                f"({'dnsperf' if use_dnsperf else 'python'} senders), sampling every "
                f"{args.sample_every:g} s"
            )
            registered = Stream("registered", REGISTERED, target * SHARE_REGISTERED)
            unregistered = Stream("unregistered", UNREGISTERED, target * SHARE_UNREGISTERED)
            malformed = Stream("malformed", UNREGISTERED, target * SHARE_MALFORMED)
            unregistered_lines = [f"{n} {t}" for n, t in UNREGISTERED_QUERIES]
            waiters: list[Dnsperf | PacedSender] = []
            if use_dnsperf:
                waiters.append(Dnsperf(registered, _registered_lines(), port, duration, state))
                waiters.append(Dnsperf(unregistered, unregistered_lines, port, duration, state))
            else:
                waiters.append(PacedSender(registered, _wire(_registered_lines()), port, duration))
                waiters.append(PacedSender(unregistered, _wire(unregistered_lines), port, duration))
            waiters.append(PacedSender(malformed, _malformed_packets(), port, duration))
            churn = Churn(source, config, duration)
            for waiter in waiters:
                if isinstance(waiter, PacedSender):
                    waiter.start()
            churn.start()
            samples = _sample_loop(server.pid, duration, args.sample_every)
            for waiter in waiters:
                waiter.join()
            churn.join()
            upstream_queries = len(upstream.queries)
        exit_code = server.returncode
    log_tail = (state / "server.log").read_text(errors="replace").splitlines()[-3:]
    return _report(
        [registered, unregistered, malformed],
        samples,
        churn,
        upstream_queries,
        exit_code,
        log_tail,
    )


def _sample_loop(pid: int, duration: int, every_s: float) -> list[Sample]:
    samples: list[Sample] = []
    start = time.monotonic()
    next_at = start + every_s
    while (now := time.monotonic()) - start < duration:
        time.sleep(max(0.0, min(next_at, start + duration) - now))
        if time.monotonic() >= next_at:
            taken = sample(pid, time.monotonic() - start)
            samples.append(taken)
            print(
                f"  t={taken.elapsed_s:6.1f}s  rss={taken.rss_kib / 1024:7.1f} MiB  fds={taken.fds}"
            )
            next_at += every_s
    return samples


def _report(
    streams: list[Stream],
    samples: list[Sample],
    churn: Churn,
    upstream_queries: int,
    exit_code: int,
    log_tail: list[str],
) -> int:
    print("\nstreams:")
    for stream in streams:
        rate = 100 * stream.answered / stream.sent if stream.sent else 0.0
        codes = ", ".join(f"{k} {v}" for k, v in sorted(stream.rcodes.items()))
        print(
            f"  {stream.name:13s} from {stream.source}: target {stream.qps:.0f} q/s, sent "
            f"{stream.sent}, answered {stream.answered} ({rate:.1f}%)  [{codes}] {stream.detail}"
        )
    print(f"registration changes: {churn.changes} ok, {churn.failures} failed")
    print(f"upstream received {upstream_queries} queries")
    rss = [s.rss_kib for s in samples]
    fds = [s.fds for s in samples]
    rss_flat, fds_flat = is_flat(rss), is_flat(fds)
    if samples:
        print(
            f"RSS MiB: first {rss[0] / 1024:.1f}, min {min(rss) / 1024:.1f}, max "
            f"{max(rss) / 1024:.1f}, last {rss[-1] / 1024:.1f} -> "
            f"{'flat' if rss_flat else 'NOT flat'} (±{FLAT_TOLERANCE:.0%})"
        )
        print(
            f"open fds: first {fds[0]}, min {min(fds)}, max {max(fds)}, last {fds[-1]} -> "
            f"{'flat' if fds_flat else 'NOT flat'} (±{FLAT_TOLERANCE:.0%})"
        )
    print(f"server exit status after SIGTERM: {exit_code}")
    print("server log tail:\n  " + "\n  ".join(log_tail))
    ok = rss_flat and fds_flat and exit_code == 0 and bool(samples)
    print("RESULT:", "pass" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
