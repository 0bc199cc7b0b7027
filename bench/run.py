#!/usr/bin/env python3
"""smartdns side by side with Unbound, dnsdist and dnsmasq on the same job (issue 6).

    python3 bench/run.py                  # full run: 3 cases x 2 rounds x 4 servers, 10 s each
    python3 bench/run.py -l 2 --rounds 1  # a quick look

Installs what is missing (apt: dnsperf, unbound, dnsdist, dnsmasq-base; a .venv with smartdns
when this Python lacks its dependencies), starts a fake upstream and every server on
127.0.0.1, warms the caches, checks a sample of real answers, then runs dnsperf case by case,
interleaving the servers, and prints one table plus smartdns' QPS as a ratio of each peer's.
Exit status 1 when any answer had an unexpected rcode or content. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

REPO: Final = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import tools  # noqa: E402
from bench.servers import TARGETS, UPSTREAMS, Smartdns, Target  # noqa: E402
from bench.tools import (  # noqa: E402
    REGISTERED,
    UNREGISTERED,
    Children,
    PerfOptions,
    PerfResult,
    log,
    rss_kib,
    run_dnsperf,
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
class Row:
    case: str
    round: int
    server: str
    qps: float
    avg_ms: float
    max_ms: float
    sent: int
    lost: int
    rss_mib: float
    server_cpu: float  # server CPU time / wall time of the run (1.0 = one core busy)
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
        "--ref",
        help="measure this git revision (exported with git archive) instead of the working tree",
    )
    parser.add_argument(
        "--profile-native",
        action="store_true",
        help="py-spy --native: show C frames (uvloop, libc) too; blocks the server per sample",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--no-install", action="store_true", help="never run apt-get or pip")
    args = parser.parse_args(argv)
    args.server_list = [s for s in args.servers.split(",") if s]
    args.case_list = [c for c in args.cases.split(",") if c]
    unknown = set(args.case_list) - set(CASES)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
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
    if not args.no_install:
        tools.ensure_commands(commands)
    py_spy = tools.ensure_py_spy() if args.profile and not args.no_install else None
    if args.profile and not py_spy:
        py_spy = shutil.which("py-spy")

    workdir = Path(tempfile.mkdtemp(prefix="smartdns-bench-"))
    children = Children()
    rows: list[Row] = []
    notes: list[str] = []
    problems: list[str] = []
    half_rate: dict[str, PerfResult] = {}
    profile: list[str] = []
    options = PerfOptions(
        seconds=args.seconds,
        clients=args.clients,
        outstanding=args.outstanding,
        cpus=args.dnsperf_cpus,
    )
    try:
        with tools.terminate_as_interrupt():
            source, measured = REPO, describe_worktree()
            if args.ref:
                source, measured = tools.export_revision(args.ref, workdir / "source")
            notes.insert(0, f"measured: smartdns from {measured}")
            files = write_queries(workdir, args.names)
            upstream = UPSTREAMS[args.upstream](args.names, cpus=args.dnsperf_cpus)
            upstream.start(workdir, children)
            log(f"{upstream.kind} upstream on 127.0.0.1:{upstream.port}")
            targets: list[Target] = []
            for name in args.server_list:
                target = TARGETS[name](workdir / name, workers=args.workers, cpus=args.server_cpus)
                if isinstance(target, Smartdns):
                    target.source = source
                target.start(children, upstream.port)
                log(f"{name} on 127.0.0.1:{target.port} (pid {target.pid}, cpus {target.cpus})")
                targets.append(target)
                if isinstance(target, Smartdns):
                    running = target.serving_processes()
                    note = f"smartdns: server.workers {args.workers}, {running} process(es) running"
                    if running < args.workers:
                        note += " (multi-worker support not in this commit: ran as one process)"
                    notes.append(note)
            problems += warm_up_and_check(targets, files, args.names, options)
            if problems:
                return report(rows, notes, problems, half_rate, profile, args)
            assert upstream.process is not None
            rows = measure(targets, upstream.process.pid, files, args, options)
            smartdns = next((t for t in targets if isinstance(t, Smartdns)), None)
            if smartdns is not None and args.half_rate:
                half_rate = measure_half_rate(smartdns, rows, files, args, options)
            if smartdns is not None and args.profile and py_spy:
                profile = run_profile(smartdns, py_spy, files["a"], workdir, args, options)
            elif args.profile:
                notes.append("profile: py-spy not available")
    except KeyboardInterrupt:
        log("interrupted: stopping every process started")
        children.stop_all()
        return 130
    finally:
        children.stop_all()
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return report(rows, notes, problems, half_rate, profile, args)


def describe_worktree() -> str:
    """HEAD's commit id, plus the files outside bench/ that differ from it."""
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    changed = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()
    dirty = [line[3:] for line in changed if not line[3:].startswith("bench/")]
    where = f"the working tree at {commit or 'an unknown commit'}"
    return where + (f" with uncommitted changes in {', '.join(dirty)}" if dirty else "")


