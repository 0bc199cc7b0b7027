"""A fleet (SPEC 4 "Registration feed"): three smartdns nodes, each with its own database,
following one bucket on a three-server NATS cluster, all on loopback.

Sources 127.0.0.20 and up stand for the customers' devices: registered through one node's
sync API, they must be answered (NOERROR) or refused on every node within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.rcode
import nats
import pytest

from tests.e2e.harness import Server, rcode_within, running_server
from tests.e2e.nats import NatsCluster, nats_cluster
from tests.e2e.test_sync_api import call
from tests.fake_upstream import FakeUpstream

EFFECT_S = 1.0  # SPEC 4: in DNS answers on every node within one second
ELECTION_S = 30.0  # a NATS cluster that lost servers accepts writes again within this
FEED_S = 20.0  # a node reconnects and catches up within this
DDNS_S = 3.0  # the refresher notices a new hostname (0.25 s), looks it up, writes the bucket

pytestmark = pytest.mark.slow


@dataclass
class Fleet:
    nats: NatsCluster
    nodes: list[Server]


def device(n: int) -> str:
    return f"127.0.0.{20 + n}"


@pytest.fixture
def fleet(tmp_path: Path, upstream: FakeUpstream) -> Iterator[Fleet]:
    with nats_cluster(tmp_path / "nats", size=3) as cluster, contextlib.ExitStack() as stack:
        nodes = []
        for i in range(3):
            state = tmp_path / f"node-{i}"
            state.mkdir()
            # Node 1 is the fleet's one DDNS refresher (its resolver: the fake upstream).
            feed = {"servers": cluster.urls, "bucket": "fleet", "replicas": 3, "refresher": i == 0}
            nodes.append(
                stack.enter_context(running_server(state, upstream.address, {"feed": feed}))
            )
        fleet = Fleet(cluster, nodes)
        for node in nodes:
            wait_health(node, "ok")
        yield fleet


def health(node: Server) -> str:
    status, text = call(node, "GET", "/healthz", token=None)
    return f"{status} {str(text).strip()}"


def wait_health(node: Server, wanted: str, timeout_s: float = FEED_S) -> float:
    start = time.monotonic()
    while (seen := health(node)) != f"200 {wanted}":
        assert time.monotonic() - start < timeout_s, f"/healthz still {seen}"
        time.sleep(0.05)
    return time.monotonic() - start


def put(node: Server, account: str, version: int, *sources: str) -> tuple[int, object]:
    return call(
        node, "PUT", f"/v1/accounts/{account}", {"version": version, "addresses": list(sources)}
    )


def put_retrying(node: Server, account: str, version: int, *sources: str) -> None:
    """A write through `node`, retried while the cluster elects leaders (503)."""
    start = time.monotonic()
    while (result := put(node, account, version, *sources))[0] == 503:
        assert time.monotonic() - start < ELECTION_S, result
        time.sleep(0.1)
    assert result[0] == 200, result


def test_writes_through_any_node_reach_every_node_within_a_second(fleet: Fleet) -> None:
    one, two, three = fleet.nodes
    status, body = put(one, "cust:1.eu", 1, device(1))
    assert (status, body) == (
        200,
        {"account": "cust:1.eu", "version": 1, "addresses": 1, "hostnames": 0, "device_ids": 0},
    )
    assert one.query("www.netflix.com", source=device(1)).rcode() == dns.rcode.NOERROR
    for node in (two, three):
        rcode_within(node, device(1), dns.rcode.NOERROR, EFFECT_S)
    assert put(two, "cust:1.eu", 0, device(1))[0] == 409  # stale, through another node
    assert put(three, "cust:1.eu", 1, device(2))[0] == 409  # same version, other content
    assert put(two, "cust:1.eu", 1, device(1))[0] == 200  # the same write repeated
    status, body = call(three, "DELETE", "/v1/accounts/cust:1.eu?version=2")
    assert (status, body) == (200, {"account": "cust:1.eu", "version": 2, "existed": True})
    for node in fleet.nodes:
        rcode_within(node, device(1), dns.rcode.REFUSED, EFFECT_S)
    assert put(one, "cust:1.eu", 2, device(1))[0] == 409  # the tombstone holds fleet-wide
    status, metrics = call(one, "GET", "/metrics", token=None)
    assert "smartdns_feed_connected 1" in metrics and "smartdns_feed_caught_up 1" in metrics
    for node in fleet.nodes:  # SPEC 7: logged at debug level, and still no id or address
        _, page = call(node, "GET", "/metrics", token=None)
        assert "feed: caught up" in node.output()  # the log is there to search
        for text in (node.output(), page):
            assert "cust" not in text and device(1) not in text and device(2) not in text


def test_a_killed_nats_server_and_a_restarted_node(fleet: Fleet) -> None:
    one, two, three = fleet.nodes
    put_retrying(one, "before", 1, device(1))
    rcode_within(three, device(1), dns.rcode.NOERROR, EFFECT_S)
    fleet.nats.kill(0)
    put_retrying(two, "during", 1, device(2))
    for node in fleet.nodes:
        rcode_within(node, device(2), dns.rcode.NOERROR, EFFECT_S)

    three.stop()
    for n in range(50):
        put_retrying(one, f"acct-{n}", 10 + n, f"127.0.1.{n}")
    for n in range(10):
        status, _ = call(two, "DELETE", f"/v1/accounts/acct-{n}?version=100")
        assert status == 200
    put_retrying(one, "before", 200)  # no addresses: device(1) refused from now on
    three.start()
    # Its old state at once (device(2) was registered before it stopped, and still is).
    assert three.query("www.netflix.com", source=device(2)).rcode() == dns.rcode.NOERROR
    wait_health(three, "ok")
    rcode_within(three, device(1), dns.rcode.REFUSED, EFFECT_S)
    rcode_within(three, "127.0.1.49", dns.rcode.NOERROR, EFFECT_S)
    rcode_within(three, "127.0.1.3", dns.rcode.REFUSED, EFFECT_S)
    _, status = call(three, "GET", "/v1/status")
    assert status["accounts"] == 40 + 1 + 1  # acct-10..49, during, before (no addresses)


def test_nodes_keep_answering_without_nats_and_converge_when_it_returns(fleet: Fleet) -> None:
    one, two, _ = fleet.nodes
    put_retrying(one, "kept", 1, device(3))
    for node in fleet.nodes:
        rcode_within(node, device(3), dns.rcode.NOERROR, EFFECT_S)
    fleet.nats.kill()
    for node in fleet.nodes:
        wait_health(node, "degraded")
        assert node.query("www.netflix.com", source=device(3)).rcode() == dns.rcode.NOERROR
    assert put(two, "new", 1, device(4))[0] == 503  # the bucket cannot take it now
    fleet.nats.start()
    for node in fleet.nodes:
        wait_health(node, "ok")
    put_retrying(two, "new", 1, device(4))
    for node in fleet.nodes:
        rcode_within(node, device(4), dns.rcode.NOERROR, EFFECT_S)
        rcode_within(node, device(3), dns.rcode.NOERROR, EFFECT_S)


def test_the_cli_imports_into_the_bucket_and_warns_about_overrides(fleet: Fleet) -> None:
    one, two, three = fleet.nodes
    document = {"version": 50, "accounts": {"imported": [device(5)]}}
    path = one.state / "snapshot.json"
    path.write_text(json.dumps(document))
    result = one.cli("registrations", "import", str(path))
    assert result.returncode == 0, result.stderr
    assert "imported snapshot version 50: 1 accounts, 1 entries, 0 device IDs" in result.stdout
    for node in fleet.nodes:
        rcode_within(node, device(5), dns.rcode.NOERROR, EFFECT_S)
    assert put(two, "late", 50, device(6))[0] == 409  # at the snapshot's version
    result = three.cli("registrations", "add", "x", device(6))
    assert result.returncode == 0 and "the feed will undo it" in result.stderr


def test_one_refresher_resolves_hostnames_for_the_fleet(
    fleet: Fleet, upstream: FakeUpstream
) -> None:
    """SPEC 3: with a feed, resolution runs once, on the refresher; its results reach every
    node through the bucket."""
    upstream.add("home.example.net", "A", [f"home.example.net. 60 IN A {device(7)}"])
    body = {"version": 1, "addresses": [], "hostnames": ["home.example.net"]}
    status, reply = call(fleet.nodes[2], "PUT", "/v1/accounts/dyn", body)
    assert status == 200 and reply["hostnames"] == 1
    for node in fleet.nodes:
        rcode_within(node, device(7), dns.rcode.NOERROR, DDNS_S)
    assert upstream.count("home.example.net", "A") == 1  # one lookup for the whole fleet


async def bucket_values(servers: list[str]) -> dict[str, bytes]:
    """Every key's current value in the fleet's bucket, read as a portal's NATS client would."""
    nc = await nats.connect(servers=servers)
    try:
        kv = await nc.jetstream().key_value("fleet")
        return {key: (await kv.get(key)).value or b"" for key in await kv.keys()}
    finally:
        await nc.close()


