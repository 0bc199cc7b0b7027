"""ZoneMatcher: which unblock zone, if any, a query name falls in. Pure; no I/O.

Names are compared in lower-cased wire form, so matching happens on label boundaries by
construction: `notnetflix.com` never matches `netflix.com`, and a label that contains a dot
cannot fake a boundary.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class ZoneMatcher(Generic[T]):
    """Maps zone → value; `match` returns the value of the most specific zone containing a
    name. Zones named in `exact` contain only themselves, not the names below them."""

    __slots__ = ("_whole", "_zones")

    def __init__(self, zones: Mapping[bytes, T], exact: Collection[bytes] = ()) -> None:
        """`zones` keys are lower-cased wire-format names (see wire.encode_name)."""
        self._whole = dict(zones)  # what a name equal to the key matches
        self._zones = {name: value for name, value in zones.items() if name not in exact}

    def __len__(self) -> int:
        return len(self._whole)

    def match(self, qname: bytes) -> T | None:
        """Value of the longest zone that equals `qname` or is a suffix of it on a label
        boundary (an `exact` zone only when equal). `qname` is lower-cased wire format, as
        in `Query.qname`. One dictionary lookup per label, as without exact zones."""
        whole = self._whole
        if not whole:
            return None
        value = whole.get(qname)
        if value is not None:
            return value
        end = len(qname) - 1  # the root label: an unblock zone is never the root
        offset = qname[0] + 1 if end > 0 else end
        zones = self._zones
        while offset < end:
            value = zones.get(qname[offset:])
            if value is not None:
                return value
            offset += qname[offset] + 1
        return None
