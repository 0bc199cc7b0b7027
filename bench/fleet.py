"""A fleet following one NATS JetStream bucket (issue 12, "Benchmark"): three NATS servers,
three smartdns nodes holding N registrations each, writes through one node's sync API.

    python3 bench/fleet.py                       # N = 100,000, 200 writes/s for 60 s, 10,000 missed
    python3 bench/fleet.py --accounts 20000 --seconds 20 --missed 2000

What it does: starts a three-server JetStream cluster on free loopback ports (nats-server,
each with its own store directory), imports N accounts of one IPv4 /32 each (in 127.0.0.0/8,
so the harness can send from any of them) into the bucket with `smartdns registrations
import` (feed mode writes it to the bucket), starts three nodes (`public_only: false`, their
own databases) and waits until each has caught up. Then for `--seconds` it writes
`PUT /v1/accounts/{account}` through node 1 at `--rate` a second, open loop, each write moving
one account to a fresh address; every tenth write is probed on nodes 2 and 3 from its new
address right after its 200, every millisecond until authorized. Last, node 3 is stopped,
`--missed` writes go through node 1 as fast as they are accepted, and node 3 is started again.
It prints

- how long the import into the bucket and each node's first catch-up took;
- accepted writes per second and PUT latency (the 200 includes node 1 applying it);
- time from the 200 to the answer on node 2 and node 3 (p50 / p99 / max);
- the restarted node: seconds to its first DNS answer (its old copy), to `/healthz ok`, and
  until the last missed write answers, and how many messages it read from the bucket
  (`smartdns_feed_received_total`: about the missed writes when it resumed) and why it read the
  whole bucket if it did (`smartdns_feed_full_reads_total`);
- after each phase, the NATS servers' CPU seconds spent in it and their RSS, and the nodes' RSS.

A measurement, not a test; loopback only; every step has a deadline and every process it
starts is stopped by its PID at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.client
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.churn import (
    FIXED_CLIENT,
    VERSION_BASE,
    Results,
    Schedule,
    address,
    percentiles,
    probe_until_authorized,
    query,
    snapshot_file,
    write_config,
)
from bench.snapshot_apply import http as request
from bench.snapshot_apply import wait_for, write_token
from bench.tools import (
    REPO,
    Children,
    cpu_seconds,
    encode_query,
    ensure_python_env,
    log,
    python_env,
    rss_kib,
    terminate_as_interrupt,
)
from tests.ports import free_port

BUCKET: Final = "bench"
NODES: Final = 3
IMPORT_TIMEOUT_S: Final = 600.0
CATCH_UP_TIMEOUT_S: Final = 600.0
HTTP_TIMEOUT_S: Final = 10.0
SAMPLE_EVERY: Final = 10
MISSED_CONNECTIONS: Final = 8


@dataclass
class Node:
    workdir: Path
    dns_port: int
    sync_port: int
    token: str
    config: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sync_port}"

    def health(self) -> str:
        try:
            return request("GET", self.url + "/healthz", None, None, 1.0)[1].decode().strip()
        except OSError:
            return "down"

    def accounts(self) -> int:
        status, body = request("GET", self.url + "/v1/status", self.token, None, 5.0)
        return int(json.loads(body)["accounts"]) if status == 200 else -1

    def feed_metrics(self) -> dict[str, float]:
        """The smartdns_feed_* samples of /metrics (name with its labels -> value)."""
        _status, body = request("GET", self.url + "/metrics", None, None, 5.0)
        samples = {}
        for line in body.decode().splitlines():
            if line.startswith("smartdns_feed_"):
                name, value = line.rsplit(" ", 1)
                samples[name[len("smartdns_feed_") :]] = float(value)
        return samples


@dataclass
class Fleet:
    nodes: list[Node]
    children: Children
    env: dict[str, str]
    nats_pids: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    _nats_cpu_s: float = 0.0

    def usage(self, phase: str) -> None:
        """Print the NATS servers' CPU seconds since the last call and their RSS now, and the
        nodes' RSS."""
        cpu_s = sum(cpu_seconds(pid) for pid in self.nats_pids)
        spent, self._nats_cpu_s = cpu_s - self._nats_cpu_s, cpu_s
        nats_mib = [rss_kib(pid) / 1024 for pid in self.nats_pids]
        nodes_mib = [rss_kib(node.process.pid) / 1024 if node.process else 0 for node in self.nodes]
        print(
            f"{phase + ':':<26} nats-server CPU {spent:.1f} s (3 servers), RSS"
            f" {' / '.join(f'{mib:.0f}' for mib in nats_mib)} MiB; nodes' RSS"
            f" {' / '.join(f'{mib:.0f}' for mib in nodes_mib)} MiB"
        )

    def command(self, node: Node, *args: str) -> list[str]:
        return [sys.executable, "-m", "smartdns", "--config", str(node.config), *args]

    def start(self, node: Node) -> None:
        node.process = self.children.start(
            self.command(node, "serve"), node.workdir / "smartdns.log", env=self.env, cwd=REPO
        )

    def stop(self, node: Node) -> None:
        assert node.process is not None
        node.process.send_signal(signal.SIGTERM)
        node.process.wait(30)


