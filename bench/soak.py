"""Soak: the real server holding a million registrations under mixed traffic for up to an hour
(issue 18 item 5; issue 7 item 6 before it); a line of RSS, CPU and traffic every minute, every
lost query counted. Not a test.

    python bench/soak.py --rate 50000 --duration 3600      # the issue's hour
    python bench/soak.py --rate 50000 --registrations 100000 --duration 180   # a quick proof

Before the start, `smartdns registrations import` loads `--registrations` accounts of one IPv4
/32 each (in 127.0.0.0/8), `--ddns-names` accounts of one hostname each, and 127.0.0.1; then
`python -m smartdns serve` starts (`--workers`) on free loopback ports with a temporary config
and database, `public_only: false`, rate limits out of the way.

`--rate` is the node's measured capacity (queries/s); the soak sends half of it: 60% from the
registered 127.0.0.1 (unblock A/AAAA/HTTPS and forwarded names), `--tcp-share` of that over
TCP and the rest over UDP, 30% over UDP from the unregistered 127.0.0.2 (REFUSED), 10%
malformed UDP packets. Queries are sent by dnsperf (`-m udp`, `-m tcp`), one run of a minute
at a time per stream, so each minute's sent/answered/lost comes from dnsperf's own summary; a
query is lost when no answer came within dnsperf's `-t` (2 s). Malformed packets come from a
paced Python sender (some get no reply by design, so they count no losses). The upstream is
the project's FakeUpstream on 127.0.0.1.

Meanwhile the portal sends `PUT /v1/accounts/a<i>` at `--write-rate` a second, open loop from
four keep-alive connections (each write moves an account to a new address at a new version;
only a 200 is ok; a slow node shows as fewer writes a minute, not as failures), and the node keeps
the hostnames resolved through tests/fake_authority.py on 127.0.0.1 (a child process) at TTL
`--ddns-ttl`, so the DDNS refresher refreshes all the time (lookups counted from /metrics,
refresh lag from the authority's view).

Every minute: elapsed time, RSS of the main process and of the workers, the node's CPU over
the minute (% of one core; and the machine's, all processes, with the load average: the
machine is shared), queries sent/answered/lost per transport, malformed packets and replies,
sync writes ok/failed, DDNS lookups. At the end a summary: RSS and CPU before the traffic,
near 1, 10 and 60 minutes, lost queries by stream and totals. Exit status 0 when RSS stayed
within 10% of the first minute's, the floor of open fds did not rise by more than 10%, no sync
write failed and the server stopped cleanly; 1 otherwise. Loopback only; bounded by
`--duration` (at most 3600 s).
"""

from __future__ import annotations

import argparse
import array
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench import tools  # noqa: E402
from bench.ddns import name as hostname  # noqa: E402
from bench.ddns import percentile, scrape, serve_authority  # noqa: E402
from bench.snapshot_apply import healthy, wait_for  # noqa: E402
from bench.soak_load import (  # noqa: E402
    PacedSender,
    QueryStream,
    SyncWriter,
    account_address,
    malformed_packets,
    reconnections,
    run_segment,
)
from bench.tools import PerfResult  # noqa: E402
from tests.e2e.harness import base_config, merge  # noqa: E402
from tests.fake_upstream import FakeUpstream  # noqa: E402
from tests.ports import free_port  # noqa: E402

MAX_DURATION_S: Final = 3600
MINUTE_S: Final = 60
START_TIMEOUT_S: Final = 600.0  # importing and loading a million registrations takes minutes
AUTHORITY_TIMEOUT_S: Final = 60.0
FLAT_TOLERANCE: Final = 0.10
REGISTERED: Final = "127.0.0.1"
UNREGISTERED: Final = "127.0.0.2"
SHARE_REGISTERED, SHARE_UNREGISTERED, SHARE_MALFORMED = 0.6, 0.3, 0.1
SNAPSHOT_VERSION: Final = 1  # the imported document's; sync writes take versions above it
FORWARDED_NAMES: Final = 500  # distinct forwarded names: a mix of cache hits and misses
SUMMARY_MINUTES: Final = (1, 10, 60)
HTTP_JOIN_S: Final = 15.0
FLOOR_MINUTES: Final = 10

