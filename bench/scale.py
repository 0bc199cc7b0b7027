#!/usr/bin/env python3
"""How registered-entry count affects smartdns (issue 6, item 3).

    python3 bench/scale.py                       # 1,000 / 100,000 / 1,000,000 entries
    python3 bench/scale.py --sizes 1000,100000 --no-server

Per size, two measurements:
1. In a fresh Python process, `AuthorizedClients.from_prefixes` directly: snapshot build time,
   the cost of one `is_authorized` call (timeit; registered and unregistered, IPv4 and IPv6),
   and the process RSS the snapshot adds.
2. The real server: a database filled through `RegistrationStore.accounts.replace_snapshot` (time
   reported), `python -m smartdns serve` on CPU 0 (time to READY=1, RSS once serving), then a
   short dnsperf run of case (a) from the registered 127.0.0.1 and case (c) from 127.0.0.2,
   to show whether per-query cost moves with the number of entries.

Entries: 80 % IPv4 /32 (inside 10.0.0.0/8), 20 % IPv6 /64 (inside 2001:db8::/32), 16 per
account, plus the account `bench` holding 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import json
import shutil
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

REPO: Final = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # after PYTHONPATH, which may name an exported revision

from bench import tools  # noqa: E402
from bench.tools import REGISTERED, UNREGISTERED, Children, PerfOptions, log  # noqa: E402

DEFAULT_SIZES: Final = "1000,100000,1000000"
PER_ACCOUNT: Final = 16
V4_BASE: Final = int(ipaddress.IPv4Address("10.0.0.0"))
V6_BASE: Final = int(ipaddress.IPv6Address("2001:db8::"))
V4_STRIDE: Final = 13  # spread the /32s over 10.0.0.0/8 (1M x 13 < 2^24)


def v4_count(size: int) -> int:
    return size - size // 5


def rows(size: int) -> Iterator[tuple[int, int, int]]:
    """(family, network as int, prefix length) rows, as the registry hands them over."""
    for i in range(v4_count(size)):
        yield (4, V4_BASE + i * V4_STRIDE, 32)
    for i in range(size // 5):
        yield (6, V6_BASE + (i << 64), 64)


def probes(size: int) -> dict[str, str]:
    """Source addresses for the lookup timings: the last registered ones and misses."""
    last_v4 = V4_BASE + (v4_count(size) - 1) * V4_STRIDE
    last_v6 = V6_BASE + ((size // 5 - 1) << 64)
    return {
        "v4 registered": str(ipaddress.IPv4Address(last_v4)),
        "v4 unregistered": str(ipaddress.IPv4Address(last_v4 + 1)),
        "v6 registered": str(ipaddress.IPv6Address(last_v6 + 0x1234)),
        "v6 unregistered": str(ipaddress.IPv6Address(V6_BASE + (1 << 100))),
    }


@dataclass(frozen=True, slots=True)
class SnapshotFigures:
    entries: int
    build_s: float
    lookup_ns: dict[str, float]
    snapshot_rss_mib: float


def measure_snapshot(size: int) -> SnapshotFigures:
    """Run in a fresh process (`--one`), so the RSS delta is the snapshot's own."""
    from smartdns.core.clients import AuthorizedClients

    data = list(rows(size))
    gc.collect()
    before = tools.rss_kib_self()
    started = time.perf_counter()
    clients = AuthorizedClients.from_prefixes(data)
    build_s = time.perf_counter() - started
    gc.collect()
    grown = tools.rss_kib_self() - before
    assert clients.entries == size
    lookups = {}
    for label, host in probes(size).items():
        expected = label.endswith(" registered")
        assert clients.is_authorized(host) is expected, label
        timer = timeit.Timer("check(host)", globals={"check": clients.is_authorized, "host": host})
        loops, _ = timer.autorange()
        best = min(timer.repeat(repeat=5, number=loops)) / loops
        lookups[label] = best * 1e9
    return SnapshotFigures(size, build_s, lookups, grown / 1024)


def snapshot_in_subprocess(size: int, source: Path) -> SnapshotFigures:
    result = subprocess.run(
        [sys.executable, __file__, "--one", str(size)],
        capture_output=True,
        text=True,
        timeout=600,
        env=tools.python_env(source),
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"snapshot measurement for {size} failed:\n{result.stderr}")
    return SnapshotFigures(**json.loads(result.stdout))


@dataclass(frozen=True, slots=True)
class ServerFigures:
    entries: int
    fill_s: float
    ready_s: float
    rss_mib: float
    qps_a: float
    qps_c: float
    rcodes_ok: bool


