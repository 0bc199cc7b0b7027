"""Tests for the sync API: the real aiohttp server on a loopback port, a real store in
tmp_path, a fake Node; every status code of SPEC 4 and the validation cases of SPEC 3."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import re
import secrets
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from smartdns.config.model import (
    Config,
    DatabaseConfig,
    HostPort,
    RegistrationsConfig,
    Secret,
    SyncConfig,
    UpstreamConfig,
)
from smartdns.core.counters import Metrics
from smartdns.errors import SmartDNSError
from smartdns.node.status import NodeStatus, ReadYourWrites
from smartdns.registrations.bulk import BulkWork
from smartdns.registrations.sources import sync_api
from smartdns.registrations.sources.sync_api import SyncServer, Timeouts, start_sync_api
from smartdns.registrations.store import DatabaseError, RegistrationStore, StoreStatus
from smartdns.registrations.store.readers import Readers
from smartdns.registrations.writer import RegistrationWriter

TOKEN = secrets.token_hex(32)
AWAIT_S = 5.0
SHORT = Timeouts(body_s=0.3, idle_s=0.5, shutdown_s=1.0)
ADDRESS = "203.0.113.7"  # distinctive: must never come back in an error or a log line


def make_config(tmp_path: Path, *, max_body: int = 1 << 20, public_only: bool = False) -> Config:
    return Config(
        path=tmp_path / "smartdns.yaml",
        database=DatabaseConfig(tmp_path / "registrations.db"),
        registrations=RegistrationsConfig(public_only=public_only),
        upstream=UpstreamConfig(servers=(HostPort("192.0.2.53", 53),)),
        sync=SyncConfig(
            listen=HostPort("127.0.0.1", 0),
            token_file=tmp_path / "sync.token",
            max_body=max_body,
            token=Secret(TOKEN.encode()),
        ),
    )


@dataclass
class FakeStats:
    queries_sent: int = 7
    answers: int = 6
    timeouts: int = 1
    failures: int = 0
    mismatched: int = 2
    rate_limited: int = 0
    tcp_retries: int = 3


@dataclass
class FakeCache:
    hits: int = 11
    misses: int = 4
    stale_served: int = 1
    evictions: int = 0
    entries: list[int] = field(default_factory=lambda: [1, 2, 3])

    def __len__(self) -> int:
        return len(self.entries)


class FakeNode:
    """The query side and the DNS side's store as NodeStatus reads them, with switches."""

    def __init__(self) -> None:
        self.up = True
        self.database: str = "ok"  # ok | error | hang
        self.cache: FakeCache | None = None
        self.applied: list[int] = []  # generations the sync API waited for
        self.confirms = True  # False: the DNS side does not apply in time (workers: 1)

    def listeners_up(self) -> bool:
        return self.up

    async def generation(self) -> int:
        if self.database == "error":
            raise DatabaseError("registrations database: ping failed: disk I/O error")
        if self.database == "hang":
            await asyncio.Event().wait()
        return 1

    async def status(self) -> StoreStatus:
        await self.generation()
        return StoreStatus(accounts=2, entries=3, snapshot_version=4)

    def forwarder_stats(self) -> FakeStats:
        return FakeStats()

    def cache_stats(self) -> FakeCache | None:
        return self.cache

    def worker_samples(self) -> tuple[()]:
        return ()

    def tls_sample(self) -> None:
        return None

    async def apply(self, generation: int, timeout_s: float) -> None:
        self.applied.append(generation)
        if not self.confirms:
            raise TimeoutError


def node_status(node: FakeNode, metrics: Metrics) -> NodeStatus:
    return NodeStatus(node, metrics, node, probe_s=0.3)  # type: ignore[arg-type]


@dataclass
class Api:
    server: SyncServer
    session: aiohttp.ClientSession
    node: FakeNode
    metrics: Metrics
    config: Config
    store: RegistrationStore  # the connection the API writes (its sink) and reads through
    writer: RegistrationWriter  # the local sink, as the node's SinkService gives it

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def close(self) -> None:
        await self.session.close()
        await asyncio.wait_for(self.server.close(), AWAIT_S)
        await self.store.close()

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = TOKEN,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        async with self.session.request(method, self.url + path, data=data, headers=sent) as resp:
            text = await resp.text()
            if resp.content_type == "application/json":
                return resp.status, json.loads(text)
            return resp.status, text

    async def put(self, account: str, version: int, addresses: list[str]) -> tuple[int, Any]:
        return await self.call(
            "PUT", f"/v1/accounts/{account}", {"version": version, "addresses": addresses}
        )


async def _start(tmp_path: Path, config: Config, timeouts: Timeouts) -> Api:
    store = await RegistrationStore.open(config.database.path, create=True)
    node, metrics = FakeNode(), Metrics()
    writer = RegistrationWriter(store, config.registrations, ReadYourWrites(node.apply).announce)
    try:
        status = node_status(node, metrics)
        server = await start_sync_api(config, writer, store.readers, metrics, status, timeouts)
    except BaseException:
        await store.close()
        raise
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=AWAIT_S))
    return Api(server, session, node, metrics, config, store, writer)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    running = await _start(tmp_path, make_config(tmp_path), SHORT)
    try:
        yield running
    finally:
        await running.close()