def write_queries(workdir: Path, count: int) -> dict[str, Path]:
    unblock = tools.unblock_names(count)
    upstream = tools.upstream_names(count)
    return {
        "a": tools.write_query_file(workdir / "case-a.txt", unblock),
        "b": tools.write_query_file(workdir / "case-b.txt", upstream),
        "c": tools.write_query_file(workdir / "case-c.txt", tools.interleave(unblock, upstream)),
    }


def warm_up_and_check(
    targets: list[Target], files: dict[str, Path], count: int, options: PerfOptions
) -> list[str]:
    """One pass over the upstream names per server (fills the caches), a second one that
    must be all NOERROR, then a sampled answer check of every case."""
    from bench.check import check_answers, expectations

    problems = []
    gentle = PerfOptions(seconds=60, clients=1, outstanding=20, timeout_s=3.0, cpus=options.cpus)
    unblock = tools.unblock_names(count)
    for target in targets:
        started = time.monotonic()
        run_dnsperf(target.port, REGISTERED, files["b"], gentle, passes=1)
        second = run_dnsperf(target.port, REGISTERED, files["b"], gentle, passes=1)
        log(f"{target.name}: warm-up done in {time.monotonic() - started:.1f} s")
        if not second.only_rcode("NOERROR") or second.lost:
            problems.append(
                f"{target.name}: warm-up pass answered {second.rcodes}, {second.lost} lost"
            )
        wanted = expectations(unblock, count, target.refuses_unregistered)
        for problem in check_answers(target.port, wanted)[:10]:
            problems.append(f"{target.name}: {problem}")
    return problems


def measure(
    targets: list[Target],
    upstream_pid: int,
    files: dict[str, Path],
    args: argparse.Namespace,
    options: PerfOptions,
) -> list[Row]:
    """Rounds outermost, then cases, then servers: a1-smartdns, a1-unbound, ..., c2-dnsmasq."""
    rows = []
    for round_number in range(1, args.rounds + 1):
        for case in args.case_list:
            _, source, expected = CASES[case]
            for target in targets:
                if case == "c" and not target.refuses_unregistered:
                    continue
                ours_before = tools.cpu_seconds(target.pid) + tools.cpu_seconds(upstream_pid)
                busy_before, steal_before = tools.machine_cpu_seconds()
                server_before, started = tools.cpu_seconds(target.pid), time.monotonic()
                result = run_dnsperf(target.port, source, files[case], options)
                wall_s = time.monotonic() - started
                server_cpu = (tools.cpu_seconds(target.pid) - server_before) / wall_s
                busy_after, steal_after = tools.machine_cpu_seconds()
                ours = tools.cpu_seconds(target.pid) + tools.cpu_seconds(upstream_pid)
                ours += result.client_cpu_s - ours_before
                others = busy_after - busy_before - ours + steal_after - steal_before
                row = Row(
                    case=case,
                    round=round_number,
                    server=target.name,
                    qps=result.qps,
                    avg_ms=result.avg_latency_s * 1000,
                    max_ms=result.max_latency_s * 1000,
                    sent=result.sent,
                    lost=result.lost,
                    rss_mib=rss_kib(target.pid) / 1024,
                    server_cpu=server_cpu,
                    client_cpu=result.client_cpu_s / wall_s,
                    other_cpu=max(0.0, others / wall_s),
                    rcodes=result.rcodes,
                    rcode_ok=result.only_rcode(expected),
                )
                rows.append(row)
                log(
                    f"{case}{round_number}-{target.name}: {row.qps:,.0f} qps, "
                    f"avg {row.avg_ms:.3f} ms, lost {row.lost}, rcodes {row.rcodes}"
                )
    return rows


