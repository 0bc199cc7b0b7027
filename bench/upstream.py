"""The benchmark's upstream: the project's FakeUpstream (tests/fake_upstream.py) in its own
process, answering `n<i>.bench-upstream.example.org A` for the case (b) names.

    python bench/upstream.py --names 1000 --port-file PATH

Writes the port it bound (UDP and TCP on 127.0.0.1) to PATH once it answers, then serves until
SIGTERM or SIGINT. Its speed matters only for the warm-up pass: case (b) is measured cached.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.tools import UPSTREAM_TTL, upstream_address, upstream_names  # noqa: E402
from tests.fake_upstream import FakeUpstream  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", type=int, default=1000)
    parser.add_argument("--port-file", type=Path, required=True)
    args = parser.parse_args()

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    upstream = FakeUpstream()
    upstream.respond_opt = True
    for index, name in enumerate(upstream_names(args.names)):
        upstream.add(name, "A", [f"{name}. {UPSTREAM_TTL} IN A {upstream_address(index)}"])
    with upstream:
        temporary = args.port_file.with_suffix(".tmp")
        temporary.write_text(str(upstream.port))
        temporary.replace(args.port_file)
        while not stop.wait(1.0):
            upstream.clear()  # it records every query; keep memory flat
    return 0


if __name__ == "__main__":
    sys.exit(main())