REGISTERED_QUERIES: Final = [
    ("www.netflix.com", "A"),  # unblock
    ("api.netflix.com", "AAAA"),  # nodata: the us region has no IPv6
    ("www.bbc.co.uk", "AAAA"),  # unblock IPv6
    ("www.netflix.com", "HTTPS"),  # nodata
]
UNREGISTERED_QUERIES: Final = [
    ("www.netflix.com", "A"),
    ("example.org", "A"),
    ("example.org", "AAAA"),
]


# ---- the node --------------------------------------------------------------------------------


def _config(
    state: Path, port: int, upstream: str, authority_port: int, args: Any
) -> dict[str, Any]:
    """The end-to-end tests' configuration (it also writes the sync token), IPv4 only."""
    return merge(
        base_config(port, state, upstream),
        {
            # The default idle timeout: the tests' 2 s would close dnsperf's quieter
            # connections every few seconds.
            "server": {
                "listen": [f"127.0.0.1:{port}"],
                "workers": args.workers,
                "tcp_idle_timeout": 10,
            },
            # Limits out of the way so every verdict keeps flowing at the soak's rate: with one
            # sender address per stream, the defaults would drop nearly all of it.
            "rate_limit": {"client_qps": 10_000_000, "refused_qps": 10_000_000},
            "ddns": {
                "resolvers": [f"127.0.0.1:{authority_port}"],
                "min_ttl": min(30, args.ddns_ttl),
            },
            "logging": {"level": "info"},
        },
    )


def write_snapshot(path: Path, registrations: int, hostnames: int) -> None:
    """The import document, written as it goes (a million accounts): `a<i>` holds
    account_address(i), `d<i>` the hostname i, `soak-main` REGISTERED."""
    with open(path, "w") as out:
        out.write(f'{{"version": {SNAPSHOT_VERSION}, "accounts": {{"soak-main": ["{REGISTERED}"]')
        for i in range(registrations):
            out.write(f',"a{i}":["{account_address(i)}"]')
        for i in range(hostnames):
            out.write(f',"d{i}":{{"addresses":[],"hostnames":["{hostname(i)}"]}}')
        out.write("}}")


def _registered_lines() -> list[str]:
    lines: list[str] = []
    for index in range(FORWARDED_NAMES):  # half unblock, half forwarded
        name, qtype = REGISTERED_QUERIES[index % len(REGISTERED_QUERIES)]
        lines.append(f"{name} {qtype}")
        lines.append(f"n{index}.soak.test A" if index % 5 else "example.org A")
    return lines


def query_streams(state: Path, target: float, tcp_share: float) -> list[QueryStream]:
    registered = state / "registered.txt"
    registered.write_text("\n".join(_registered_lines()) + "\n")
    unregistered = state / "unregistered.txt"
    unregistered.write_text("".join(f"{n} {t}\n" for n, t in UNREGISTERED_QUERIES))
    share_tcp = SHARE_REGISTERED * tcp_share
    streams = [
        QueryStream(
            "registered-udp", "udp", REGISTERED, target * (SHARE_REGISTERED - share_tcp), registered
        ),
        QueryStream("registered-tcp", "tcp", REGISTERED, target * share_tcp, registered),
        QueryStream(
            "unregistered-udp", "udp", UNREGISTERED, target * SHARE_UNREGISTERED, unregistered
        ),
    ]
    return [stream for stream in streams if stream.qps >= 1]


# ---- the minutes -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Usage:
    """Cumulative counters at one instant: differences of two make a minute."""

    at: float  # time.monotonic()
    node_cpu_s: float
    machine_cpu_s: float
    malformed_sent: int
    malformed_answered: int
    sync_ok: int
    sync_failed: int
    ddns_lookups: float


