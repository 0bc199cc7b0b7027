"""h2_hpack: RFC 7541's own examples, agreement with the `hpack` library's encoder over a
connection's worth of blocks, the bounds, and the Huffman cache's bound."""

from __future__ import annotations

import random

import hpack
import pytest

from smartdns.serve import h2_hpack
from smartdns.serve.h2_hpack import HeaderListTooLarge, HpackDecoder, HpackError

# RFC 7541 Appendix C.3: three requests on one connection, without Huffman coding
C3 = [
    (
        "828684410f7777772e6578616d706c652e636f6d",
        [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":path", b"/"),
            (b":authority", b"www.example.com"),
        ],
    ),
    (
        "828684be58086e6f2d6361636865",
        [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":path", b"/"),
            (b":authority", b"www.example.com"),
            (b"cache-control", b"no-cache"),
        ],
    ),
    (
        "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
        [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":path", b"/index.html"),
            (b":authority", b"www.example.com"),
            (b"custom-key", b"custom-value"),
        ],
    ),
]
# Appendix C.4.1: the first of them with Huffman coding
C41 = "828684418cf1e3c2e5f23a6ba0ab90f4ff"


def test_the_rfc_examples_decode() -> None:
    decoder = HpackDecoder(8192)
    for block, fields in C3:
        assert decoder.decode(bytes.fromhex(block)) == fields
    assert HpackDecoder(8192).decode(bytes.fromhex(C41)) == C3[0][1]


def test_blocks_from_the_hpack_encoder_decode_alike() -> None:
    """A connection's worth of blocks: indexing, eviction (small table), Huffman, paths."""
    chance = random.Random(7)
    encoder = hpack.Encoder()
    decoder = HpackDecoder(8192)
    for block_number in range(300):
        fields = [
            (b":method", chance.choice([b"GET", b"POST"])),
            (b":scheme", b"https"),
            (b":authority", b"dns.example.net"),
            (b":path", b"/dns-query?dns=" + bytes(chance.choices(b"AZaz09-_", k=40))),
            (b"x-%d" % chance.randrange(60), b"v" * chance.randrange(200)),
        ]
        if block_number == 100:
            encoder.header_table_size = 256  # a size update at the start of the block
        assert decoder.decode(encoder.encode(fields)) == fields


@pytest.mark.parametrize(
    "block",
    [
        "80",  # index 0
        "c0",  # an index past the static table with the dynamic one empty
        "0f8f",  # name index 30 + 15, dynamic, empty
        "000a6e616d65",  # a name shorter than its length says
        "ff80808080808001",  # an integer past 2^28
        "ff",  # an integer cut off
        "8220",  # a table size update after a field
        "3fe21f",  # a table size update over 4096
        "0001618100",  # a Huffman string whose padding is not the EOS prefix
        "00016184ffffffff",  # a Huffman string with EOS in it
    ],
)
def test_undecodable_blocks_raise(block: str) -> None:
    with pytest.raises(HpackError):
        HpackDecoder(8192).decode(bytes.fromhex(block))


def test_a_header_list_over_the_bound_raises() -> None:
    fields = [(b"x-long", b"v" * 100)] * 5
    block = hpack.Encoder().encode(fields)
    assert len(HpackDecoder(5 * (6 + 100 + 32)).decode(block)) == 5
    with pytest.raises(HeaderListTooLarge):
        HpackDecoder(5 * (6 + 100 + 32) - 1).decode(block)


def test_a_table_size_update_evicts() -> None:
    decoder = HpackDecoder(8192)
    decoder.decode(bytes.fromhex(C3[0][0]))  # :authority enters the dynamic table (index 62)
    assert decoder.decode(bytes.fromhex("be")) == [(b":authority", b"www.example.com")]
    with pytest.raises(HpackError):
        decoder.decode(bytes.fromhex("20be"))  # size 0: the entry is gone


def test_the_huffman_cache_is_bounded() -> None:
    encoder = hpack.Encoder()
    decoder = HpackDecoder(8192)
    for number in range(h2_hpack._HUFFMAN_CACHED + 10):
        path = b"/dns-query?dns=%d" % number
        block = encoder.encode([(b":path", path)], huffman=True)
        assert decoder.decode(block) == [(b":path", path)]
    assert 0 < len(h2_hpack._huffman_cache) <= h2_hpack._HUFFMAN_CACHED
