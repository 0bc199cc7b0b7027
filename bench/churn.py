"""Registrations that keep changing (issue 11, "Targets"): portal writes at a steady rate on a
node holding N registered accounts, and how fast each write is in DNS answers.

    python3 bench/churn.py                                 # N = 1,000,000, 200 writes/s, 60 s
    python3 bench/churn.py --accounts 10000 --workers 2 --seconds 30
    python3 bench/churn.py --revision main~3               # the same against an older revision

What it does: imports N accounts of one IPv4 /32 each (in 127.0.0.0/8, so the harness can
send from any of them) with `smartdns registrations import`, starts `python -m smartdns
serve` on free loopback ports (`public_only: false`, rate limits out of the way), then for
`--seconds` writes `PUT /v1/accounts/{account}` at `--rate` a second from `--connections`
keep-alive HTTP connections, open loop (write i is due at i / rate seconds whatever the
others do): each write moves one account to a fresh address. Every tenth write is probed
from its new address right after its 200, again every millisecond until authorized (a new
socket each time, so with workers any of them may answer); a fixed registered client is
probed every 10 ms throughout. It prints

- writes accepted per second (200s over the window) and PUT latency;
- time to effect of the sampled writes, from the 200 to the first authorized answer
  (p50 / p99 / max; "late" counts those not in effect after 5 s);
- the fixed probe's latency (p50 / p99 / max; a lost query counts as 1 s);
- the node's CPU (main process and workers) over the window, in % of one core;
- the node's RSS (with workers) before the writes, after their first minute, after them.

A measurement, not a test; loopback only; every step has a deadline and every process it
starts is stopped by its PID at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.client
import ipaddress
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import snapshot_apply
from bench.snapshot_apply import healthy, wait_for, write_token
from bench.tools import (
    REPO,
    Children,
    cpu_seconds,
    encode_query,
    ensure_python_env,
    export_revision,
    log,
    python_env,
    rss_kib,
    terminate_as_interrupt,
)
from tests.ports import free_port

FIRST: Final = int(ipaddress.IPv4Address("127.0.1.1"))  # account i starts at FIRST + i
FIXED_CLIENT: Final = "127.0.0.2"
START_TIMEOUT_S: Final = 300.0  # a million registrations load in a few seconds
HTTP_TIMEOUT_S: Final = 10.0
EFFECT_GIVE_UP_S: Final = 5.0
PROBE_TIMEOUT_S: Final = 1.0
FIXED_INTERVAL_S: Final = 0.010
EFFECT_INTERVAL_S: Final = 0.001
SAMPLE_EVERY: Final = 10
VERSION_BASE: Final = 1  # the imported snapshot's version; writes take versions above it


def address(index: int) -> str:
    return str(ipaddress.IPv4Address(FIRST + index))


def write_config(workdir: Path, dns_port: int, sync_port: int, workers: int) -> Path:
    """snapshot_apply's configuration, with `workers` and quieter logs."""
    path = snapshot_apply.write_config(workdir, dns_port, sync_port)
    config = json.loads(path.read_text())
    config["server"]["workers"] = workers
    config["logging"]["level"] = "warning"
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    return path


def snapshot_file(workdir: Path, accounts: int) -> Path:
    """The import document: account `a{i}` holds address(i); `fixed` holds FIXED_CLIENT."""
    path = workdir / "snapshot.json"
    with open(path, "w") as out:
        out.write(f'{{"version": {VERSION_BASE}, "accounts": {{"fixed": ["{FIXED_CLIENT}"]')
        for i in range(accounts):
            out.write(f',"a{i}":["{address(i)}"]')
        out.write("}}")
    return path


