"""ratelimit: GCRA buckets per keyed-hash slot, simulated time, no address kept."""

from __future__ import annotations

import gc
import ipaddress
import itertools
import socket
import tracemalloc
from array import array
from collections.abc import Callable, Iterator

import pytest

from smartdns.core import ratelimit
from smartdns.core.clients import source_address
from smartdns.core.ratelimit import Admission, RateLimiter

T0 = 1000.0  # a monotonic clock rarely starts at zero


def counting_keys() -> Callable[[int], bytes]:
    """Deterministic distinct keys: 1, 2, 3, ... as 16 bytes."""
    counter = itertools.count(1)
    return lambda size: next(counter).to_bytes(size)


def limiter(rate: float = 5, **kwargs: object) -> RateLimiter:
    return RateLimiter(rate, key_source=counting_keys(), **kwargs)  # type: ignore[arg-type]


def burst_size(rl: RateLimiter, host: str, now: float) -> int:
    """How many back-to-back queries pass at `now` (stops at 10,000)."""
    for count in range(10_000):
        if not rl.allow(source_address(host), now):
            return count
    return 10_000


def test_burst_then_refused() -> None:
    rl = limiter(5)
    assert burst_size(rl, "192.0.2.1", T0) == 5
    assert not rl.allow(source_address("192.0.2.1"), T0 + 0.01)


@pytest.mark.parametrize("rate", [1, 3, 5, 7, 10, 200, 1000, 0.5])
def test_burst_defaults_to_one_second_of_rate(rate: float) -> None:
    assert burst_size(limiter(rate), "192.0.2.1", T0) == max(1, round(rate))


def test_explicit_burst() -> None:
    assert burst_size(limiter(5, burst=20), "192.0.2.1", T0) == 20
    assert burst_size(limiter(100, burst=1), "192.0.2.1", T0) == 1


def test_other_sources_unaffected() -> None:
    rl = limiter(5)
    burst_size(rl, "192.0.2.1", T0)
    assert burst_size(rl, "192.0.2.2", T0) == 5
    assert burst_size(rl, "2001:db8::1", T0) == 5


def test_refill_one_per_interval() -> None:
    rl = limiter(5)
    burst_size(rl, "192.0.2.1", T0)
    assert not rl.allow(source_address("192.0.2.1"), T0 + 0.1)
    assert rl.allow(source_address("192.0.2.1"), T0 + 0.2)  # one interval later: one more
    assert not rl.allow(source_address("192.0.2.1"), T0 + 0.2)
    assert burst_size(rl, "192.0.2.1", T0 + 60) == 5  # idle: full burst again, never more


@pytest.mark.parametrize("rate", [5, 200])
def test_sustained_flood_gets_the_rate(rate: int) -> None:
    """A source sending 4x the rate for 10 simulated seconds gets rate x 10 plus one burst."""
    rl = limiter(rate)
    sent = 4 * rate * 10
    allowed = sum(
        rl.allow(source_address("198.51.100.7"), T0 + i / (4 * rate)) for i in range(sent)
    )
    assert rate * 10 <= allowed <= rate * 10 + rate + 1


def test_refused_queries_do_not_count() -> None:
    """A source over its rate is not pushed further back by its own refused queries."""
    rl = limiter(5)
    burst_size(rl, "192.0.2.1", T0)
    for step in range(1000):
        rl.allow(source_address("192.0.2.1"), T0 + step / 10_000)  # 1000 refused within 0.1 s
    assert rl.allow(source_address("192.0.2.1"), T0 + 0.2)


def test_ipv6_counted_per_56() -> None:
    rl = limiter(5)
    assert burst_size(rl, "2001:db8:0:ab00::1", T0) == 5
    # same /56, other /64s and interface ids: one bucket
    assert not rl.allow(source_address("2001:db8:0:abff:ffff::2"), T0)
    assert not rl.allow(source_address("2001:db8:0:ab42::53"), T0)
    # the neighbouring /56s have their own
    assert burst_size(rl, "2001:db8:0:ac00::1", T0) == 5
    assert burst_size(rl, "2001:db8:0:aa00::1", T0) == 5


def test_distinct_56s_rarely_share_a_bucket() -> None:
    rl = limiter(5)
    prefixes = [f"2001:db8:{high:x}:{low:x}00::1" for high in range(16) for low in range(256)]
    slots = {rl._slot(source_address(host), T0) for host in prefixes}
    assert len(slots) >= len(prefixes) * 0.9  # 4,096 /56s in 65,536 slots: ~3% collide


def test_mapped_ipv4_is_the_ipv4_address() -> None:
    rl = limiter(5)
    assert burst_size(rl, "192.0.2.9", T0) == 5
    assert not rl.allow(source_address("::ffff:192.0.2.9"), T0)
    assert rl._slot(source_address("::ffff:192.0.2.9"), T0) == rl._slot(
        source_address("192.0.2.9"), T0
    )


def test_scope_is_ignored() -> None:
    rl = limiter(5)
    assert rl._slot(source_address("fe80::1%eth0"), T0) == rl._slot(source_address("fe80::1"), T0)
    assert rl._slot(source_address("fe80::1%eth0"), T0) == rl._slot(
        source_address("fe80::2%eth1"), T0
    )  # same /56


def test_ipv4_and_ipv6_with_the_same_bytes_differ() -> None:
    rl = limiter(5)
    v4 = "192.0.2.1"
    v6 = str(ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET, v4) + bytes(12)))
    assert rl._slot(source_address(v4), T0) != rl._slot(source_address(v6), T0)