def test_device_ids_travel_as_digests_and_belong_to_one_account(
    fleet: Fleet, tmp_path: Path
) -> None:
    """SPEC 3: the feed carries only the SHA-256 digest of an ID (grep the bucket and the
    NATS servers' files for the raw ID: absent, its digest present); another account giving
    the ID through another node is refused from that node's copy (the bucket has no index)."""
    one, two, _ = fleet.nodes
    device_id = "f7g3h9j1k5l2m8n4p6q0r3s7t1"
    digest = hashlib.sha256(device_id.encode()).hexdigest()
    body = {"version": 1, "addresses": [], "device_ids": [device_id]}
    status, reply = call(one, "PUT", "/v1/accounts/phone", body)
    assert (status, reply["device_ids"]) == (200, 1), reply
    start = time.monotonic()
    while True:
        sent = time.monotonic() - start  # the deadline is the server's: counted to the request
        if call(two, "GET", "/v1/accounts/phone")[0] == 200:
            break
        assert sent < EFFECT_S
        time.sleep(0.05)
    assert call(two, "GET", "/v1/accounts/phone")[1]["device_ids"] == 1
    status, reply = call(two, "PUT", "/v1/accounts/other", {**body, "version": 2})
    assert (status, reply) == (409, {"error": "device_ids[0]: held by another account"})
    values = asyncio.run(asyncio.wait_for(bucket_values(fleet.nats.urls), 10))
    value = json.loads(values["acct.phone"])
    assert value == {"version": 1, "addresses": [], "device_id_sha256": [digest]}
    assert "acct.other" not in values
    stored = b"".join(
        path.read_bytes() for path in (tmp_path / "nats").rglob("*") if path.is_file()
    )
    assert digest.encode() in stored  # the search finds what is there
    assert device_id.encode() not in stored
    for node in fleet.nodes:
        database = b"".join(p.read_bytes() for p in node.state.glob("registrations.db*"))
        assert database and device_id.encode() not in database
        assert device_id not in node.output()