def query(source: str, port: int, payload: bytes) -> tuple[int | None, float]:
    """(rcode or None when lost, seconds) of one query from a new socket bound to `source`."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(PROBE_TIMEOUT_S)
        started = time.perf_counter()
        sock.sendto(payload, ("127.0.0.1", port))
        try:
            reply = sock.recv(4096)
        except TimeoutError:
            return None, PROBE_TIMEOUT_S
        return reply[3] & 0x0F, time.perf_counter() - started


@dataclass
class Results:
    put_s: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    effect_s: list[float] = field(default_factory=list)
    late: int = 0
    fixed_s: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def probe_until_authorized(source: str, port: int, since: float, results: Results) -> None:
    payload = encode_query("www.netflix.com")
    while True:
        rcode, _ = query(source, port, payload)
        elapsed = time.perf_counter() - since
        if rcode == 0:
            with results.lock:
                results.effect_s.append(elapsed)
            return
        if elapsed > EFFECT_GIVE_UP_S:
            with results.lock:
                results.late += 1
            return
        time.sleep(EFFECT_INTERVAL_S)


def probe_fixed(port: int, stop: threading.Event, results: Results) -> None:
    payload = encode_query("www.netflix.com")
    while not stop.wait(FIXED_INTERVAL_S):
        _, seconds = query(FIXED_CLIENT, port, payload)
        results.fixed_s.append(seconds)


class Writer(threading.Thread):
    """One keep-alive connection taking due writes from the shared schedule."""

    def __init__(self, run: Run, schedule: Schedule) -> None:
        super().__init__(daemon=True)
        self.run_ = run
        self.schedule = schedule

    def run(self) -> None:
        run = self.run_
        connection = http.client.HTTPConnection("127.0.0.1", run.sync_port, timeout=HTTP_TIMEOUT_S)
        headers = {"Authorization": f"Bearer {run.token}", "Content-Type": "application/json"}
        while (job := self.schedule.next()) is not None:
            number, account, new_address = job
            body = json.dumps({"version": VERSION_BASE + 1 + number, "addresses": [new_address]})
            started = time.perf_counter()
            connection.request("PUT", f"/v1/accounts/a{account}", body, headers)
            response = connection.getresponse()
            response.read()
            done = time.perf_counter()
            with run.results.lock:
                run.results.put_s.append(done - started)
                run.results.statuses[response.status] = (
                    run.results.statuses.get(response.status, 0) + 1
                )
            if response.status == 200 and number % SAMPLE_EVERY == 0:
                run.probes.submit(
                    probe_until_authorized, new_address, run.dns_port, done, run.results
                )
        connection.close()


class Schedule:
    """Write i is due at start + i / rate (open loop); `next` blocks until the next is due."""

    def __init__(self, rate: float, seconds: float, accounts: int) -> None:
        self.rate = rate
        self.total = int(rate * seconds)
        self.accounts = accounts
        self.start = time.perf_counter()
        self._next = 0
        self._lock = threading.Lock()

    def next(self) -> tuple[int, int, str] | None:
        with self._lock:
            number = self._next
            if number >= self.total:
                return None
            self._next += 1
        delay = self.start + number / self.rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        # Consecutive writes go to different accounts (a stride coprime with most N), each
        # to an address never used before, so a probe sees exactly this write take effect.
        account = (number * 7919) % self.accounts
        return number, account, address(self.accounts + number)


@dataclass
class Run:
    dns_port: int
    sync_port: int
    token: str
    results: Results
    probes: concurrent.futures.ThreadPoolExecutor


def percentiles(values: Sequence[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)

    def at(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000

    return f"p50 {at(0.5):.1f} / p99 {at(0.99):.1f} / max {ordered[-1] * 1000:.1f} ms"


def measure(args: argparse.Namespace, workdir: Path, children: Children, source: Path) -> int:
    env = python_env(source)
    dns_port, sync_port = free_port(), free_port()
    token = write_token(workdir / "sync.token")
    config = write_config(workdir, dns_port, sync_port, args.workers)
    smartdns = [sys.executable, "-m", "smartdns", "--config", str(config)]
    log(f"importing {args.accounts:,} accounts")
    started = time.monotonic()
    subprocess.run(
        [*smartdns, "registrations", "import", str(snapshot_file(workdir, args.accounts))],
        check=True,
        env=env,
        cwd=source,  # `python -m` puts the working directory first on sys.path
        capture_output=True,
        timeout=START_TIMEOUT_S,
    )
    log(f"imported in {time.monotonic() - started:.1f} s; starting the node")
    server = children.start([*smartdns, "serve"], workdir / "smartdns.log", env=env, cwd=source)
    url = f"http://127.0.0.1:{sync_port}"
    wait_for("healthy node", lambda: healthy(url), START_TIMEOUT_S, server)
    time.sleep(2.0)  # start-up garbage settles before RSS is read
    results = Results()
    stop = threading.Event()
    fixed = threading.Thread(target=probe_fixed, args=(dns_port, stop, results), daemon=True)
    rss_before = rss_kib(server.pid)
    cpu_before, wall_before = cpu_seconds(server.pid), time.monotonic()
    fixed.start()
    # Issue 11: RSS after an hour of churn within 10 % of RSS after its first minute.
    first_minute: list[int] = []
    minute = threading.Timer(60.0, lambda: first_minute.append(rss_kib(server.pid)))
    minute.daemon = True
    minute.start()
    with concurrent.futures.ThreadPoolExecutor(8) as probes:
        run = Run(dns_port, sync_port, token, results, probes)
        schedule = Schedule(args.rate, args.seconds, args.accounts)
        writers = [Writer(run, schedule) for _ in range(args.connections)]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(args.seconds + 120)
        window = time.perf_counter() - schedule.start
        cpu_after, wall_after = cpu_seconds(server.pid), time.monotonic()
    stop.set()
    minute.cancel()
    fixed.join(5)
    rss_after = rss_kib(server.pid)
    accepted = results.statuses.get(200, 0)
    cpu = (cpu_after - cpu_before) / (wall_after - wall_before) * 100
    print()
    print(
        f"N = {args.accounts:,}, workers {args.workers}, offered {args.rate:g}/s for"
        f" {args.seconds:g} s over {args.connections} connections ({source.name})"
    )
    print(f"accepted writes:   {accepted / window:.1f}/s  (statuses {results.statuses})")
    print(f"PUT latency:       {percentiles(results.put_s)}")
    print(
        f"time to effect:    {percentiles(results.effect_s)} after the 200"
        f"  ({len(results.effect_s)} sampled, {results.late} not in effect after 5 s)"
    )
    print(f"fixed probe:       {percentiles(results.fixed_s)}  ({len(results.fixed_s)} queries)")
    print(f"node CPU:          {cpu:.0f} % of one core")
    at_minute = f" -> {first_minute[0] / 1024:.0f} after 1 min" if first_minute else ""
    print(f"node RSS:          {rss_before / 1024:.0f}{at_minute} -> {rss_after / 1024:.0f} MiB")
    return 0 if server.poll() is None else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=200.0, help="writes offered per second")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--revision", help="run the server of this git revision instead")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    ensure_python_env()
    workdir = Path(tempfile.mkdtemp(prefix="smartdns-bench-churn-"))
    children = Children()
    try:
        with terminate_as_interrupt():
            source = REPO
            if args.revision:
                source, _ = export_revision(args.revision, workdir / "source")
            return measure(args, workdir, children, source)
    finally:
        children.stop_all()
        if args.keep:
            log(f"kept {workdir}")
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(workdir)


if __name__ == "__main__":
    sys.exit(main())