@pytest.mark.parametrize("host", ["", "not an address", "999.1.1.1", "::g", "%", "1.2.3.4%x"])
def test_garbage_host_shares_one_bucket_and_never_raises(host: str) -> None:
    rl = limiter(5)
    assert rl._slot(source_address(host), T0) == rl._slot(source_address("garbage"), T0)
    assert rl.allow(source_address(host), T0)


def test_key_rotation_changes_bucket_assignment_and_resets() -> None:
    rl = limiter(5, rotate_after_s=600.0)
    hosts = [source_address(f"10.0.{i >> 8}.{i & 255}") for i in range(1000)]
    before = [rl._slot(host, T0) for host in hosts]
    assert before == [rl._slot(host, T0 + 599.9) for host in hosts]  # same key until it rotates
    burst_size(rl, "192.0.2.1", T0 + 599.9)
    after = [rl._slot(host, T0 + 600.0) for host in hosts]
    assert sum(a != b for a, b in zip(before, after, strict=True)) > 990
    assert burst_size(rl, "192.0.2.1", T0 + 600.0) == 5  # the table was cleared


def test_key_is_random_per_process_by_default() -> None:
    first, second = RateLimiter(5), RateLimiter(5)
    hosts = [source_address(f"10.1.0.{i}") for i in range(64)]
    assert [first._slot(h, T0) for h in hosts] != [second._slot(h, T0) for h in hosts]


def test_blake2b_fallback_when_hash_is_not_siphash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratelimit, "_HASH_IS_SIPHASH", False)
    rl = limiter(5)
    assert burst_size(rl, "192.0.2.1", T0) == 5
    assert rl._slot(source_address("::ffff:192.0.2.1"), T0) == rl._slot(
        source_address("192.0.2.1"), T0
    )
    assert rl._slot(source_address("192.0.2.1"), T0) != rl._slot(source_address("192.0.2.2"), T0)


def test_memory_constant_after_100k_sources() -> None:
    rl = limiter(5)
    rl.allow(source_address("192.0.2.1"), T0)  # picks the key and the table
    slots = rl.slots
    gc.collect()
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        for index in range(100_000):
            rl.allow(
                source_address(str(ipaddress.IPv4Address(0x0A000000 + index))), T0 + index / 100_000
            )
        gc.collect()
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rl.slots == slots == 65_536
    assert len(rl._arrivals) == len(rl._excess_parity) == slots
    assert current - baseline < 4096  # nothing per source: no growth beyond noise


def _attribute_values(rl: RateLimiter) -> Iterator[object]:
    names = set(getattr(rl, "__dict__", {})) | set(type(rl).__slots__)
    for name in names:
        yield getattr(rl, name)


def test_no_attribute_holds_an_address() -> None:
    canaries = ["203.0.113.77", "2001:db8:77:7700::77", "::ffff:198.51.100.77"]
    rl = limiter(5)
    for host in canaries:
        for _ in range(10):
            rl.check(source_address(host), T0)
    packed = [
        socket.inet_pton(socket.AF_INET, "203.0.113.77"),
        socket.inet_pton(socket.AF_INET6, "2001:db8:77:7700::77")[:7],
        socket.inet_pton(socket.AF_INET, "198.51.100.77"),
    ]
    as_ints = {int.from_bytes(p) for p in packed}
    for value in _attribute_values(rl):
        assert not isinstance(value, str), value
        if isinstance(value, bytes | bytearray | array):
            raw = bytes(value)
            assert not any(p in raw for p in packed)
        if isinstance(value, int):
            assert value not in as_ints
        text = repr(value)
        assert not any(canary in text for canary in canaries)
    # besides the key source (a function), nothing refers to a str
    for value in _attribute_values(rl):
        if not callable(value):
            assert not any(isinstance(ref, str) for ref in gc.get_referents(value))


def test_check_alternates_truncate_and_drop_over_the_rate() -> None:
    rl = limiter(5)
    results = [rl.check(source_address("192.0.2.1"), T0) for _ in range(11)]
    assert results[:5] == [Admission.ALLOW] * 5
    assert results[5:] == [Admission.TRUNCATE, Admission.DROP] * 3
    assert rl.check(source_address("192.0.2.1"), T0 + 0.2) is Admission.ALLOW  # refilled


def test_alternation_is_per_bucket() -> None:
    rl = limiter(1)
    rl.check(source_address("192.0.2.1"), T0)
    rl.check(source_address("192.0.2.2"), T0)
    assert rl.check(source_address("192.0.2.1"), T0) is Admission.TRUNCATE
    assert rl.check(source_address("192.0.2.2"), T0) is Admission.TRUNCATE
    assert rl.check(source_address("192.0.2.1"), T0) is Admission.DROP
    assert rl.check(source_address("192.0.2.2"), T0) is Admission.DROP


def test_check_and_allow_share_the_bucket() -> None:
    rl = limiter(2)
    assert rl.allow(source_address("192.0.2.1"), T0)
    assert rl.check(source_address("192.0.2.1"), T0) is Admission.ALLOW
    assert not rl.allow(source_address("192.0.2.1"), T0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate_per_s": 0}, "rate_per_s"),
        ({"rate_per_s": 5, "burst": 0}, "burst"),
        ({"rate_per_s": 5, "slots": 1000}, "power of two"),
        ({"rate_per_s": 5, "slots": 0}, "power of two"),
        ({"rate_per_s": 5, "rotate_after_s": 0}, "rotate_after_s"),
    ],
)
def test_bad_arguments(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RateLimiter(**kwargs)  # type: ignore[arg-type]


def test_short_key_is_rejected() -> None:
    rl = RateLimiter(5, key_source=lambda size: b"short")
    with pytest.raises(ValueError, match="wrong number of bytes"):
        rl.allow(source_address("192.0.2.1"), T0)