@pytest.fixture
async def public_api(tmp_path: Path) -> AsyncIterator[Api]:
    running = await _start(tmp_path, make_config(tmp_path, public_only=True), SHORT)
    try:
        yield running
    finally:
        await running.close()


# --- authentication ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "path", "token"),
    [
        ({}, "/v1/status", None),
        ({}, "/v1/status", "0" * 64),
        ({}, "/v1/status", TOKEN[:-1]),
        ({}, "/v1/status", TOKEN + "x"),
        ({"Authorization": "Basic " + TOKEN}, "/v1/status", None),
        ({"Authorization": TOKEN}, "/v1/status", None),
        ({}, f"/v1/status?token={TOKEN}", None),
        ({}, f"/v1/status?access_token={TOKEN}", TOKEN),
        ({"Cookie": f"token={TOKEN}"}, "/v1/status", TOKEN),
        ({}, "/v1/nowhere", None),
        ({}, "/", None),
    ],
    ids=[
        "no_header",
        "wrong_token",
        "prefix_of_token",
        "token_plus_one",
        "basic_scheme",
        "no_scheme",
        "token_in_query",
        "query_token_next_to_valid_header",
        "cookie_next_to_valid_header",
        "unknown_v1_path",
        "unknown_path",
    ],
)
async def test_unauthorized(
    api: Api, headers: dict[str, str], path: str, token: str | None
) -> None:
    async with api.session.get(
        api.url + path,
        headers={**headers, **({"Authorization": f"Bearer {token}"} if token else {})},
    ) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith('Bearer realm="smartdns"')
        body = await resp.text()
    assert TOKEN not in body and TOKEN[:16] not in body


async def test_two_authorization_headers_are_refused(api: Api) -> None:
    headers = [("Authorization", f"Bearer {TOKEN}"), ("Authorization", f"Bearer {TOKEN}")]
    async with api.session.get(api.url + "/v1/status", headers=headers) as resp:
        assert resp.status == 401


async def test_scheme_is_case_insensitive(api: Api) -> None:
    async with api.session.get(
        api.url + "/v1/status", headers={"Authorization": f"bearer {TOKEN}"}
    ) as resp:
        assert resp.status == 200


async def test_unknown_path_with_token_is_404_and_wrong_method_405(api: Api) -> None:
    assert (await api.call("GET", "/v1/nowhere"))[0] == 404
    async with api.session.post(
        api.url + "/v1/snapshot", headers={"Authorization": f"Bearer {TOKEN}"}
    ) as resp:
        assert resp.status == 405
        assert "PUT" in resp.headers["Allow"]


async def test_reload_swaps_the_token(api: Api) -> None:
    new = secrets.token_hex(32)
    api.server.reload(
        replace(api.config, sync=replace(api.config.sync, token=Secret(new.encode())))
    )
    assert (await api.call("GET", "/v1/status"))[0] == 401
    assert (await api.call("GET", "/v1/status", token=new))[0] == 200