@dataclass(frozen=True, slots=True)
class Minute:
    """One line of the report."""

    elapsed_s: float
    seconds: float  # how long this line's segment ran (the last one may be short)
    main_rss_kib: int
    workers_rss_kib: int
    fds: int
    node_cpu: float  # % of one core over the minute
    machine_cpu: float  # % of one core, every process at normal priority, steal included
    load1: float
    perf: dict[str, PerfResult]  # by transport, the streams summed
    reconnections: int  # TCP connections dnsperf opened again (the server closed them)
    malformed: tuple[int, int]  # sent, answered
    sync: tuple[int, int]  # ok, failed
    ddns_lookups: float

    def line(self) -> str:
        minutes, seconds = divmod(round(self.elapsed_s), 60)
        traffic = "  ".join(
            f"{transport} {r.sent}/{r.completed}/{r.lost}" for transport, r in self.perf.items()
        )
        return (
            f"[{minutes:3d}:{seconds:02d}] rss main {self.main_rss_kib / 1024:6.1f} MiB"
            f" workers {self.workers_rss_kib / 1024:6.1f} MiB  fds {self.fds:3d} | cpu node"
            f" {self.node_cpu:4.0f}% machine {self.machine_cpu:4.0f}% load {self.load1:4.1f} |"
            f" sent/answered/lost {traffic} reconnections {self.reconnections} |"
            f" malformed {self.malformed[0]}/{self.malformed[1]} |"
            f" sync ok {self.sync[0]} failed {self.sync[1]} | ddns lookups {self.ddns_lookups:.0f}"
        )


@dataclass
class Node:
    """What the minutes read: the server, the senders that run throughout, /metrics."""

    pid: int
    sync_url: str
    malformed: PacedSender
    writer: SyncWriter
    started_at: float
    minutes: list[Minute] = field(default_factory=list)

    def usage(self) -> Usage:
        busy, steal = tools.machine_cpu_seconds()
        try:
            lookups = scrape(self.sync_url)["lookups"]
        except OSError:
            lookups = float("nan")
        return Usage(
            time.monotonic(),
            tools.cpu_seconds(self.pid),
            busy + steal,
            self.malformed.sent,
            self.malformed.answered,
            self.writer.ok,
            self.writer.failed,
            lookups,
        )

    def record(self, start: Usage, results: Sequence[tuple[QueryStream, PerfResult]]) -> Usage:
        end = self.usage()
        wall = end.at - start.at
        perf: dict[str, PerfResult] = {}
        for stream, result in results:
            stream.add(result)
            perf[stream.transport] = _sum(perf.get(stream.transport), result)
        main = _own_rss_kib(self.pid)
        minute = Minute(
            elapsed_s=end.at - self.started_at,
            seconds=wall,
            main_rss_kib=main,
            workers_rss_kib=tools.rss_kib(self.pid) - main,
            fds=_fds(self.pid),
            node_cpu=100 * (end.node_cpu_s - start.node_cpu_s) / wall,
            machine_cpu=100 * (end.machine_cpu_s - start.machine_cpu_s) / wall,
            load1=os.getloadavg()[0],
            perf=perf,
            reconnections=sum(reconnections(result) for _, result in results),
            malformed=(
                end.malformed_sent - start.malformed_sent,
                end.malformed_answered - start.malformed_answered,
            ),
            sync=(end.sync_ok - start.sync_ok, end.sync_failed - start.sync_failed),
            ddns_lookups=end.ddns_lookups - start.ddns_lookups,
        )
        self.minutes.append(minute)
        print(minute.line(), flush=True)
        return end


def _sum(total: PerfResult | None, result: PerfResult) -> PerfResult:
    if total is None:
        return result
    rcodes = dict(total.rcodes)
    for rcode, count in result.rcodes.items():
        rcodes[rcode] = rcodes.get(rcode, 0) + count
    return PerfResult(
        sent=total.sent + result.sent,
        completed=total.completed + result.completed,
        lost=total.lost + result.lost,
        rcodes=rcodes,
        qps=total.qps + result.qps,
        avg_latency_s=max(total.avg_latency_s, result.avg_latency_s),
        max_latency_s=max(total.max_latency_s, result.max_latency_s),
        output="",
    )


