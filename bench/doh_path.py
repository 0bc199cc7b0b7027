#!/usr/bin/env python3
"""Per-request cost of DoH's HTTP/2 path in-process: H2Session, read_request, dns_response.

    python3 bench/doh_path.py                 # this tree
    python3 bench/doh_path.py --tree /tmp/old # another checkout (`git archive REV smartdns`)

GET requests as h2load sends them (`:authority` and `user-agent` indexed once, `:path` a
Huffman-coded literal never indexed), 37 streams per read, each answered with an A reply;
no TLS, no sockets, no pipeline (bench/query_path.py measures that). Two runs: one cycles
through 1,000 paths (the caches of decoded paths and reply headers hit), one through 20,000
(they miss: neither holds more than 4,096). Best of `--repeat` runs; on a shared machine
alternate trees a few times.
"""

from __future__ import annotations

import argparse
import base64
import struct
import sys
import time
from pathlib import Path
from typing import Any

READ_STREAMS = 37  # h2load -m with the run.py defaults (300 in flight over 8 connections)
CYCLES = {"paths seen before (1,000 names)": 1000, "paths not seen (20,000 names)": 20_000}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("-n", "--reads", type=int, default=600, help="reads per run")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.tree.resolve()))
    for name, names in CYCLES.items():
        best = min(_run(names, args.reads) for _ in range(args.repeat))
        print(f"{name:36s} {best * 1e6:6.2f} us per request")


def _frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return (
        struct.pack(">L", len(payload))[1:]
        + bytes((kind, flags))
        + struct.pack(">L", stream_id)
        + payload
    )


def _query(number: int) -> bytes:
    labels = (b"www%d" % number, b"example", b"org")
    name = b"".join(bytes((len(label),)) + label for label in labels) + b"\0"
    return struct.pack(">6H", 0, 0x0100, 1, 0, 0, 0) + name + b"\0\1\0\1"


def _reply(query: bytes) -> bytes:
    answer = b"\xc0\x0c\0\1\0\1\0\0\x0e\x10\0\x04\xc0\0\2\1"
    return query[:2] + b"\x81\x80\0\1\0\1\0\0\0\0" + query[12:] + answer


def _blocks(names: int) -> tuple[bytes, list[bytes]]:
    """The first request's header block, then one per path: nghttp2's choices."""
    import hpack
    from hpack.huffman import HuffmanEncoder
    from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

    huffman = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
    paths = [
        b"/dns-query?dns=" + base64.urlsafe_b64encode(_query(n)).rstrip(b"=") for n in range(names)
    ]
    first = hpack.Encoder().encode(
        [
            (b":method", b"GET"),
            (b":path", paths[0]),
            (b":scheme", b"https"),
            (b":authority", b"dns.example.net"),
            (b"user-agent", b"h2load nghttp2/1.52.0"),
        ]
    )
    blocks = []
    for path in paths:
        coded = huffman.encode(path)
        length = hpack.hpack.encode_integer(len(coded), 7)
        length[0] |= 0x80  # H: Huffman-coded
        # :method GET, :path (name index 4, literal without indexing), :scheme https,
        # then the two fields the first block put in the dynamic table
        blocks.append(b"\x82\x04" + bytes(length) + coded + b"\x87\xbf\xbe")
    return first, blocks


def _run(names: int, reads: int) -> float:
    """Thread CPU seconds per request over `reads` reads."""
    from smartdns.serve.doh_h2 import H2Session
    from smartdns.serve.doh_request import dns_response, error_response, read_request

    first, blocks = _blocks(names)
    session: Any = H2Session(0.0, 10.0)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b"")
    session.receive(preface + _frame(8, 0, 0, struct.pack(">L", 2**30)), 0.0)
    session.receive(_frame(1, 5, 1, first), 0.0)
    session.respond(1, error_response(404), 0.0)
    session.data_to_send()
    reads_data = []
    stream_id, index = 3, 0
    for _ in range(reads):
        frames = []
        for _ in range(READ_STREAMS):
            frames.append(_frame(1, 5, stream_id, blocks[index % names]))
            stream_id += 2
            index += 1
        reads_data.append(b"".join(frames))
    replies = [_reply(_query(number)) for number in range(names)]
    answered = 0
    window = _frame(8, 0, 0, struct.pack(">L", 2**20))
    started = time.thread_time()
    for number, data in enumerate(reads_data):
        for ref, request in session.receive(data, 0.0):
            read_request(request)  # the DNS message, as serve.doh reads it
            reply = replies[(ref - 3) // 2 % names]  # the pipeline's part, prepared
            session.respond(ref, dns_response(reply), 0.0)
            answered += 1
        session.data_to_send()
        if number % 20 == 0:
            session.receive(window, 0.0)  # the client reads its answers
    return (time.thread_time() - started) / answered


if __name__ == "__main__":
    main()