async def test_empty_token_accepts_nobody(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    config = replace(config, sync=replace(config.sync, token=Secret()))
    running = await _start(tmp_path, config, SHORT)
    try:
        async with running.session.get(
            running.url + "/v1/status", headers={"Authorization": "Bearer "}
        ) as resp:
            assert resp.status == 401
    finally:
        await running.close()


# --- accounts: ordering, idempotency, tombstones ----------------------------------------------


async def test_put_get_delete_account(api: Api) -> None:
    status, body = await api.put("acct-1", 5, [ADDRESS, "2001:db8:7::/64"])
    assert (status, body) == (
        200,
        {"account": "acct-1", "version": 5, "addresses": 2, "hostnames": 0, "device_ids": 0},
    )
    status, body = await api.call("GET", "/v1/accounts/acct-1")
    assert (status, body) == (
        200,
        {
            "account": "acct-1",
            "version": 5,
            "addresses": [ADDRESS, "2001:db8:7::/64"],
            "hostnames": [],
            "device_ids": 0,
        },
    )
    status, body = await api.call("DELETE", "/v1/accounts/acct-1?version=6")
    assert (status, body) == (200, {"account": "acct-1", "version": 6, "existed": True})
    assert (await api.call("GET", "/v1/accounts/acct-1"))[0] == 404


async def test_a_write_the_dns_side_did_not_apply_in_time_is_503_until_it_did(api: Api) -> None:
    """SPEC 4: a 200 means in DNS answers. With `workers: 1` there is no worker to restart:
    the write is stored, but was answered 200 all the same (the log said "stored but not
    confirmed by the DNS side"), so the portal told its customer what was not true yet."""
    api.node.confirms = False
    status, body = await api.put("acct-1", 5, [ADDRESS])
    assert status == 503 and "repeat the write" in body["error"]
    assert (await api.call("GET", "/v1/accounts/acct-1"))[0] == 200  # stored all the same
    assert (await api.put("acct-1", 5, [ADDRESS]))[0] == 503  # the repeat waits for it too
    api.node.confirms = True
    assert (await api.put("acct-1", 5, [ADDRESS]))[0] == 200  # now in effect
    assert api.node.applied == [1, 1, 1]
    assert (await api.put("acct-1", 5, [ADDRESS]))[0] == 200
    assert api.node.applied == [1, 1, 1]  # confirmed: a repeat waits for nothing


async def _generation(api: Api) -> int:
    async with await RegistrationStore.open(api.config.database.path, create=False) as store:
        return await store.readers.generation()


async def test_same_write_repeated_is_a_no_op(api: Api) -> None:
    assert (await api.put("acct-1", 5, [ADDRESS]))[0] == 200
    before = await _generation(api)
    assert await api.put("acct-1", 5, [ADDRESS]) == (
        200,
        {"account": "acct-1", "version": 5, "addresses": 1, "hostnames": 0, "device_ids": 0},
    )
    assert await _generation(api) == before


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("PUT", 5, [ADDRESS]), ("PUT", 4, [ADDRESS])),  # older
        (("PUT", 5, [ADDRESS]), ("PUT", 5, ["203.0.113.8"])),  # same version, other content
        (("DELETE", 7, None), ("PUT", 6, [ADDRESS])),  # older PUT after a newer DELETE
        (("DELETE", 7, None), ("PUT", 7, [ADDRESS])),  # PUT at the tombstone's version
        (("PUT", 5, [ADDRESS]), ("DELETE", 4, None)),  # older DELETE
    ],
    ids=[
        "older_put",
        "same_version_other_content",
        "put_after_newer_delete",
        "put_at_tombstone",
        "older_delete",
    ],
)
async def test_stale_write_is_409_and_changes_nothing(
    api: Api, first: tuple[str, int, list[str] | None], second: tuple[str, int, list[str] | None]
) -> None:
    for method, version, addresses in (first,):
        if method == "PUT":
            assert addresses is not None
            assert (await api.put("acct-1", version, addresses))[0] == 200
        else:
            assert (await api.call("DELETE", f"/v1/accounts/acct-1?version={version}"))[0] == 200
    before = await api.call("GET", "/v1/accounts/acct-1")
    method, version, addresses = second
    if method == "PUT":
        assert addresses is not None
        status, body = await api.put("acct-1", version, addresses)
    else:
        status, body = await api.call("DELETE", f"/v1/accounts/acct-1?version={version}")
    assert status == 409, body
    assert ADDRESS not in body["error"]
    assert await api.call("GET", "/v1/accounts/acct-1") == before


async def test_delete_of_unknown_account_leaves_a_tombstone(api: Api) -> None:
    status, body = await api.call("DELETE", "/v1/accounts/never-seen?version=9")
    assert (status, body) == (200, {"account": "never-seen", "version": 9, "existed": False})
    assert (await api.put("never-seen", 8, [ADDRESS]))[0] == 409
    assert (await api.call("GET", "/v1/accounts/never-seen"))[0] == 404
    assert (await api.put("never-seen", 10, [ADDRESS]))[0] == 200


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?version=",
        "?version=x",
        "?version=-1",
        "?version=1.0",
        "?version=1&version=2",
        "?version=99999999999999999999",
    ],
)
async def test_delete_needs_one_integer_version(api: Api, query: str) -> None:
    status, body = await api.call("DELETE", f"/v1/accounts/acct-1{query}")
    assert status == 400, body
    assert body["error"].startswith("version: ")


# --- device IDs (SPEC 2a, 3) ---------------------------------------------------------------------

DEVICE_ID = "k3v9q2m8x4t6w1z7p5r0bn2dca"  # distinctive: must never come back in a reply


async def test_device_ids_are_counted_never_returned(api: Api) -> None:
    body = {"version": 1, "addresses": [], "device_ids": [DEVICE_ID, "b" * 20]}
    status, reply = await api.call("PUT", "/v1/accounts/phone", body)
    assert (status, reply["device_ids"], reply["addresses"]) == (200, 2, 0)
    status, reply = await api.call("GET", "/v1/accounts/phone")
    assert (status, reply["device_ids"]) == (200, 2)
    assert (await api.call("PUT", "/v1/accounts/phone", body))[0] == 200  # a repeat: no-op
    other = {"version": 1, "addresses": [], "device_ids": [DEVICE_ID]}
    status, reply = await api.call("PUT", "/v1/accounts/phone", other)
    assert (status, reply) == (409, {"error": "version 1 is already stored with other content"})


async def test_id_another_account_holds_is_409_by_position(api: Api) -> None:
    body = {"version": 1, "addresses": [], "device_ids": [DEVICE_ID]}
    assert (await api.call("PUT", "/v1/accounts/first", body))[0] == 200
    taken = {"version": 2, "addresses": [ADDRESS], "device_ids": ["c" * 20, DEVICE_ID]}
    status, reply = await api.call("PUT", "/v1/accounts/second", taken)
    assert (status, reply) == (409, {"error": "device_ids[1]: held by another account"})
    assert (await api.call("GET", "/v1/accounts/second"))[0] == 404
    assert (await api.call("DELETE", "/v1/accounts/first?version=3"))[0] == 200
    taken["version"] = 4
    assert (await api.call("PUT", "/v1/accounts/second", taken))[0] == 200