def make_node(workdir: Path, servers: list[str]) -> Node:
    workdir.mkdir()
    dns_port, sync_port = free_port(), free_port()
    token = write_token(workdir / "sync.token")
    path = write_config(workdir, dns_port, sync_port, 1)
    config = json.loads(path.read_text())
    config["feed"] = {"servers": servers, "bucket": BUCKET, "replicas": 3}
    path.write_text(json.dumps(config, indent=1))
    return Node(workdir, dns_port, sync_port, token, path)


def set_up(args: argparse.Namespace, workdir: Path, fleet: Fleet) -> None:
    """Import N accounts into the bucket, start the nodes, wait until each caught up."""
    first = fleet.nodes[0]
    for node in fleet.nodes:  # an empty database for each (add warns: the feed will undo it)
        subprocess.run(
            fleet.command(node, "registrations", "add", "local", FIXED_CLIENT),
            check=True, env=fleet.env, cwd=REPO, capture_output=True, timeout=60,
        )  # fmt: skip
    log(f"importing {args.accounts:,} accounts into the bucket")
    started = time.monotonic()
    subprocess.run(
        fleet.command(first, "registrations", "import", str(snapshot_file(workdir, args.accounts))),
        check=True, env=fleet.env, cwd=REPO, capture_output=True, timeout=IMPORT_TIMEOUT_S,
    )  # fmt: skip
    fleet.timings["import into the bucket"] = time.monotonic() - started
    print(f"import into the bucket:    {fleet.timings['import into the bucket']:.1f} s")
    fleet.usage("import")
    started = time.monotonic()
    for node in fleet.nodes:
        fleet.start(node)
    wanted = args.accounts + 1  # and `fixed`; `local` is reconciled away
    for index, node in enumerate(fleet.nodes, start=1):
        assert node.process is not None

        def caught_up(node: Node = node) -> bool:
            return node.health() == "ok" and node.accounts() == wanted

        wait_for(f"node {index} caught up", caught_up, CATCH_UP_TIMEOUT_S, node.process)
        fleet.timings[f"node {index} first catch-up"] = time.monotonic() - started
        print(
            f"node {index} first catch-up:    {fleet.timings[f'node {index} first catch-up']:.1f} s"
        )
    fleet.usage("first catch-ups")


@dataclass
class Writes:
    node: Node
    others: list[Node]
    probes: concurrent.futures.ThreadPoolExecutor
    results: dict[int, Results]  # per other node
    put: Results = field(default_factory=Results)

    def run(self, schedule: Schedule, sample: bool) -> None:
        node = self.node
        connection = http.client.HTTPConnection("127.0.0.1", node.sync_port, timeout=HTTP_TIMEOUT_S)
        headers = {"Authorization": f"Bearer {node.token}", "Content-Type": "application/json"}
        while (job := schedule.next()) is not None:
            number, account, new_address = job
            body = json.dumps({"version": VERSION_BASE + 1 + number, "addresses": [new_address]})
            started = time.perf_counter()
            connection.request("PUT", f"/v1/accounts/a{account}", body, headers)
            response = connection.getresponse()
            response.read()
            done = time.perf_counter()
            with self.put.lock:
                self.put.put_s.append(done - started)
                self.put.statuses[response.status] = self.put.statuses.get(response.status, 0) + 1
            if sample and response.status == 200 and number % SAMPLE_EVERY == 0:
                for other in self.others:
                    port, results = other.dns_port, self.results[other.dns_port]
                    self.probes.submit(probe_until_authorized, new_address, port, done, results)
        connection.close()


