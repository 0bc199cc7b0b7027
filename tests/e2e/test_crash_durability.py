"""SPEC 4 durability: `kill -9` at a random moment during a stream of PUTs never loses a write
that got its 200 and never leaves a half-applied request; the database stays intact, the
node reports its snapshot version after the restart and its DNS answers equal the database.
Killing one worker of two mid-burst loses no 200 either, and its successor answers as the
database says. Bounded loops of rounds."""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import random
import signal
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import dns.rcode
import pytest

from tests.e2e.harness import Server, running_server
from tests.fake_upstream import FakeUpstream

ROUNDS = 20
ACCOUNTS = 12  # writes go to a small set, so most are overwrites of a live account
WRITE_TIMEOUT_S = 5.0
WRITER_JOIN_S = 10.0
MAX_ACKS_BEFORE_KILL = 25
# The hang guard of the 20-restart test in place of the suite's 120 s (pyproject): 37 s in a
# whole e2e run next to two busy processes, most of it 20 server starts (a one-server fixture
# took up to 10 s to set up in that run); its own waits (READY, WRITER_JOIN_S) bound each round.
ROUNDS_TIMEOUT_S = 600


@dataclass
class Ledger:
    """Every write attempted (account -> version -> addresses) and the newest acknowledged."""

    attempted: dict[str, dict[int, frozenset[str]]] = field(default_factory=dict)
    acked: dict[str, int] = field(default_factory=dict)
    acks: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _put(url: str, token: str, account: str, version: int, addresses: list[str]) -> int:
    request = urllib.request.Request(
        f"{url}/v1/accounts/{account}",
        data=json.dumps({"version": version, "addresses": addresses}).encode(),
        method="PUT",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=WRITE_TIMEOUT_S) as response:
        return int(response.status)


def _call(server: Server, method: str, path: str, body: object = None) -> dict[str, int]:
    request = urllib.request.Request(
        server.sync_url + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {server.token}"},
    )
    with urllib.request.urlopen(request, timeout=WRITE_TIMEOUT_S) as response:
        result: dict[str, int] = json.loads(response.read())
    return result


def _writer(
    server: Server, ledger: Ledger, versions: list[int], rng: random.Random, stop: threading.Event
) -> None:
    url, token = server.sync_url, server.token
    while not stop.is_set():
        versions[0] += 1
        version = versions[0]
        account = f"acct-{rng.randrange(ACCOUNTS)}"
        addresses = sorted(
            {f"127.{rng.randrange(1, 250)}.{rng.randrange(250)}.1" for _ in range(3)}
        )
        with ledger.lock:
            ledger.attempted.setdefault(account, {})[version] = frozenset(addresses)
        try:
            status = _put(url, token, account, version, addresses)
        except (urllib.error.URLError, http.client.HTTPException, OSError):
            return  # the server is gone
        assert status == 200
        with ledger.lock:
            ledger.acked[account] = version
            ledger.acks += 1


def _stored(database: Path) -> dict[str, tuple[int, bool, frozenset[str]]]:
    """account -> (version, deleted, addresses), read with sqlite3 while the server is down."""
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        accounts = {
            name: (int(version), bool(deleted), set[str]())
            for name, version, deleted in db.execute(
                "SELECT account, version, deleted FROM accounts"
            )
        }
        for name, family, packed, prefix_len in db.execute(
            "SELECT account, family, network, prefix_len FROM entries"
        ):
            network = ipaddress.ip_network((int.from_bytes(packed, "big"), prefix_len))
            assert network.version == family
            accounts[name][2].add(str(network.network_address))
    db.close()
    return {name: (v, d, frozenset(entries)) for name, (v, d, entries) in accounts.items()}


def _check(stored: dict[str, tuple[int, bool, frozenset[str]]], ledger: Ledger) -> None:
    for account, acked in ledger.acked.items():
        version, deleted, addresses = stored[account]
        assert not deleted
        # Newer than the last ack only through a write that was in flight at the kill.
        assert version >= acked, f"{account}: acknowledged version {acked} lost (found {version})"
        assert addresses == ledger.attempted[account][version], f"{account}: half-applied write"
    for account, (version, _, addresses) in stored.items():
        if account in ledger.attempted:  # an unacknowledged write is all there or not at all
            assert addresses == ledger.attempted[account][version], f"{account}: half-applied"


def _answers_equal_the_database(
    server: Server, stored: dict[str, tuple[int, bool, frozenset[str]]], ledger: Ledger
) -> None:
    """Every stored address is authorized, and addresses only ever attempted are not (all
    attempted ones are /32s in 127/8, so each is a source the test can bind)."""
    registered = set().union(*(entries for _, deleted, entries in stored.values() if not deleted))
    attempted = {
        address
        for versions in ledger.attempted.values()
        for addresses in versions.values()
        for address in addresses
    }
    for address in sorted(registered):
        reply = server.query("www.netflix.com", source=address)
        assert reply.rcode() == dns.rcode.NOERROR, f"{address} stored but refused"
    for address in sorted(attempted - registered)[:40]:
        reply = server.query("www.netflix.com", source=address)
        assert reply.rcode() == dns.rcode.REFUSED, f"{address} not stored but authorized"