async def test_bad_device_id_is_422_without_echo(api: Api) -> None:
    body = {"version": 1, "addresses": [], "device_ids": [DEVICE_ID.upper()]}
    status, reply = await api.call("PUT", "/v1/accounts/phone", body)
    assert (status, reply) == (
        422,
        {"error": "device_ids[0]: must be lower-case letters a-z and digits only"},
    )


async def test_snapshot_object_form_carries_device_ids(api: Api) -> None:
    accounts = {
        "a": {"addresses": [ADDRESS], "device_ids": [DEVICE_ID]},
        "b": {"addresses": [], "device_id_sha256": ["ab" * 32]},
    }
    status, reply = await api.call("PUT", "/v1/snapshot", {"version": 5, "accounts": accounts})
    assert (status, reply) == (200, {"version": 5, "accounts": 2, "entries": 1, "device_ids": 2})
    assert (await api.call("GET", "/v1/accounts/b"))[1]["device_ids"] == 1
    accounts["b"] = {"addresses": [], "device_ids": [DEVICE_ID]}
    status, reply = await api.call("PUT", "/v1/snapshot", {"version": 6, "accounts": accounts})
    assert (status, reply) == (
        422,
        {"error": 'accounts["b"].device_ids[0]: given to another account too'},
    )


# --- snapshots ---------------------------------------------------------------------------------


async def test_snapshot_replaces_everything_and_orders_later_writes(api: Api) -> None:
    assert (await api.put("old", 3, [ADDRESS]))[0] == 200
    assert (await api.call("DELETE", "/v1/accounts/gone?version=4"))[0] == 200
    status, body = await api.call(
        "PUT",
        "/v1/snapshot",
        {"version": 10, "accounts": {"a": ["203.0.113.1"], "b": ["203.0.113.2", "2001:db8::/48"]}},
    )
    assert (status, body) == (200, {"version": 10, "accounts": 2, "entries": 3, "device_ids": 0})
    assert (await api.call("GET", "/v1/accounts/old"))[0] == 404
    assert (await api.call("GET", "/v1/accounts/a"))[1]["version"] == 10
    assert await api.call("GET", "/v1/status") == (
        200,
        {"accounts": 2, "entries": 3, "snapshot_version": 10},
    )
    # not above the snapshot version: stale; the tombstone of "gone" was dropped, but 4 < 10
    assert (await api.put("gone", 10, [ADDRESS]))[0] == 409
    assert (await api.put("gone", 11, [ADDRESS]))[0] == 200
    # an older snapshot is stale; the same version again is accepted (idempotent replay)
    assert (await api.call("PUT", "/v1/snapshot", {"version": 9, "accounts": {}}))[0] == 409
    assert (await api.call("GET", "/v1/accounts/gone"))[0] == 200


