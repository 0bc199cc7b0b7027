"""Fixtures: a fake upstream with a small table, and a running smartdns in front of it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Server, running_server
from tests.fake_upstream import FakeUpstream


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        fake.add("example.org", "A", ["example.org. 300 IN A 192.0.2.1"])
        fake.add("example.org", "AAAA", ["example.org. 300 IN AAAA 2001:db8::1"])
        fake.add("example.org", "MX", ["example.org. 300 IN MX 10 mail.example.org."])
        fake.add("www.netflix.com", "MX", ["www.netflix.com. 300 IN MX 10 mx.netflix.com."])
        fake.add("www.netflix.com", "TXT", ['www.netflix.com. 300 IN TXT "real-txt"'])
        fake.add("netflix.com", "CAA", ['netflix.com. 300 IN CAA 0 issue "ca.example"'])
        fake.add("example.org", "666", ["example.org. 300 IN TYPE666 \\# 2 abcd"])
        fake.large_answer("big.example.org", 120)
        yield fake


@pytest.fixture
def server(tmp_path: Path, upstream: FakeUpstream) -> Iterator[Server]:
    with running_server(tmp_path, upstream.address) as running:
        yield running
