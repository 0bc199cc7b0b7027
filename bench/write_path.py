#!/usr/bin/env python3
"""A sync write's path in-process, with the event loop kept busy: what each hop costs.

    python3 bench/write_path.py                      # this tree, the loop busy 2 ms a turn
    python3 bench/write_path.py --tree /tmp/old      # another checkout (`git archive REV`)
    python3 bench/write_path.py --busy-ms 0          # a quiet loop

What a node with `workers: 1` does for `PUT /v1/accounts/{account}`, without HTTP: the
RegistrationWriter on one connection of a real SQLite file, and the DNS side's
ClientsFollower on another, confirming each write (read-your-writes) before it returns;
`--writers` coroutines write concurrently, `--writes` each, on uvloop. Meanwhile a task
blocks the loop for `--busy-ms` each turn (time.sleep: the GIL stays free), standing in for
the DNS traffic of a loaded node: every statement is a hop to the database thread and back
through the loop, so a write costs about its hops times a turn of the loop. Prints writes a
second, latency p50/p99 and the hops a write made (statements on either connection).
A measurement, not a test; on a shared machine alternate trees a few times.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ACCOUNTS = 200


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--writers", type=int, default=4, help="concurrent writes")
    parser.add_argument("--writes", type=int, default=50, help="per writer")
    parser.add_argument("--busy-ms", type=float, default=2.0, help="the loop blocked per turn")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.tree.resolve()))
    import uvloop

    with (
        tempfile.TemporaryDirectory(prefix="smartdns-bench-write-") as directory,
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
    ):
        runner.run(_run(args, Path(directory) / "registrations.db"))


async def _run(args: argparse.Namespace, path: Path) -> None:
    import aiosqlite

    from smartdns.config.model import RegistrationsConfig
    from smartdns.registrations.follower import ClientsFollower, load_clients
    from smartdns.registrations.store import RegistrationStore
    from smartdns.registrations.writer import RegistrationWriter

    hops = 0
    execute = aiosqlite.Connection._execute

    async def counted(self: Any, fn: Any, *a: Any, **k: Any) -> Any:
        nonlocal hops
        hops += 1
        return await execute(self, fn, *a, **k)

    aiosqlite.Connection._execute = counted  # type: ignore[method-assign]
    async with await RegistrationStore.open(path, create=True) as store:
        for i in range(ACCOUNTS):
            network = ipaddress.IPv4Network(f"203.0.113.{i}/32")
            await store.accounts.put_account(f"a{i}", 1, [network])
    dns = await RegistrationStore.open(path, create=False)
    written = await RegistrationStore.open(path, create=False)
    generation, clients = await load_clients(dns)
    follower = ClientsFollower(dns, clients, generation, lambda _: None)

    async def announce(generation: int, everything: bool) -> None:
        await follower.wait_applied(generation)

    writer = RegistrationWriter(written, RegistrationsConfig(public_only=False), announce)
    latencies: list[float] = []

    async def write(index: int) -> None:
        for n in range(args.writes):
            network = ipaddress.IPv4Network(f"198.51.100.{(index * 7 + n) % 250}/32")
            started = time.perf_counter()
            await writer.put_account(f"a{index}", 10 + n, [network])
            latencies.append(time.perf_counter() - started)

    stop = asyncio.Event()

    async def busy() -> None:
        while not stop.is_set():
            time.sleep(args.busy_ms / 1000)  # noqa: ASYNC251 - blocking the loop is the point
            await asyncio.sleep(0)

    burner = asyncio.create_task(busy())
    hops_before, started = hops, time.perf_counter()
    await asyncio.gather(*(write(index) for index in range(args.writers)))
    wall = time.perf_counter() - started
    stop.set()
    await burner
    count = args.writers * args.writes
    ordered = sorted(latencies)
    print(
        f"{args.tree.name}: busy {args.busy_ms:g} ms, {args.writers} writers:"
        f" {count / wall:.1f} writes/s, p50 {statistics.median(ordered) * 1000:.1f} ms,"
        f" p99 {ordered[int(0.99 * (len(ordered) - 1))] * 1000:.1f} ms,"
        f" {(hops - hops_before) / count:.1f} hops a write"
    )
    await follower.close()
    await written.close()
    await dns.close()


if __name__ == "__main__":
    main()
