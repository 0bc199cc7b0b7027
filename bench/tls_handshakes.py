#!/usr/bin/env python3
"""New TLS handshakes per second (issue 16): a fresh connection for every query.

    python3 bench/tls_handshakes.py                      # smartdns, Unbound, dnsdist; DoT and DoH
    python3 bench/tls_handshakes.py -l 3 --rounds 1      # a quick look

dnsperf with `-O num-queries-per-conn=1`: each of `-c` connections sends one query of case
(a), reads the answer, closes, and connects again (a full handshake: dnsperf offers no
session to resume). smartdns limits new handshakes per source address (50 a second), so the
connections come from 240 addresses in turn (127.0.0.10 to 127.0.0.249, through
bench/bind_source.c), all registered with smartdns (127.0.0.0/24) and allowed by the peers.
The servers run as in run.py, on CPU 0, with the same throwaway certificate (ECDSA P-256);
dnsperf runs on CPU 1. Rounds, then transports, then servers, so a slow phase of the machine
hits every server.

The client's handshake costs about as much CPU as the server's, so one dnsperf core may be
the limit: the figure that compares servers is the server's CPU time per handshake (and its
inverse, handshakes per second per core), next to the rate reached.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Final

REPO: Final = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import tools  # noqa: E402
from bench.servers import TARGETS, Target, UnboundUpstream, start_targets  # noqa: E402
from bench.tools import REGISTERED, PerfOptions, log, run_dnsperf  # noqa: E402

DEFAULT_SERVERS: Final = "smartdns,unbound,dnsdist"
FIRST_SOURCE: Final = "127.0.0.10"  # past 127.0.0.2, which the peers refuse
SOURCES: Final = 240
REGISTERED_PREFIX: Final = "127.0.0.0/24"


@dataclass(frozen=True, slots=True)
class Row:
    round: int
    transport: str
    server: str
    handshakes_per_s: float  # answered queries per second, one connection each
    cpu_us: float  # server CPU time per handshake (and its one query), microseconds
    server_cpu: float  # fractions of one core over the run
    client_cpu: float
    other_cpu: float
    lost: int
    rcodes: dict[str, int]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="TLS handshakes per second, a fresh connection per query (dnsperf).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-l", "--seconds", type=float, default=10.0, help="dnsperf -l per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--servers", default=DEFAULT_SERVERS, help="comma-separated")
    parser.add_argument("--transports", default="dot,doh", help="dot, doh or both")
    parser.add_argument(
        "-c", "--connections", type=int, default=32, help="dnsperf -c and -q: connections open"
    )
    tools.add_run_options(parser)
    args = parser.parse_args(argv)
    args.server_list = [s for s in args.servers.split(",") if s]
    args.transport_list = [t for t in args.transports.split(",") if t]
    if set(args.server_list) - set(TARGETS) or set(args.transport_list) - {"dot", "doh"}:
        parser.error("unknown server or transport")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    commands = ["dnsperf", "taskset", "openssl", "unbound", "cc"]
    tools.ensure_for(args.server_list, commands, args.no_install)
    rows: list[Row] = []
    notes: list[str] = []
    try:
        with tools.session(args.keep) as (workdir, children):
            source, measured = tools.smartdns_source(args.ref, workdir)
            notes += [f"measured: smartdns from {measured}", tools.load_average("at the start")]
            tls = tools.make_tls_files(workdir / "tls")
            names = tools.unblock_names(1000)
            queries = tools.write_query_file(workdir / "case-a.txt", names)
            upstream = UnboundUpstream(len(names), cpus="1").start(workdir, children)
            targets = start_targets(
                args.server_list,
                workdir,
                children,
                upstream.port,
                source=source,
                tls=tls,
                registered=(REGISTERED_PREFIX,),
            )
            notes += [
                f"{target.name}: no {transport} in this commit (not measured)"
                for target in targets
                for transport in args.transport_list
                if transport not in target.transports
            ]
            problems = check(targets, args.transport_list, tls, names)
            if problems:
                print("FAILED: wrong answers", *problems, sep="\n  ", flush=True)
                return 1
            assert upstream.process is not None
            binding = tools.build_source_binding(workdir)
            rows = measure(targets, upstream.process.pid, queries, binding, args)
            notes.append(tools.load_average("at the end"))
    except KeyboardInterrupt:
        log("interrupted: every process started was stopped")
        return 130
    return report(rows, notes, args)


def check(
    targets: list[Target], transports: list[str], tls: tools.TlsFiles, names: list[str]
) -> list[str]:
    """Before measuring: a sample of case (a) answered right over each transport."""
    from bench.check import check_answers, expectations

    wanted = [item for item in expectations(names, 0, False) if item.source == REGISTERED]
    problems = []
    for target in targets:
        for transport in transports:
            if transport not in target.transports:
                continue  # a note says so
            found = check_answers(transport, target.port_for(transport), tls, wanted)
            problems += [f"{target.name}: {transport}: {problem}" for problem in found[:10]]
    return problems


def measure(
    targets: list[Target],
    upstream_pid: int,
    queries: Path,
    source_binding: Path,
    args: argparse.Namespace,
) -> list[Row]:
    """Rounds, then transports, then servers; each run `-l seconds` of dnsperf."""
    options = PerfOptions(
        seconds=args.seconds,
        clients=args.connections,
        outstanding=args.connections,
        queries_per_connection=1,
        cpus="1",
        source_binding=source_binding,
        source_count=SOURCES,
    )
    rows = []
    for round_number in range(1, args.rounds + 1):
        for transport in args.transport_list:
            at = dataclasses.replace(options, transport=transport)
            for target in (t for t in targets if transport in t.transports):
                port = target.port_for(transport)
                load = partial(run_dnsperf, port, FIRST_SOURCE, queries, at)
                usage = tools.measure_usage(target.pid, upstream_pid, load)
                result = usage.result
                row = Row(
                    round=round_number,
                    transport=transport,
                    server=target.name,
                    handshakes_per_s=result.qps,
                    cpu_us=1e6 * usage.server_s / result.completed if result.completed else 0.0,
                    server_cpu=usage.server,
                    client_cpu=usage.client,
                    other_cpu=usage.other,
                    lost=result.lost,
                    rcodes=result.rcodes,
                )
                rows.append(row)
                log(
                    f"{round_number}-{transport}-{target.name}: {row.handshakes_per_s:,.0f}/s, "
                    f"{row.cpu_us:.0f} us server CPU each, rcodes {row.rcodes}"
                )
    return rows


def report(rows: list[Row], notes: list[str], args: argparse.Namespace) -> int:
    lines = [
        f"TLS handshakes: {args.seconds:g} s per run, {args.rounds} round(s), dnsperf -c "
        f"{args.connections} -q {args.connections} -O num-queries-per-conn=1 on cpu 1, "
        f"servers on cpu 0, case (a) names from {SOURCES} addresses from {FIRST_SOURCE} on",
        *notes,
        "",
        "| round | transport | server | handshakes/s | server CPU µs each | per core/s "
        "| srv CPU | perf CPU | other CPU | lost | rcodes |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r.round} | {r.transport} | {r.server} | {r.handshakes_per_s:,.0f} | "
        f"{r.cpu_us:,.0f} | {1e6 / r.cpu_us if r.cpu_us else 0:,.0f} | "
        f"{100 * r.server_cpu:.0f}% | {100 * r.client_cpu:.0f}% | {100 * r.other_cpu:.0f}% | "
        f"{r.lost} | {', '.join(f'{k} {v}' for k, v in r.rcodes.items())} |"
        for r in rows
    ]
    lines.append("")
    by_key: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in rows:
        by_key[(row.transport, row.server)].append(row)
    for transport in args.transport_list:
        ours = by_key.get((transport, "smartdns"), [])
        for peer in (s for s in args.server_list if s != "smartdns"):
            theirs = by_key.get((transport, peer), [])
            pairs = list(zip(ours, theirs, strict=False))
            if not pairs or not all(a.cpu_us and b.handshakes_per_s for a, b in pairs):
                continue
            rate = statistics.mean(a.handshakes_per_s / b.handshakes_per_s for a, b in pairs)
            per_core = statistics.mean(b.cpu_us / a.cpu_us for a, b in pairs)
            lines.append(
                f"{transport}: smartdns vs {peer}: handshakes/s {rate:.2f}, per core {per_core:.2f}"
            )
    wrong = [r for r in rows if set(r.rcodes) != {"NOERROR"}]
    if wrong:
        lines.append("FAILED: " + ", ".join(f"{r.round}-{r.transport}-{r.server}" for r in wrong))
    tools.publish(lines, args.json, {"rows": [asdict(r) for r in rows], "notes": notes})
    return 1 if wrong or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
