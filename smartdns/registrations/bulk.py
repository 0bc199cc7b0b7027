"""BulkWork: the process's mode while a large registration set is decoded, validated, stored
or loaded. No I/O; used from the event loop thread only.
"""

from __future__ import annotations

import gc
import sys
from typing import Final


class BulkWork:
    """The process's mode while a large registration set is decoded, validated, stored or
    loaded (`with BULK_WORK:`; nests across tasks). Used from the event loop thread only.

    A million-entry snapshot allocates millions of tracked objects; each full collection
    over them takes seconds with the GIL held, on whichever thread triggers it, which stalls
    the DNS event loop (and more than doubles the validation time). Nothing built there is
    cyclic, so reference counting frees it all: cyclic collection is off until the last
    user ends. And the work runs in threads that hold the GIL the loop thread needs several
    times per query, each time for up to the switch interval (5 ms by default): a tenth of
    it meanwhile took the worst DNS latency during a 1M-entry apply from ~100 ms to ~20 ms.
    """

    SWITCH_INTERVAL_S: Final = 0.0005

    def __init__(self) -> None:
        self._users = 0
        self._resume_collector = False
        self._switch_interval_s = 0.0

    def __enter__(self) -> None:
        if self._users == 0:
            self._resume_collector = gc.isenabled()
            gc.disable()
            self._switch_interval_s = sys.getswitchinterval()
            sys.setswitchinterval(self.SWITCH_INTERVAL_S)
        self._users += 1

    def __exit__(self, *_exc: object) -> None:
        self._users -= 1
        if self._users == 0:
            sys.setswitchinterval(self._switch_interval_s)
            if self._resume_collector:
                gc.enable()


BULK_WORK: Final = BulkWork()
