#!/usr/bin/env python3
"""Memory per idle DoT connection (issue 16): 10,000 connections held open against one
smartdns worker and against Unbound, RSS before and after.

    python3 bench/idle_connections.py                        # smartdns and Unbound, 10,000 each
    python3 bench/idle_connections.py --connections 2000 --servers unbound,dnsdist

Each server runs alone on CPU 0 (smartdns `workers: 1`; Unbound `num-threads: 1`), listening
on DoT (Unbound on DoT alone: it reserves file descriptors for `incoming-num-tcp` on every
interface), with its connection cap and idle timeout raised so that none of the connections
is shed or timed out (smartdns `encrypted.max_connections`, `server.tcp_max_connections`,
`tcp_idle_timeout`; Unbound `incoming-num-tcp`, `tcp-idle-timeout`; dnsdist
`setTCPRecvTimeout`). The client is
this process, on CPU 1, asyncio: it opens the connections (at most `--parallel` handshakes
at a time), sends one query on each and reads its answer, so the server has set up all it
keeps per connection, then holds them idle. Each connection comes from its own 127.x.y.1
address, one per /24, so no per-source limit of new handshakes (smartdns has one) slows the
opening. RSS (VmRSS of the server's processes) is read after one connection was opened and
closed (TLS set up), with all of them open, and after they were closed. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import resource
import ssl
import struct
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

REPO: Final = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import tools  # noqa: E402
from bench.servers import (  # noqa: E402
    TARGETS,
    UNBOUND_OUTGOING_RANGE,
    Target,
    UnboundUpstream,
    start_targets,
)
from bench.tools import SERVER_NAME, TlsFiles, log, rss_kib  # noqa: E402

DEFAULT_SERVERS: Final = "smartdns,unbound"
STEP_TIMEOUT_S: Final = 20.0  # one connect + handshake + answer, or one probe
OPEN_TIMEOUT_S: Final = 900.0  # all connections of one server
SAMPLE: Final = 200  # held connections asked again before closing: still served?
QUERY_NAME: Final = "w1.netflix.com"
# Far beyond the run: Unbound shortens its idle timeout to 0.2% of this (200 s) when most of
# its connection slots are in use.
IDLE_TIMEOUT_S: Final = 100_000.0


@dataclass(frozen=True, slots=True)
class Result:
    server: str
    requested: int
    held: int  # opened and answered
    failed: int  # could not be opened or gave no answer
    shed: int  # sampled connections the server had closed meanwhile
    rss_before_mib: float
    rss_open_mib: float
    rss_closed_mib: float
    per_connection_kib: float
    open_s: float
    server_cpu_us_per_open: float  # handshake and first answer, server CPU time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="RSS for N idle DoT connections held open, per connection.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--servers", default=DEFAULT_SERVERS, help="comma-separated")
    parser.add_argument("--parallel", type=int, default=64, help="handshakes in flight")
    tools.add_run_options(parser)
    args = parser.parse_args(argv)
    args.server_list = [s for s in args.servers.split(",") if s]
    if set(args.server_list) - set(TARGETS) or "dnsmasq" in args.server_list:
        parser.error("servers: smartdns, unbound, dnsdist")
    if not 0 < args.connections <= 250 * 256:
        parser.error("--connections: 1 to 64,000 (one source address per /24 of 127/8)")
    return args


def raise_file_limit(needed: int) -> None:
    """Soft RLIMIT_NOFILE up to the hard limit (the servers started later inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(f"bench: RLIMIT_NOFILE hard limit {hard} < {needed} needed")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, needed * 2)), hard))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tools.ensure_for(args.server_list, ["taskset", "openssl", "unbound"], args.no_install)
    raise_file_limit(args.connections + 1000)
    results: list[Result] = []
    notes: list[str] = []
    try:
        with tools.session(args.keep) as (workdir, children):
            source, measured = tools.smartdns_source(args.ref, workdir)
            notes += [f"measured: smartdns from {measured}", tools.load_average("at the start")]
            tls = tools.make_tls_files(workdir / "tls")
            upstream = UnboundUpstream(1, cpus="1").start(workdir, children)
            for name in args.server_list:  # one at a time: each alone on CPU 0
                connections = connections_for(name, args.connections)
                if connections < args.connections:
                    notes.append(f"{name}: {connections:,} connections, all its file limit allows")
                (target,) = start_targets(
                    [name],
                    workdir,
                    children,
                    upstream.port,
                    source=source,
                    tls=tls,
                    connections=connections + 100,
                    idle_timeout_s=IDLE_TIMEOUT_S,
                    serve=("dot",),
                )
                if "dot" not in target.transports:
                    notes.append(f"{name}: no DoT in this commit (not measured)")
                else:
                    os.sched_setaffinity(0, {1})
                    results.append(asyncio.run(measure(target, tls, connections, args.parallel)))
                assert target.process is not None
                children.stop(target.process)
            notes.append(tools.load_average("at the end"))
    except KeyboardInterrupt:
        log("interrupted: every process started was stopped")
        return 130
    return report(results, notes, args)


