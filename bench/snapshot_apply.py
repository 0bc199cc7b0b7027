"""Apply a one-million-entry registration snapshot through the sync API while dnsperf queries.

    python3 bench/snapshot_apply.py                  # 1,000,000 entries, dnsperf at 2,000 qps
    python3 bench/snapshot_apply.py --entries 100000 --qps 5000 --keep
    python3 bench/snapshot_apply.py --micro          # in-process: validation, store, loop gaps

What it does: starts `python -m smartdns serve` on free loopback ports with a temporary
config and database (127.0.0.1 registered, `public_only: false`, rate limits out of the way),
starts dnsperf (`-Q` open-ish loop, unblock names from 127.0.0.1, answered locally), then
sends `PUT /v1/snapshot` with N entries: accounts of 16 IPv4 /32s from 1.0.0.0/8, plus the
dnsperf source so its answers stay NOERROR throughout. It reports

- apply time: from sending the request to its 200 (JSON decode and validation in a thread,
  one SQLite transaction);
- in effect: from the 200 until the server logs `registrations loaded: N entries` (the DNS
  side rebuilt its prefix snapshot off the loop and swapped it);
- the server's peak RSS (VmHWM from /proc/PID/status), and its RSS before and after;
- dnsperf's figures over the window from just before the PUT to one second after the swap:
  worst and average latency, lost queries, rcodes.

With `--micro` no server or dnsperf runs: the same document is validated with
`parse_snapshot_document` in this process (time with the cyclic collector off, as the
server does, and the tracemalloc peak in a second run) and stored with
`RegistrationStore.accounts.replace_snapshot` into a temporary database. Then an event loop ticks
every millisecond while a worker thread decodes the document, first with plain json.loads
(the peer), then with what `PUT /v1/snapshot` runs (registrations.json_body and validation); the
worst lateness of a tick is how long DNS would have waited for the GIL.

It is a measurement, not a test: nothing is asserted beyond the 200 and NOERROR answers.
Every step has a deadline (about ten minutes in all); every process it starts is stopped by
its PID at the end. dnsperf is installed with apt-get when missing (bench/tools.py).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.tools import (
    REPO,
    Children,
    encode_query,
    ensure_commands,
    ensure_python_env,
    log,
    parse_dnsperf,
    python_env,
    terminate_as_interrupt,
)
from tests.ports import free_port

if TYPE_CHECKING:
    from smartdns.config.model import RegistrationsConfig

PER_ACCOUNT: Final = 16
FIRST_ADDRESS: Final = int(ipaddress.IPv4Address("1.0.0.1"))
SOURCE: Final = "127.0.0.1"
START_TIMEOUT_S: Final = 30.0
APPLY_TIMEOUT_S: Final = 300.0
EFFECT_TIMEOUT_S: Final = 120.0
DNSPERF_LIMIT_S: Final = 600
PROBE_INTERVAL_S: Final = 0.005
PROBE_TIMEOUT_S: Final = 5.0
QUERY_NAMES: Final = ("www.netflix.com", "nflxvideo.net", "www.hulu.com", "www.bbc.co.uk")


def write_token(path: Path) -> str:
    token = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    return token


def write_config(workdir: Path, dns_port: int, sync_port: int) -> Path:
    config = {
        "server": {"listen": [f"127.0.0.1:{dns_port}"], "workers": 1},
        "database": {"path": str(workdir / "registrations.db")},
        "registrations": {"public_only": False},
        "unblock": {
            "ttl": 60,
            "regions": {"us": {"ipv4": ["198.51.100.10"]}, "uk": {"ipv4": ["198.51.100.20"]}},
            "zones": {"us": ["netflix.com", "nflxvideo.net", "hulu.com"], "uk": ["bbc.co.uk"]},
        },
        "upstream": {"servers": ["127.0.0.1:9"], "timeout": 0.5, "attempts": 1},
        "rate_limit": {"client_qps": 10_000_000, "refused_qps": 10_000_000},
        "sync": {"listen": f"127.0.0.1:{sync_port}", "token_file": str(workdir / "sync.token")},
        "logging": {"level": "info"},
    }
    path = workdir / "smartdns.yaml"
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    return path


def snapshot_document(entries: int) -> bytes:
    """{"version": 1, "accounts": {...}}: `entries` IPv4 /32s in accounts of 16, plus SOURCE."""
    accounts: dict[str, list[str]] = {"bench-source": [SOURCE]}
    for start in range(0, entries, PER_ACCOUNT):
        count = min(PER_ACCOUNT, entries - start)
        accounts[f"acct-{start // PER_ACCOUNT:06d}"] = [
            str(ipaddress.IPv4Address(FIRST_ADDRESS + start + i)) for i in range(count)
        ]
    return json.dumps({"version": 1, "accounts": accounts}, separators=(",", ":")).encode()


class Probe(threading.Thread):
    """One query at a time, every PROBE_INTERVAL_S: (wall-clock send time, latency) samples,
    so the worst latency can be placed in a phase of the apply. A lost query counts as
    PROBE_TIMEOUT_S."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        query = encode_query("probe.netflix.com")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((SOURCE, 0))
            sock.settimeout(PROBE_TIMEOUT_S)
            while not self.stop.wait(PROBE_INTERVAL_S):
                sent_wall, sent = time.time(), time.monotonic()
                sock.sendto(query, ("127.0.0.1", self.port))
                with contextlib.suppress(TimeoutError):
                    sock.recv(4096)
                self.samples.append((sent_wall, time.monotonic() - sent))

    def worst(self, start: float, end: float) -> float:
        return max((lat for wall, lat in self.samples if start <= wall < end), default=0.0)