def fill_database(path: Path, size: int) -> float:
    """A database holding `size` entries plus `bench` → 127.0.0.1; seconds replace_snapshot took."""
    from smartdns.registrations.entries import Network, Snapshot
    from smartdns.registrations.store import RegistrationStore

    networks: list[Network] = [
        ipaddress.IPv4Network((network, length))
        if family == 4
        else ipaddress.IPv6Network((network, length))
        for family, network, length in rows(size)
    ]
    accounts: dict[str, tuple[Network, ...]] = {
        f"acct{start // PER_ACCOUNT}": tuple(networks[start : start + PER_ACCOUNT])
        for start in range(0, len(networks), PER_ACCOUNT)
    }
    accounts["bench"] = (ipaddress.IPv4Network(REGISTERED),)

    async def write() -> float:
        store = await RegistrationStore.open(path, create=True)
        try:
            started = time.perf_counter()
            result = await store.accounts.replace_snapshot(Snapshot(version=1, accounts=accounts))
            elapsed = time.perf_counter() - started
            assert result.entries == size + 1, result
            return elapsed
        finally:
            await store.close()

    return asyncio.run(write())


def measure_server(size: int, workdir: Path, source: Path, seconds: float) -> ServerFigures:
    from bench.servers import Smartdns, UnboundUpstream

    children = Children()
    try:
        database = workdir / f"registrations-{size}.db"
        fill_s = fill_database(database, size)
        upstream = UnboundUpstream(10, cpus="1").start(workdir, children)
        server = Smartdns(workdir / f"smartdns-{size}", cpus="0", database=database, source=source)
        server.start(children, upstream.port)
        time.sleep(1.0)  # let start-up garbage settle before reading RSS
        rss_mib = tools.rss_kib(server.pid) / 1024
        qps = {}
        ok = True
        if seconds > 0 and shutil.which("dnsperf"):
            options = PerfOptions(seconds=seconds, clients=8, outstanding=300, cpus="1")
            names = tools.unblock_names(1000)
            query_file = tools.write_query_file(workdir / "scale-queries.txt", names)
            for case, source_address, rcode in (
                ("a", REGISTERED, "NOERROR"),
                ("c", UNREGISTERED, "REFUSED"),
            ):
                result = tools.run_dnsperf(server.port, source_address, query_file, options)
                qps[case] = result.qps
                ok = ok and result.only_rcode(rcode)
        return ServerFigures(
            entries=size,
            fill_s=fill_s,
            ready_s=server.start_seconds,
            rss_mib=rss_mib,
            qps_a=qps.get("a", 0.0),
            qps_c=qps.get("c", 0.0),
            rcodes_ok=ok,
        )
    finally:
        children.stop_all()


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Scale figures for smartdns' registration snapshot.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated entry counts")
    parser.add_argument("--no-server", action="store_true", help="skip the real-server part")
    parser.add_argument("-l", "--seconds", type=float, default=3.0, help="dnsperf -l per case")
    parser.add_argument("--ref", help="measure this git revision instead of the working tree")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--no-install", action="store_true", help="never run apt-get or pip")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one size
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(asdict(measure_snapshot(args.one))))
        return 0
    if not args.no_install:
        tools.ensure_python_env()
        if not args.no_server:
            tools.ensure_commands(["dnsperf", "taskset", "unbound"])
    sizes = [int(s) for s in args.sizes.split(",") if s]
    workdir = Path(tempfile.mkdtemp(prefix="smartdns-scale-"))
    try:
        with tools.terminate_as_interrupt():
            source, measured = REPO, "the working tree"
            if args.ref:
                source, commit = tools.export_revision(args.ref, workdir / "source")
                measured = commit
            if str(source) not in sys.path:
                sys.path.insert(0, str(source))
            snapshots = []
            for size in sizes:
                log(f"snapshot of {size:,} entries")
                snapshots.append(snapshot_in_subprocess(size, source))
            servers = []
            if not args.no_server:
                for size in sizes:
                    log(f"server with {size:,} entries")
                    servers.append(measure_server(size, workdir, source, args.seconds))
    except KeyboardInterrupt:
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(render(measured, snapshots, servers))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "measured": measured,
                    "snapshots": [asdict(s) for s in snapshots],
                    "servers": [asdict(s) for s in servers],
                },
                indent=2,
            )
        )
    return 0 if all(s.rcodes_ok for s in servers) else 1


def render(measured: str, snapshots: list[SnapshotFigures], servers: list[ServerFigures]) -> str:
    out = [f"smartdns scale figures ({measured})", ""]
    labels = list(snapshots[0].lookup_ns) if snapshots else []
    out.append(
        "| entries | build ms | snapshot MiB | " + " | ".join(f"{x} ns" for x in labels) + " |"
    )
    out.append("|---:|---:|---:|" + "---:|" * len(labels))
    for s in snapshots:
        lookups = " | ".join(f"{s.lookup_ns[label]:.0f}" for label in labels)
        out.append(
            f"| {s.entries:,} | {s.build_s * 1000:.1f} | {s.snapshot_rss_mib:.1f} | {lookups} |"
        )
    if servers:
        out += [
            "",
            "| entries | DB fill s | start→READY s | server RSS MiB | QPS (a) | QPS (c) | rcodes |",
            "|---:|---:|---:|---:|---:|---:|---|",
        ]
        for v in servers:
            out.append(
                f"| {v.entries:,} | {v.fill_s:.1f} | {v.ready_s:.2f} | {v.rss_mib:.1f} "
                f"| {v.qps_a:,.0f} | {v.qps_c:,.0f} | {'ok' if v.rcodes_ok else 'WRONG'} |"
            )
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