async def test_large_snapshot_is_decoded_off_the_loop(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[threading.Thread] = []
    original = sync_api.decode_snapshot

    def recording(body: bytes, rules: RegistrationsConfig) -> Any:
        threads.append(threading.current_thread())
        return original(body, rules)

    monkeypatch.setattr(sync_api, "decode_snapshot", recording)
    accounts = {f"acct-{i}": [f"10.{i // 256}.{i % 256}.1"] for i in range(5000)}
    status, body = await api.call("PUT", "/v1/snapshot", {"version": 1, "accounts": accounts})
    assert (status, body) == (
        200,
        {"version": 1, "accounts": 5000, "entries": 5000, "device_ids": 0},
    )
    assert threads and threads[0] is not threading.main_thread()


# --- 400 and 422: nothing applied, messages name a position --------------------------------------

BAD_SHAPE = [
    (b"not json", "body is not valid JSON"),
    (b"", "body is not valid JSON"),
    (b"\xff\xfe\x00", "body is not"),
    (b"[]", "body must be a JSON object"),
    (b'{"version": 1}', "addresses: missing"),
    (b'{"version": 1, "addresses": [], "extra": 1}', "unexpected top-level key"),
    (b'{"version": "1", "addresses": []}', "version: must be an integer"),
    (b'{"version": true, "addresses": []}', "version: must be an integer"),
    (b'{"version": 1.5, "addresses": []}', "version: must be an integer"),
    (b'{"version": -1, "addresses": []}', "version: must be between"),
    (b'{"version": 1, "addresses": "203.0.113.7"}', "addresses: must be a list"),
    (b'{"version": 1, "version": 2, "addresses": []}', "duplicate key"),
    (b'{"version": NaN, "addresses": []}', "NaN"),
    (b'{"version": 1, "addresses": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
    (b'{"version": 1' + b"0" * 5000 + b', "addresses": []}', "number out of range"),
]


@pytest.mark.parametrize(
    ("raw", "fragment"), BAD_SHAPE, ids=[str(i) for i in range(len(BAD_SHAPE))]
)
async def test_wrong_shape_is_400(api: Api, raw: bytes, fragment: str) -> None:
    status, body = await api.call("PUT", "/v1/accounts/acct-1", raw=raw)
    assert status == 400, body
    assert fragment in body["error"]
    assert ADDRESS not in body["error"]
    assert (await api.call("GET", "/v1/accounts/acct-1"))[0] == 404


BAD_RULE = [
    ([ADDRESS, "203.0.113.9/24"], "addresses[1]: host bits set"),
    (["203.0.0.0/16"], "addresses[0]: prefix /16 is wider than the allowed /24"),
    (["2001:db8::/32"], "addresses[0]: prefix /32 is wider than the allowed /48"),
    (["not-an-address"], "addresses[0]: not a valid IP address or prefix"),
    ([ADDRESS, 7], "addresses[1]: must be a string"),
    (["0.0.0.0"], "addresses[0]: unspecified address"),
    (["224.0.0.1"], "addresses[0]: multicast address"),
    (["ff02::1"], "addresses[0]: multicast address"),
    (
        [f"203.0.113.{i}" for i in range(17)],
        "addresses: 17 entries exceed the limit of 16 per account",
    ),
]


@pytest.mark.parametrize(
    ("addresses", "message"), BAD_RULE, ids=[str(i) for i in range(len(BAD_RULE))]
)
async def test_broken_rule_is_422_naming_the_position(
    api: Api, addresses: list[Any], message: str
) -> None:
    assert (await api.put("acct-1", 1, ["198.51.100.1"]))[0] == 200
    status, body = await api.put("acct-1", 2, addresses)
    assert (status, body) == (422, {"error": message})
    assert await api.call("GET", "/v1/accounts/acct-1") == (
        200,
        {
            "account": "acct-1",
            "version": 1,
            "addresses": ["198.51.100.1"],
            "hostnames": [],
            "device_ids": 0,
        },
    )


@pytest.mark.parametrize("account", ["a" * 129, "bad%20id", "caf%C3%A9", "a,b"])
async def test_bad_account_id_is_422(api: Api, account: str) -> None:
    status, body = await api.put(account, 1, [ADDRESS])
    assert (status, body) == (
        422,
        {"error": "account: must be 1 to 128 characters of A-Z a-z 0-9 . _ : -"},
    )


async def test_snapshot_errors_name_the_account_entry(api: Api) -> None:
    assert (await api.call("PUT", "/v1/snapshot", {"version": 2, "accounts": {"k": [ADDRESS]}}))[
        0
    ] == 200
    status, body = await api.call(
        "PUT", "/v1/snapshot", {"version": 3, "accounts": {"a": [ADDRESS], "b": ["x", "y"]}}
    )
    assert (status, body) == (422, {"error": 'accounts["b"][0]: not a valid IP address or prefix'})
    status, body = await api.call(
        "PUT", "/v1/snapshot", {"version": 3, "accounts": {"a": [], "bad id": []}}
    )
    assert (status, body) == (
        422,
        {"error": "accounts (key #1): must be 1 to 128 characters of A-Z a-z 0-9 . _ : -"},
    )
    status, body = await api.call("PUT", "/v1/snapshot", {"version": 3, "accounts": []})
    assert (status, body) == (400, {"error": "accounts: must be an object"})
    assert await api.call("GET", "/v1/status") == (
        200,
        {"accounts": 1, "entries": 1, "snapshot_version": 2},
    )


async def test_public_only_rejects_non_global(public_api: Api) -> None:
    status, body = await public_api.put("acct-1", 1, ["1.1.1.1", "10.0.0.1"])
    assert (status, body) == (
        422,
        {"error": "addresses[1]: not a globally routable address (registrations.public_only)"},
    )
    assert (await public_api.put("acct-1", 1, ["1.1.1.1"]))[0] == 200


# --- limits and timeouts -------------------------------------------------------------------------


async def test_body_over_max_body_is_413_before_reading(tmp_path: Path) -> None:
    running = await _start(tmp_path, make_config(tmp_path, max_body=1024), SHORT)
    try:
        body = {"version": 1, "accounts": {f"a{i}": [] for i in range(200)}}
        status, answer = await running.call("PUT", "/v1/snapshot", body)
        assert status == 413, answer
        assert answer == {"error": "request body is over 1024 bytes (sync.max_body)"}

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(4):
                yield b" " * 400

        async with running.session.put(
            running.url + "/v1/accounts/a",
            data=chunks(),  # chunked: no Content-Length, so the limit applies while reading
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as resp:
            assert resp.status == 413
        assert (await running.call("GET", "/v1/status"))[1]["accounts"] == 0
    finally:
        await running.close()


async def _raw_exchange(api: Api, request: bytes, *, whole: bool = False) -> bytes:
    """Send `request` and stall; the first line the server sends (b"" when it just closes),
    or with `whole` everything it sends until it closes."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", api.server.port), AWAIT_S
    )
    try:
        writer.write(request)
        await asyncio.wait_for(writer.drain(), AWAIT_S)
        received = reader.read() if whole else reader.readline()
        return await asyncio.wait_for(received, AWAIT_S)
    finally:
        writer.close()


async def test_stalled_body_gets_408(api: Api) -> None:
    reply = await _raw_exchange(
        api,
        b"PUT /v1/accounts/a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + TOKEN.encode()
        + b'\r\nContent-Length: 100\r\n\r\n{"version"',
    )
    assert reply.startswith(b"HTTP/1.1 408 ")


async def test_stalled_headers_are_closed(api: Api) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    reply = await _raw_exchange(api, b"GET /v1/status HTTP/1.1\r\nHost: x\r\n")
    assert reply == b""
    assert loop.time() - started < SHORT.idle_s + 2


async def test_listen_address_taken(api: Api, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    config = replace(
        config, sync=replace(config.sync, listen=HostPort("127.0.0.1", api.server.port))
    )
    with pytest.raises(SmartDNSError, match=r"cannot listen on 127\.0\.0\.1:\d+ \(sync API\)"):
        await asyncio.wait_for(
            start_sync_api(
                config,
                api.writer,
                api.store.readers,
                Metrics(),
                node_status(FakeNode(), Metrics()),
                SHORT,
            ),
            AWAIT_S,
        )


async def test_database_failure_is_503(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(_self: Readers) -> StoreStatus:
        raise DatabaseError("registrations database: status failed: disk I/O error")

    monkeypatch.setattr(Readers, "status", broken)
    assert await api.call("GET", "/v1/status") == (
        503,
        {"error": "registrations database unavailable"},
    )


# --- /healthz and /metrics ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("up", "database", "status", "text"),
    [
        (True, "ok", 200, "ok\n"),
        (False, "ok", 503, "unavailable\n"),
        (True, "error", 503, "unavailable\n"),
        (True, "hang", 503, "unavailable\n"),
    ],
    ids=["healthy", "listeners_down", "database_error", "database_hangs"],
)
async def test_healthz(api: Api, up: bool, database: str, status: int, text: str) -> None:
    api.node.up, api.node.database = up, database
    assert await api.call("GET", "/healthz", token=None) == (status, text)


def _parse_exposition(text: str) -> dict[str, float]:
    """Check the text format line by line; return {series: value}."""
    assert text.endswith("\n")
    samples: dict[str, float] = {}
    declared: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge") and name not in declared
            assert name.endswith("_total") == (kind == "counter"), name
            declared[name] = kind
            continue
        match = re.fullmatch(r'([a-z_]+)(\{(?:[a-z_]+="[^"\\]*",?)*\})? (-?[0-9.e+]+)', line)
        assert match, line
        assert match.group(1) in declared, line
        samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


async def test_metrics_without_token_in_exposition_format(api: Api) -> None:
    api.node.cache = FakeCache()
    assert (await api.put("acct-secret-id", 1, [ADDRESS]))[0] == 200
    assert (await api.call("GET", "/v1/accounts/acct-secret-id"))[0] == 200
    assert (await api.call("GET", "/v1/status", token="wrong-token-value-000"))[0] == 401
    async with api.session.get(api.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = await resp.text()
    samples = _parse_exposition(text)
    route = "/v1/accounts/{account}"
    assert (
        samples[f'smartdns_sync_requests_total{{method="PUT",route="{route}",status="200"}}'] == 1
    )
    assert (
        samples[f'smartdns_sync_requests_total{{method="GET",route="{route}",status="200"}}'] == 1
    )
    assert (
        samples['smartdns_sync_requests_total{method="GET",route="/v1/status",status="401"}'] == 1
    )
    assert samples['smartdns_queries_total{transport="udp",outcome="unblock"}'] == 0
    assert samples["smartdns_upstream_queries_sent_total"] == 7
    assert samples['smartdns_upstream_failures_total{reason="timeout"}'] == 1
    assert samples["smartdns_cache_hits_total"] == 11 and samples["smartdns_cache_entries"] == 3
    assert samples["smartdns_registered_entries"] == 3 and samples["smartdns_database_up"] == 1
    assert samples["smartdns_ready"] == 1
    for secret in ("acct-secret-id", ADDRESS, TOKEN, "wrong-token-value", "127.0.0.1"):
        assert secret not in text


async def test_metrics_without_database_or_cache(api: Api) -> None:
    api.node.database = "error"
    status, text = await api.call("GET", "/metrics", token=None)
    samples = _parse_exposition(text)
    assert status == 200 and samples["smartdns_database_up"] == 0
    assert samples["smartdns_ready"] == 0
    assert "smartdns_registered_accounts" not in text and "smartdns_cache_" not in text


async def test_ready_gauge_follows_healthz_when_the_listeners_go_down(api: Api) -> None:
    api.node.up = False
    assert (await api.call("GET", "/healthz", token=None))[0] == 503
    status, text = await api.call("GET", "/metrics", token=None)
    samples = _parse_exposition(text)
    assert status == 200 and samples["smartdns_ready"] == 0
    assert samples["smartdns_database_up"] == 1


async def test_nothing_sensitive_is_logged(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await api.put("acct-log", 1, [ADDRESS])
    await api.put("acct-log", 1, [ADDRESS, "203.0.113.9/24"])
    await api.call("GET", "/v1/status", token="x" * 40)
    await api.call("GET", f"/v1/status?token={TOKEN}")
    await api.call("PUT", "/v1/accounts/acct-log", raw=b"{bad")
    # Library debug output (aiosqlite prints SQL parameters) is silenced by logs.setup.
    ours = [r for r in caplog.records if r.name.split(".")[0] in ("smartdns", "aiohttp")]
    logged = "\n".join(record.getMessage() for record in ours)
    for secret in (ADDRESS, "203.0.113.9", TOKEN, "acct-log", "127.0.0.1"):
        assert secret not in logged


def test_http_log_filter_drops_arguments_and_tracebacks() -> None:
    record = logging.LogRecord(
        "x", logging.ERROR, "f", 1, "Error handling request from %s", ("192.0.2.99",), None
    )
    try:
        raise ValueError("203.0.113.7")
    except ValueError:
        record.exc_info = sys.exc_info()
    assert sync_api._NoDetails().filter(record)
    assert record.getMessage() == "Error handling request from - (ValueError)"
    assert record.exc_info is None


def test_bulk_work_nests_and_restores_the_collector_and_switch_interval() -> None:
    interval = sys.getswitchinterval()
    work = BulkWork()
    assert gc.isenabled()
    try:
        with work:
            with work:  # a snapshot apply overlapping a prefix load
                assert not gc.isenabled()
                assert sys.getswitchinterval() == BulkWork.SWITCH_INTERVAL_S
            assert not gc.isenabled()  # the outer user is still at work
            assert sys.getswitchinterval() == BulkWork.SWITCH_INTERVAL_S
        assert gc.isenabled()
        assert sys.getswitchinterval() == interval
        gc.disable()  # off before: stays off after
        with work:
            pass
        assert not gc.isenabled()
        assert sys.getswitchinterval() == interval
    finally:
        gc.enable()
        sys.setswitchinterval(interval)


# --- the HTTP edge: every error is JSON and echoes nothing ---------------------------------------

CANARY = "203.0.113.77"  # in bodies and headers of malformed requests: must never come back
_AUTH = b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
_ACCOUNT_BODY = json.dumps({"version": 1, "addresses": [CANARY]}).encode()


def _put(headers: bytes, body: bytes = _ACCOUNT_BODY) -> bytes:
    return (
        b"PUT /v1/accounts/acct-edge HTTP/1.1\r\nHost: x\r\n"
        + _AUTH
        + headers
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def _responses(received: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Each response in `received` (status, lower-cased header names, body), by Content-Length."""
    responses = []
    while received:
        head, _, rest = received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith(("HTTP/1.1 ", "HTTP/1.0 ")), lines[0]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers["content-length"])
        responses.append((int(lines[0].split()[1]), headers, rest[:length]))
        received = rest[length:]
    return responses


_MALFORMED = {
    "control_char_in_header": _put(b"X-Note: a\x01" + CANARY.encode() + b"\r\n"),
    "over_long_header_line": _put(b"X-Note: " + CANARY.encode() * 2000 + b"\r\n"),
    "over_long_request_line": b"GET /v1/accounts/"
    + CANARY.encode() * 2000
    + b" HTTP/1.1\r\nHost: x\r\n"
    + _AUTH
    + b"\r\n",
    "bad_request_line": b"GET /v1/" + CANARY.encode() + b" HTTP/9.Z\r\n" + _AUTH + b"\r\n",
    "content_encoding_br": _put(b"Content-Encoding: br\r\n"),
    "content_encoding_gzip_plain_body": _put(b"Content-Encoding: gzip\r\n"),
    "content_encoding_deflate_plain_body": _put(b"Content-Encoding: deflate\r\n"),
    "content_encoding_unknown": _put(b"Content-Encoding: x-" + CANARY.encode() + b"\r\n"),
    "pipelined_malformed_second_request": b"GET /v1/status HTTP/1.1\r\nHost: x\r\n"
    + _AUTH
    + b"\r\n"
    + b"PUT /v1/accounts/acct-edge HTTP/1.1\r\nHost: x\r\n"
    + _AUTH
    + b"X-Note: \x00"
    + CANARY.encode()
    + b"\r\n\r\n",
    "bad_chunk_size": b"PUT /v1/accounts/acct-edge HTTP/1.1\r\nHost: x\r\n"
    + _AUTH
    + b"Transfer-Encoding: chunked\r\n\r\nzz"
    + CANARY.encode()
    + b"\r\n",
    "two_content_lengths": _put(b"Content-Length: 3\r\n"),
}


@pytest.mark.parametrize("request_bytes", list(_MALFORMED.values()), ids=list(_MALFORMED))
async def test_malformed_http_gets_a_json_error_echoing_nothing(
    api: Api, request_bytes: bytes
) -> None:
    received = await _raw_exchange(api, request_bytes, whole=True)
    responses = _responses(received)
    assert responses and responses[-1][0] in (400, 413, 415, 431), received[:300]
    for status, headers, body in responses:
        assert headers["content-type"].startswith("application/json"), (status, headers)
        if status >= 400:
            assert set(json.loads(body)) == {"error"}
    for secret in (CANARY, TOKEN, "Bearer", "acct-edge"):
        assert secret.encode() not in received
    assert (await api.call("GET", "/v1/accounts/acct-edge"))[0] == 404


# --- the OpenAPI document against the running API ------------------------------------------------

OPENAPI = Path(__file__).resolve().parents[2] / "docs" / "sync-api.openapi.yaml"


def _resolved(node: Any, document: dict[str, Any]) -> Any:
    """`node` with every local `$ref` replaced by what it points at (the document has no
    recursive schemas), so jsonschema checks it without a reference registry."""
    if isinstance(node, dict):
        if "$ref" in node:
            target: Any = document
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            return _resolved(target, document)
        return {key: _resolved(value, document) for key, value in node.items()}
    if isinstance(node, list):
        return [_resolved(value, document) for value in node]
    return node


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    from openapi_spec_validator import validate

    document = yaml.safe_load(OPENAPI.read_text(encoding="utf-8"))
    validate(document)  # a valid OpenAPI 3.1 document
    return _resolved(document, document)  # type: ignore[no-any-return]


def test_every_route_is_documented_and_every_documented_operation_exists(
    api: Api, openapi: dict[str, Any]
) -> None:
    documented = {
        (method.upper(), path)
        for path, item in openapi["paths"].items()
        for method in item
        if method != "parameters"
    }
    routes = {
        (route.method, route.resource.canonical)
        for route in api.server.api.application().router.routes()
        if route.resource is not None and route.method != "HEAD"  # HEAD: GET without a body
    }
    assert routes == documented


# (method, path, body or raw bytes, headers, token, expected status)
_EXCHANGES: list[tuple[str, str, Any, dict[str, str], str | None, int]] = [
    ("PUT", "/v1/accounts/acct-1", {"version": 2, "addresses": [ADDRESS]}, {}, TOKEN, 200),
    (
        "PUT",
        "/v1/accounts/dev",
        {"version": 2, "addresses": [], "device_ids": ["d" * 20]},
        {},
        TOKEN,
        200,
    ),
    (
        "PUT",
        "/v1/accounts/dev2",
        {"version": 3, "addresses": [], "device_ids": ["d" * 20]},
        {},
        TOKEN,
        409,
    ),
    ("PUT", "/v1/accounts/acct-1", {"version": 1, "addresses": []}, {}, TOKEN, 409),
    ("PUT", "/v1/accounts/acct-1", {"version": 3, "addresses": ["bad"]}, {}, TOKEN, 422),
    ("PUT", "/v1/accounts/acct-1", b'{"version": 3', {}, TOKEN, 400),
    ("PUT", "/v1/accounts/acct-1", {"version": 3, "addresses": []}, {}, None, 401),
    ("PUT", "/v1/accounts/acct-1", b"{}", {"Content-Encoding": "gzip"}, TOKEN, 415),
    ("PUT", "/v1/accounts/acct-1", b" " * (2 << 20), {}, TOKEN, 413),
    ("GET", "/v1/accounts/acct-1", None, {}, TOKEN, 200),
    ("GET", "/v1/accounts/nobody", None, {}, TOKEN, 404),
    ("GET", "/v1/accounts/bad%20id", None, {}, TOKEN, 422),
    ("DELETE", "/v1/accounts/acct-1?version=5", None, {}, TOKEN, 200),
    ("DELETE", "/v1/accounts/acct-1?version=4", None, {}, TOKEN, 409),
    ("DELETE", "/v1/accounts/acct-1", None, {}, TOKEN, 400),
    ("PUT", "/v1/snapshot", {"version": 9, "accounts": {"b": [ADDRESS]}}, {}, TOKEN, 200),
    ("PUT", "/v1/snapshot", {"version": 8, "accounts": {}}, {}, TOKEN, 409),
    ("PUT", "/v1/snapshot", {"version": 10, "accounts": {"b": ["x"]}}, {}, TOKEN, 422),
    ("PUT", "/v1/snapshot", {"version": 10}, {}, TOKEN, 400),
    ("GET", "/v1/status", None, {}, TOKEN, 200),
    ("GET", "/v1/status", None, {}, "wrong-token", 401),
    ("GET", "/healthz", None, {}, None, 200),
    ("GET", "/metrics", None, {}, None, 200),
]


async def test_real_replies_match_the_document(api: Api, openapi: dict[str, Any]) -> None:
    import jsonschema

    exercised = set()
    for method, target, body, headers, token, expected in _EXCHANGES:
        sent = dict(headers)
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        async with api.session.request(method, api.url + target, data=data, headers=sent) as resp:
            payload = await resp.read()
            content_type = resp.headers["Content-Type"]
            status = resp.status
        assert status == expected, (method, target, payload[:200])
        path = target.partition("?")[0]
        if path.startswith("/v1/accounts/"):
            path = "/v1/accounts/{account}"
        operation = openapi["paths"][path][method.lower()]
        exercised.add((method, path))
        response = operation["responses"][str(status)]
        media = response["content"]
        documented_type = next(t for t in media if content_type.startswith(t.split(";")[0]))
        if documented_type.startswith("text/plain; version"):
            assert content_type == documented_type
        schema = media[documented_type]["schema"]
        value = json.loads(payload) if documented_type == "application/json" else payload.decode()
        jsonschema.validate(value, schema)
        for name in response.get("headers", {}):
            assert name in resp.headers, (status, name)
    documented = {
        (method.upper(), path)
        for path, item in openapi["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert exercised == documented