def _own_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _fds(pid: int) -> int:
    total = 0
    for member in tools.descendants(pid):
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{member}/fd"))
    return total


# ---- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rate", type=int, default=4000, help="measured capacity, queries/s")
    parser.add_argument("--duration", type=int, default=600, help="seconds (at most 3600)")
    parser.add_argument("--registrations", type=int, default=1_000_000, help="imported /32s")
    parser.add_argument("--tcp-share", type=float, default=0.5, help="of registered queries")
    parser.add_argument("--write-rate", type=float, default=50.0, help="sync API PUTs a second")
    parser.add_argument("--ddns-names", type=int, default=10_000, help="registered hostnames")
    parser.add_argument("--ddns-ttl", type=int, default=30, help="their TTL, seconds")
    parser.add_argument("--workers", type=int, default=1, help="server.workers")
    parser.add_argument("--source", type=Path, default=REPO, help="smartdns checkout to run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    args.duration = max(MINUTE_S, min(args.duration, MAX_DURATION_S))
    args.registrations = max(1, args.registrations)  # the sync writes move imported accounts
    tools.ensure_commands(["dnsperf"])
    state = Path(tempfile.mkdtemp(prefix="smartdns-soak-"))
    children = tools.Children()
    context = multiprocessing.get_context("fork")  # before any thread of ours exists
    parent, child = context.Pipe()
    authority = context.Process(
        target=serve_authority, args=(args.ddns_names, args.ddns_ttl, child)
    )
    authority.start()
    try:
        with tools.terminate_as_interrupt():
            if not parent.poll(AUTHORITY_TIMEOUT_S):
                raise SystemExit("soak: the fake authority did not start")
            return _soak(args, state, children, parent.recv(), parent)
    finally:
        children.stop_all()
        with contextlib.suppress(OSError):
            parent.send("stop")
        authority.join(AUTHORITY_TIMEOUT_S)
        if authority.is_alive():
            authority.kill()
        if args.keep:
            print(f"kept {state}")
        else:
            shutil.rmtree(state, ignore_errors=True)


def _soak(
    args: argparse.Namespace,
    state: Path,
    children: tools.Children,
    authority_port: int,
    authority: multiprocessing.connection.Connection,
) -> int:
    source: Path = args.source.resolve()
    env = tools.python_env(source)
    with FakeUpstream() as upstream:
        upstream.add("example.org", "A", ["example.org. 300 IN A 192.0.2.1"])
        for index in range(0, FORWARDED_NAMES, 2):  # the others get NXDOMAIN
            upstream.add(f"n{index}.soak.test", "A", [f"n{index}.soak.test. 30 IN A 192.0.2.2"])
        port = free_port()
        config = _config(state, port, upstream.address, authority_port, args)
        config_path = state / "smartdns.yaml"
        config_path.write_text(yaml.safe_dump(config))
        smartdns = [sys.executable, "-m", "smartdns", "--config", str(config_path)]
        started = time.monotonic()
        snapshot = state / "snapshot.json"
        write_snapshot(snapshot, args.registrations, args.ddns_names)
        imported = subprocess.run(
            [*smartdns, "registrations", "import", str(snapshot)],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
            cwd=state,  # `python -m` puts the working directory first on sys.path
            env=env,
        )
        if imported.returncode:
            print(imported.stderr, file=sys.stderr)
            return 1
        snapshot.unlink()
        tools.log(f"imported in {time.monotonic() - started:.0f} s; starting the node")
        server = children.start([*smartdns, "serve"], state / "server.log", env=env, cwd=state)
        sync_url = "http://" + config["sync"]["listen"]
        wait_for("healthy node", lambda: healthy(sync_url), START_TIMEOUT_S, server)
        tools.log(f"serving after {time.monotonic() - started:.0f} s (import included)")
        target = args.rate / 2
        streams = query_streams(state, target, args.tcp_share)
        stop = threading.Event()
        token = (state / "sync.token").read_text().strip()
        sync_port = int(config["sync"]["listen"].rsplit(":", 1)[1])
        node = Node(
            pid=server.pid,
            sync_url=sync_url,
            malformed=PacedSender(
                UNREGISTERED, target * SHARE_MALFORMED, malformed_packets(), port, stop
            ),
            writer=SyncWriter(
                sync_port, token, args.write_rate, args.registrations, SNAPSHOT_VERSION + 1, stop
            ),
            started_at=time.monotonic(),
        )
        rss_before = tools.rss_kib(server.pid)
        print(
            f"soak: {args.registrations:,} registrations and {args.ddns_names:,} hostnames"
            f" (TTL {args.ddns_ttl} s), workers {args.workers}, {args.duration} s at"
            f" {target:,.0f} q/s ("
            + ", ".join(f"{s.name} {s.qps:,.0f}" for s in streams)
            + f", malformed {node.malformed.qps:,.0f}), sync writes {args.write_rate:g}/s;"
            f" RSS before the traffic {rss_before / 1024:.1f} MiB",
            flush=True,
        )
        print("minute lines: sent/answered/lost per transport (dnsperf -t 2 s)", flush=True)
        node.malformed.start()
        node.writer.start()
        usage = node.usage()
        while (left := args.duration - (time.monotonic() - node.started_at)) >= 1:
            seconds = int(min(MINUTE_S, left))
            results = run_segment(streams, port, seconds, children, state)
            usage = node.record(usage, list(zip(streams, results, strict=True)))
        stop.set()
        node.malformed.join(10)
        node.writer.join(HTTP_JOIN_S)
        upstream_queries = len(upstream.queries)
        final = scrape(sync_url)
        exit_code = children.stop(server)
    authority.send("stop")
    refreshes = _refresh_lag(authority, args.ddns_ttl)
    log_tail = (state / "server.log").read_text(errors="replace").splitlines()[-3:]
    return _report(
        node, streams, rss_before, final, refreshes, upstream_queries, exit_code, log_tail
    )


def _refresh_lag(authority: multiprocessing.connection.Connection, ttl: int) -> str:
    """The authority's view: queries it got, and each name's interval between A lookups
    less the TTL (negative: refreshed early, by the jitter)."""
    if not authority.poll(AUTHORITY_TIMEOUT_S):
        return "the fake authority did not report"
    queries, raw = authority.recv()
    intervals = array.array("d")
    intervals.frombytes(raw)
    lag = [interval - ttl for interval in intervals]
    return (
        f"authority answered {queries:,} queries; refresh lag (interval - TTL) over"
        f" {len(lag):,} refreshes: p50 {percentile(lag, 0.5):.2f} s, p99"
        f" {percentile(lag, 0.99):.2f} s, max {max(lag, default=float('nan')):.2f} s"
    )


def _report(
    node: Node,
    streams: list[QueryStream],
    rss_before_kib: int,
    final: dict[str, float],
    refreshes: str,
    upstream_queries: int,
    exit_code: int | None,
    log_tail: list[str],
) -> int:
    minutes = node.minutes
    print("\nsummary:")
    print(f"  before the traffic: RSS {rss_before_kib / 1024:.1f} MiB (main and workers)")
    shown: list[Minute] = []
    for number in SUMMARY_MINUTES if minutes else ():
        minute = at_minute(minutes, number)
        if minute in shown:
            continue
        shown.append(minute)
        print(
            f"  near minute {number:2d} (t={minute.elapsed_s:5.0f} s): RSS main"
            f" {minute.main_rss_kib / 1024:.1f} MiB, workers {minute.workers_rss_kib / 1024:.1f}"
            f" MiB; CPU node {minute.node_cpu:.0f}%, machine {minute.machine_cpu:.0f}%,"
            f" load {minute.load1:.1f}"
        )
    lost = sum(stream.lost for stream in streams)
    print(f"  lost queries: {lost} of {sum(stream.sent for stream in streams)} sent")
    for stream in streams:
        codes = ", ".join(f"{k} {v}" for k, v in sorted(stream.rcodes.items()))
        print(
            f"    {stream.name:16s} target {stream.qps:7,.0f} q/s: sent {stream.sent}, answered"
            f" {stream.completed}, lost {stream.lost}, reconnections {stream.reconnections}"
            f"  [{codes}]"
        )
    lost_minutes = [
        f"{m.elapsed_s / 60:.0f}: "
        + ", ".join(f"{t} {r.lost}" for t, r in m.perf.items() if r.lost)
        for m in minutes
        if any(r.lost for r in m.perf.values())
    ]
    print("  minutes with lost queries: " + ("; ".join(lost_minutes) or "none"))
    codes = ", ".join(f"{k} {v}" for k, v in sorted(node.malformed.rcodes.items()))
    print(f"  malformed: sent {node.malformed.sent}, replies {node.malformed.answered} [{codes}]")
    writer = node.writer
    print(
        f"  sync writes: {writer.ok} ok, {writer.failed} failed {writer.statuses}; PUT latency"
        f" p50 {percentile(writer.latencies_s, 0.5) * 1000:.1f} ms, p99"
        f" {percentile(writer.latencies_s, 0.99) * 1000:.1f} ms, max"
        f" {max(writer.latencies_s, default=float('nan')) * 1000:.1f} ms"
    )
    print(
        f"  ddns: {final['lookups']:,.0f} lookups, {final['addresses']:,.0f} addresses"
        f" authorized at the end; {refreshes}"
    )
    print(f"  upstream received {upstream_queries} queries")
    rss_flat = is_flat([m.main_rss_kib + m.workers_rss_kib for m in minutes])
    fds_flat = floor_is_flat([m.fds for m in minutes])
    print(
        f"  RSS {'flat' if rss_flat else 'NOT flat'}, open fds {'flat' if fds_flat else 'NOT flat'}"
        f" (RSS: every minute within {FLAT_TOLERANCE:.0%} of the first; fds: the fewest of"
        f" the last {FLOOR_MINUTES} minutes within {FLAT_TOLERANCE:.0%} of the fewest of the"
        f" first {FLOOR_MINUTES})"
    )
    print(f"  server exit status after SIGTERM: {exit_code}")
    print("  server log tail:\n    " + "\n    ".join(log_tail))
    ok = rss_flat and fds_flat and exit_code == 0 and bool(minutes) and writer.failed == 0
    print("RESULT:", "pass" if ok else "FAIL")
    return 0 if ok else 1


def at_minute(minutes: list[Minute], number: int) -> Minute:
    """The line nearest `number` minutes into the run, of those whose segment ran at least
    half a minute (a last segment of a few seconds gives a noisy CPU figure)."""
    full = [minute for minute in minutes if minute.seconds >= MINUTE_S / 2] or minutes
    return min(full, key=lambda minute: abs(minute.elapsed_s - number * MINUTE_S))


def floor_is_flat(values: list[int]) -> bool:
    """The open fds include the TCP connections of the moment (dnsperf reconnects every
    1,000 queries), so a leak shows as a rising floor: the fewest of the last FLOOR_MINUTES
    lines within FLAT_TOLERANCE of the fewest of the first FLOOR_MINUTES."""
    if len(values) < 2:
        return True
    first, last = min(values[:FLOOR_MINUTES]), min(values[-FLOOR_MINUTES:])
    return abs(last - first) <= FLAT_TOLERANCE * first


def is_flat(values: list[int]) -> bool:
    """Every value after the first within FLAT_TOLERANCE of the first (warm-up) one."""
    if len(values) < 2:
        return True
    base = values[0]
    return all(abs(value - base) <= FLAT_TOLERANCE * base for value in values[1:])


if __name__ == "__main__":
    sys.exit(main())
