"""Keep N DDNS hostnames fresh against a fake authority on loopback and measure the refresher.

    python3 bench/ddns.py                         # 100,000 names, TTL 60, about 2.5 minutes
    python3 bench/ddns.py --names 10000 --duration 130
    python3 bench/ddns.py --names 100000 --max-concurrent 128
    python3 bench/ddns.py --server                # the real node: smartdns serve, DNS probes

What it does: a child process serves N names `h<i>.bench.test` (A 10.x.y.z, no AAAA: NODATA,
TTL `--ttl`) from tests/fake_authority.py on a free port of 127.0.0.1 and notes, per name,
the time between its successive A queries. This process runs the refresher exactly as the
node does (registrations.sources.ddns over upstream.lookup on uvloop, `ddns` defaults but
for `--max-concurrent`, public_only off so 10.x counts) into a sink that counts what it is
given, for `--duration` seconds. It reports

- lookups per second: during the first round (every name new) and in the steady state after;
- refresh lag: each name's interval between lookups minus the TTL, p50/p99/max (negative:
  refreshed early, by the jitter; the promise is at most 0 plus scheduling);
- this process's CPU (user+sys over wall) in the steady state;
- event-loop lateness p50/p99/max of a 10 ms ticker in the same loop: what a DNS query
  served by this process would wait (the node's single-process mode runs both here);
- RSS before the names, after the first round, at the end; full (generation 2) collections
  of the cyclic garbage collector and the longest, a cause of loop lateness.

With `--server` the node itself runs instead: `python -m smartdns serve` (`--workers`, default
1, so DNS and the refresher share one process: the worst case) with a temporary config and
database, the names registered with `registrations import` (one account per hostname, the
snapshot's object form) plus the probe source 127.0.0.2. A thread asks for an unblock name from
127.0.0.2 every 10 ms (answered by the node itself); the report then has the node's CPU and RSS
(with its workers), the time until /metrics shows every name's address authorized, lookups/s
from /metrics, and the probe's latency p50/p99/max during the first round and after.

A measurement, not a test: nothing is asserted. Bounded: the run ends after `--duration`
and the child is stopped by its PID.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import gc
import json
import multiprocessing
import multiprocessing.connection
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dns.message
import yaml

from bench.tools import cpu_seconds, rss_kib, rss_kib_self
from smartdns.config.model import DdnsConfig, HostPort, RegistrationsConfig, UpstreamConfig
from smartdns.core.chain import LookupOutcome
from smartdns.registrations.entries import Network
from smartdns.registrations.sources.ddns import HostnameRefresher
from smartdns.upstream.forwarder import Forwarder
from smartdns.upstream.lookup import HostnameLookup, forwarder_config
from tests.e2e.harness import Server, base_config, merge
from tests.ports import free_port

SUFFIX = "bench.test"
TICK_S = 0.01


def name(index: int) -> str:
    return f"h{index}.{SUFFIX}"


def serve_authority(names: int, ttl: int, conn: multiprocessing.connection.Connection) -> None:
    """Child: serve the names until told to stop, then send back the intervals."""
    from tests.fake_authority import FakeAuthority

    authority = FakeAuthority()
    for i in range(names):
        authority.set_addresses(name(i), [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"], ttl)
    authority.intervals = []
    authority.start()
    conn.send(authority.port)
    conn.recv()  # stop
    authority.stop()
    conn.send((authority.count(), array.array("d", authority.intervals).tobytes()))


class CountingSink:
    """Counts hostnames given addresses; `complete` is set once `target` have been."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.hostnames = 0
        self.complete = asyncio.Event()

    async def apply_resolved(self, changes: Mapping[str, tuple[Network, ...]]) -> None:
        self.hostnames += sum(1 for addresses in changes.values() if addresses)
        if self.hostnames >= self.target:
            self.complete.set()


