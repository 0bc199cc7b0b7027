"""SPEC 2's behaviour table against the real server, over UDP and TCP, from data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.flags
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest
import yaml

from tests.e2e.harness import REGISTERED, REGISTERED_V6, UNREGISTERED, Server, running_server
from tests.fake_upstream import FakeUpstream

CASES: list[dict[str, Any]] = yaml.safe_load(
    (Path(__file__).parents[1] / "data" / "behaviour.yaml").read_text()
)
SOURCES = {"registered": REGISTERED, "unregistered": UNREGISTERED, "registered_v6": REGISTERED_V6}


@pytest.fixture(scope="module")
def table_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, FakeUpstream]]:
    with FakeUpstream() as upstream:
        upstream.add("example.org", "A", ["example.org. 300 IN A 192.0.2.1"])
        upstream.add("example.org", "AAAA", ["example.org. 300 IN AAAA 2001:db8::1"])
        upstream.add("www.netflix.com", "MX", ["www.netflix.com. 300 IN MX 10 mx.netflix.com."])
        upstream.add("www.netflix.com", "TXT", ['www.netflix.com. 300 IN TXT "real-txt"'])
        with running_server(tmp_path_factory.mktemp("table"), upstream.address) as server:
            yield server, upstream


def _case_id(case: dict[str, Any]) -> str:
    return f"{case['client']}-{case['name']}-{case['qtype']}"


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_behaviour(
    table_server: tuple[Server, FakeUpstream], case: dict[str, Any], transport: str
) -> None:
    server, upstream = table_server
    before = upstream.count(case["name"].lower(), case["qtype"])
    reply = server.query(
        case["name"], case["qtype"], source=SOURCES[case["client"]], tcp=transport == "tcp"
    )

    assert dns.rcode.to_text(reply.rcode()) == case["rcode"]
    assert reply.question[0].name.to_text() == dns.name.from_text(case["name"]).to_text()
    answers = sorted(rdata.to_text() for rrset in reply.answer for rdata in rrset)
    assert answers == sorted(case["answer"])
    if "ttl" in case:
        assert all(rrset.ttl == case["ttl"] for rrset in reply.answer)
    if "soa" in case:
        (soa,) = reply.authority
        assert soa.rdtype == dns.rdatatype.SOA and soa.name.to_text() == case["soa"] + "."
        assert soa[0].mname.to_text() == "smartdns.invalid." and soa[0].minimum == 60
    for flag in case.get("flags", []):
        assert reply.flags & dns.flags.from_text(flag), flag
    assert reply.flags & dns.flags.RA
    # Local answers never reach the upstream. A forwarded one reaches it exactly once: whichever
    # transport (or client) asks first, the others are answered from the cache.
    after = upstream.count(case["name"].lower(), case["qtype"])
    if case.get("forwarded", False):
        assert after == 1
    else:
        assert after == before
