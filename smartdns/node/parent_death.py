"""A worker dies with its main process: the kernel's parent-death signal, set first thing.

Stdlib only, imported by `smartdns.__main__` before anything else: the signal must be armed
before the worker does any work, so not even a slow import can leave an orphan serving.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Final

PARENT_PID_ENV: Final = "SMARTDNS_WORKER_PARENT"
_PR_SET_PDEATHSIG: Final = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    """In a worker (started with PARENT_PID_ENV), have the kernel SIGKILL this process when
    its parent dies, and exit at once if the parent already died before that was armed.

    SIGKILL, not SIGTERM: a worker has nothing to save (the main process owns every write),
    and a worker whose event loop is stuck would never act on SIGTERM. The orderly way out is
    the main process's SIGTERM and drain; this is for a main process that died without one.
    The race: the parent can die between fork and prctl, and then no signal comes; the
    process has been reparented by then, so the parent pid tells. (The signal follows the
    thread that forked: the main process starts workers from its event loop's thread, which
    lives as long as the process.)
    """
    expected = os.environ.get(PARENT_PID_ENV)
    if expected is None:
        return
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"prctl(PR_SET_PDEATHSIG): {os.strerror(error)}")
    if os.getppid() != int(expected):
        os._exit(1)