def measure_half_rate(
    smartdns: Target,
    rows: list[Row],
    files: dict[str, Path],
    args: argparse.Namespace,
    options: PerfOptions,
) -> dict[str, PerfResult]:
    """Issue 6 target: smartdns' average latency at half its own maximum rate (dnsperf -Q)."""
    results = {}
    for case in args.case_list:
        peak = [r.qps for r in rows if r.server == "smartdns" and r.case == case]
        if not peak:
            continue
        rate = int(statistics.mean(peak) / 2)
        _, source, _ = CASES[case]
        results[case] = run_dnsperf(smartdns.port, source, files[case], options, max_qps=rate)
        average_ms = results[case].avg_latency_s * 1e3
        log(f"half rate {case}: {rate} qps requested, avg {average_ms:.3f} ms")
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
    by_key: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for row in rows:
        by_key[(row.case, row.server)][row.round] = row.qps
    lines = []
    cases = sorted({row.case for row in rows})
    peers = [s for s in dict.fromkeys(row.server for row in rows) if s != "smartdns"]
    for case in cases:
        ours = by_key.get((case, "smartdns"))
        if not ours:
            continue
        parts = []
        for peer in peers:
            theirs = by_key.get((case, peer))
            if not theirs:
                continue
            per_round = [ours[r] / theirs[r] for r in sorted(ours) if theirs.get(r)]
            if not per_round:
                continue
            rounds = ", ".join(f"{value:.2f}" for value in per_round)
            parts.append(f"vs {peer} {statistics.mean(per_round):.2f} ({rounds})")
        if parts:
            lines.append(f"case {case}: smartdns QPS ratio " + "; ".join(parts))
    return lines


def table(rows: list[Row]) -> list[str]:
    """A Markdown table, one line per dnsperf run, in the order they ran."""
    columns = ["case", "round", "server", "QPS", "avg ms", "max ms", "lost", "RSS MiB"]
    columns += ["srv CPU", "perf CPU", "other CPU", "rcodes"]
    body = [
        [
            row.case,
            str(row.round),
            row.server,
            f"{row.qps:,.0f}",
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
    right = {3, 4, 5, 6, 7, 8, 9, 10}

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
    half_rate: dict[str, PerfResult],
    profile: list[str],
    args: argparse.Namespace,
) -> int:
    out = [
        f"smartdns bench: {args.seconds:g} s per run, {args.rounds} round(s), "
        f"dnsperf -c {args.clients} -q {args.outstanding} on cpus {args.dnsperf_cpus}, "
        f"servers on cpus {args.server_cpus}, {args.names} names per case",
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
            f"smartdns at half its max rate, case {case}: {r.qps:,.0f} qps, avg "
            f"{r.avg_latency_s * 1e3:.3f} ms, max {r.max_latency_s * 1e3:.1f} ms, lost {r.lost}"
            for case, r in half_rate.items()
        ]
    if profile:
        out += ["", "py-spy, smartdns during case (a):", *profile]
    disturbed = [f"{r.case}{r.round}-{r.server}" for r in rows if r.other_cpu > DISTURBED_CPU]
    if disturbed:
        out += [
            "",
            f"! other work used more than {DISTURBED_CPU:.2f} of a core during "
            f"{', '.join(disturbed)}: compare those rows, and ratios using them, with care",
        ]
    wrong = [r for r in rows if not r.rcode_ok]
    problems = problems + [
        f"{r.case}{r.round}-{r.server}: unexpected rcodes {r.rcodes}" for r in wrong
    ]
    if problems:
        out += ["", "FAILED: wrong answers", *(f"  {p}" for p in problems)]
    elif rows:
        out += ["", "rcode check: every answer had the expected rcode"]
    print("\n".join(out), flush=True)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rows": [asdict(r) for r in rows],
                    "problems": problems,
                    "notes": notes,
                    "profile": profile,
                },
                indent=2,
            )
        )
    return 1 if problems or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
