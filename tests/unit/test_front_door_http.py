"""The front door's HTTP/1.1 pieces that need no socket: heads, framing, the chunked end."""

from __future__ import annotations

import pytest

from metal_agent.frontdoor.http1 import BadRequest, ChunkedEnd, Request, parse_head, upstream_request

BODY = b"5\r\nhello\r\n1a;ext=1\r\n" + b"x" * 26 + b"\r\n0\r\nX-Trailer: 1\r\n\r\n"


@pytest.mark.parametrize("cut", [1, 2, 3, 7, len(BODY)])
def test_the_chunked_end_is_found_however_the_reads_fall(cut):
    scanner = ChunkedEnd()
    pieces = [BODY[i:i + cut] for i in range(0, len(BODY), cut)]
    ends = [scanner.feed(p) for p in pieces]
    assert ends[:-1] == [None] * (len(pieces) - 1)
    assert ends[-1] == len(pieces[-1])


def test_the_chunked_end_ignores_what_follows_it():
    assert ChunkedEnd().feed(b"0\r\n\r\nHTTP/1.1 200 OK") == 5


def test_a_chunk_holding_line_breaks_is_data_not_framing():
    scanner = ChunkedEnd()
    assert scanner.feed(b"6\r\n\n\n\n\n\r\n\r\n") is None
    assert scanner.feed(b"0\r\n\r\n") == 5


def test_a_bad_chunk_size_is_an_error():
    with pytest.raises(ValueError):
        ChunkedEnd().feed(b"zz\r\n")


def test_heads_parse_and_bad_header_lines_are_refused():
    start, headers = parse_head(b"POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n")
    assert start == b"POST /v1/x HTTP/1.1"
    assert headers == [(b"host", b"a"), (b"content-length", b"2")]
    with pytest.raises(BadRequest):
        parse_head(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")


def test_the_upstream_request_drops_hop_by_hop_headers_and_frames_the_body_itself():
    request = Request(b"POST", b"/v1/chat/completions", b"HTTP/1.1",
                      [(b"host", b"mac:31234"), (b"connection", b"keep-alive"), (b"transfer-encoding", b"chunked"),
                       (b"expect", b"100-continue"), (b"authorization", b"Bearer k")], body=b"{}")
    sent = upstream_request(request, b"127.0.0.1:4000")
    assert sent == (b"POST /v1/chat/completions HTTP/1.1\r\nhost: mac:31234\r\nauthorization: Bearer k\r\n"
                    b"content-length: 2\r\n\r\n{}")