async def ticker(lateness: list[float], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        due = loop.time() + TICK_S
        await asyncio.sleep(TICK_S)
        lateness.append(loop.time() - due)


class GcPauses:
    """Durations of the cyclic collector's full (generation 2) collections."""

    def __init__(self) -> None:
        self.full: list[float] = []
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.full.append(time.perf_counter() - self._started)


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run(args: argparse.Namespace, port: int) -> dict[str, float]:
    ddns = DdnsConfig(resolvers=(HostPort("127.0.0.1", port),), max_concurrent=args.max_concurrent)
    upstream = forwarder_config(ddns, UpstreamConfig())
    lookup = HostnameLookup(Forwarder(upstream, edns_udp_size=1232), ddns.max_concurrent)
    sink = CountingSink(args.names)
    refresher = HostnameRefresher(ddns, RegistrationsConfig(public_only=False), lookup, sink)
    lateness: list[float] = []
    stop = asyncio.Event()
    figures: dict[str, float] = {"rss_before_kib": rss_kib_self()}
    pauses = GcPauses()
    started = time.monotonic()
    refresher.add(name(i) for i in range(args.names))
    tick_task = asyncio.create_task(ticker(lateness, stop))
    await refresher.start()
    lookups = refresher.stats.lookups
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(args.duration):
            await sink.complete.wait()
    first_round_s = time.monotonic() - started
    figures["first_round_s"] = first_round_s
    figures["first_round_lookups_per_s"] = lookups.total() / first_round_s
    figures["rss_after_first_round_kib"] = rss_kib_self()
    steady_lookups, steady_cpu, steady_at = lookups.total(), cpu_s(), time.monotonic()
    steady_ticks = len(lateness)
    await asyncio.sleep(max(0.0, args.duration - (steady_at - started)))
    wall = time.monotonic() - steady_at
    figures["steady_s"] = wall
    figures["steady_lookups_per_s"] = (lookups.total() - steady_lookups) / wall if wall else 0
    figures["steady_cpu_fraction"] = (cpu_s() - steady_cpu) / wall if wall else 0
    figures["rss_end_kib"] = rss_kib_self()
    stop.set()
    await tick_task
    await refresher.stop()
    lookup.close()
    steady = lateness[steady_ticks:]
    for label, values in (("loop_lateness_all", lateness), ("loop_lateness_steady", steady)):
        figures[f"{label}_p50_ms"] = percentile(values, 0.5) * 1000
        figures[f"{label}_p99_ms"] = percentile(values, 0.99) * 1000
        figures[f"{label}_max_ms"] = max(values, default=float("nan")) * 1000
    for outcome in LookupOutcome:
        figures[f"lookups_{outcome.value}"] = lookups[outcome]
    figures["addresses_authorized"] = refresher.addresses_authorized
    figures["gc_full_collections"] = len(pauses.full)
    figures["gc_full_max_ms"] = max(pauses.full, default=0.0) * 1000
    return figures


def probe(port: int, latencies: list[float], stop: threading.Event) -> None:
    """Thread: an unblock query from the registered probe source every TICK_S; RTTs."""
    query = dns.message.make_query("www.netflix.com", "A").to_wire()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.2", 0))
        sock.settimeout(2.0)
        while not stop.is_set():
            started = time.perf_counter()
            sock.sendto(query, ("127.0.0.1", port))
            try:
                sock.recv(4096)
                latencies.append(time.perf_counter() - started)
            except TimeoutError:
                latencies.append(2.0)
            time.sleep(TICK_S)


def scrape(sync_url: str) -> dict[str, float]:
    """The DDNS figures of /metrics: addresses authorized and lookups of every outcome."""
    with urllib.request.urlopen(sync_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    figures = {"addresses": 0.0, "lookups": 0.0}
    for line in text.splitlines():
        if line.startswith("smartdns_ddns_addresses "):
            figures["addresses"] = float(line.split()[1])
        elif line.startswith("smartdns_ddns_lookups_total{"):
            figures["lookups"] += float(line.split()[1])
    return figures


def run_server(args: argparse.Namespace, port: int) -> dict[str, float]:
    """The node: start, wait for the first round, measure a steady window; see the docstring."""
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="smartdns-bench-ddns-") as directory:
        state = Path(directory)
        dns_port = free_port()
        config = merge(
            base_config(dns_port, state, f"127.0.0.1:{port}"),
            {
                "server": {"listen": [f"127.0.0.1:{dns_port}"], "workers": args.workers},
                "ddns": {"resolvers": [f"127.0.0.1:{port}"], "max_concurrent": args.max_concurrent},
                "logging": {"level": "info"},
            },
        )
        config_path = state / "smartdns.yaml"
        config_path.write_text(yaml.safe_dump(config))
        accounts: dict[str, object] = {"probe": ["127.0.0.2"]}
        accounts.update(
            (f"a{i}", {"addresses": [], "hostnames": [name(i)]}) for i in range(args.names)
        )
        snapshot = state / "snapshot.json"
        snapshot.write_text(json.dumps({"version": 1, "accounts": accounts}))
        server = Server(state=state, port=dns_port, config_path=config_path)
        imported = server.cli("registrations", "import", str(snapshot))
        if imported.returncode:
            raise SystemExit(imported.stderr)
        latencies: list[float] = []
        stop = threading.Event()
        server.start()
        assert server.process is not None
        pid = server.process.pid
        thread = threading.Thread(target=probe, args=(dns_port, latencies, stop), daemon=True)
        started = time.monotonic()
        thread.start()
        try:
            while scrape(server.sync_url)["addresses"] < args.names:
                if time.monotonic() - started > args.duration:
                    break
                time.sleep(0.5)
            first_round_s = time.monotonic() - started
            first_ticks, first = len(latencies), scrape(server.sync_url)
            figures["first_round_s"] = first_round_s
            figures["first_round_lookups_per_s"] = first["lookups"] / first_round_s
            steady_cpu, steady_at = cpu_seconds(pid), time.monotonic()
            time.sleep(max(0.0, args.duration - first_round_s))
            wall = time.monotonic() - steady_at
            last = scrape(server.sync_url)
            figures["steady_s"] = wall
            figures["steady_lookups_per_s"] = (last["lookups"] - first["lookups"]) / wall
            figures["node_cpu_fraction_steady"] = (cpu_seconds(pid) - steady_cpu) / wall
            figures["node_rss_kib"] = rss_kib(pid)
            figures["addresses_authorized"] = last["addresses"]
        finally:
            stop.set()
            thread.join(5)
            server.stop()
    for label, values in (
        ("probe_first_round", latencies[:first_ticks]),
        ("probe_steady", latencies[first_ticks:]),
    ):
        figures[f"{label}_p50_ms"] = percentile(values, 0.5) * 1000
        figures[f"{label}_p99_ms"] = percentile(values, 0.99) * 1000
        figures[f"{label}_max_ms"] = max(values, default=float("nan")) * 1000
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", type=int, default=100_000)
    parser.add_argument("--ttl", type=int, default=60)
    parser.add_argument("--duration", type=float, default=150.0, help="seconds in all")
    parser.add_argument("--max-concurrent", type=int, default=64)
    parser.add_argument("--server", action="store_true", help="measure the node itself")
    parser.add_argument("--workers", type=int, default=1, help="with --server")
    args = parser.parse_args()

    context = multiprocessing.get_context("fork")
    parent, child = context.Pipe()
    process = context.Process(target=serve_authority, args=(args.names, args.ttl, child))
    process.start()
    try:
        if not parent.poll(120):
            raise SystemExit("the fake authority did not start")
        port = parent.recv()
        if args.server:
            figures = run_server(args, port)
        else:
            try:
                import uvloop

                uvloop.install()
            except ImportError:
                pass
            figures = asyncio.run(run(args, port))
        parent.send("stop")
        if not parent.poll(60):
            raise SystemExit("the fake authority did not report")
        queries, raw = parent.recv()
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
    intervals = array.array("d")
    intervals.frombytes(raw)
    lag = [interval - args.ttl for interval in intervals]
    figures["authority_queries"] = queries
    figures["refreshes_measured"] = len(lag)
    figures["refresh_lag_p50_s"] = percentile(lag, 0.5)
    figures["refresh_lag_p99_s"] = percentile(lag, 0.99)
    figures["refresh_lag_max_s"] = max(lag, default=float("nan"))
    figures["refresh_lag_mean_s"] = statistics.fmean(lag) if lag else float("nan")
    mode = f"server workers={args.workers}" if args.server else "in-process"
    print(f"{mode} names={args.names} ttl={args.ttl} max_concurrent={args.max_concurrent}")
    for key, value in figures.items():
        print(f"  {key:32} {value:,.3f}" if isinstance(value, float) else f"  {key:32} {value:,}")


if __name__ == "__main__":
    main()
