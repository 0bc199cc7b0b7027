#!/usr/bin/env python3
"""smartdns side by side with Unbound, dnsdist and dnsmasq on the same job (issues 6, 16).

    python3 bench/run.py                  # full run: 3 cases x 3 transports x 2 rounds, 10 s each
    python3 bench/run.py -l 2 --rounds 1  # a quick look
    python3 bench/run.py --transports udp # plain DNS only (issue 6)

Installs what is missing (apt: dnsperf, unbound, dnsdist, dnsmasq-base, nghttp2-client, gcc;
a .venv with smartdns when this Python lacks its dependencies), starts an upstream and every
server on 127.0.0.1 (with DoT and DoH listeners sharing one throwaway certificate), warms the
caches, checks a sample of real answers over each transport, then runs the load case by case
(dnsperf for UDP and DoT, h2load for DoH), interleaving the servers, and prints one table plus
smartdns' QPS and CPU per query as ratios of each peer's.
Exit status 1 when any answer had an unexpected rcode or content. See bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

REPO: Final = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import tools  # noqa: E402
from bench.servers import TARGETS, UPSTREAMS, Smartdns, Target, start_targets  # noqa: E402
from bench.tools import (  # noqa: E402
    REGISTERED,
    TRANSPORTS,
    UNREGISTERED,
    PerfOptions,
    PerfResult,
    QuerySet,
    TlsFiles,
    log,
    rss_kib,
    run_dnsperf,
    run_load,
)

CASES: Final = {
    "a": ("A over unblock names, registered", REGISTERED, "NOERROR"),
    "b": ("A over upstream names (cached), registered", REGISTERED, "NOERROR"),
    "c": ("a+b mix, unregistered", UNREGISTERED, "REFUSED"),
}
DEFAULT_SERVERS: Final = "smartdns,unbound,dnsdist,dnsmasq"
# Other work on the machine (cores busy outside the run, plus steal) above which a row is
# marked: its QPS says more about the neighbours than about the server.
DISTURBED_CPU: Final = 0.25


@dataclass(frozen=True, slots=True)
class RunKey:
    case: str
    round: int
    transport: str


@dataclass(frozen=True, slots=True)
class Row:
    case: str
    round: int
    transport: str
    server: str
    qps: float
    avg_ms: float
    max_ms: float
    sent: int
    lost: int
    rss_mib: float
    server_cpu: float  # server CPU time / wall time of the run (1.0 = one core busy)
    cpu_us: float  # server CPU time per answered query, microseconds
    client_cpu: float  # the same for dnsperf
    other_cpu: float  # CPU time of other normal-priority work on the machine, plus steal
    rcodes: dict[str, int]
    rcode_ok: bool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark smartdns against Unbound, dnsdist and dnsmasq with dnsperf.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-l", "--seconds", type=float, default=10.0, help="dnsperf -l per run")
    parser.add_argument("--rounds", type=int, default=2, help="times each case is run")
    parser.add_argument("--servers", default=DEFAULT_SERVERS, help="comma-separated")
    parser.add_argument("--cases", default="a,b,c", help="comma-separated subset of a,b,c")
    parser.add_argument(
        "--transports", default=",".join(TRANSPORTS), help="comma-separated subset of udp,dot,doh"
    )
    parser.add_argument("--names", type=int, default=1000, help="names per case")
    parser.add_argument("-c", "--clients", type=int, default=8, help="dnsperf -c")
    parser.add_argument("-q", "--outstanding", type=int, default=300, help="dnsperf -q")
    parser.add_argument(
        "--workers", type=int, default=1, help="smartdns server.workers; peers get as many threads"
    )
    parser.add_argument(
        "--upstream",
        choices=sorted(UPSTREAMS),
        default="unbound",
        help="upstream for case (b) names: unbound local-data, or the project's FakeUpstream",
    )
    parser.add_argument("--server-cpus", help="taskset list for servers (default 0, or 0-1)")
    parser.add_argument("--dnsperf-cpus", default="1", help="taskset list for dnsperf")
    parser.add_argument(
        "--half-rate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure smartdns' latency at half its max QPS (dnsperf -Q)",
    )
    parser.add_argument(
        "--profile", type=float, default=0.0, help="py-spy smartdns during case (a) for N s"
    )
    parser.add_argument(
        "--profile-native",
        action="store_true",
        help="py-spy --native: show C frames (uvloop, libc) too; blocks the server per sample",
    )
    tools.add_run_options(parser)
    args = parser.parse_args(argv)
    args.server_list = [s for s in args.servers.split(",") if s]
    args.case_list = [c for c in args.cases.split(",") if c]
    unknown = set(args.case_list) - set(CASES)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    args.transport_list = [t for t in args.transports.split(",") if t]
    unknown = set(args.transport_list) - set(TRANSPORTS)
    if unknown:
        parser.error(f"unknown transports: {', '.join(sorted(unknown))}")
    if args.server_cpus is None:
        args.server_cpus = "0" if args.workers == 1 else f"0-{args.workers - 1}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.no_install:
        tools.ensure_python_env()
    unknown = set(args.server_list) - set(TARGETS)
    if unknown:
        raise SystemExit(f"bench: unknown servers: {', '.join(sorted(unknown))}")
    commands = ["dnsperf", "taskset", *(s for s in args.server_list if s != "smartdns")]
    if args.upstream == "unbound":
        commands.append("unbound")
    if set(args.transport_list) - {"udp"}:
        commands.append("openssl")
    if "doh" in args.transport_list:
        commands += ["h2load", "cc"]
    if not args.no_install:
        tools.ensure_commands(commands)
    py_spy = tools.ensure_py_spy() if args.profile and not args.no_install else None
    if args.profile and not py_spy:
        py_spy = shutil.which("py-spy")

    rows: list[Row] = []
    notes: list[str] = []
    problems: list[str] = []
    half_rate: dict[tuple[str, str], PerfResult] = {}
    profile: list[str] = []
    options = PerfOptions(
        seconds=args.seconds,
        clients=args.clients,
        outstanding=args.outstanding,
        cpus=args.dnsperf_cpus,
    )
    try:
        with tools.session(args.keep) as (workdir, children):
            source, measured = tools.smartdns_source(args.ref, workdir)
            notes.insert(0, f"measured: smartdns from {measured}")
            notes.append(tools.load_average("at the start"))
            files = write_queries(workdir, args.names)
            tls = None
            if set(args.transport_list) - {"udp"}:
                tls = tools.make_tls_files(workdir / "tls")
            if "doh" in args.transport_list:
                binding = tools.build_source_binding(workdir)
                options = dataclasses.replace(options, source_binding=binding)
            upstream = UPSTREAMS[args.upstream](args.names, cpus=args.dnsperf_cpus)
            upstream.start(workdir, children)
            log(f"{upstream.kind} upstream on 127.0.0.1:{upstream.port}")
            targets = start_targets(
                args.server_list,
                workdir,
                children,
                upstream.port,
                source=source,
                workers=args.workers,
                cpus=args.server_cpus,
                tls=tls,
            )
            for target in targets:
                missing = set(args.transport_list) - set(target.transports)
                if missing:
                    notes.append(f"{target.name}: no {', '.join(sorted(missing))} (not measured)")
                if isinstance(target, Smartdns):
                    running = target.serving_processes()
                    note = f"smartdns: server.workers {args.workers}, {running} process(es) running"
                    if running < args.workers:
                        note += " (multi-worker support not in this commit: ran as one process)"
                    notes.append(note)
            for transport in args.transport_list:
                problems += warm_up_and_check(targets, transport, files, args.names, options, tls)
            if problems:
                return report(rows, notes, problems, half_rate, profile, args)
            assert upstream.process is not None
            rows = measure(targets, upstream.process.pid, files, args, options)
            smartdns = next((t for t in targets if isinstance(t, Smartdns)), None)
            if smartdns is not None and args.half_rate:
                half_rate = measure_half_rate(smartdns, rows, files, args, options)
            if smartdns is not None and args.profile and py_spy:
                profile = run_profile(smartdns, py_spy, files["a"].names, workdir, args, options)
            elif args.profile:
                notes.append("profile: py-spy not available")
            notes.append(tools.load_average("at the end"))
    except KeyboardInterrupt:
        log("interrupted: every process started was stopped")
        return 130
    return report(rows, notes, problems, half_rate, profile, args)


def write_queries(workdir: Path, count: int) -> dict[str, QuerySet]:
    unblock = tools.unblock_names(count)
    upstream = tools.upstream_names(count)
    return {
        "a": tools.write_query_set(workdir, "a", unblock),
        "b": tools.write_query_set(workdir, "b", upstream),
        "c": tools.write_query_set(workdir, "c", tools.interleave(unblock, upstream)),
    }


def warm_up_and_check(
    targets: list[Target],
    transport: str,
    files: dict[str, QuerySet],
    count: int,
    options: PerfOptions,
    tls: TlsFiles | None,
) -> list[str]:
    """Over `transport`, one pass over the upstream names per server (fills the caches; a
    server may keep one per transport), a second one that must be all NOERROR, then a sampled
    answer check of every case."""
    from bench.check import check_answers, expectations, warm_up

    problems = []
    gentle = PerfOptions(
        seconds=60, clients=1, outstanding=20, timeout_s=3.0, cpus=options.cpus, transport=transport
    )
    unblock = tools.unblock_names(count)
    for target in (t for t in targets if transport in t.transports):
        started = time.monotonic()
        port = target.port_for(transport)
        if transport == "doh":  # h2load cannot see rcodes: a real client asks every name
            names = tools.upstream_names(count)
            warm_up(transport, port, tls, names)
            problems += [f"{target.name}: {p}" for p in warm_up(transport, port, tls, names)[:10]]
        else:
            run_dnsperf(port, REGISTERED, files["b"].names, gentle, passes=1)
            second = run_dnsperf(port, REGISTERED, files["b"].names, gentle, passes=1)
            if not second.only_rcode("NOERROR") or second.lost:
                problems.append(
                    f"{target.name}: {transport} warm-up pass answered {second.rcodes}, "
                    f"{second.lost} lost"
                )
        log(f"{target.name}: {transport} warm-up done in {time.monotonic() - started:.1f} s")
        wanted = expectations(unblock, count, target.refuses_unregistered)
        for problem in check_answers(transport, port, tls, wanted)[:10]:
            problems.append(f"{target.name}: {transport}: {problem}")
    return problems


def measure(
    targets: list[Target],
    upstream_pid: int,
    files: dict[str, QuerySet],
    args: argparse.Namespace,
    options: PerfOptions,
) -> list[Row]:
    """Rounds outermost, then cases, then transports, then servers: a1-udp-smartdns,
    a1-udp-unbound, ..., a1-dot-smartdns, ..., c2-doh-dnsdist."""
    rows = []
    for round_number in range(1, args.rounds + 1):
        for case in args.case_list:
            for transport in args.transport_list:
                for target in targets:
                    if case == "c" and not target.refuses_unregistered:
                        continue
                    if transport not in target.transports:
                        continue
                    run = RunKey(case, round_number, transport)
                    row = measure_one(target, upstream_pid, files[case], run, options)
                    rows.append(row)
                    log(
                        f"{case}{round_number}-{transport}-{target.name}: {row.qps:,.0f} qps, "
                        f"{row.cpu_us:.1f} us CPU/query, avg {row.avg_ms:.3f} ms, "
                        f"lost {row.lost}, rcodes {row.rcodes}"
                    )
    return rows


def measure_one(
    target: Target, upstream_pid: int, queries: QuerySet, run: RunKey, options: PerfOptions
) -> Row:
    """One closed-loop run of a case over a transport against `target`, with the CPU time of
    the server, the load generator and everything else on the machine meanwhile."""
    _, source, expected = CASES[run.case]
    options = dataclasses.replace(options, transport=run.transport)
    port = target.port_for(run.transport)
    usage = tools.measure_usage(
        target.pid, upstream_pid, lambda: run_load(port, source, queries, options)
    )
    result = usage.result
    return Row(
        case=run.case,
        round=run.round,
        transport=run.transport,
        server=target.name,
        qps=result.qps,
        avg_ms=result.avg_latency_s * 1000,
        max_ms=result.max_latency_s * 1000,
        sent=result.sent,
        lost=result.lost,
        rss_mib=rss_kib(target.pid) / 1024,
        server_cpu=usage.server,
        cpu_us=1e6 * usage.server_s / result.completed if result.completed else 0.0,
        client_cpu=usage.client,
        other_cpu=usage.other,
        rcodes=result.rcodes,
        rcode_ok=result.as_expected(expected, queries.query_bytes),
    )


def measure_half_rate(
    smartdns: Target,
    rows: list[Row],
    files: dict[str, QuerySet],
    args: argparse.Namespace,
    options: PerfOptions,
) -> dict[tuple[str, str], PerfResult]:
    """Issue 6 target: smartdns' average latency at half its own maximum rate (dnsperf -Q,
    h2load --rps), per transport and case."""
    results = {}
    for transport in args.transport_list:
        for case in args.case_list:
            peak = [
                r.qps
                for r in rows
                if r.server == "smartdns" and r.case == case and r.transport == transport
            ]
            if not peak:
                continue
            rate = int(statistics.mean(peak) / 2)
            _, source, _ = CASES[case]
            at = dataclasses.replace(options, transport=transport)
            port = smartdns.port_for(transport)
            result = run_load(port, source, files[case], at, max_qps=rate)
            results[(transport, case)] = result
            average_ms = result.avg_latency_s * 1e3
            log(f"half rate {transport} {case}: {rate} qps requested, avg {average_ms:.3f} ms")
    return results


def run_profile(
    smartdns: Target,
    py_spy: str,
    query_file: Path,
    workdir: Path,
    args: argparse.Namespace,
    options: PerfOptions,
) -> list[str]:
    """py-spy record (non-blocking, 100 Hz) on smartdns while dnsperf runs case (a)."""
    raw = workdir / "profile.txt"
    load = subprocess.Popen(
        tools.pinned(
            options.cpus,
            [
                *("dnsperf", "-s", "127.0.0.1", "-p", str(smartdns.port), "-a", REGISTERED),
                *("-d", str(query_file), "-c", str(options.clients)),
                *("-q", str(options.outstanding), "-l", str(args.profile + 3)),
            ],
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)
        subprocess.run(
            tools.pinned(
                options.cpus,
                [
                    *(py_spy, "record", "--pid", str(smartdns.pid)),
                    *("--duration", str(int(args.profile)), "--rate", "100"),
                    *(("--native",) if args.profile_native else ("--nonblocking",)),
                    *("--function", "--format", "raw", "--output", str(raw)),
                ],
            ),
            capture_output=True,
            timeout=args.profile + 60,
            check=False,
        )
    finally:
        if load.poll() is None:
            load.terminate()
        load.wait(30)
    if not raw.exists():
        return ["py-spy produced no output (needs ptrace permission)"]
    return summarize_profile(raw.read_text())


def summarize_profile(text: str, top: int = 10) -> list[str]:
    """Top functions by own samples and by inclusive samples from py-spy's raw output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short_frame(frame) for frame in stack.split(";")]
        if any(frame.startswith("Thread._bootstrap ") for frame in frames):
            continue  # helper threads (aiosqlite's, to_thread): idle, not the query path
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return ["no samples"]
    lines = [f"{total} samples of the event-loop thread; own time (leaf frame):"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    lines.append("inclusive time (frame anywhere on the stack; start-up frames left out):")
    below_root = [(f, n) for f, n in inclusive.most_common() if n < 0.95 * total]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in below_root[:top]]
    return lines


