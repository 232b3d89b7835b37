"""The HTTP/2 front end's request decoder decodes exactly what hpack's own decoder decodes."""

from __future__ import annotations

import random

import pytest
from hpack import Decoder, Encoder, NeverIndexedHeaderTuple
from hpack.exceptions import HPACKDecodingError, InvalidTableIndex, OversizedHeaderListError

from rpxy.front.h2 import _RequestDecoder


def request_blocks(seed: int) -> list[bytes]:
    """A client's successive header blocks: dynamic table growth, eviction, huffman, never-indexed."""
    rng = random.Random(seed)
    encoder = Encoder()
    encoder.header_table_size = rng.choice((256, 4096))
    blocks = []
    for n in range(60):
        fields = [
            (b":method", rng.choice((b"GET", b"POST", b"PUT"))),
            (b":scheme", b"https"),
            (b":path", b"/item/%d?x=%d" % (rng.randrange(20), n)),
            (b":authority", b"example.com"),
            (b"user-agent", b"test/1.0"),
            (b"x-custom-%d" % rng.randrange(200), b"v" * rng.randrange(1, 90)),
        ]
        if rng.random() < 0.3:
            fields.append(NeverIndexedHeaderTuple(b"authorization", b"Bearer %d" % n))
        if n == 30:
            encoder.header_table_size = 128  # a size update at the start of the next block
        blocks.append(encoder.encode(fields, huffman=rng.random() < 0.5))
    return blocks


@pytest.mark.parametrize("seed", range(8))
def test_same_fields_as_hpack_for_a_whole_connection(seed):
    ours, theirs = _RequestDecoder(), Decoder()
    for block in request_blocks(seed):
        expected = [(bytes(name), bytes(value)) for name, value in theirs.decode(block, raw=True)]
        assert [(name, value) for name, value in ours.decode(block, raw=True)] == expected
    assert list(ours.header_table.dynamic_entries) == list(theirs.header_table.dynamic_entries)


def test_multi_byte_index_goes_to_hpack():
    encoder = Encoder()
    ours, theirs = _RequestDecoder(), Decoder()
    for n in range(120):  # fill the dynamic table so its oldest entry sits past index 127
        block = encoder.encode([(b"x-n-%d" % n, b"v")])
        ours.decode(block, raw=True)
        theirs.decode(block, raw=True)
    oldest = tuple(theirs.header_table.dynamic_entries[-1])
    block = encoder.encode([oldest])
    assert block[0] == 0xFF  # an index of 127 or more: a multi-byte integer
    assert ours.decode(block, raw=True) == [oldest]


@pytest.mark.parametrize(
    ("block", "error"),
    [
        (b"\x80", InvalidTableIndex),  # index 0
        (b"\xbe", InvalidTableIndex),  # index 62, dynamic table empty
        (b"\x82\x20", HPACKDecodingError),  # table size update after a field
    ],
)
def test_bad_blocks_raise_hpack_errors(block, error):
    with pytest.raises(error):
        _RequestDecoder().decode(block, raw=True)


def test_header_list_cap_applies_to_indexed_fields():
    decoder = _RequestDecoder(max_header_list_size=100)
    with pytest.raises(OversizedHeaderListError):
        decoder.decode(b"\x82" * 10, raw=True)  # ten ":method GET": 10 x 42 bytes
