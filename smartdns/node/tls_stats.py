"""DoT and DoH figures on their way to /metrics: a process's report (JSON-able, also what a
worker sends the main process) and their totals over the processes of a node.

Aggregate numbers only, keyed by enum values; no peer, no server name.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from smartdns.core.counters import Handshake, Transport
from smartdns.node.metrics import TlsSample
from smartdns.serve.encrypted import EncryptedListeners


def tls_report(encrypted: EncryptedListeners) -> dict[str, Any]:
    connections = encrypted.connections
    return {
        "open": {kind.value: count for kind, count in connections.open_by_kind().items()},
        "accepted": {kind.value: count for kind, count in connections.accepted.items()},
        "shed": {kind.value: count for kind, count in connections.shed.items()},
        "handshakes": {o.value: count for o, count in encrypted.handshakes.outcomes.items()},
        "not_after": encrypted.not_after,
    }


@dataclass
class TlsTotals:
    """Reports added up: counters summed; open connections summed and the earliest notAfter
    taken over the reports added with their gauges (the running processes)."""

    reported: bool = False
    open: Counter[Transport] = field(default_factory=Counter)
    accepted: Counter[Transport] = field(default_factory=Counter)
    shed: Counter[Transport] = field(default_factory=Counter)
    handshakes: Counter[Handshake] = field(default_factory=Counter)
    not_after: float | None = None

    def add(self, report: dict[str, Any] | None, *, gauges: bool = True) -> None:
        """Add one report; `gauges` False for a process that has exited (its counters
        still count, its open connections and certificate no longer)."""
        if not report:
            return
        self.reported = True
        for name in ("accepted", "shed"):
            counts: Counter[Transport] = getattr(self, name)
            for kind, count in report.get(name, {}).items():
                counts[Transport(kind)] += int(count)
        for outcome, count in report.get("handshakes", {}).items():
            self.handshakes[Handshake(outcome)] += int(count)
        if not gauges:
            return
        for kind, count in report.get("open", {}).items():
            self.open[Transport(kind)] += int(count)
        not_after = report.get("not_after")
        if not_after is not None and (self.not_after is None or not_after < self.not_after):
            self.not_after = float(not_after)

    def counters(self) -> TlsTotals:
        """A copy without the gauges: what retired processes add to the running ones."""
        return TlsTotals(
            self.reported,
            accepted=self.accepted.copy(),
            shed=self.shed.copy(),
            handshakes=self.handshakes.copy(),
        )

    def sample(self, now: float) -> TlsSample | None:
        """The /metrics view at `now` (epoch seconds); None when no process serves TLS."""
        if not self.reported:
            return None
        expiry_s = None if self.not_after is None else self.not_after - now
        return TlsSample(expiry_s, self.open, self.accepted, self.shed, self.handshakes)