def log_time(text: str, marker: str) -> float:
    """Wall-clock time of the first log line containing `marker` (the logs.py timestamp)."""
    for line in text.splitlines():
        if marker in line:
            match = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})", line)
            if match:
                return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return float("nan")


def proc_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def http(
    method: str, url: str, token: str | None, body: bytes | None, timeout_s: float
) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_for(
    what: str, ready: Callable[[], bool], timeout_s: float, process: subprocess.Popen[bytes]
) -> None:
    """Poll `ready()` until true; fail when the deadline passes or the server died."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None:
            raise SystemExit(
                f"bench: smartdns exited ({process.returncode}) while waiting for {what}"
            )
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: no {what} within {timeout_s:.0f} s")
        time.sleep(0.01)


def healthy(url: str) -> bool:
    try:
        return http("GET", url + "/healthz", None, None, 1.0)[0] == 200
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000, help="addresses in the snapshot")
    parser.add_argument("--qps", type=int, default=2000, help="dnsperf -Q (queries per second)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--micro", action="store_true", help="validation and store in-process, no server"
    )
    parser.add_argument("--rounds", type=int, default=3, help="--micro: timed validations")
    parser.add_argument(
        "--public-only", action="store_true", help="--micro: registrations.public_only: true"
    )
    args = parser.parse_args()
    ensure_python_env()
    if args.micro:
        return micro(args)
    ensure_commands(["dnsperf"])

    workdir = Path(tempfile.mkdtemp(prefix="smartdns-bench-snapshot-"))
    children = Children()
    try:
        with terminate_as_interrupt():
            return run(args, workdir, children)
    finally:
        children.stop_all()
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def micro(args: argparse.Namespace) -> int:
    """Validation and store in this process: seconds, tracemalloc peak, store seconds."""
    import asyncio
    import gc
    import tracemalloc

    from smartdns.config.model import RegistrationsConfig
    from smartdns.registrations.entries import parse_snapshot_document
    from smartdns.registrations.store import RegistrationStore

    rules = RegistrationsConfig(public_only=args.public_only)  # false as in write_config
    body = snapshot_document(args.entries)
    document = json.loads(body)
    if args.public_only:
        del document["accounts"]["bench-source"]  # loopback: not global
    count = sum(len(addresses) for addresses in document["accounts"].values())
    gc.disable()  # as bulk.BulkWork around the whole apply
    times = []
    for _ in range(max(1, args.rounds)):
        started = time.perf_counter()
        snapshot = parse_snapshot_document(document, rules)
        times.append(time.perf_counter() - started)
        del snapshot
    tracemalloc.start()
    snapshot = parse_snapshot_document(document, rules)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    async def store(path: Path) -> float:
        async with await RegistrationStore.open(path, create=True) as registrations:
            started = time.perf_counter()
            result = await registrations.accounts.replace_snapshot(snapshot)
            elapsed = time.perf_counter() - started
            assert result.entries == count, result
            return elapsed

    with tempfile.TemporaryDirectory(prefix="smartdns-bench-micro-") as directory:
        stored_s = asyncio.run(store(Path(directory) / "registrations.db"))
    gc.enable()
    print(f"entries: {count:,} in {len(snapshot.accounts):,} accounts")
    print(
        f"parse_snapshot_document: best {min(times):.2f} s of {len(times)}"
        f" ({min(times) / count * 1e6:.2f} us per entry);"
        f" tracemalloc peak {peak / 2**20:.1f} MiB, result holds {held / 2**20:.1f} MiB"
    )
    print(f"replace_snapshot: {stored_s:.2f} s")
    if not args.public_only:
        from smartdns.registrations.bulk import BULK_WORK

        with BULK_WORK:  # as around the server's apply
            worst_ms = asyncio.run(worst_loop_gaps(body, rules))
        print(
            "worst event-loop gap while a worker thread decodes the body:"
            f" json.loads {worst_ms[0]:.1f} ms, sync API decode and validation {worst_ms[1]:.1f} ms"
        )
    return 0


async def worst_loop_gaps(body: bytes, rules: RegistrationsConfig) -> tuple[float, float]:
    """The longest the event loop waited for the GIL (a 1 ms ticker's worst lateness) while a
    worker thread runs json.loads on `body`, then while it runs what PUT /v1/snapshot runs."""
    import asyncio

    from smartdns.registrations.json_body import decode_snapshot

    async def worst_gap_ms(work: Callable[[], object]) -> float:
        worst = 0.0
        task = asyncio.create_task(asyncio.to_thread(work))
        last = time.perf_counter()
        while not task.done():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst, last = max(worst, now - last - 0.001), now
        kept = await task  # freed after the measurement, as the server frees it gradually
        del kept
        return worst * 1000

    return (
        await worst_gap_ms(lambda: json.loads(body)),
        await worst_gap_ms(lambda: decode_snapshot(body, rules)),
    )


def run(args: argparse.Namespace, workdir: Path, children: Children) -> int:
    dns_port, sync_port = free_port(), free_port()
    token = write_token(workdir / "sync.token")
    config = write_config(workdir, dns_port, sync_port)
    smartdns = [sys.executable, "-m", "smartdns", "--config", str(config)]
    env = python_env(REPO)
    subprocess.run(
        [*smartdns, "registrations", "add", "bench-source", SOURCE],
        check=True,
        env=env,
        capture_output=True,
        timeout=60,
    )
    server_log = workdir / "smartdns.log"
    server = children.start([*smartdns, "serve"], server_log, env=env)
    url = f"http://127.0.0.1:{sync_port}"
    wait_for("healthy server", lambda: healthy(url), START_TIMEOUT_S, server)

    log(f"building a {args.entries:,}-entry snapshot document")
    document = snapshot_document(args.entries)
    log(f"document: {len(document) / 2**20:.1f} MiB")
    queries = workdir / "queries.txt"
    queries.write_text("".join(f"{name} A\n" for name in QUERY_NAMES))
    rss_before = proc_kib(server.pid, "VmRSS")

    perf_out = workdir / "dnsperf.out"
    with open(perf_out, "wb") as output:
        # -l bounds the run; it is interrupted (SIGINT, which prints the figures) much earlier.
        command = ["dnsperf", "-s", "127.0.0.1", "-p", str(dns_port), "-a", SOURCE]
        command += ["-d", str(queries), "-l", str(DNSPERF_LIMIT_S), "-Q", str(args.qps)]
        command += ["-c", "4", "-q", "200", "-t", "5"]
        dnsperf = subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    children.processes.append(dnsperf)  # stopped by PID if anything below fails
    probe = Probe(dns_port)
    probe.start()
    time.sleep(0.5)  # dnsperf and the probe warming up; the window starts here
    loaded_marker = f"registrations loaded: {args.entries + 1} entries"

    log("PUT /v1/snapshot")
    started, started_wall = time.monotonic(), time.time()
    status, body = http("PUT", url + "/v1/snapshot", token, document, APPLY_TIMEOUT_S)
    acknowledged, acknowledged_wall = time.monotonic(), time.time()
    if status != 200:
        raise SystemExit(f"bench: PUT /v1/snapshot got {status}: {body[:200]!r}")
    wait_for(
        "swap of the DNS snapshot",
        lambda: loaded_marker in server_log.read_text(errors="replace"),
        EFFECT_TIMEOUT_S,
        server,
    )
    in_effect, in_effect_wall = time.monotonic(), time.time()
    time.sleep(1.0)  # a second of queries against the new set
    probe.stop.set()
    probe.join(PROBE_TIMEOUT_S + 1)
    dnsperf.send_signal(signal.SIGINT)
    dnsperf.wait(30)
    children.processes.remove(dnsperf)
    perf = parse_dnsperf(perf_out.read_text(errors="replace"))
    peak = proc_kib(server.pid, "VmHWM")
    rss_after = proc_kib(server.pid, "VmRSS")
    status_code, status_body = http("GET", url + "/v1/status", token, None, 10.0)

    result = json.loads(body)
    print()
    print(
        f"snapshot: {result['entries']:,} entries in {result['accounts']:,} accounts, "
        f"{len(document) / 2**20:.1f} MiB of JSON"
    )
    print(f"apply (PUT until 200):        {acknowledged - started:7.2f} s")
    print(f"in effect (200 until swap):   {in_effect - acknowledged:7.2f} s")
    print(f"server RSS before / after:    {rss_before / 1024:7.1f} / {rss_after / 1024:.1f} MiB")
    print(f"server peak RSS (VmHWM):      {peak / 1024:7.1f} MiB")
    print(
        f"dnsperf -Q {args.qps}, {perf.sent:,} queries: worst {perf.max_latency_s * 1000:.1f} ms,"
        f" average {perf.avg_latency_s * 1000:.2f} ms, lost {perf.lost}, rcodes {perf.rcodes}"
    )
    print(f"GET /v1/status: {status_code} {status_body.decode()}")
    # Phases from the server's log line "validated in X s" and the client's clock.
    server_text = server_log.read_text(errors="replace")
    match = re.search(r"validated in ([\d.]+) s, stored in ([\d.]+) s", server_text)
    validated_wall = started_wall + float(match.group(1)) if match else float("nan")
    phases = [
        ("before the PUT", 0.0, started_wall),
        ("upload, decode, validation", started_wall, validated_wall),
        ("SQLite transaction", validated_wall, acknowledged_wall),
        ("200 until the swap", acknowledged_wall, in_effect_wall),
        ("after the swap", in_effect_wall, float("inf")),
    ]
    print(f"probe (1 query per {PROBE_INTERVAL_S * 1000:.0f} ms), worst latency per phase:")
    for name, start, end in phases:
        print(f"  {name:28} {probe.worst(start, end) * 1000:8.1f} ms")
    return 0 if perf.only_rcode("NOERROR") else 1


if __name__ == "__main__":
    sys.exit(main())
