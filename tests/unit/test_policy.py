"""policy: SPEC 2's table, row by row."""

from __future__ import annotations

import pytest

from smartdns.config.model import Unregistered
from smartdns.core.policy import Verdict, decide

A, AAAA, MX, TXT, SVCB, HTTPS, ANY = 1, 28, 15, 16, 64, 65, 255
IN, CH, HS = 1, 3, 4
V = Verdict


@pytest.mark.parametrize(
    ("authorized", "in_zone", "has_v6", "qtype", "qclass", "unregistered", "verdict"),
    [
        (True, True, False, A, IN, Unregistered.REFUSE, V.UNBLOCK),
        (True, True, False, ANY, IN, Unregistered.REFUSE, V.UNBLOCK),
        (True, True, True, AAAA, IN, Unregistered.REFUSE, V.UNBLOCK),
        (True, True, False, AAAA, IN, Unregistered.REFUSE, V.NODATA),
        (True, True, True, HTTPS, IN, Unregistered.REFUSE, V.NODATA),
        (True, True, True, SVCB, IN, Unregistered.REFUSE, V.NODATA),
        (True, True, False, MX, IN, Unregistered.REFUSE, V.FORWARD),
        (True, True, False, TXT, IN, Unregistered.REFUSE, V.FORWARD),
        (True, True, False, A, HS, Unregistered.REFUSE, V.FORWARD),
        (True, False, False, A, IN, Unregistered.REFUSE, V.FORWARD),
        (True, False, False, HTTPS, IN, Unregistered.REFUSE, V.FORWARD),
        (True, True, False, TXT, CH, Unregistered.REFUSE, V.REFUSE),
        (False, False, False, TXT, CH, Unregistered.RESOLVE, V.REFUSE),
        (False, False, False, TXT, CH, Unregistered.DROP, V.REFUSE),
        (False, True, False, A, IN, Unregistered.REFUSE, V.REFUSE),
        (False, True, False, A, IN, Unregistered.DROP, V.DROP),
        (False, True, False, A, IN, Unregistered.RESOLVE, V.FORWARD),
        (False, False, False, A, IN, Unregistered.RESOLVE, V.FORWARD),
    ],
)
def test_decide(
    authorized: bool,
    in_zone: bool,
    has_v6: bool,
    qtype: int,
    qclass: int,
    unregistered: Unregistered,
    verdict: Verdict,
) -> None:
    assert decide(authorized, in_zone, has_v6, qtype, qclass, unregistered) is verdict