def write_for(writes: Writes, schedule: Schedule, connections: int, sample: bool) -> float:
    threads = [
        threading.Thread(target=writes.run, args=(schedule, sample), daemon=True)
        for _ in range(connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    return time.perf_counter() - schedule.start


def steady_writes(args: argparse.Namespace, fleet: Fleet) -> None:
    one, *others = fleet.nodes
    with concurrent.futures.ThreadPoolExecutor(16) as probes:
        writes = Writes(one, others, probes, {node.dns_port: Results() for node in others})
        log(f"writing {args.rate:g}/s for {args.seconds:g} s through node 1")
        schedule = Schedule(args.rate, args.seconds, args.accounts)
        window = write_for(writes, schedule, args.connections, sample=True)
    accepted = writes.put.statuses.get(200, 0)
    print(f"accepted writes:   {accepted / window:.1f}/s  (statuses {writes.put.statuses})")
    print(f"PUT latency:       {percentiles(writes.put.put_s)}  (node 1 applied it)")
    for index, node in enumerate(others, start=2):
        results = writes.results[node.dns_port]
        print(
            f"200 -> node {index}:    {percentiles(results.effect_s)}"
            f"  ({len(results.effect_s)} sampled, {results.late} not in effect after 5 s)"
        )


def missed_writes(args: argparse.Namespace, fleet: Fleet) -> None:
    """Node 3 misses `--missed` writes, then restarts: old copy at once, then the catch-up."""
    one, _, three = fleet.nodes
    fleet.stop(three)
    log(f"node 3 stopped; {args.missed:,} writes through node 1")
    with concurrent.futures.ThreadPoolExecutor(1) as probes:
        writes = Writes(one, [], probes, {})
        offset = int(args.rate * args.seconds)
        window = write_for(writes, Burst(offset, args.missed, args.accounts), MISSED_CONNECTIONS,
                           sample=False)  # fmt: skip
    print(f"missed writes:     {args.missed:,} in {window:.1f} s  ({writes.put.statuses})")
    last = address(args.accounts + offset + args.missed - 1)
    payload = encode_query("www.netflix.com")
    started = time.monotonic()
    fleet.start(three)
    assert three.process is not None
    wait_for("node 3 answering", lambda: query(FIXED_CLIENT, three.dns_port, payload)[0] == 0,
             60.0, three.process)  # fmt: skip
    first_answer = time.monotonic() - started
    wait_for("node 3 ok", lambda: three.health() == "ok", CATCH_UP_TIMEOUT_S, three.process)
    healthy = time.monotonic() - started
    wait_for("the last missed write on node 3",
             lambda: query(last, three.dns_port, payload)[0] == 0, 60.0, three.process)  # fmt: skip
    print(
        f"restarted node 3:  first answer (old copy) {first_answer:.2f} s, /healthz ok"
        f" {healthy:.2f} s, last missed write answered {time.monotonic() - started:.2f} s"
    )
    feed = three.feed_metrics()
    full_reads = {name: int(v) for name, v in feed.items() if name.startswith("full_reads") and v}
    print(
        f"restarted node 3 read {int(feed.get('received_total', -1)):,} messages from the bucket;"
        f" full reads {full_reads or 'none'}"
    )
    fleet.usage("missed writes and restart")


class Burst(Schedule):
    """Writes numbered from `offset` (fresh versions and addresses after the steady ones),
    each due at once: as fast as the node accepts them."""

    def __init__(self, offset: int, total: int, accounts: int) -> None:
        super().__init__(1.0, 0.0, accounts)
        self.offset = offset
        self.total = total

    def next(self) -> tuple[int, int, str] | None:
        with self._lock:
            number = self._next
            if number >= self.total:
                return None
            self._next += 1
        number += self.offset
        return number, (number * 7919) % self.accounts, address(self.accounts + number)


def measure(args: argparse.Namespace, workdir: Path, children: Children) -> int:
    from tests.e2e.nats import nats_cluster  # needs the repository's test helpers

    with nats_cluster(workdir / "nats", size=3) as cluster:
        nodes = [make_node(workdir / f"node-{i}", cluster.urls) for i in range(NODES)]
        pids = [server.process.pid for server in cluster.servers if server.process]
        fleet = Fleet(nodes, children, python_env(REPO), pids)
        set_up(args, workdir, fleet)
        print()
        print(
            f"N = {args.accounts:,} accounts, 3 NATS servers, 3 nodes; {args.rate:g} writes/s"
            f" for {args.seconds:g} s over {args.connections} connections"
        )
        steady_writes(args, fleet)
        fleet.usage("steady writes")
        missed_writes(args, fleet)
        return 0 if all(node.process and node.process.poll() is None for node in nodes) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=200.0, help="writes offered per second")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--missed", type=int, default=10_000, help="writes node 3 misses")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    ensure_python_env()
    workdir = Path(tempfile.mkdtemp(prefix="smartdns-bench-fleet-"))
    children = Children()
    try:
        with terminate_as_interrupt():
            return measure(args, workdir, children)
    finally:
        children.stop_all()
        if args.keep:
            log(f"kept {workdir}")
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(workdir)


if __name__ == "__main__":
    raise SystemExit(main())
