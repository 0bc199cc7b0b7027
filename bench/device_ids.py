"""Device IDs in the store at scale (SPEC 3, 4): what N registered IDs cost a snapshot and a
full load, and whether a one-account write with IDs still costs what it touches.

    python3 bench/device_ids.py                       # N = 1,000,000, with and without IDs
    python3 bench/device_ids.py --accounts 10 --accounts 1000000

For each N: a snapshot of N accounts of one IPv4 /32 each, with one device ID each (and, for
comparison, without), stored by RegistrationStore.accounts.replace_snapshot into a fresh database;
a full load (registrations.follower.load_clients, as a DNS process does at start); then 200
writes of one account alternating between two pairs of IDs, each followed by changes_since
and its apply to the loaded set, as a DNS process follows a write. It prints the snapshot's
and the load's seconds and p50 / p99 of the write and of changes_since. In-process, on a
temporary file removed at the end; no network. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import statistics
import tempfile
import time
from pathlib import Path
from types import MappingProxyType

from smartdns.core.clients import device_digest
from smartdns.registrations.entries import Snapshot
from smartdns.registrations.follower import load_clients
from smartdns.registrations.store import RegistrationStore

WRITES = 200


def _percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[int(len(ordered) * 0.99)]
    return f"p50 {statistics.median(ordered) * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms"


async def measure(accounts: int, with_ids: bool, path: Path) -> str:
    store = await RegistrationStore.open(path, create=True)
    try:
        networks = {
            f"a{i}": (ipaddress.IPv4Network((0x0B000000 + i, 32)),) for i in range(accounts)
        }
        ids = {f"a{i}": (device_digest(f"{i:026d}"),) for i in range(accounts)} if with_ids else {}
        started = time.perf_counter()
        snapshot = Snapshot(1, MappingProxyType(networks), devices=MappingProxyType(ids))
        await store.accounts.replace_snapshot(snapshot)
        stored = time.perf_counter() - started
        started = time.perf_counter()
        generation, clients = await load_clients(store)
        loaded = time.perf_counter() - started
        pairs = [device_digest(f"phone{i:021d}") for i in range(4)]
        writes: list[float] = []
        reads: list[float] = []
        for version in range(2, 2 + WRITES):
            given = pairs[version % 2 * 2 :][:2] if with_ids else []
            address = ipaddress.IPv4Network((0x0C000000 + version % 2, 32))
            started = time.perf_counter()
            await store.accounts.put_account("phone", version, [address], (), given)
            writes.append(time.perf_counter() - started)
            started = time.perf_counter()
            changes = await store.readers.changes_since(generation)
            reads.append(time.perf_counter() - started)
            clients.apply(
                changes.present, changes.gone, changes.devices_present, changes.devices_gone
            )
            generation = changes.generation
    finally:
        await store.close()
    return (
        f"{accounts:>9,} accounts, {'one ID each' if with_ids else 'no IDs     '}: "
        f"snapshot {stored:.2f} s, full load {loaded:.2f} s; "
        f"write {_percentiles(writes)}; changes_since {_percentiles(reads)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, action="append", help="N (repeatable)")
    args = parser.parse_args()
    for accounts in args.accounts or [1_000_000]:
        for with_ids in (False, True):
            with tempfile.TemporaryDirectory(prefix="smartdns-bench-") as directory:
                path = Path(directory) / "registrations.db"
                print(asyncio.run(measure(accounts, with_ids, path)), flush=True)


if __name__ == "__main__":
    main()