@pytest.mark.slow
@pytest.mark.timeout(ROUNDS_TIMEOUT_S)
def test_kill_9_never_loses_an_acknowledged_write(tmp_path: Path, upstream: FakeUpstream) -> None:
    seed = int(time.time())
    rng = random.Random(seed)
    ledger = Ledger()
    versions = [100]
    with running_server(tmp_path, upstream.address) as server:
        _call(server, "PUT", "/v1/snapshot", {"version": 50, "accounts": {}})
        for round_number in range(ROUNDS):
            stop = threading.Event()
            writer = threading.Thread(
                target=_writer, args=(server, ledger, versions, rng, stop), daemon=True
            )
            kill_after = ledger.acks + rng.randrange(1, MAX_ACKS_BEFORE_KILL)
            writer.start()
            deadline = time.monotonic() + WRITER_JOIN_S
            while ledger.acks < kill_after and writer.is_alive():
                assert time.monotonic() < deadline, f"round {round_number}: writes stalled"
                time.sleep(0.001)
            time.sleep(rng.uniform(0, 0.004))  # a random point inside the next request
            server.kill()
            stop.set()
            writer.join(WRITER_JOIN_S)
            assert not writer.is_alive()
            _check(_stored(server.database_path), ledger)
            stored = _stored(server.database_path)
            _check(stored, ledger)
            server.start()
            status = _call(server, "GET", "/v1/status")
            assert status["snapshot_version"] == 50, f"seed {seed}"  # where the portal resumes
            assert status["accounts"] >= len(ledger.acked)
            _answers_equal_the_database(server, stored, ledger)
    assert ledger.acks >= ROUNDS, f"seed {seed}"


def _workers(server: Server) -> list[int]:
    assert server.process is not None
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
    return [int(pid) for pid in children.read_text().split()]


def _all_workers_up(server: Server) -> bool:
    with urllib.request.urlopen(f"{server.sync_url}/metrics", timeout=WRITE_TIMEOUT_S) as reply:
        text = reply.read().decode()
    up = [line for line in text.splitlines() if line.startswith("smartdns_worker_up{")]
    return len(up) == 2 and all(line.endswith(" 1") for line in up)


@pytest.mark.slow
def test_kill_9_of_a_worker_mid_burst(tmp_path: Path, upstream: FakeUpstream) -> None:
    """Every PUT gets its 200 while a worker dies under it (the main process stops waiting
    for a worker that is gone); the restarted worker answers as the database says."""
    seed = int(time.time())
    rng = random.Random(seed)
    ledger = Ledger()
    versions = [100]
    with running_server(tmp_path, upstream.address, {"server": {"workers": 2}}) as server:
        for round_number in range(3):
            stop = threading.Event()
            writer = threading.Thread(
                target=_writer, args=(server, ledger, versions, rng, stop), daemon=True
            )
            writer.start()
            kill_after = ledger.acks + rng.randrange(1, MAX_ACKS_BEFORE_KILL)
            deadline = time.monotonic() + WRITER_JOIN_S
            while ledger.acks < kill_after:
                assert writer.is_alive() and time.monotonic() < deadline, f"seed {seed}"
                time.sleep(0.001)
            os.kill(rng.choice(_workers(server)), signal.SIGKILL)
            acked_at_kill = ledger.acks
            while ledger.acks < acked_at_kill + 20:  # writes go on through the restart
                assert writer.is_alive() and time.monotonic() < deadline + 10, f"seed {seed}"
                time.sleep(0.001)
            stop.set()
            writer.join(WRITER_JOIN_S)
            assert not writer.is_alive()
            while not _all_workers_up(server):
                assert time.monotonic() < deadline + 20, f"round {round_number}: no restart"
                time.sleep(0.02)
            _answers_equal_the_database(server, _stored(server.database_path), ledger)


def _snapshot_put(server: Server, body: bytes, outcome: list[int]) -> None:
    request = urllib.request.Request(
        server.sync_url + "/v1/snapshot",
        data=body,
        method="PUT",
        headers={"Authorization": f"Bearer {server.token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=WRITE_TIMEOUT_S * 6) as response:
            outcome.append(int(response.status))
    except (urllib.error.URLError, http.client.HTTPException, OSError):
        pass  # the server is gone


@pytest.mark.slow
def test_kill_9_during_a_snapshot_leaves_all_of_it_or_none(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """A snapshot killed at any moment is all there or not at all after the restart, a 200'd
    one always all there, and DNS answers what the database holds."""
    seed = int(time.time())
    rng = random.Random(seed)
    with running_server(tmp_path, upstream.address) as server:
        for round_number in range(4):
            version = 100 + round_number
            accounts = {
                f"s{version}-{i}": [f"127.{version}.{i // 250}.{i % 250 + 1}"]
                for i in range(20_000)
            }
            body = json.dumps({"version": version, "accounts": accounts}).encode()
            before = _stored(server.database_path)
            outcome: list[int] = []
            put = threading.Thread(target=_snapshot_put, args=(server, body, outcome), daemon=True)
            put.start()
            time.sleep(rng.uniform(0.0, 0.5))  # upload, validation, transaction, or the load
            server.kill()
            put.join(WRITER_JOIN_S)
            stored = _stored(server.database_path)
            new = {name: (version, False, frozenset(a)) for name, a in accounts.items()}
            assert stored in (before, new), f"seed {seed}: a half-applied snapshot"
            if outcome == [200]:
                assert stored == new, f"seed {seed}: a 200'd snapshot lost"
            server.start()
            _some_answer(server, stored, dns.rcode.NOERROR, rng)
            _some_answer(server, before if stored == new else new, dns.rcode.REFUSED, rng)


def _some_answer(
    server: Server,
    accounts: dict[str, tuple[int, bool, frozenset[str]]],
    wanted: int,
    rng: random.Random,
) -> None:
    """Twenty addresses of `accounts` (all when fewer) get `wanted`."""
    addresses = sorted(
        {a for _, deleted, entries in accounts.values() if not deleted for a in entries}
    )
    for address in rng.sample(addresses, min(20, len(addresses))):
        rcode = server.query("www.netflix.com", source=address).rcode()
        assert rcode == wanted, f"{address}: {dns.rcode.to_text(rcode)}"
