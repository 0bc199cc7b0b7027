"""Where the DDNS refresher runs (node.ddns): once per deployment (SPEC 3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from smartdns.config.model import Config, FeedConfig
from smartdns.node.ddns import DdnsService, runs_refresher


@pytest.mark.parametrize(
    ("feed", "expected"),
    [
        (None, True),  # a single node resolves its own hostnames
        (FeedConfig(servers=("nats://127.0.0.1:4222",), refresher=False), False),
        (FeedConfig(servers=("nats://127.0.0.1:4222",), refresher=True), True),
    ],
)
def test_with_a_feed_only_the_refresher_node_resolves(
    feed: FeedConfig | None, expected: bool
) -> None:
    assert runs_refresher(Config(path=Path("smartdns.yaml"), feed=feed)) is expected


async def test_a_node_that_does_not_resolve_has_no_ddns_figures(tmp_path: Path) -> None:
    async def applier(generation: int, timeout_s: float) -> None:
        raise AssertionError("nothing is written")

    feed = FeedConfig(servers=("nats://127.0.0.1:4222",), refresher=False)
    service = DdnsService(applier)
    await service.start(Config(path=tmp_path / "smartdns.yaml", feed=feed))  # opens nothing
    assert service.sample() is None
    await service.stop()