def connections_for(server: str, requested: int) -> int:
    """What `server` can hold within the hard RLIMIT_NOFILE: Unbound reserves two file
    descriptors per connection it holds (see Unbound's `incoming-num-tcp`), and its
    outgoing range."""
    if server != "unbound":
        return requested
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return requested
    return min(requested, (hard - UNBOUND_OUTGOING_RANGE - 100) // 2 - 110)


def source_address(index: int) -> str:
    """127.a.b.1 with a different /24 for each index (a = 1..250)."""
    return f"127.{1 + index % 250}.{index // 250}.1"


def dot_query(query_id: int) -> bytes:
    message = tools.encode_query(QUERY_NAME, query_id=query_id)
    return struct.pack("!H", len(message)) + message


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, query_id: int
) -> bool:
    """One query and its answer (any rcode: an unregistered source is refused) in time."""
    writer.write(dot_query(query_id))
    async with asyncio.timeout(STEP_TIMEOUT_S):
        (length,) = struct.unpack("!H", await reader.readexactly(2))
        reply = await reader.readexactly(length)
    return reply[:2] == struct.pack("!H", query_id)


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_one(port: int, context: ssl.SSLContext, index: int) -> Connection | None:
    try:
        async with asyncio.timeout(STEP_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1",
                port,
                ssl=context,
                server_hostname=SERVER_NAME,
                local_addr=(source_address(index), 0),
            )
        if await exchange(reader, writer, index & 0xFFFF):
            return reader, writer
        writer.close()
    except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError):
        pass
    return None


async def measure(target: Target, tls: TlsFiles, connections: int, parallel: int) -> Result:
    context = ssl.create_default_context(cafile=str(tls.ca))
    context.set_alpn_protocols(["dot"])
    port = target.dot_port
    first = await open_one(port, context, 0)
    if first is None:
        raise RuntimeError(f"{target.name}: the first DoT connection got no answer")
    await close_all([first])
    before = rss_kib(target.pid)
    log(f"{target.name}: RSS {before / 1024:.1f} MiB, opening {connections:,} connections")
    cpu_before, started = tools.cpu_seconds(target.pid), time.monotonic()
    gate = asyncio.Semaphore(parallel)

    async def gated(index: int) -> Connection | None:
        async with gate:
            return await open_one(port, context, index)

    async with asyncio.timeout(OPEN_TIMEOUT_S):
        opened = await asyncio.gather(*(gated(i) for i in range(1, connections + 1)))
    open_s = time.monotonic() - started
    cpu_s = tools.cpu_seconds(target.pid) - cpu_before
    held = [connection for connection in opened if connection is not None]
    with_all = rss_kib(target.pid)
    log(f"{target.name}: {len(held):,} open in {open_s:.1f} s, RSS {with_all / 1024:.1f} MiB")
    sample = random.Random(16).sample(held, min(SAMPLE, len(held)))
    answered = await asyncio.gather(*(still_served(c) for c in sample))
    await close_all(held)
    closed = rss_kib(target.pid)
    shed = answered.count(False)
    return Result(
        server=target.name,
        requested=connections,
        held=len(held),
        failed=connections - len(held),
        shed=shed,
        rss_before_mib=before / 1024,
        rss_open_mib=with_all / 1024,
        rss_closed_mib=closed / 1024,
        per_connection_kib=(with_all - before) / len(held) if held else 0.0,
        open_s=open_s,
        server_cpu_us_per_open=1e6 * cpu_s / len(held) if held else 0.0,
    )


async def still_served(connection: Connection) -> bool:
    try:
        return await exchange(*connection, 0xBEEF)
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False


async def close_all(connections: list[Connection]) -> None:
    for _, writer in connections:
        writer.close()
    for _, writer in connections:
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            async with asyncio.timeout(STEP_TIMEOUT_S):
                await writer.wait_closed()


def report(results: list[Result], notes: list[str], args: argparse.Namespace) -> int:
    lines = [
        f"idle DoT connections: {args.connections:,} per server, one worker/thread on cpu 0, "
        "the client (asyncio, this process) on cpu 1",
        *notes,
        "",
        "| server | held | failed | shed | RSS before MiB | RSS open MiB | RSS closed MiB "
        "| KiB per connection | open s | server CPU µs per open |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r.server} | {r.held:,} | {r.failed:,} | {r.shed} | {r.rss_before_mib:.1f} | "
            f"{r.rss_open_mib:.1f} | {r.rss_closed_mib:.1f} | {r.per_connection_kib:.1f} | "
            f"{r.open_s:.1f} | {r.server_cpu_us_per_open:,.0f} |"
            for r in results
        ),
    ]
    by_name = {r.server: r for r in results}
    ours = by_name.get("smartdns")
    for peer in (r for r in results if r.server != "smartdns"):
        if ours and peer.per_connection_kib:
            lines.append(
                f"smartdns memory per connection / {peer.server}'s: "
                f"{ours.per_connection_kib / peer.per_connection_kib:.2f}"
            )
    incomplete = [r.server for r in results if r.held < r.requested or r.shed]
    if incomplete:
        lines.append(f"INCOMPLETE: not every connection held in {', '.join(incomplete)}")
    tools.publish(lines, args.json, {"results": [asdict(r) for r in results], "notes": notes})
    return 1 if incomplete or not results else 0


if __name__ == "__main__":
    sys.exit(main())
