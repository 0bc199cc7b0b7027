#!/usr/bin/env python3
"""Per-query cost of Pipeline.handle in-process (timeit), without sockets or dnsperf.

    python3 bench/query_path.py                 # this tree
    python3 bench/query_path.py --tree /tmp/old # another checkout, e.g. `git worktree add`

Each case is one packet handled again and again, best of `--repeat` runs: UDP and then TCP
answers (forwarded, unblock, refused). Since stream peers got a packet cache of their own
(TCP, DoT, DoH), both are packet-cache hits; with `--tree` a checkout from before that, the
TCP cases measure parsing, policy and reply building (answer-cache hit, unblock, refused).
Two trees measured one after the other on the same core compare well; on a shared machine
alternate them a few times and keep each case's minimum.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import ipaddress
import sys
import timeit
from pathlib import Path
from types import MappingProxyType
from typing import Any

import dns.message

REGISTERED, STRANGER = "127.0.0.2", "127.0.0.9"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("-n", "--number", type=int, default=200_000, help="calls per run")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.tree.resolve()))
    from tests.fake_upstream import FakeUpstream

    with FakeUpstream() as upstream:
        upstream.add("example.org", "A", ["example.org. 300 IN A 192.0.2.1"])
        pipeline, udp, tcp = _pipeline(f"{upstream.host}:{upstream.port}")
        forwarded = dns.message.make_query("example.org", "A").to_wire()
        unblock = dns.message.make_query("www.netflix.com", "A").to_wire()
        asyncio.run(_warm(pipeline, forwarded, tcp(REGISTERED)))
        cases = {
            "udp packet-cache hit, forwarded": (forwarded, udp(REGISTERED)),
            "udp packet-cache hit, unblock": (unblock, udp(REGISTERED)),
            "udp packet-cache hit, refused": (unblock, udp(STRANGER)),
            "tcp forwarded": (forwarded, tcp(REGISTERED)),
            "tcp unblock": (unblock, tcp(REGISTERED)),
            "tcp refused": (unblock, tcp(STRANGER)),
        }
        for name, (packet, peer) in cases.items():
            timer = timeit.Timer(
                "handle(packet, peer)",
                globals={"handle": pipeline.handle, "packet": packet, "peer": peer},
            )
            best = min(timer.repeat(number=args.number, repeat=args.repeat))
            print(f"{name:34s} {best / args.number * 1e9:7.0f} ns")


def _pipeline(upstream: str) -> tuple[Any, Any, Any]:
    """A pipeline as the daemon builds it, limits out of the way; peer constructors."""
    model = importlib.import_module("smartdns.config.model")
    peer = importlib.import_module("smartdns.core.peer")
    clients = importlib.import_module("smartdns.core.clients")
    host, port = upstream.rsplit(":", 1)
    config = model.Config(
        path=Path("bench.yaml"),
        unblock=model.UnblockConfig(
            ttl=60,
            regions=MappingProxyType(
                {"us": model.Region(ipv4=(ipaddress.IPv4Address("198.51.100.10"),))}
            ),
            zones=MappingProxyType({"netflix.com": "us"}),
        ),
        upstream=model.UpstreamConfig(servers=(model.HostPort(host, int(port)),)),
        rate_limit=model.RateLimitConfig(client_qps=10**9, refused_qps=10**9),
    )
    settings = importlib.import_module("smartdns.node.daemon").build_settings(config)
    registered = clients.AuthorizedClients.from_prefixes(
        [(4, int(ipaddress.IPv4Address(REGISTERED)), 32)]
    )
    metrics = importlib.import_module("smartdns.core.counters").Metrics()
    pipeline = importlib.import_module("smartdns.serve.pipeline").Pipeline(
        settings, registered, metrics
    )
    return pipeline, peer.udp_peer, peer.stream_peer


async def _warm(pipeline: Any, packet: bytes, peer: Any) -> None:
    """Fill the answer cache: the first query goes upstream."""
    reply = pipeline.handle(packet, peer)
    if not isinstance(reply, bytes):
        await reply


if __name__ == "__main__":
    main()