def _short_frame(frame: str) -> str:
    """`handle (/work/main/smartdns/pipeline.py:60)` → `handle (smartdns/pipeline.py:60)`."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("/smartdns/", "/asyncio/", "/site-packages/", "/lib/python"):
        if marker in where:
            where = where[where.index(marker) + 1 :]
            break
    return f"{name} ({where})" if where else name


def ratio_lines(rows: list[Row]) -> list[str]:
    """Per transport and case, smartdns' figure divided by each peer's and by the better
    peer's of the same round, averaged over the rounds (each round's in parentheses):
    QPS, and queries per second of server CPU (per core: the peer's CPU per query divided
    by ours), which holds when the load generator, not the server, was the limit."""
    lines = []
    for transport in dict.fromkeys(row.transport for row in rows):
        for case in sorted({row.case for row in rows}):
            these = [r for r in rows if r.transport == transport and r.case == case]
            qps = _ratio_text(these, lambda row: row.qps)
            per_core = _ratio_text(these, lambda row: 1 / row.cpu_us if row.cpu_us else 0.0)
            if qps:
                lines.append(f"{transport} case {case}: smartdns QPS {qps}")
                lines.append(f"{transport} case {case}: smartdns per core {per_core}")
    return lines


def _ratio_text(rows: list[Row], figure: Callable[[Row], float]) -> str:
    by_server: dict[str, dict[int, float]] = defaultdict(dict)
    for row in rows:
        by_server[row.server][row.round] = figure(row)
    ours = by_server.pop("smartdns", {})
    if not ours or not by_server:
        return ""
    parts = []
    best = {r: max(peer.get(r, 0.0) for peer in by_server.values()) for r in ours}
    for peer, theirs in [*by_server.items(), ("the better peer", best)]:
        per_round = [ours[r] / theirs[r] for r in sorted(ours) if theirs.get(r)]
        if per_round:
            rounds = ", ".join(f"{value:.2f}" for value in per_round)
            parts.append(f"vs {peer} {statistics.mean(per_round):.2f} ({rounds})")
    return "; ".join(parts)


def table(rows: list[Row]) -> list[str]:
    """A Markdown table, one line per load generator run, in the order they ran."""
    columns = ["case", "round", "transport", "server", "QPS", "CPU µs/q", "avg ms", "max ms"]
    columns += ["lost", "RSS MiB", "srv CPU", "perf CPU", "other CPU", "rcodes"]
    body = [
        [
            row.case,
            str(row.round),
            row.transport,
            row.server,
            f"{row.qps:,.0f}",
            f"{row.cpu_us:.1f}",
            f"{row.avg_ms:.3f}",
            f"{row.max_ms:.1f}",
            f"{row.lost:,}",
            f"{row.rss_mib:.1f}",
            f"{100 * row.server_cpu:.0f}%",
            f"{100 * row.client_cpu:.0f}%",
            f"{100 * row.other_cpu:.0f}%" + (" !" if row.other_cpu > DISTURBED_CPU else ""),
            ("ok " if row.rcode_ok else "WRONG ")
            + ", ".join(f"{k} {v}" for k, v in row.rcodes.items()),
        ]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [columns, *body]) for i in range(len(columns))]
    right = set(range(4, 13))

    def render(cells: list[str]) -> str:
        padded = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return [render(columns), rule, *(render(line) for line in body)]


def report(
    rows: list[Row],
    notes: list[str],
    problems: list[str],
    half_rate: dict[tuple[str, str], PerfResult],
    profile: list[str],
    args: argparse.Namespace,
) -> int:
    out = [
        f"smartdns bench: {args.seconds:g} s per run, {args.rounds} round(s), "
        f"{args.clients} connections and {args.outstanding} queries in flight "
        f"(dnsperf -c -q; h2load -c -m {max(1, args.outstanding // args.clients)} for DoH) "
        f"on cpus {args.dnsperf_cpus}, servers on cpus {args.server_cpus}, "
        f"{args.names} names per case, transports {', '.join(args.transport_list)}",
        *(
            f"  {key}: {text} ({source}, expect {rcode})"
            for key, (text, source, rcode) in CASES.items()
        ),
        *notes,
        "",
        *table(rows),
        "",
        *ratio_lines(rows),
    ]
    if half_rate:
        out.append("")
        out += [
            f"smartdns at half its max rate, {transport} case {case}: {r.qps:,.0f} qps, avg "
            f"{r.avg_latency_s * 1e3:.3f} ms, max {r.max_latency_s * 1e3:.1f} ms, lost {r.lost}"
            for (transport, case), r in half_rate.items()
        ]
    if profile:
        out += ["", "py-spy, smartdns during case (a):", *profile]
    disturbed = [
        f"{r.case}{r.round}-{r.transport}-{r.server}" for r in rows if r.other_cpu > DISTURBED_CPU
    ]
    if disturbed:
        out += [
            "",
            f"! other work used more than {DISTURBED_CPU:.2f} of a core during "
            f"{', '.join(disturbed)}: compare those rows, and ratios using them, with care",
        ]
    wrong = [r for r in rows if not r.rcode_ok]
    problems = problems + [
        f"{r.case}{r.round}-{r.transport}-{r.server}: unexpected rcodes {r.rcodes}"
        + (" (DoH: HTTP statuses and the mean reply size)" if r.transport == "doh" else "")
        for r in wrong
    ]
    if problems:
        out += ["", "FAILED: wrong answers", *(f"  {p}" for p in problems)]
    elif rows:
        out += ["", "rcode check: every answer had the expected rcode"]
    document = {
        "rows": [asdict(r) for r in rows],
        "problems": problems,
        "notes": notes,
        "profile": profile,
    }
    tools.publish(out, args.json, document)
    return 1 if problems or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
